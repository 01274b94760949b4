"""The committed studies regenerate: ``python -m fedmpi.report`` over the committed runs
gives the committed summary byte for byte (the README's tables are taken from it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUDIES = [
    ("study/runs", "study/report"),
    ("study/v1/runs", "study/v1/report"),
    ("study/compression/runs", "study/compression/report"),
    ("study/pilot/runs", "study/pilot/report"),
    ("study/privacy/runs", "study/privacy/report"),
    ("study/privacy/pilot/runs", "study/privacy/pilot/report"),
    ("study/privacy/v1/runs", "study/privacy/v1/report"),
]


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


def _outcome_from_file(path: Path) -> str:
    """The outcome rules of docs/study.md, written out again on the raw datasets."""
    import json
    import math

    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        accuracy = f["metrics/test_accuracy"][()]
        loss = f["metrics/train_loss"][()]
        m, n = float(f.attrs["majority_rate"]), int(f.attrs["test_examples"])
        confusion = f["metrics/test_confusion"][()] if "metrics/test_confusion" in f else None
        assert len(accuracy) == json.loads(f.attrs["config"])["rounds"]
    last = np.flatnonzero(~np.isnan(accuracy))[-1]
    if loss[-1] >= 0.95 * loss[0]:
        if confusion is None:
            return ""
        final = confusion[last]
        if final.sum(axis=0).max() >= 0.95 * final.sum():
            return "collapsed"
    return "learned" if accuracy[last] > m + 2 * math.sqrt(m * (1 - m) / n) else "slow"


@pytest.mark.parametrize(("runs", "report"), STUDIES)
def test_outcome_counts_match_a_recomputation_from_the_files(runs, report):
    import csv

    with open(ROOT / report / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        found = [_outcome_from_file(ROOT / runs / p) for p in row["runs"].split(";")]
        for name in ("learned", "slow", "collapsed"):
            expected = "" if "" in found else f"{found.count(name)}/{len(found)}"
            assert row[name] == expected, (row["runs"], name)


@pytest.mark.parametrize(("runs", "report"), STUDIES)
def test_every_file_a_committed_summary_reads_is_tracked_by_git(runs, report):
    """A run present here but ignored by git is missing from a clean clone (it happened)."""
    import csv

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    with open(ROOT / report / "summary.csv", newline="") as handle:
        files = [
            f"{runs}/{path}" for row in csv.DictReader(handle) for path in row["runs"].split(";")
        ]
    tracked = subprocess.run(
        ["git", "ls-files", "--", runs], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert sorted(set(files) - set(tracked)) == []


def test_the_privacy_study_spends_the_epsilon_each_arm_names():
    """study/privacy: each DP arm's final epsilon is the one its name asks for (1, 3, 8,
    from z calibrated by fedmpi.calibrate), of a simulated deployment, with noise a given
    seed made reproducible; the arms without noise spend none."""
    import re

    import h5py

    runs = sorted((ROOT / "study/privacy/runs").glob("*/results.h5"))
    assert len(runs) == 24
    for path in runs:
        name = path.parent.name
        with h5py.File(path, "r") as f:
            epsilon = float(f["privacy/epsilon"][-1])
            attrs = dict(f.attrs)
        target = re.search(r"-eps(\d+)-", name)
        if target is None:
            assert epsilon == float("inf"), name
            continue
        assert epsilon == pytest.approx(float(target.group(1)), rel=0.01), name
        assert attrs["dp_simulated"] and attrs["dp_noise_seed_given"], name
        assert attrs["dp_noise_cohort"] == 1000 and attrs["dp_population"] == 100000, name
