"""Shared by the benchmarks that launch MPI jobs: the ``mpiexec`` command line, and the
real job (``python -m fedmpi``) with its per-round timings read back from results.h5."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fedmpi.results import read_results

DEFAULT_MPIEXEC = str(Path(sys.executable).with_name("mpiexec"))
# Rank 0's phases of a round, in train.py's order; all but round_s add up to round_s.
PHASES = ("train_s", "wait_s", "allreduce_s", "diagnostics_s", "eval_s", "round_s")


def mpiexec_prefix(mpiexec: str) -> list[str]:
    """The launcher and the flags it needs: Open MPI refuses more ranks than cores unless
    told ``--oversubscribe`` (as tests/conftest.py tells it); MPICH needs nothing."""
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True).stdout
    return (
        [mpiexec, "--oversubscribe"] if "Open MPI" in version or "OpenRTE" in version else [mpiexec]
    )


def run_fedmpi(
    mpiexec: str, np_: int, out: Path, flags: list[str]
) -> tuple[dict[str, np.ndarray], float]:
    """Run one job; returns (rank 0's ``timing/*`` arrays, one per round; wall seconds)."""
    command = [*mpiexec_prefix(mpiexec), "-n", str(np_), sys.executable, "-m", "fedmpi"]
    command += ["--output", str(out)]
    start = time.perf_counter()
    subprocess.run([*command, *flags], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    results = read_results(out / "results.h5")
    return {p: np.asarray(results[f"timing/{p}"], dtype=float) for p in PHASES}, wall
