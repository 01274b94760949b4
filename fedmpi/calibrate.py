"""The noise multiplier that spends a target epsilon: ``python -m fedmpi.calibrate``.

Why: a privacy study states its arms as budgets (epsilon 1, 3 and 8 at a delta), while a
run takes ``--dp-noise z``. This finds, by bisection, the smallest z (to 0.1 %) whose
epsilon after the given rounds, as fedmpi's accountant reports it (``privacy.spent_epsilon``:
PRV, or RDP where tighter), is at most the target, for Poisson cohorts at rate q:

    python -m fedmpi.calibrate --epsilon 1 3 8 --rounds 12 --cohort 1000 --population 1000000
    python -m fedmpi.calibrate --epsilon 3 --rounds 12 --rate 0.1 --delta 1e-5

The cohort and population are what ``--dp-noise-cohort`` and ``--dp-population`` give a
run (q = N / M); delta defaults to fedmpi's, 1 / M^1.1. With adaptive clipping the
accountant charges more than z alone (docs/privacy.md): calibrate z, then read the run's
``privacy/epsilon``. Bad input exits 2 with one line.
"""

from __future__ import annotations

import argparse
import math
import sys

from fedmpi.privacy import default_delta, rdp_epsilon, spent_epsilon

PROG = "python -m fedmpi.calibrate"
RELATIVE_TOLERANCE = 1e-3  # on z


class CalibrationError(ValueError):
    """Input for which no noise multiplier can be found (reported as one line, exit 2)."""


def noise_for_epsilon(epsilon: float, rate: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier z (within RELATIVE_TOLERANCE) whose epsilon after
    ``rounds`` at sampling rate ``rate`` and ``delta`` is at most ``epsilon``."""
    if not epsilon > 0 or not math.isfinite(epsilon):
        raise CalibrationError(f"the target epsilon must be positive and finite, got {epsilon}")
    if not 0 < rate <= 1:
        raise CalibrationError(f"the sampling rate must be in (0, 1], got {rate}")
    if rounds < 1:
        raise CalibrationError(f"rounds must be at least 1, got {rounds}")
    if not 0 < delta < 1:
        raise CalibrationError(f"delta must be in (0, 1), got {delta}")

    def spends(z: float) -> float:
        return spent_epsilon(z, rate, rounds, delta)

    low, high = 0.0, 1.0
    while spends(high) > epsilon:  # epsilon falls as z grows: find a z that is enough
        low, high = high, 2 * high
        if high > 1e4:
            raise CalibrationError(f"no noise multiplier below 1e4 reaches epsilon {epsilon:g}")
    while high - low > RELATIVE_TOLERANCE * high:
        middle = (low + high) / 2
        if spends(middle) > epsilon:
            low = middle
        else:
            high = middle
    return high


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--epsilon", type=float, nargs="+", required=True, help="target(s)")
    parser.add_argument("--rounds", type=int, required=True, help="rounds of the run")
    rate = parser.add_mutually_exclusive_group(required=True)
    rate.add_argument("--rate", type=float, help="the Poisson sampling rate q")
    rate.add_argument("--cohort", type=int, help="expected cohort N (with --population M)")
    parser.add_argument("--population", type=int, help="clients M the cohorts come from")
    parser.add_argument("--delta", type=float, help="default: 1 / population^1.1")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.cohort is not None:
            if args.population is None or not 0 < args.cohort <= args.population:
                raise CalibrationError("--cohort N needs --population M with 0 < N <= M")
            rate = args.cohort / args.population
        else:
            rate = args.rate
        if args.delta is not None:
            delta = args.delta
        elif args.population is not None and args.population > 0:
            delta = default_delta(args.population)
        else:
            raise CalibrationError("give --delta, or --population for the default delta")
        rows = []
        for target in args.epsilon:
            z = noise_for_epsilon(target, rate, args.rounds, delta)
            rows.append((target, z, spent_epsilon(z, rate, args.rounds, delta)))
    except CalibrationError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(f"q = {rate:.6g}, {args.rounds} rounds, delta = {delta:.3g}")
    print("| target epsilon | --dp-noise | epsilon (fedmpi) | epsilon (RDP) |")
    print("|---:|---:|---:|---:|")
    for target, z, spent in rows:
        rdp = rdp_epsilon(z, rate, args.rounds, delta)
        print(f"| {target:g} | {z:.4g} | {spent:.3f} | {rdp:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
