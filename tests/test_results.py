"""The results file: one row per round whatever each round measured, atomic rewrites that
survive a failed write, and a resumed run's history."""

import errno
import json

import h5py
import numpy as np
import pytest

from fedmpi.results import ResultsWriter, read_results

ATTRS = {"config": json.dumps({"model": "m", "dataset": "d"}), "label_names": '["a", "b"]'}


def writer(path):
    return ResultsWriter(path, ATTRS, {"clients/sizes": np.array([3, 4])}, {"launch": "first"})


def test_rows_stay_aligned_when_a_round_does_not_measure_something(tmp_path):
    results = writer(tmp_path / "results.h5")
    results.append({"round": 1, "metrics/test_accuracy": 0.5})
    results.append({"round": 2, "sync/param_crc32": np.array([7, 7])})  # --verify-sync on
    results.append({"round": 3, "metrics/test_accuracy": 0.7})
    data = read_results(tmp_path / "results.h5")
    assert list(data["round"]) == [1, 2, 3]
    np.testing.assert_array_equal(data["metrics/test_accuracy"], [0.5, np.nan, 0.7])
    assert data["sync/param_crc32"].tolist() == [[-1, -1], [7, 7], [-1, -1]]
    assert data["clients/sizes"].tolist() == [3, 4] and "clients/sizes" in data["static"]


def test_a_failed_write_keeps_the_last_complete_file(tmp_path, monkeypatch):
    path = tmp_path / "results.h5"
    results = writer(path)
    results.append({"round": 1, "metrics/test_accuracy": 0.5})

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5py.Group, "create_dataset", full_disk)
    with pytest.raises(OSError, match="No space left"):
        results.append({"round": 2, "metrics/test_accuracy": 0.6})
    monkeypatch.undo()
    assert read_results(path)["round"].tolist() == [1]  # readable, and still round 1
    assert [p.name for p in tmp_path.iterdir()] == ["results.h5"]  # no temporary left

    # A rerun resuming from a checkpoint of round 1 continues the file.
    again = ResultsWriter.reopen(path, 1, ATTRS, {}, {"launch": "second"})
    again.append({"round": 2, "metrics/test_accuracy": 0.6})
    data = read_results(path)
    assert data["round"].tolist() == [1, 2] and data["launch"].tolist() == [0, 1]


def test_reopen_drops_rounds_after_the_checkpoint_by_round_number(tmp_path):
    path = tmp_path / "results.h5"
    results = writer(path)
    for round_ in (1, 2, 3):
        results.append({"round": round_, "metrics/train_loss": float(round_)})
    again = ResultsWriter.reopen(path, 2, {**ATTRS, "world_size": 4}, {}, {"launch": "second"})
    again.append({"round": 3, "metrics/train_loss": 30.0})
    data = read_results(path)
    assert data["round"].tolist() == [1, 2, 3]
    assert data["metrics/train_loss"].tolist() == [1.0, 2.0, 30.0]
    assert data["attrs"]["world_size"] == 4
    launches = json.loads(data["attrs"]["launches"])
    assert [x["launch"] for x in launches] == ["first", "second"]
    assert [x["first_round"] for x in launches] == [1, 3]
