"""The MPI world: ranks, node-local ranks, device and thread placement, coordinated failure.

Two failure paths keep a job from ever hanging:

* ``collectively(world, fn)`` for set-up phases: every rank runs ``fn``, the ranks agree
  (one tiny Allreduce) on whether any failed, the lowest failing rank prints its one-line
  message and every rank exits with the same code (2 for a UsageError).
* ``abort_on_error(world)`` around everything else: an exception on any rank prints that
  rank's message and calls ``MPI_Abort``, which ends every rank, including ranks already
  blocked in a collective.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from mpi4py import MPI

from fedmpi.errors import UsageError

T = TypeVar("T")
ABORT_GRACE_S = 0.5


@dataclass(frozen=True)
class World:
    """This process's place in the MPI job."""

    comm: MPI.Comm
    rank: int
    size: int
    local_rank: int  # rank among the processes on this node
    local_size: int  # processes on this node
    node_comm: MPI.Comm

    @classmethod
    def from_comm(cls, comm: MPI.Comm = MPI.COMM_WORLD) -> World:
        node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        return cls(
            comm=comm,
            rank=comm.Get_rank(),
            size=comm.Get_size(),
            local_rank=node_comm.Get_rank(),
            local_size=node_comm.Get_size(),
            node_comm=node_comm,
        )

    @property
    def is_root(self) -> bool:
        return self.rank == 0


def node_layout(world: World) -> str:
    """Which ranks run on which host, e.g. ``node0: ranks 0-1; node1: ranks 2-3``.

    Logged at start-up of a multi-node job because MPI launchers report a lost node by
    host (and PID), not by rank: this line turns their message into the ranks lost.
    """
    hosts = world.comm.allgather(MPI.Get_processor_name())  # set-up only, a few bytes
    ranks: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        ranks.setdefault(host, []).append(rank)
    return "; ".join(f"{host}: ranks {_ranges(members)}" for host, members in ranks.items())


def _ranges(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5``."""
    spans: list[list[int]] = []
    for rank in ranks:
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def log(world: World, message: str) -> None:
    """Print a progress line from rank 0 only (flushed: Slurm logs are files)."""
    if world.is_root:
        print(f"[fedmpi] {message}", flush=True)


def wait_for_all(world: World) -> None:
    """Barrier that sleeps instead of spinning.

    MPI implementations busy-poll in blocking collectives; with more ranks than cores
    (CI, laptops) a rank spinning while it waits steals the CPU its slower peers need.
    """
    request = world.comm.Ibarrier()
    delay = 1e-4
    while not request.Test():
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


def collectively(world: World, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it raises anywhere, every rank exits with one message.

    The lowest failing rank prints ``fedmpi: error: ...`` (a UsageError) or its traceback
    (anything else); all ranks then raise SystemExit with the highest exit code.
    """
    result: T | None = None
    error: BaseException | None = None
    try:
        result = fn()
    except Exception as exc:  # any failure (a UsageError too) must reach the agreement below
        error = exc
    code = 0 if error is None else getattr(error, "exit_code", 1)
    # [max exit code, -(lowest failing rank)] in one tiny Allreduce.
    flags = np.array([code, -world.rank if code else -world.size], dtype=np.int64)
    wait_for_all(world)
    world.comm.Allreduce(MPI.IN_PLACE, flags, op=MPI.MAX)
    worst_code, first_failing = int(flags[0]), -int(flags[1])
    if worst_code:
        if world.rank == first_failing and error is not None:
            report_error(world, error)
        raise SystemExit(worst_code)
    return result  # type: ignore[return-value]


def root_computes(world: World, fn: Callable[[], T]) -> T:
    """Rank 0 runs ``fn`` (agreed on like any set-up phase) and every rank gets its result
    (a small Python object, pickled: set-up only, never per round)."""
    return world.comm.bcast(collectively(world, lambda: fn() if world.is_root else None), root=0)


def root_first(world: World, fn: Callable[[], T]) -> T:
    """Rank 0 runs ``fn`` first (it may download into a shared cache), then every other
    rank runs it (from that cache); each rank keeps its own result."""
    mine = collectively(world, lambda: fn() if world.is_root else None)
    others = collectively(world, lambda: None if world.is_root else fn())
    return mine if world.is_root else others


def report_error(world: World, error: BaseException) -> None:
    """One line for a user error; the traceback (with the rank) for anything unexpected."""
    where = f"rank {world.rank}: " if world.size > 1 else ""
    if isinstance(error, UsageError):
        print(f"fedmpi: error: {error}", file=sys.stderr, flush=True)
    else:
        # The one-line summary first: it is what a user needs if the job is torn down
        # before the traceback is forwarded.
        print(f"fedmpi: {where}error: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        traceback.print_exception(error, file=sys.stderr)
        sys.stderr.flush()


@contextmanager
def abort_on_error(world: World) -> Iterator[None]:
    """End the whole job promptly if this rank raises: never leave peers in a collective."""
    try:
        yield
    except SystemExit:
        raise  # agreed by every rank (collectively) or a clean exit
    except BaseException as exc:
        report_error(world, exc)
        if world.size > 1:
            time.sleep(ABORT_GRACE_S)  # let the launcher forward this rank's last output
            world.comm.Abort(getattr(exc, "exit_code", 1))
        raise


def usable_cores(world: World) -> int:
    """Cores this rank may use: its own if ranks are bound to disjoint cores, else a share.

    Ranks on a node compare their CPU affinity masks; bound ranks (``srun --cpu-bind``,
    ``mpirun --bind-to core``) keep their own cores, unbound ranks split the node's.
    """
    mine = (
        os.sched_getaffinity(0)
        if hasattr(os, "sched_getaffinity")
        else set(range(os.cpu_count() or 1))
    )
    masks = world.node_comm.allgather(sorted(mine))
    union = set().union(*map(set, masks))
    if sum(len(m) for m in masks) == len(union):  # disjoint: each rank has its own cores
        return len(mine)
    return max(1, len(union) // world.local_size)


def select_device(world: World, requested: str) -> str:
    """``cuda:(local_rank % n_gpus)`` for GPU runs, else ``cpu``."""
    import torch

    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but no CUDA device is available")
    device = f"cuda:{world.local_rank % torch.cuda.device_count()}"
    torch.cuda.set_device(device)
    return device
