"""Where a round's time goes: train / wait / allreduce / eval, for the default model.

    python bench/round_split.py [--nps 2 4] [--rounds 2] [--mpiexec PATH]

Runs the real job (``python -m fedmpi``, offline MiniLM on Rotten Tomatoes) at each -np
with the same total training set, then reads each run's results.h5 and prints one table
of mean seconds per round (rounds after the first, which includes warm-up, when there
are several). Timings are rank 0's view; "wait" is rank 0 waiting for the slowest rank.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from fedmpi.results import read_results

PHASES = ("train_s", "wait_s", "allreduce_s", "eval_s", "round_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nps", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mpiexec", default=str(Path(sys.executable).with_name("mpiexec")))
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more fedmpi flags")
    args = parser.parse_args()

    print(f"| np | {' | '.join(p.removesuffix('_s') + ' s' for p in PHASES)} | not training |")
    print("|---:|" + "---:|" * (len(PHASES) + 1))
    with tempfile.TemporaryDirectory() as tmp:
        for np_ in args.nps:
            out = Path(tmp) / f"np{np_}"
            command = [args.mpiexec, "-n", str(np_), sys.executable, "-m", "fedmpi",
                       "--rounds", str(args.rounds), "--output", str(out), *args.extra]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            results = read_results(out / "results.h5")
            skip = 1 if args.rounds > 1 else 0
            means = [float(np.mean(results[f"timing/{p}"][skip:])) for p in PHASES]
            overhead = 1 - means[0] / means[-1]
            print(f"| {np_} | {' | '.join(f'{m:.3f}' for m in means)} | {overhead:.1%} |", flush=True)


if __name__ == "__main__":
    main()
