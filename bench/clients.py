"""Per-client overhead: the same local steps as a few long clients or many one-step ones.

    python bench/clients.py [--np 2] [--repeats 3] [--rounds 2] [--diagnostics off full]
                            [--peft none] [--out runs/bench-clients]

The real job (``mpiexec -n NP python -m fedmpi``), MiniLM, full fine-tuning (``--peft
lora`` for adapters), 1,600 training examples at batch 8, so 200 local steps a round in
both shapes:

* **few**: 2 clients x 100 steps (800 examples each; one client a rank at np 2);
* **many**: 200 clients x 1 step (8 examples each; 100 clients a rank).

Each job's training time is rank 0's ``timing/train_s`` summed over its ``--rounds``
(from results.h5: the local training phase of the round, the client switches included,
not the Allreduce, the diagnostics after it or the evaluation); the ratio many / few is
the cost of switching clients, and (many - few) / (clients a rank - 1) its price a switch.
On a machine that other jobs share, wall times swing with their load; the job's CPU
seconds (all ranks, start to exit, from ``getrusage``) swing less, so the table also
gives the extra CPU a switch costs a rank: (CPU many - CPU few) / (ranks x switches).
The two shapes run back to back, and the pairs ``--repeats`` times in turn, so that a
busy machine disturbs both alike; the table gives medians and ranges of the per-pair
ratios. The test set is cut to 100 examples (scored after the last round only).

Prints a markdown table and writes it with the raw numbers (JSON) to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
from pathlib import Path

from runjob import DEFAULT_MPIEXEC, run_fedmpi, save_table

TRAIN_SAMPLES, BATCH = 1600, 8
SHAPES = {"few": 2, "many": 200}  # clients; 1,600 examples -> 100 steps or 1 step each


def job_flags(clients: int, diagnostics: str, peft: str, rounds: int) -> list[str]:
    return [
        *("--clients", str(clients), "--rounds", str(rounds)),
        *("--train-samples", str(TRAIN_SAMPLES), "--batch-size", str(BATCH)),
        *("--test-samples", "100", "--eval-every", str(rounds)),
        *("--diagnostics", diagnostics, "--peft", peft),
    ]


def run_job(mpiexec: str, np_: int, flags: list[str]) -> dict[str, float]:
    """One job: rank 0's training seconds (results.h5), and the CPU seconds of the whole
    job (every rank, from start-up to exit: the launcher's waited-for children)."""
    before = children_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        timing, _ = run_fedmpi(mpiexec, np_, Path(tmp) / "run", flags)
    return {"train_s": float(timing["train_s"].sum()), "cpu_s": children_cpu() - before}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--np", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--diagnostics", nargs="+", default=["off", "full"])
    parser.add_argument("--peft", nargs="+", default=["none"], choices=("none", "lora"))
    parser.add_argument("--mpiexec", default=DEFAULT_MPIEXEC)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-clients"))
    args = parser.parse_args()

    cases = [(peft, level) for peft in args.peft for level in args.diagnostics]
    runs: dict[str, list[dict[str, float]]] = {f"{p} {d}": [] for p, d in cases}
    for repeat in range(args.repeats):
        for peft, level in cases:
            pair = {
                shape: run_job(args.mpiexec, args.np, job_flags(clients, level, peft, args.rounds))
                for shape, clients in SHAPES.items()
            }
            runs[f"{peft} {level}"].append(pair)
            print(f"[{repeat + 1}/{args.repeats}] {peft} {level}: {pair}", flush=True)

    switches = SHAPES["many"] // args.np - 1  # client switches a rank makes per round
    lines = [
        f"MiniLM, {TRAIN_SAMPLES} examples at batch {BATCH}, np={args.np}, {args.rounds} rounds, "
        f"malloc {os.environ.get('FEDMPI_MALLOC', 'auto')}; train_s summed over rounds, "
        f"median [range] of {args.repeats} interleaved pairs\n",
        "| peft | diagnostics | 2 clients x 100 steps, s | 200 clients x 1 step, s "
        "| ratio | ms a client switch | job CPU s, few / many | CPU ms a switch |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, pairs in runs.items():
        peft, level = key.split()
        few = [p["few"]["train_s"] for p in pairs]
        many = [p["many"]["train_s"] for p in pairs]
        ratios = [b / a for a, b in zip(few, many, strict=True)]
        per_switch = [
            1000 * (b - a) / (switches * args.rounds) for a, b in zip(few, many, strict=True)
        ]
        cpu_few = [p["few"]["cpu_s"] for p in pairs]
        cpu_many = [p["many"]["cpu_s"] for p in pairs]
        # every rank switches: the job's extra CPU over all ranks' switches
        cpu_switch = [
            1000 * (b - a) / (switches * args.np * args.rounds)
            for a, b in zip(cpu_few, cpu_many, strict=True)
        ]
        lines.append(
            f"| {peft} | {level} | {cell(few, '.1f')} | {cell(many, '.1f')} | "
            f"{cell(ratios, '.2f')}x | {cell(per_switch, '.0f')} | "
            f"{cell(cpu_few, '.0f')} / {cell(cpu_many, '.0f')} | {cell(cpu_switch, '.0f')} |"
        )
    save_table(args.out, "clients", "\n".join(lines), {"runs": runs})


def cell(values: list[float], fmt: str) -> str:
    median = format(statistics.median(values), fmt)
    if len(values) == 1:
        return median
    return f"{median} [{min(values):{fmt}}-{max(values):{fmt}}]"


if __name__ == "__main__":
    main()
