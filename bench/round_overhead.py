"""What fraction of a federated round is not local training, with and without evaluation.

    python bench/round_overhead.py [--nps 2 4] [--rounds 3] [--train-samples 800]

Runs the real job (``mpiexec -n NP python -m fedmpi``: offline MiniLM on Rotten Tomatoes,
defaults otherwise) twice per rank count: evaluating the global model every round
(``--eval-every 1``, the default) and only after the last round (``--eval-every`` larger
than ``--rounds``). From rank 0's ``timing/*`` in results.h5 it prints the mean seconds
per phase over the rounds after the first (the first includes warm-up); for the
end-only runs also without the last round, which evaluates. "not training" is
(round_s - train_s) / round_s; "wait" (rank 0 waiting in a sleeping barrier for slower
ranks) is part of it and shown on its own. With more ranks than cores, "wait" also holds
the time-slicing of oversubscribed ranks.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from runjob import DEFAULT_MPIEXEC, PHASES, run_fedmpi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nps", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-samples", type=int, default=800)
    parser.add_argument("--mpiexec", default=DEFAULT_MPIEXEC)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more fedmpi flags")
    args = parser.parse_args()
    modes = {"every round": 1, "end only": args.rounds + 1}

    header = " | ".join(p.removesuffix("_s") + " s" for p in PHASES)
    print(f"| np | eval | rounds | {header} | not training | wait share | job wall s |")
    print("|---:|---|---|" + "---:|" * (len(PHASES) + 3))
    with tempfile.TemporaryDirectory() as tmp:
        for np_ in args.nps:
            for mode, every in modes.items():
                flags = ["--rounds", str(args.rounds), "--train-samples", str(args.train_samples)]
                flags += ["--eval-every", str(every), *args.extra]
                timing, wall = run_fedmpi(args.mpiexec, np_, Path(tmp) / f"{np_}-{every}", flags)
                first = 1 if args.rounds > 1 else 0
                spans = [(first, args.rounds)]
                if every > args.rounds and args.rounds - first > 1:
                    spans.append((first, args.rounds - 1))  # drop the evaluated last round
                for lo, hi in spans:
                    mean = {p: float(np.mean(timing[p][lo:hi])) for p in PHASES}
                    rounds = f"{lo + 1}-{hi}" if hi - lo > 1 else str(hi)
                    cells = " | ".join(f"{mean[p]:.2f}" for p in PHASES)
                    round_s = mean["round_s"]
                    print(
                        f"| {np_} | {mode} | {rounds} | {cells} | "
                        f"{(round_s - mean['train_s']) / round_s:.1%} | "
                        f"{mean['wait_s'] / round_s:.1%} | {wall:.0f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
