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

import numpy as np
import torch

from fedmpi.config import SERVER_OPTIMIZERS, Config
from fedmpi.flat import flat_zeros


@dataclass(frozen=True)
class ServerHyper:
    lr: float = 1.0
    momentum: float = 0.9  # avgm
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    @classmethod
    def from_config(cls, cfg: Config) -> ServerHyper:
        return cls(
            cfg.server_lr, cfg.server_momentum, cfg.server_beta1, cfg.server_beta2, cfg.server_tau
        )


class ServerOptimizer:
    """Applies one server step from the round's starting global model ``start`` and the
    clients' weighted sum, writing the new global model into ``params``."""

    def __init__(self, name: str, hyper: ServerHyper, like: torch.Tensor) -> None:
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {name!r}")
        self.name, self.hyper = name, hyper
        self.m = flat_zeros(like.numel(), like.device) if name != "fedavg" else None
        self.v = (
            flat_zeros(like.numel(), like.device).fill_(hyper.tau**2)
            if name in ("adam", "yogi", "adagrad")
            else None
        )

    def step(self, params: torch.Tensor, start: torch.Tensor, average: torch.Tensor) -> None:
        """Write the new global model into ``params``. ``average`` (the clients' weighted
        average) is used up: the adaptive optimizers compute the pseudo-gradient in it."""
        if self.name == "fedavg":
            if average.data_ptr() != params.data_ptr():  # in place, it already is the model
                params.copy_(average)
            return
        h = self.hyper
        d = average.neg_().add_(start)  # d = global - average, in the payload's memory
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

    def load_state(self, state: dict[str, np.ndarray | torch.Tensor]) -> None:
        mine = self.state()
        if set(state) != set(mine):
            raise ValueError(
                f"server state holds {sorted(state)}, {self.name} needs {sorted(mine)}"
            )
        for name, tensor in mine.items():
            tensor.copy_(torch.as_tensor(state[name]))
