"""Time per round against clients per round: does fedmpi scale to cross-device cohorts?

    python bench/cohorts.py [--np 2] [--clients 10 100 1000] [--peft none lora]
                            [--rounds 2] [--out runs/bench-cohorts]

The real job (``mpiexec -n NP python -m fedmpi``), MiniLM, every client holding 8 training
examples (one local step of batch 8), every client in every round, default diagnostics;
the cohort is 10, 100 or 1,000 clients, fully fine-tuned or through LoRA. Local work
grows with the cohort, so the figure's question is whether the time per client stays
flat (the per-client overhead of ``bench/clients.py`` does not grow with the cohort) and
what a round of 1,000 clients costs. Each cell is rank 0's ``timing/round_s`` and
``timing/train_s`` of the last round (the first pays the allocator's warm-up), from
results.h5; the test set is 100 examples, scored after the last round, outside
``train_s``.

Prints a markdown table, writes it with the raw numbers (JSON) to ``--out`` and draws
``--figure`` (default docs/img/cohorts.png): milliseconds per client against clients per
round, one line per fine-tuning mode.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from runjob import DEFAULT_MPIEXEC, run_fedmpi, save_table

BATCH = 8  # one local step per client


def job_flags(clients: int, peft: str, rounds: int) -> list[str]:
    return [
        *("--clients", str(clients), "--rounds", str(rounds)),
        *("--train-samples", str(BATCH * clients), "--batch-size", str(BATCH)),
        *("--test-samples", "100", "--eval-every", str(rounds), "--peft", peft),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--np", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--peft", nargs="+", default=["none", "lora"], choices=("none", "lora"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mpiexec", default=DEFAULT_MPIEXEC)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-cohorts"))
    parser.add_argument("--figure", type=Path, default=Path("docs/img/cohorts.png"))
    args = parser.parse_args()

    cells = []
    for peft in args.peft:
        for clients in args.clients:
            with tempfile.TemporaryDirectory() as tmp:
                timing, wall = run_fedmpi(
                    args.mpiexec, args.np, Path(tmp) / "run", job_flags(clients, peft, args.rounds)
                )
            cell = {
                "peft": peft,
                "clients": clients,
                "round_s": float(timing["round_s"][-1]),
                "train_s": float(timing["train_s"][-1]),
                "job_wall_s": wall,
            }
            cells.append(cell)
            print(json.dumps(cell), flush=True)

    lines = [
        f"MiniLM, {BATCH} examples (one step) a client, np={args.np}, the last of "
        f"{args.rounds} rounds\n",
        "| fine-tuning | clients a round | round s | training s | ms a client (training) |",
        "|---|---:|---:|---:|---:|",
    ]
    for cell in cells:
        per_client = 1000 * cell["train_s"] * args.np / cell["clients"]  # a rank's clients
        lines.append(
            f"| {'full' if cell['peft'] == 'none' else 'LoRA'} | {cell['clients']} | "
            f"{cell['round_s']:.1f} | {cell['train_s']:.1f} | {per_client:.0f} |"
        )
    save_table(args.out, "cohorts", "\n".join(lines), {"cells": cells})
    draw(cells, args.np, args.figure)


def draw(cells: list[dict], np_: int, path: Path) -> None:
    """Milliseconds of training per client (on its rank) against clients per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for peft in dict.fromkeys(c["peft"] for c in cells):
        mine = [c for c in cells if c["peft"] == peft]
        ax.plot(
            [c["clients"] for c in mine],
            [1000 * c["train_s"] * np_ / c["clients"] for c in mine],
            marker="o",
            label="full fine-tuning" if peft == "none" else "LoRA",
        )
    ax.set_xscale("log")
    ax.set(
        xlabel="clients a round (8 examples, one step each)",
        ylabel="ms of training a client",
        title=f"MiniLM, np={np_}",
    )
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
