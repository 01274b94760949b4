"""fedmpi's aggregation step against the bare-MPI limit, gloo, and a memcpy floor.

Run under MPI, once per rank count:

    mpiexec -n 2 python bench/aggregation.py [--models bert-base minilm] [--repeats 10]
    mpiexec -n 4 python bench/aggregation.py

For each model (``bert-base``: a random ``BertForSequenceClassification(BertConfig())``,
~110M fp32 parameters, nothing downloaded; ``minilm``: the offline built-in) it times, on
a payload of the model's size:

* fedmpi's step, the project's own round code (``fedmpi.round.FederatedRound``, built
  by ``bench/rig.py`` over a synthetic job of one client per rank, weights = shard sizes,
  FedAvg, so the payload is the parameters' own storage, scaled and reduced in place
  slice by slice): ``begin`` (the cohort, the copy of the round's start model, the
  payload opened), ``contribute`` (the rank's client into the payload; it stands in for
  local training, which is not timed here) and ``aggregate`` (the sleeping wait, the
  Allreduce, the hooks after it, the server step), with no hooks;
* the same step with the round's diagnostics hook (``UpdateDiagnostics`` at
  ``--diagnostics off``, ``norms``, ``full``), its ``after_server_step`` included (the
  hooks' calls that ``FederatedRound.run`` makes after ``aggregate``); and the hook's
  share, the difference of the two medians (with the hook minus without: on a busy
  machine it is noisy and can come out below zero);
* a bare ``comm.Allreduce(MPI.IN_PLACE, ...)`` on a preallocated numpy float32 buffer,
  and the same in fixed slices (``--chunks-mb``); then in fedmpi's slices after a whole
  scale pass (what the step would cost without scaling each slice just before it is
  sent), and on a buffer from torch's allocator (4 KiB pages; numpy's large arrays get
  huge pages, as ``flat_zeros`` relies on);
* one Allreduce per parameter tensor;
* ``torch.distributed`` (gloo, TCP on 127.0.0.1) ``all_reduce`` on the flat buffer;
* a memcpy of the buffer on every rank at once (the memory-bandwidth floor).

Each row is the median over ``--repeats`` of the slowest rank's time, with a barrier
before every repeat (and one untimed warm-up), except the diagnostics' share, a difference
of two such rows; GB/s is payload bytes / time. Rank 0 prints one markdown table per
model.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from mpi4py import MPI
from rig import one_client_per_rank

from fedmpi.allreduce import CHUNK_BYTES, TAIL
from fedmpi.comm import World
from fedmpi.config import Config
from fedmpi.diagnostics import UpdateDiagnostics
from fedmpi.flat import FlatParameters
from fedmpi.hooks import RoundHook
from fedmpi.models import load_model, quiet_transformers
from fedmpi.preemption import StopRequest
from fedmpi.round import FederatedRound, PhaseClock

EXAMPLES = 100  # each rank's client's rows: equal weights, so the average stays put


def timed(comm: MPI.Comm, repeats: int, fn: Callable[[], object]) -> float:
    """Median over repeats of the slowest rank's seconds; a barrier before each repeat."""
    comm.Barrier()
    fn()  # warm-up: first-touch page faults, MPI's internal buffers
    times = np.empty(repeats)
    for i in range(repeats):
        comm.Barrier()
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
    comm.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)
    return float(np.median(times))


def build_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "bert-base":
        from transformers import BertConfig, BertForSequenceClassification

        return BertForSequenceClassification(BertConfig())
    model, _ = load_model(name, ["a", "b"])
    return model


def init_gloo(comm: MPI.Comm) -> None:
    """torch.distributed over gloo, rank and size from MPI, a free port from rank 0."""
    port = None
    if comm.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = comm.bcast(port, root=0)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=comm.Get_rank(),
        world_size=comm.Get_size(),
    )


