"""The committed studies regenerate: ``python -m fedmpi.report`` over the committed runs
gives the committed summary byte for byte (the README's tables are taken from it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUDIES = [("study/runs", "study/report"), ("study/privacy/runs", "study/privacy/report")]


@pytest.mark.parametrize(("runs", "report"), STUDIES)
def test_committed_runs_regenerate_the_committed_summary(runs, report, tmp_path):
    done = sorted((ROOT / runs).glob("*/fedmpi.done"))
    assert done, f"{runs} holds no finished run"
    subprocess.run(
        [sys.executable, "-m", "fedmpi.report", str(ROOT / runs), "--output", str(tmp_path)],
        check=True,
        capture_output=True,
        env={"MPLBACKEND": "Agg", "PATH": "/usr/bin:/bin"},
    )
    expected = (ROOT / report / "summary.csv").read_bytes()
    assert (tmp_path / "summary.csv").read_bytes() == expected
