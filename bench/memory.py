"""Peak memory of one fedmpi rank against a plain single-process fine-tuning.

    python bench/memory.py [--part phases|job|all] [--np 2] [--train-samples 320]
                           [--test-samples 200] [--job-clients 4]

``--part phases`` runs, each in a fresh process:

* fedmpi: ``mpiexec -n NP python bench/memory.py --worker fedmpi -- FLAGS``, which calls
  ``fedmpi.cli.main()`` for one round of the default job (offline MiniLM, Rotten
  Tomatoes, batch 16, max length 64, fused AdamW) and records each rank's VmRSS and
  VmHWM (/proc/self/status) after the phases it hooks in ``fedmpi.prepare`` (model
  load, flattening) and ``fedmpi.round`` (payload allocation, local training, Allreduce,
  evaluation);
* plain: ``python bench/memory.py --worker plain``: the same model, the same number of
  training rows as one fedmpi rank (so the same number of steps), the same batch size,
  padding, optimizer and thread count, then the same number of test rows evaluated, with
  no MPI and no federation state.

Prints the phases of rank 0 and the plain run, each rank's peak, the ratio, and an
estimate of fedmpi's extra memory from the parameter count P (fp32 bytes).

``--part job`` runs the whole default job (``python -m fedmpi --clients 4``, 3 rounds of
2,000 training and 1,000 test examples) at ``--np`` ranks and samples every rank's PSS
(``/proc/PID/smaps_rollup``, every 0.2 s): the peak of their sum, that sum per rank, and
the largest single rank's peak. PSS counts pages the ranks share (torch's libraries, the
page cache of the model file) once in the sum, which is what a node's memory pays.
``--job-args`` adds flags to the job, e.g. 200 clients of one local step each:

    python bench/memory.py --part job --job-clients 200 \
        --job-args "--train-samples 1600 --batch-size 8"

The job runs on the allocator ``python -m fedmpi`` picks (``FEDMPI_MALLOC``: export
``FEDMPI_MALLOC=system`` for glibc's malloc); the table names it, from the job's log.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runjob import run_with_pss

FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
MARK = "MEMORY "
ROW_FIELDS = ("input_ids", "lengths", "labels")


def status() -> dict[str, float]:
    """This process's memory counters from /proc/self/status, in MB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in FIELDS:
            values[key] = int(rest.split()[0]) / 1024
    return values


class Recorder:
    def __init__(self) -> None:
        self.phases: list[tuple[str, dict[str, float]]] = []

    def mark(self, phase: str) -> None:
        self.phases.append((phase, status()))

    def after(self, phase: str, fn):
        def wrapped(*args, **kwargs):
            result = fn(*args, **kwargs)
            self.mark(phase)
            return result

        return wrapped

    def emit(self, who: str, extra: dict | None = None) -> None:
        print(MARK + json.dumps({"who": who, "phases": self.phases, **(extra or {})}), flush=True)


def fedmpi_worker(argv: list[str], rows_file: str) -> None:
    rec = Recorder()
    import numpy as np
    from mpi4py import MPI

    import fedmpi.allreduce
    import fedmpi.prepare
    import fedmpi.round
    from fedmpi.cli import main

    rec.mark("imports + MPI_Init")
    rank = MPI.COMM_WORLD.Get_rank()
    train = fedmpi.round
    saved: dict = {}

    def save_rows(key: str, rows, seed: int = 0) -> None:
        """Rank 0 hands its training and test rows to the plain run (same batches)."""
        if rank == 0:
            saved.update({f"{key}_{f}": getattr(rows, f).numpy() for f in ROW_FIELDS})
            saved[f"{key}_seed"] = seed

    def train_client(model, data, cfg, seed, *args, **kwargs):
        save_rows("train", data, seed)
        return original_train(model, data, cfg, seed, *args, **kwargs)

    def evaluate(model, data, *args, **kwargs):
        save_rows("test", data)
        return original_evaluate(model, data, *args, **kwargs)

    original_train, original_evaluate = train.train_client, train.evaluate
    train.train_client, train.evaluate = train_client, evaluate
    hooks = [
        (fedmpi.prepare, "_load_model", "model loaded + Bcast"),
        (fedmpi.prepare, "FlatParameters", "parameters flattened"),
        (train, "WeightedAllreduce", "payload allocated"),
        (train, "train_client", "local training"),
        (train, "evaluate", "evaluation"),
    ]
    for module, name, phase in hooks:
        setattr(module, name, rec.after(phase, getattr(module, name)))
    cls = fedmpi.allreduce.WeightedAllreduce
    cls.allreduce = rec.after("Allreduce", cls.allreduce)
    code = main(argv)
    rec.mark("end")
    if rank == 0:
        np.savez(rows_file, **saved)
    rec.emit(f"rank {rank}", {"code": code})


