"""Local training of one federated client, starting from the round's global model."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmpi import precision
from fedmpi.config import Config
from fedmpi.device_rows import DeviceRows
from fedmpi.flat import FlatParameters
from fedmpi.hooks import RoundContext, RoundHook


@dataclass
class ClientResult:
    loss_sum: float  # sum of per-batch mean losses x batch sizes, over all local epochs
    samples_seen: int  # examples processed, over all local epochs
    stopped: bool  # cut short by a stop request (preemption): the round is void


def client_seed(seed: int, client: int, round_: int) -> int:
    """A client's RNG stream depends on (seed, client, round) only: never on rank or -np."""
    return int(np.random.SeedSequence([seed, client, round_]).generate_state(1)[0])


def make_optimizer(cfg: Config, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # fused AdamW steps MiniLM ~10x faster than the default implementation on CPU.
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def reset_state(optimizer: torch.optim.Optimizer) -> bool:
    """Put ``optimizer`` back in a fresh one's state, in place, where a fresh state is all
    zeros: AdamW's step count and both moments (created at zero by the first step) are
    zeroed, so the next step computes bit for bit what a new AdamW's first would. Returns
    False (nothing touched) for an optimizer whose state does not start at zero."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return False
    tensors = [value for state in optimizer.state.values() for value in state.values()]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    if tensors:
        torch._foreach_zero_(tensors)
    return True


class LocalOptimizers:
    """Each client's local optimizer: fresh every round, or, with ``--keep-local-opt``,
    one per client kept across rounds (and checkpointed, as flat arrays per state key).

    A "fresh" AdamW is one optimizer whose state is zeroed in place for each client
    (``reset_state``): the same numbers as a new one, without allocating, page-faulting
    and freeing two model-sized moments per client, which cost cross-device runs of many
    one-step clients most of a step each (docs/benchmarks.md, per-client overhead)."""

    def __init__(self, cfg: Config, params: list[nn.Parameter]) -> None:
        self.cfg, self.params = cfg, params
        self.kept: dict[int, torch.optim.Optimizer] = {}
        self.shared: torch.optim.Optimizer | None = None  # reused, reset, for every client

    def for_client(self, client: int) -> torch.optim.Optimizer:
        if not self.cfg.keep_local_opt:
            if self.shared is None or not reset_state(self.shared):
                self.shared = make_optimizer(self.cfg, self.params)
            return self.shared
        if client not in self.kept:
            self.kept[client] = make_optimizer(self.cfg, self.params)
        return self.kept[client]

    def release(self) -> None:
        """Free the shared optimizer's state once a rank's clients of the round have
        trained: held through the Allreduce and the evaluation, it raised the peak by 100
        (4 clients) to 170 MiB (200 clients) a rank on mimalloc. Kept optimizers stay.
        The state is cleared, not just dropped: the first torch optimizer of a process
        stays referenced (a cycle) until the garbage collector runs."""
        if self.shared is not None:
            self.shared.state.clear()
        self.shared = None

    def state_arrays(self, client: int) -> dict[str, np.ndarray] | None:
        """The client's optimizer state, each key's tensors concatenated in parameter
        order (None: the client has no state yet)."""
        optimizer = self.kept.get(client)
        state = optimizer.state_dict()["state"] if optimizer is not None else {}
        if not state:
            return None
        keys = sorted(state[0])
        return {
            key: np.concatenate(
                [state[i][key].detach().cpu().reshape(-1).numpy() for i in range(len(state))]
            )
            for key in keys
        }

    def load_state(self, client: int, arrays: dict[str, np.ndarray]) -> None:
        """Restore ``state_arrays``: per-parameter tensors (moments) or scalars (step)."""
        optimizer = self.for_client(client)
        sizes = [p.numel() for p in self.params]
        state: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(self.params))}
        for key, flat in arrays.items():
            scalar = flat.size == len(self.params)
            pieces = np.split(flat, len(self.params) if scalar else np.cumsum(sizes)[:-1])
            for i, (piece, param) in enumerate(zip(pieces, self.params, strict=True)):
                value = torch.from_numpy(piece.copy())
                state[i][key] = value.reshape(()) if scalar else value.reshape(param.shape)
        saved = optimizer.state_dict()
        optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def epoch_batches(
    lengths: torch.Tensor, batch_size: int, group_by_length: bool, generator: torch.Generator
) -> list[torch.Tensor]:
    """One epoch's batches of row indices, each row exactly once, in a seeded random order.

    With ``group_by_length``, rows are shuffled, sorted by length within windows of 50
    batches, cut into batches, and the batches shuffled: batches of similar lengths waste
    little compute on padding, while the order stays random.
    """
    order = torch.randperm(len(lengths), generator=generator)
    if group_by_length:
        window = 50 * batch_size
        order = torch.cat(
            [chunk[torch.argsort(lengths[chunk], stable=True)] for chunk in order.split(window)]
        )
    batches = list(order.split(batch_size))
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
    return batches


class FedProx(RoundHook):
    """FedProx (Li et al. 2020): every local step adds the gradient of
    mu/2 ||w - w_global||^2, mu (w - w_global), pulling each client toward the round's
    global model."""

    def __init__(self, flat: FlatParameters, mu: float) -> None:
        self.flat, self.mu = flat, mu
        self.anchor: list[torch.Tensor] | None = None  # the round's start, shaped as params

    def start(self, ctx: RoundContext) -> None:
        if self.anchor is None:  # the round keeps its start model in one buffer
            self.anchor = self.flat.views(ctx.start)

    def adjust_gradients(self) -> None:
        for param, global_value in zip(self.flat.params, self.anchor, strict=True):
            if param.grad is not None:
                param.grad.add_(param.detach(), alpha=self.mu).sub_(global_value, alpha=self.mu)


def train_client(
    model: nn.Module,
    data: DeviceRows,
    cfg: Config,
    seed: int,
    optimizer: torch.optim.Optimizer,
    adjust_gradients: Callable[[], None] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    compute: str | None = None,
) -> ClientResult:
    """Fine-tune ``model`` in place on ``data`` for ``cfg.local_epochs`` epochs.

    ``seed`` fixes the data order and the dropout masks; ``adjust_gradients()`` runs at
    every step between the backward pass and the optimizer step, on true (unscaled)
    gradients (the round's hooks, e.g. FedProx's term); ``progress(step, total, loss)`` is
    called at most every 15 seconds for long rounds; ``should_stop()`` is checked after every step;
    ``compute`` is the autocast precision (default ``cfg.precision``).
    """
    model.train()
    device = str(data.labels.device)
    compute = compute or cfg.precision
    scaler = precision.grad_scaler(compute, device)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    n = len(data)
    steps_per_epoch = -(-n // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.local_epochs
    loss_sum = torch.zeros((), dtype=torch.float64, device=data.labels.device)
    step, last_report = 0, time.monotonic()
    for _ in range(cfg.local_epochs):
        for index in epoch_batches(
            data.lengths.cpu(), cfg.batch_size, cfg.group_by_length, generator
        ):
            inputs, labels = data.batch(index.to(data.labels.device))
            with precision.autocast(compute, device):
                loss = model(**inputs, labels=labels).loss
            if scaler is None:
                loss.backward()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)  # true gradients, for the hooks below
            if adjust_gradients is not None:
                adjust_gradients()
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().double() * labels.numel()
            step += 1
            if progress is not None and time.monotonic() - last_report > 15:
                progress(step, total_steps, float(loss.detach()))
                last_report = time.monotonic()
            if should_stop():
                return ClientResult(float(loss_sum), n * cfg.local_epochs, stopped=True)
    return ClientResult(float(loss_sum), n * cfg.local_epochs, stopped=False)
