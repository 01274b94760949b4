"""The Allreduce over real (simulated) network links: flat, sliced and per-tensor.

Why: the 4 MB slices of ``fedmpi.allreduce`` (``FEDMPI_ALLREDUCE_CHUNK_MB``) were tuned on
shared memory, and the cluster cost model of docs/benchmarks.md was on paper. This runs,
on a ``bench/simcluster.py`` cluster of N nodes x 1 rank (UCX over TCP on veth links
shaped by ``tc``), the payloads of MiniLM and BERT-base three ways: one Allreduce over
the flat buffer, the same in slices of several sizes, and one Allreduce per parameter
tensor (what a per-tensor implementation or an unflattened DDP bucket of one tensor would
do). Needs root; ``netem`` for the delay variants, skipped with a message where the
kernel lacks it.

    python bench/network.py [--nodes 2 4] [--rates 1gbit 10gbit 25gbit] [--repeats 2]

The worker (``--worker``) needs only numpy and mpi4py, so a launch costs about a second.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simcluster import SimCluster, delay_supported  # noqa: E402

SLICES_MB = (1, 4, 16, 64)
DELAYS = ("0.05ms", "0.5ms")
MIB = 2**20


def bert_tensor_sizes(vocab: int, hidden: int, layers: int, intermediate: int) -> list[int]:
    """The trainable tensors of a BertForSequenceClassification (2 labels), in order:
    what a per-tensor Allreduce sends, without loading a model."""
    sizes = [vocab * hidden, 512 * hidden, 2 * hidden, hidden, hidden]  # embeddings + LN
    per_layer = [hidden * hidden, hidden] * 4 + [hidden, hidden]  # q k v o + LN
    per_layer += [hidden * intermediate, intermediate, intermediate * hidden, hidden]
    per_layer += [hidden, hidden]  # output LN
    sizes += per_layer * layers
    sizes += [hidden * hidden, hidden, 2 * hidden, 2]  # pooler, classifier
    return sizes


PAYLOADS = {
    "MiniLM": bert_tensor_sizes(30522, 384, 6, 1536),  # 22.7M floats, 91 MB
    "BERT-base": bert_tensor_sizes(28996, 768, 12, 3072),  # 108M floats, 433 MB
}


def worker(payloads: list[str], repeats: int) -> None:
    """Under mpiexec: time each way of reducing each payload; rank 0 prints JSON lines.

    A time is the slowest rank's, after a barrier; the minimum over ``repeats`` is kept
    (the machine is shared: the minimum is the least disturbed)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    for name in payloads:
        sizes = PAYLOADS[name]
        buffer = np.ones(sum(sizes), dtype=np.float32)
        offsets = np.cumsum([0, *sizes])
        ways = {"flat": [buffer]}
        for mb in SLICES_MB:
            step = mb * MIB // 4
            ways[f"{mb} MB slices"] = [buffer[i : i + step] for i in range(0, len(buffer), step)]
        ways["per tensor"] = [buffer[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        for way, pieces in ways.items():
            best = np.inf
            for _ in range(repeats):
                comm.Barrier()
                start = time.perf_counter()
                for piece in pieces:
                    comm.Allreduce(MPI.IN_PLACE, piece, op=MPI.SUM)
                elapsed = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
                best = min(best, elapsed)
            if comm.rank == 0:
                row = {"payload": name, "bytes": buffer.nbytes, "way": way, "calls": len(pieces)}
                print(json.dumps({**row, "seconds": best}), flush=True)


def measure(cluster: SimCluster, payloads: list[str], repeats: int, shm: bool) -> list[dict]:
    command = [
        *cluster.mpiexec(str(Path(sys.executable).with_name("mpiexec")), tcp_only=not shm),
        sys.executable, __file__, "--worker", "--repeats", str(repeats), "--payloads", *payloads,
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=900, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def links(rates: list[str]) -> list[tuple[str | None, str | None]]:
    """(rate, delay) pairs to measure: each rate with no added delay, then with each of
    DELAYS where netem exists."""
    pairs: list[tuple[str | None, str | None]] = [(None, None)] + [(r, None) for r in rates]
    if delay_supported():
        pairs += [(r, d) for r in rates for d in DELAYS]
    else:
        print(
            "network.py: this kernel has no sch_netem (tc netem): the delay variants "
            f"({', '.join(DELAYS)}) are skipped; links add only veth's own latency",
            file=sys.stderr,
        )
    return pairs


def payloads_for(rate: str | None) -> list[str]:
    """BERT-base takes 3.5-5 s per Allreduce at 1 Gbit/s: MiniLM alone says enough there."""
    return ["MiniLM"] if rate == "1gbit" else list(PAYLOADS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rates", nargs="+", default=["1gbit", "10gbit", "25gbit"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--payloads", nargs="+", default=list(PAYLOADS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.payloads, args.repeats)
        return
    print("| nodes | link | payload | way | calls | ms | Gbit/s (algorithm) |")
    print("|---:|---|---|---|---:|---:|---:|")
    for nodes in args.nodes:
        with SimCluster(nodes, 1) as cluster:
            setups = [("shared memory (UCX default)", None, None, True)]
            setups += [(_link_name(r, d), r, d, False) for r, d in links(args.rates)]
            for label, rate, delay, shm in setups:
                cluster.shape(rate, delay)
                for row in measure(cluster, payloads_for(rate), args.repeats, shm):
                    # A ring Allreduce moves 2 (P-1)/P of the payload through each link.
                    gbits = 2 * (nodes - 1) / nodes * row["bytes"] * 8 / row["seconds"] / 1e9
                    print(
                        f"| {nodes} | {label} | {row['payload']} | {row['way']} | "
                        f"{row['calls']} | {1e3 * row['seconds']:.0f} | {gbits:.2f} |",
                        flush=True,
                    )


def _link_name(rate: str | None, delay: str | None) -> str:
    name = f"TCP, tbf {rate.replace('gbit', ' Gbit/s')}" if rate else "TCP, unshaped veth"
    return name + (f", +{delay}" if delay else "")


if __name__ == "__main__":
    main()
