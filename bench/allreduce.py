"""Allreduce bandwidth of fedmpi's aggregation step against a plain memcpy of the buffer.

Run under MPI:  mpiexec -n 4 python bench/allreduce.py [--model minilm] [--repeats 10]

Times, on the payload of the given model (all trainable parameters plus the weight and
metric slots): fedmpi's WeightedAllreduce (accumulate + Allreduce + FedAvg divide), a bare
``comm.Allreduce`` of the same size, and a memcpy of the buffer on each rank (the memory
bandwidth floor). Prints one table on rank 0.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from mpi4py import MPI

from fedmpi.comm import World
from fedmpi.fedavg import WeightedAllreduce
from fedmpi.flat import FlatParameters
from fedmpi.models import load_model, quiet_transformers
from fedmpi.server import ServerHyper, ServerOptimizer


def best_of(repeats: int, comm: MPI.Comm, fn) -> float:
    """Median seconds of ``fn`` over repeats, each started together on every rank."""
    times = []
    for _ in range(repeats):
        comm.Barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    local = np.array([np.median(times)])
    comm.Allreduce(MPI.IN_PLACE, local, op=MPI.MAX)  # the slowest rank sets the pace
    return float(local[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet_transformers()
    world = World.from_comm()
    flat = FlatParameters(load_model(args.model, ["a", "b"]))
    aggregator = WeightedAllreduce(world, flat.numel, "cpu", n_metrics=2)
    payload_bytes = aggregator.payload.numel() * 4
    server = ServerOptimizer("fedavg", ServerHyper(), flat.buffer)

    def fedmpi_step() -> None:
        aggregator.reset()
        aggregator.add(flat.buffer, 100.0, [1.0, 2.0])
        summed, weight, _ = aggregator.allreduce()
        server.step(flat.buffer, flat.buffer, summed, weight)

    bare = np.ones(aggregator.payload.numel(), dtype=np.float32)
    copy_target = np.empty_like(bare)
    rows = [
        ("fedmpi aggregation (scale+Allreduce+divide)", best_of(args.repeats, world.comm, fedmpi_step)),
        ("bare comm.Allreduce (numpy, in place)",
         best_of(args.repeats, world.comm, lambda: world.comm.Allreduce(MPI.IN_PLACE, bare, op=MPI.SUM))),
        ("memcpy of the buffer (per rank)",
         best_of(args.repeats, world.comm, lambda: np.copyto(copy_target, bare))),
    ]
    if world.is_root:
        print(f"np={world.size} model={args.model} payload={payload_bytes / 2**20:.1f} MiB "
              f"MPI={MPI.Get_library_version().splitlines()[0].strip()}")
        print(f"| {'operation':45s} | {'ms':>8s} | {'GB/s':>7s} |")
        print(f"|{'-' * 47}|{'-' * 10}|{'-' * 9}|")
        for name, seconds in rows:
            print(f"| {name:45s} | {seconds * 1e3:8.1f} | {payload_bytes / seconds / 1e9:7.2f} |")


if __name__ == "__main__":
    main()
