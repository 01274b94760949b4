"""Shared by the benchmarks that launch MPI jobs: the ``mpiexec`` command line, and the
real job (``python -m fedmpi``) with its per-round timings read back from results.h5."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
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


class PssSampler:
    """Peak of the summed PSS of a process tree's ``python`` processes (the ranks)."""

    def __init__(self, root_pid: int, interval: float = 0.2) -> None:
        self.root_pid = root_pid
        self.interval = interval
        self.peak_total_mb = 0.0
        self.peak_rank_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _ranks(self) -> list[int]:
        children, frontier = [], [self.root_pid]
        while frontier:
            pid = frontier.pop()
            try:
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            frontier += [int(k) for k in kids]
            children += [int(k) for k in kids]
        return [p for p in children if _is_python(p)]

    def _run(self) -> None:
        while not self._stop.is_set():
            sizes = [_pss_mb(p) for p in self._ranks()]
            if sizes:
                self.peak_total_mb = max(self.peak_total_mb, sum(sizes))
                self.peak_rank_mb = max(self.peak_rank_mb, max(sizes))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _is_python(pid: int) -> bool:
    try:
        return b"python" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False


def _pss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_with_pss(command: list[str]) -> tuple[str, PssSampler]:
    """Run a job (its output captured) while sampling its ranks' PSS; exits on failure."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = PssSampler(proc.pid)
    log, _ = proc.communicate()
    sampler.stop()
    if proc.returncode:
        raise SystemExit(f"job failed ({proc.returncode}): {' '.join(command)}\n{log[-2000:]}")
    return log, sampler


def save_table(out: Path, name: str, table: str, raw: dict) -> None:
    """Print a benchmark's markdown table and keep it, with its raw numbers and how it was
    run, as OUT/NAME.md and OUT/NAME.json."""
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(table + "\n")
    record = {"argv": sys.argv, "time": time.ctime(), **raw}
    (out / f"{name}.json").write_text(json.dumps(record, indent=1))
