"""FedAvg over MPI: one in-place Allreduce of ``[sum w_k*theta_k | sum w_k | metric sums]``.

Each rank accumulates its clients' weighted parameters into one payload buffer; a single
``Allreduce(IN_PLACE, SUM)`` with the buffer protocol (no pickling) then gives every rank
the same sums, and every rank divides by the same total weight: all ranks leave the round
with bit-identical global parameters and no rank acts as a server.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from mpi4py import MPI

from fedmpi.comm import World

CUDA_AWARE_ENV = "FEDMPI_CUDA_AWARE_MPI"
CHUNK_BYTES = int(os.environ.get("FEDMPI_ALLREDUCE_CHUNK_MB", "16")) * 2**20


class WeightedAllreduce:
    """The round's aggregation buffer: accumulate clients locally, then reduce once.

    On CPU the payload is handed to MPI as a zero-copy numpy view. On GPU it is staged
    through one pinned host buffer allocated once, unless ``FEDMPI_CUDA_AWARE_MPI=1``
    says the MPI library reads device memory, in which case the CUDA tensor goes to MPI
    directly.
    """

    def __init__(
        self,
        world: World,
        numel: int,
        device: torch.device | str,
        n_metrics: int,
        staged: bool | None = None,
        in_place: torch.Tensor | None = None,
    ):
        """``staged``: reduce through a host copy (default: on GPU unless CUDA-aware).

        ``in_place``: the parameters' own storage (``FlatParameters.storage`` with room for
        the tail) to use as the payload, saving a copy of the model, for a rank that
        trains at most one client per round: its ``add`` scales the parameters in place.
        """
        self.world = world
        self.numel = numel
        size = numel + 1 + n_metrics
        if in_place is not None and in_place.numel() != size:
            raise ValueError(f"in-place storage holds {in_place.numel()} floats, not {size}")
        self.in_place = in_place is not None
        self.payload = (
            in_place
            if in_place is not None
            else torch.zeros(size, dtype=torch.float32, device=device)
        )
        on_gpu = self.payload.device.type == "cuda"
        if staged is None:
            staged = on_gpu and os.environ.get(CUDA_AWARE_ENV, "0") != "1"
        self.host: torch.Tensor | None = None
        if staged:
            host = torch.empty_like(self.payload, device="cpu")
            # Pinned memory makes the device<->host copies DMA at full speed.
            self.host = host.pin_memory() if torch.cuda.is_available() else host
        # Metric sums are accumulated on the host and travel in the payload's fp32 tail
        # (counts stay exact below 2**24 examples per round).
        self.metrics = np.zeros(n_metrics, dtype=np.float64)
        self.weight = 0.0
        self.clients = 0

    def reset(self) -> None:
        """Start a round. The payload itself is overwritten by the first ``add``."""
        self.metrics[:] = 0.0
        self.weight = 0.0
        self.clients = 0

    def add(self, params: torch.Tensor, weight: float, metrics: Sequence[float]) -> None:
        """Add one client's parameters with its FedAvg weight, and its metric sums."""
        head = self.payload[: self.numel]
        if self.in_place and self.clients > 0:
            raise RuntimeError("an in-place payload takes one client per round")
        if self.clients == 0:
            torch.mul(params, weight, out=head)  # one pass instead of zero + add
        else:
            head.add_(params, alpha=weight)
        self.clients += 1
        self.weight += weight
        self.add_metrics(metrics)

    def add_metrics(self, values: Sequence[float]) -> None:
        """Add to the metric sums without a client (e.g. a rank's vote to stop)."""
        self.metrics += np.asarray(values, dtype=np.float64)

    def allreduce(self) -> tuple[torch.Tensor, float, np.ndarray]:
        """Sum over all ranks; returns (sum of w_k*theta_k, sum of w_k, metric sums)."""
        if self.clients == 0:
            self.payload.zero_()  # a rank without a client this round still joins, with zeros
        tail = np.concatenate(([self.weight], self.metrics)).astype(np.float32)
        self.payload[self.numel :].copy_(torch.from_numpy(tail))
        if self.host is not None:
            self.host.copy_(self.payload)
            self._reduce(self.host.numpy())
            self.payload.copy_(self.host, non_blocking=False)
        elif self.payload.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
            self._reduce(self.payload)
        else:
            self._reduce(self.payload.numpy())
        tail_sums = self.payload[self.numel :].cpu().numpy().astype(np.float64)
        return self.payload[: self.numel], float(tail_sums[0]), tail_sums[1:]

    def _reduce(self, buffer: np.ndarray | torch.Tensor) -> None:
        """In-place SUM in fixed slices of CHUNK_BYTES.

        Measured here (docs/benchmarks.md): 16 MB slices reduce 2.6-2.9x faster than one
        call over the whole buffer with MPICH, whose per-call temporary of the message's
        size is freshly mapped and page-faulted every time; slices reuse a small one.
        """
        step = CHUNK_BYTES // 4
        for start in range(0, len(buffer), step):
            self.world.comm.Allreduce(MPI.IN_PLACE, buffer[start : start + step], op=MPI.SUM)
