"""Time per round as the rank count grows, with the total training set fixed.

    python bench/scaling.py [--nps 1 2 4] [--rounds 2] [--train-samples 800]

Runs the real job (``mpiexec -n NP python -m fedmpi``: offline MiniLM on Rotten Tomatoes,
one client per rank, ``--eval-every 100`` so only the last round evaluates) at each rank
count with the same ``--train-samples`` split over the ranks, so the work per round is
fixed and only its distribution changes. Prints rank 0's seconds for the last round
(earlier rounds include warm-up) and the speed-up of round time without evaluation over
the first rank count. Each rank gets its share of the cores as torch threads: with more
ranks than cores (4 ranks on a 2-core machine) ranks are oversubscribed, not sped up.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from runjob import DEFAULT_MPIEXEC, PHASES, run_fedmpi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train-samples", type=int, default=800)
    parser.add_argument("--mpiexec", default=DEFAULT_MPIEXEC)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more fedmpi flags")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))

    header = " | ".join(p.removesuffix("_s") + " s" for p in PHASES)
    print(
        f"| np | ranks/core | examples/rank | {header} | round - eval s | speed-up | job wall s |"
    )
    print("|---:|---:|---:|" + "---:|" * (len(PHASES) + 3))
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for np_ in args.nps:
            flags = ["--rounds", str(args.rounds), "--train-samples", str(args.train_samples)]
            flags += ["--eval-every", "100", *args.extra]
            timing, wall = run_fedmpi(args.mpiexec, np_, Path(tmp) / str(np_), flags)
            last = {p: float(timing[p][-1]) for p in PHASES}
            no_eval = last["round_s"] - last["eval_s"]
            base = base or no_eval
            cells = " | ".join(f"{last[p]:.2f}" for p in PHASES)
            print(
                f"| {np_} | {np_ / cores:.1f} | {args.train_samples // np_} | {cells} | "
                f"{no_eval:.2f} | {base / no_eval:.2f}x | {wall:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
