"""Shared by the benchmarks that run the real job: launch ``python -m fedmpi`` under
``mpiexec`` and read the per-round timings back from its results.h5."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fedmpi.results import read_results

DEFAULT_MPIEXEC = str(Path(sys.executable).with_name("mpiexec"))
PHASES = ("train_s", "wait_s", "allreduce_s", "eval_s", "round_s")


def run_fedmpi(
    mpiexec: str, np_: int, out: Path, flags: list[str]
) -> tuple[dict[str, np.ndarray], float]:
    """Run one job; returns (rank 0's ``timing/*`` arrays, one per round; wall seconds)."""
    command = [mpiexec, "-n", str(np_), sys.executable, "-m", "fedmpi", "--output", str(out)]
    start = time.perf_counter()
    subprocess.run([*command, *flags], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    results = read_results(out / "results.h5")
    return {p: np.asarray(results[f"timing/{p}"], dtype=float) for p in PHASES}, wall