def bench_model(name: str, world: World, args: argparse.Namespace) -> None:
    comm, repeats = world.comm, args.repeats
    model = build_model(name)
    flat = FlatParameters(model, tail=len(TAIL))
    job = one_client_per_rank(world, model, flat, "cpu", examples=EXAMPLES)

    def round_step(hooks: list[RoundHook], level: str = "off") -> Callable[[], None]:
        """The round's begin, contribute and aggregate (and its hooks' after_server_step)
        for this rank's one client, with ``hooks``."""
        fed_round = FederatedRound(Config(diagnostics=level), world, job, hooks, StopRequest())
        # One client per rank and FedAvg: the round reduces the parameters in place.
        assert fed_round.aggregator.in_place

        def run() -> None:
            ctx = fed_round.begin(1)
            fed_round.contribute(ctx, world.rank, loss_sum=1.0, examples=EXAMPLES)
            fed_round.aggregate(ctx, PhaseClock(job.device))
            for hook in fed_round.hooks:
                hook.after_server_step(ctx)

        return run

    step = timed(comm, repeats, round_step([]))
    rows = [("fedmpi step (FederatedRound begin/contribute/aggregate, no hooks)", step)]
    for level in ("off", "norms", "full"):
        diagnostics = UpdateDiagnostics(flat, world.size, level)
        with_hook = timed(comm, repeats, round_step([diagnostics], level))
        rows.append((f"fedmpi step + UpdateDiagnostics hook, --diagnostics {level}", with_hook))
        rows.append((f"fedmpi diagnostics, --diagnostics {level} (difference)", with_hook - step))
        del diagnostics
    n = flat.storage.numel()  # the payload: the parameters and the Allreduce's tail
    nbytes = n * flat.storage.element_size()
    bare = np.zeros(n, dtype=np.float32)
    target = np.empty_like(bare)
    tensors = [p.detach().numpy() for p in flat.params]
    flat_tensor = torch.from_numpy(bare)

    def bare_allreduce() -> None:
        comm.Allreduce(MPI.IN_PLACE, bare, op=MPI.SUM)

    small_pages = torch.zeros(n).numpy()  # torch's allocator: no huge pages

    def chunked(chunk_bytes: int, buffer: np.ndarray = bare) -> Callable[[], None]:
        step = chunk_bytes // 4

        def run() -> None:
            for start in range(0, n, step):
                comm.Allreduce(MPI.IN_PLACE, buffer[start : start + step], op=MPI.SUM)

        return run

    def per_tensor() -> None:
        for t in tensors:
            comm.Allreduce(MPI.IN_PLACE, t, op=MPI.SUM)

    rows.append(("bare comm.Allreduce, numpy, in place", timed(comm, repeats, bare_allreduce)))
    for mb in args.chunks_mb:
        rows.append((f"bare Allreduce in {mb} MB slices", timed(comm, repeats, chunked(mb << 20))))
    sliced = chunked(CHUNK_BYTES)

    def scale_then_sliced() -> None:  # the step unfused: a whole scale pass, then the slices
        flat_tensor.mul_(0.5)
        sliced()

    rows.append(
        (
            f"scale pass, then bare Allreduce in {CHUNK_BYTES >> 20} MB slices (unfused)",
            timed(comm, repeats, scale_then_sliced),
        )
    )
    rows.append(
        (
            f"bare Allreduce in {CHUNK_BYTES >> 20} MB slices, torch-allocated (4 KiB pages)",
            timed(comm, repeats, chunked(CHUNK_BYTES, small_pages)),
        )
    )
    rows.append(
        (f"per-tensor Allreduce ({len(tensors)} tensors)", timed(comm, repeats, per_tensor))
    )
    if not args.no_gloo:
        rows.append(
            (
                "torch.distributed gloo all_reduce",
                timed(comm, repeats, lambda: dist.all_reduce(flat_tensor)),
            )
        )
    rows.append(
        (
            "memcpy of the buffer, all ranks at once",
            timed(comm, repeats, lambda: np.copyto(target, bare)),
        )
    )

    if world.is_root:
        print(
            f"\n{name}: {flat.numel / 1e6:.1f}M parameters, payload {nbytes / 1e6:.0f} MB, "
            f"np={world.size}, median of {repeats}\n"
        )
        print("| operation | ms | GB/s |\n|---|---:|---:|")
        for label, seconds in rows:
            rate = f"{nbytes / seconds / 1e9:.2f}" if seconds > 0 else "-"
            print(f"| {label} | {seconds * 1e3:.1f} | {rate} |")
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bert-base", "minilm"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--chunks-mb", type=int, nargs="*", default=[4, 16, 64])
    parser.add_argument("--no-gloo", action="store_true", help="skip torch.distributed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_transformers()
    world = World.from_comm()
    if not args.no_gloo:
        init_gloo(world.comm)
    if world.is_root:
        print(
            f"MPI: {MPI.Get_library_version().splitlines()[0].strip()}, torch {torch.__version__}"
        )
    for name in args.models:
        bench_model(name, world, args)
    if not args.no_gloo:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
