"""Server optimizers, run redundantly and identically on every rank after the Allreduce.

FedAvg replaces the global model by the weighted average of the clients' models. The
adaptive variants (Reddi et al., "Adaptive Federated Optimization", ICLR 2021) treat
``d = global - average`` as a pseudo-gradient and step the global model with it:

    avgm:    m = beta * m + d                              x -= lr * m
    adagrad: v = v + d^2                                   x -= lr * m / (sqrt(v) + tau)
    yogi:    v = v - (1 - beta2) * d^2 * sign(v - d^2)     (m as below)
    adam:    v = beta2 * v + (1 - beta2) * d^2
    with     m = beta1 * m + (1 - beta1) * d  for adagrad, yogi and adam, v starting at tau^2.

State lives in flat fp32 buffers like the parameters and persists across rounds; every
rank starts from the same state and applies the same arithmetic, so no rank drifts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SERVER_OPTIMIZERS = ("fedavg", "avgm", "adam", "yogi", "adagrad")


@dataclass(frozen=True)
class ServerHyper:
    lr: float = 1.0
    momentum: float = 0.9  # avgm
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3


class ServerOptimizer:
    """Applies one server step from the round's starting global model ``start`` and the
    clients' weighted sum, writing the new global model into ``params``."""

    def __init__(self, name: str, hyper: ServerHyper, like: torch.Tensor) -> None:
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {name!r}")
        self.name, self.hyper = name, hyper
        self.m = torch.zeros_like(like) if name != "fedavg" else None
        self.v = (
            torch.full_like(like, hyper.tau**2) if name in ("adam", "yogi", "adagrad") else None
        )

    def step(
        self,
        params: torch.Tensor,
        start: torch.Tensor,
        weighted_sum: torch.Tensor,
        total_weight: float,
    ) -> None:
        if not total_weight > 0:
            raise RuntimeError("no client contributed to this round (total FedAvg weight is 0)")
        if self.name == "fedavg":
            # Exactly the weighted average: one divide straight into the parameters.
            torch.div(weighted_sum, total_weight, out=params)
            return
        h = self.hyper
        # d = global - average, computed in the payload (it is rebuilt next round).
        d = weighted_sum.div_(total_weight).neg_().add_(start)
        params.copy_(start)
        if self.name == "avgm":
            self.m.mul_(h.momentum).add_(d)
            params.add_(self.m, alpha=-h.lr)
            return
        self.m.mul_(h.beta1).add_(d, alpha=1 - h.beta1)
        d_squared = d.mul_(d)  # d is no longer needed on its own
        if self.name == "adagrad":
            self.v.add_(d_squared)
        elif self.name == "adam":
            self.v.mul_(h.beta2).add_(d_squared, alpha=1 - h.beta2)
        else:  # yogi
            sign = torch.sign(self.v - d_squared)
            self.v.addcmul_(d_squared, sign, value=-(1 - h.beta2))
        params.addcdiv_(self.m, self.v.sqrt().add_(h.tau), value=-h.lr)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint (empty for FedAvg, which keeps no state)."""
        return {k: t for k, t in (("m", self.m), ("v", self.v)) if t is not None}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        mine = self.state()
        if set(state) != set(mine):
            raise ValueError(
                f"server state holds {sorted(state)}, {self.name} needs {sorted(mine)}"
            )
        for name, tensor in mine.items():
            tensor.copy_(state[name])