def plain_worker(rows_file: str, threads: int) -> None:
    rec = Recorder()
    import numpy as np
    import torch

    from fedmpi.config import Config
    from fedmpi.models import load_model, quiet_transformers

    rec.mark("imports")
    torch.set_num_threads(threads)
    quiet_transformers()
    cfg = Config()
    saved = np.load(rows_file)
    train = [torch.from_numpy(saved[f"train_{f}"]) for f in ROW_FIELDS]
    test = [torch.from_numpy(saved[f"test_{f}"]) for f in ROW_FIELDS]
    torch.manual_seed(cfg.seed)
    model, _ = load_model(cfg.model, ["fresh", "rotten"])
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rec.mark("model loaded")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)

    def batch(rows, index):
        input_ids, lengths, labels = (t[index] for t in rows)
        width = int(lengths.max())
        mask = torch.arange(width)[None, :] < lengths[:, None]
        return input_ids[:, :width].long(), mask.long(), labels

    model.train()
    generator = torch.Generator().manual_seed(int(saved["train_seed"]))
    for index in torch.randperm(len(train[2]), generator=generator).split(cfg.batch_size):
        ids, mask, labels = batch(train, index)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    rec.mark("local training")
    model.eval()
    with torch.inference_mode():
        for index in torch.argsort(test[1], stable=True).split(cfg.eval_batch_size):
            ids, mask, _ = batch(test, index)
            model(input_ids=ids, attention_mask=mask)
    rec.mark("evaluation")
    rec.emit("plain", {"numel": numel})


