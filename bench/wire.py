"""Would a compressed wire beat fedmpi's fp32 Allreduce between nodes?

Why: ``--compress`` simulates what a client would upload (its update in bf16, int8, top-k
...), but the ranks still sum the decompressed updates with one fp32 Allreduce, whose
bytes do not shrink. Two ways a compressed wire could be faster on slow links: a bf16
Allreduce (half the bytes; a user-defined MPI op adds in fp32 and rounds to bf16 at each
step of the reduction), and, for top-k updates, an Allgather of every rank's (index,
value) pairs, summed locally (k P pairs of 8 bytes against a payload of 4 n bytes).

On a ``bench/simcluster.py`` cluster of N nodes x 1 rank (UCX over TCP on veth links
shaped by ``tc``), for MiniLM's payload (22.7M floats), each way is timed end to end:
fedmpi's fp32 Allreduce (``fedmpi.allreduce.WeightedAllreduce``: a rank's update added
to the payload, then reduced in its slices), a bf16 Allreduce prototyped here in slices
of the same bytes including the conversions in and out, and fedmpi's sparse wire
(``fedmpi.sparse_wire.SparseAllgather``: the update added, its moved coordinates
Allgathered and summed into a dense average).
Each row also gives the error against the fp32 sum. Needs root.

    python bench/wire.py [--nodes 2 4] [--rates 1gbit 10gbit] [--repeats 3] [--fraction 0.01]

The worker (``--worker``) runs in fedmpi's environment (numpy, mpi4py, torch).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from network import PAYLOADS, _link_name  # noqa: E402
from simcluster import SimCluster  # noqa: E402


def bf16_sum(inbuf, inoutbuf, datatype) -> None:  # noqa: ARG001  (MPI's signature)
    """The user-defined op, inout += in in bf16 (torch adds in fp32 and rounds to nearest
    even, vectorised: 7x faster here than the same in numpy). This MPICH build has no
    native MPI_BFLOAT16_T, so the wire type is a 16-bit integer."""
    import torch

    out = torch.frombuffer(inoutbuf, dtype=torch.bfloat16)
    out.add_(torch.frombuffer(inbuf, dtype=torch.bfloat16))


def worker(repeats: int, fraction: float) -> None:
    """Under mpiexec: time each way; rank 0 prints JSON lines. A time is the slowest
    rank's after a barrier, the minimum over ``repeats`` (the machine is shared)."""
    import torch
    from mpi4py import MPI

    from fedmpi.allreduce import CHUNK_BYTES, WeightedAllreduce
    from fedmpi.comm import World
    from fedmpi.sparse_wire import SparseAllgather

    torch.set_num_threads(1)  # as a fedmpi rank with --threads 1

    comm = MPI.COMM_WORLD
    n = sum(PAYLOADS["MiniLM"])
    rng = np.random.default_rng(comm.rank)
    update = (rng.standard_normal(n) * 1e-3).astype(np.float32)  # this rank's sum
    exact = np.empty_like(update)
    comm.Allreduce(update, exact, op=MPI.SUM)
    k = max(1, int(fraction * n))
    chosen = np.argpartition(np.abs(update), n - k)[n - k :].astype(np.int32)
    values = update[chosen]
    sparse_exact = np.zeros(n, dtype=np.float64)
    for rank_chosen, rank_values in zip(
        comm.allgather(chosen), comm.allgather(values), strict=True
    ):
        sparse_exact[rank_chosen] += rank_values
    op = MPI.Op.Create(bf16_sum, commute=True)

    world = World.from_comm(comm)
    zeros = torch.zeros(n)
    dense = WeightedAllreduce(world, n, "cpu")
    sparse = SparseAllgather(world, zeros)
    dense_update = torch.from_numpy(update)
    sparse_update = torch.zeros(n)
    sparse_update[torch.from_numpy(chosen).long()] = torch.from_numpy(values)

    def through(aggregator, params: torch.Tensor) -> np.ndarray:
        """fedmpi's own aggregation of this rank's update (weight 1 of 1: the sum)."""
        aggregator.begin_round(1.0, rescale=False)
        aggregator.add(params, 1.0, 0.0, 0.0)
        return aggregator.allreduce().average.numpy()

    def fp32() -> np.ndarray:
        return through(dense, dense_update)

    def bf16() -> np.ndarray:
        wire = torch.from_numpy(update).to(torch.bfloat16)
        bits = wire.view(torch.int16).numpy()
        step = CHUNK_BYTES // 2  # the same bytes a call, twice the values
        for i in range(0, n, step):
            comm.Allreduce(MPI.IN_PLACE, [bits[i : i + step], MPI.INT16_T], op=op)
        return wire.float().numpy()

    def topk() -> np.ndarray:
        return through(sparse, sparse_update)

    ways = {"fp32 Allreduce (fedmpi)": (fp32, exact, 4 * n), "bf16 Allreduce": (bf16, exact, 2 * n)}
    ways[f"top-k {fraction:g} Allgather (fedmpi's sparse wire)"] = (topk, sparse_exact, 8 * k)
    for way, (run, reference, sent) in ways.items():
        best = np.inf
        for _ in range(repeats):
            comm.Barrier()
            start = time.perf_counter()
            result = run()
            best = min(best, comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
        error = float(np.linalg.norm(result - reference) / np.linalg.norm(reference))
        if comm.rank == 0:
            row = {"way": way, "seconds": best, "bytes_a_rank": sent, "relative_error": error}
            print(json.dumps(row), flush=True)
    op.Free()


def measure(cluster: SimCluster, repeats: int, fraction: float) -> list[dict]:
    command = [
        *cluster.mpiexec(str(Path(sys.executable).with_name("mpiexec"))),
        sys.executable, __file__, "--worker", "--repeats", str(repeats),
        "--fraction", str(fraction),
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=900, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rates", nargs="+", default=["1gbit", "10gbit"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.repeats, args.fraction)
        return
    print("| nodes | link | way | MB a rank sends | ms | x fp32 | error vs exact sum |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for nodes in args.nodes:
        with SimCluster(nodes, 1) as cluster:
            for rate in args.rates:
                cluster.shape(rate, None)
                rows = measure(cluster, args.repeats, args.fraction)
                base = rows[0]["seconds"]
                for row in rows:
                    print(
                        f"| {nodes} | {_link_name(rate, None)} | {row['way']} | "
                        f"{row['bytes_a_rank'] / 1e6:.1f} | {1e3 * row['seconds']:.0f} | "
                        f"{row['seconds'] / base:.2f} | {row['relative_error']:.1e} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
