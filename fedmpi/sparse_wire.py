"""A sparse wire for sparse updates: each rank's nonzero coordinates, Allgathered.

Why: with ``--compress topk:F`` or ``randk:F`` every client's update is F-sparse, yet the
fp32 Allreduce still carries the whole model. Measured on simulated nodes
(``bench/wire.py``, docs/benchmarks.md section 6), this wire took 0.26-0.30x the fp32
Allreduce's time for 1 % updates at 2-4 nodes on 1 Gbit/s links and 0.75-0.96x on 10
Gbit/s. On one node the dense Allreduce is as fast, so ``FEDMPI_WIRE`` chooses: ``auto``
(the default: sparse when the codec is sparse, the job spans more than one node and the
sparse volume is the smaller, see ``wire_choice``), ``sparse`` or ``dense``.

``SparseAllgather`` has ``WeightedAllreduce``'s interface and meaning: after
``allreduce()`` its head is ``sum_k (w_k / W) theta_k`` over the clients that arrived,
rescaled when weight went missing, on every rank bit-identically. It keeps the rank's
``sum_k (w_k / W) (theta_k - start)`` and the coordinates any client moved; the wire
carries those coordinates (int32) and values (fp32), every rank sums the ranks'
contributions in rank order, and the head is ``start * arrived / W`` plus that sum. The
result equals the dense path's up to fp32 rounding (the order of the additions differs,
as it does between ``-np`` values).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from mpi4py import MPI

from fedmpi.allreduce import TAIL, RoundSums, RoundTotals
from fedmpi.comm import World
from fedmpi.errors import UsageError

WIRE_ENV = "FEDMPI_WIRE"
WIRES = ("auto", "dense", "sparse")
CHUNK = 1 << 20  # values per pass when accumulating a client's update


def requested_wire(compress: str, env: dict[str, str]) -> str:
    """``FEDMPI_WIRE`` as given (``auto`` when unset); UsageError for a value that is not
    a wire, or ``sparse`` without a sparse codec."""
    value = env.get(WIRE_ENV, "auto")
    if value not in WIRES:
        raise UsageError(f"{WIRE_ENV}={value}: expected one of {', '.join(WIRES)}")
    if value == "sparse" and not is_sparse(compress):
        raise UsageError(f"{WIRE_ENV}=sparse needs --compress topk:F or randk:F")
    return value


def is_sparse(compress: str) -> bool:
    """Whether ``--compress`` leaves each update sparse (top-k, random-k)."""
    return str(compress).partition(":")[0] in ("topk", "randk")


def wire_choice(
    compress: str, world: World, clients_per_rank: int, env: dict[str, str] | None = None
) -> str:
    """``dense`` or ``sparse`` for this job, the same on every rank: what FEDMPI_WIRE asks
    for. ``auto`` means sparse for a sparse codec on more than one node while the ranks'
    moved coordinates stay fewer than the model's: a rank of c clients at fraction F
    sends up to c F n pairs of 8 bytes and receives every rank's, against the ring
    Allreduce's 2 (P - 1) / P x 4 n bytes, so while c F P < 1."""
    value = requested_wire(compress, dict(os.environ) if env is None else env)
    if value != "auto":
        return value
    if not is_sparse(compress) or world.local_size >= world.size:
        return "dense"
    fraction = float(str(compress).partition(":")[2])
    return "sparse" if clients_per_rank * fraction * world.size < 1 else "dense"


class SparseAllgather(RoundSums):
    """The round's aggregation over a sparse wire (see the module's docstring)."""

    def __init__(self, world: World, start: torch.Tensor) -> None:
        """``start``: the round's global model, which FederatedRound refreshes each round."""
        super().__init__()
        self.world, self.start = world, start
        self.numel = start.numel()
        self.sum = torch.zeros_like(start)  # sum_k (w_k / W) (theta_k - start), this rank
        self.moved = torch.zeros(self.numel, dtype=torch.bool, device=start.device)
        self.scratch = torch.empty(min(CHUNK, self.numel), dtype=start.dtype, device=start.device)
        self.head = torch.empty_like(start)
        self.sent_bytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes this rank put on the wire in the last round (indices, values, tail)."""
        return self.sent_bytes

    def begin_round(self, denominator: float, rescale: bool = True) -> None:
        super().begin_round(denominator, rescale)
        self.sum.zero_()
        self.moved.zero_()

    def add(self, params: torch.Tensor, weight: float, loss_sum: float, examples: float) -> None:
        """Add one client's model ``params`` (its update is ``params - start``)."""
        scale = weight / self.denominator
        for lo in range(0, self.numel, CHUNK):
            hi = min(lo + CHUNK, self.numel)
            update = self.scratch[: hi - lo]
            torch.sub(params[lo:hi], self.start[lo:hi], out=update)
            self.moved[lo:hi] |= update != 0
            self.sum[lo:hi].add_(update, alpha=scale)
        self.count(weight, loss_sum, examples)

    def allreduce(self) -> RoundTotals:
        """Every rank's moved coordinates and values to every rank, summed in rank order."""
        comm = self.world.comm
        index = torch.nonzero(self.moved).flatten()
        values = self.sum[index].float().cpu().numpy()
        index = index.to(torch.int32).cpu().numpy()
        counts = np.array(comm.allgather(len(index)), dtype=np.int64)
        offsets = np.concatenate(([0], np.cumsum(counts)[:-1]))
        all_index = np.empty(counts.sum(), dtype=np.int32)
        all_values = np.empty(counts.sum(), dtype=np.float32)
        comm.Allgatherv(index, [all_index, (counts, offsets), MPI.INT32_T])
        comm.Allgatherv(values, [all_values, (counts, offsets), MPI.FLOAT])
        sums = self.tail.copy()
        comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
        self.sent_bytes = index.nbytes + values.nbytes + sums.nbytes
        head = self.head
        torch.mul(self.start, sums[TAIL.index("weight")] / self.denominator, out=head)
        device = head.device
        for lo, n in zip(offsets.tolist(), counts.tolist(), strict=True):  # rank order
            rows = torch.from_numpy(all_index[lo : lo + n]).to(device, torch.int64)
            head.index_add_(0, rows, torch.from_numpy(all_values[lo : lo + n]).to(device))
        return self.totals(head, sums)