def collect(command: list[str]) -> list[dict]:
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return [json.loads(line[len(MARK) :]) for line in out.splitlines() if line.startswith(MARK)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("phases", "job", "all"), default="all")
    parser.add_argument("--np", type=int, default=2)
    parser.add_argument("--job-clients", type=int, default=4)
    parser.add_argument("--job-args", default="", help="more flags for --part job's job")
    parser.add_argument("--train-samples", type=int, default=320)
    parser.add_argument("--test-samples", type=int, default=200)
    parser.add_argument("--mpiexec", default=str(Path(sys.executable).with_name("mpiexec")))
    parser.add_argument("--worker", choices=("fedmpi", "plain"), help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "fedmpi":
        return fedmpi_worker([a for a in args.rest if a != "--"], args.rows)
    if args.worker == "plain":
        return plain_worker(args.rows, threads=1)  # fedmpi's share of 2 cores at np=2

    if args.part in ("job", "all"):
        whole_job(args)
    if args.part in ("phases", "all"):
        phases(args)


def whole_job(args: argparse.Namespace) -> None:
    """The default job at ``--np`` ranks with ``--job-clients`` clients: its peak PSS."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [args.mpiexec, "-n", str(args.np), sys.executable, "-m", "fedmpi"]
        flags = ["--clients", str(args.job_clients), *shlex.split(args.job_args)]
        command += [*flags, "--output", str(Path(tmp) / "run")]
        start = time.perf_counter()
        log, sampler = run_with_pss(command)
        wall = time.perf_counter() - start
    malloc = re.search(r", malloc (.+)$", log, re.MULTILINE)
    print(
        f"default job (`python -m fedmpi {shlex.join(flags)}`), np={args.np}, "
        f"malloc {malloc.group(1) if malloc else '?'}, {wall:.0f} s\n\n"
        f"| peak of the ranks' summed PSS MiB | per rank MiB | "
        f"largest rank's own peak MiB |\n|---:|---:|---:|\n"
        f"| {sampler.peak_total_mb:.0f} | {sampler.peak_total_mb / args.np:.0f} | "
        f"{sampler.peak_rank_mb:.0f} |\n"
    )


def phases(args: argparse.Namespace) -> None:
    """One round, per phase, rank 0 against the plain run on rank 0's rows."""
    me = [sys.executable, __file__]
    with tempfile.TemporaryDirectory() as tmp:
        rows = str(Path(tmp) / "rows.npz")
        flags = ["--rounds", "1", "--train-samples", str(args.train_samples)]
        flags += ["--test-samples", str(args.test_samples), "--output", str(Path(tmp) / "run")]
        start = time.perf_counter()
        fedmpi_cmd = [args.mpiexec, "-n", str(args.np), *me, "--worker", "fedmpi", "--rows", rows]
        ranks = collect([*fedmpi_cmd, "--", *flags])
        fed_wall = time.perf_counter() - start
        start = time.perf_counter()
        (plain,) = collect([*me, "--worker", "plain", "--rows", rows])
        plain_wall = time.perf_counter() - start
    ranks.sort(key=lambda r: r["who"])
    per_rank = (args.train_samples // args.np, args.test_samples // args.np)
    report(ranks, plain, args, per_rank, fed_wall, plain_wall)


def report(ranks, plain, args, per_rank, fed_wall, plain_wall) -> None:
    print(
        f"default job (MiniLM, batch 16, max length 64, fused AdamW), 1 round, np={args.np}: "
        f"{per_rank[0]} training and {per_rank[1]} test rows per rank; plain: rank 0's rows "
        f"and batches in one process (wall: fedmpi {fed_wall:.0f} s, plain {plain_wall:.0f} s)\n"
    )
    print("| run | after phase | " + " | ".join(f"{f} MiB" for f in FIELDS) + " |")
    print("|---|---|" + "---:|" * len(FIELDS))
    for run in (ranks[0], plain):
        for phase, s in run["phases"]:
            cells = " | ".join(f"{s[f]:.0f}" for f in FIELDS)
            print(f"| {run['who']} | {phase} | {cells} |")

    def peak(run) -> float:
        return max(s["VmHWM"] for _, s in run["phases"])

    print("\n| run | peak RSS (VmHWM) MiB | vs plain |\n|---|---:|---:|")
    for run in (*ranks, plain):
        print(f"| {run['who']} | {peak(run):.0f} | {peak(run) / peak(plain):.2f}x |")

    p_mib = plain["numel"] * 4 / 2**20
    first_fed, first_plain = ranks[0]["phases"][0][1], plain["phases"][0][1]
    setup_hwm = dict(ranks[0]["phases"])["payload allocated"]["VmHWM"]
    sample_mib = min(plain["numel"], 2**20) * 4 / 2**20
    items = [
        ("Allreduce payload (0: one client per rank reduces its parameters in place)", 0.0),
        ("round-start global model (1 P)", p_mib),
        (
            "mpi4py, MPI_Init and fedmpi's imports (measured at start)",
            first_fed["VmRSS"] - first_plain["VmRSS"],
        ),
        ("of which MPI shared memory (RssShmem)", first_fed["RssShmem"]),
    ]
    diff = peak(ranks[0]) - peak(plain)
    rest = diff - sum(mib for _, mib in items[:3])
    items.append(("rest: rank 0's tokenizer and results writer, allocator slack", rest))
    print(
        f"\nrank 0 - plain = {diff:.0f} MiB; estimated, "
        f"P = {plain['numel'] / 1e6:.1f}M parameters = {p_mib:.0f} MiB fp32:\n"
    )
    print("| where fedmpi's extra memory goes | MiB |\n|---|---:|")
    for label, mib in items:
        print(f"| {label} | {mib:.0f} |")
    print(
        f"| diagnostics after training (update sample per client, mean sample, chunk "
        f"temporaries; not at the peak) | ~{3 * sample_mib:.0f} |"
    )
    print(
        f"| set-up transients: Bcast vector and flattening copy (1 P each; HWM after set-up "
        f"{setup_hwm:.0f}, below the training peak) | 0 at the peak |"
    )
    print("| the flat buffer itself (the parameters live in it) | 0 |")


if __name__ == "__main__":
    main()
