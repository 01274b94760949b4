"""Resuming under real MPI: what a checkpoint refuses (another client count, changed
data), what a resumed results file records, and the end of endless requeues."""

import json
import shutil

import h5py
import pytest
from conftest import job, run_mpi

from fedmpi.preemption import EXIT_PREEMPTED, EXIT_STALLED
from fedmpi.results import read_results

pytestmark = pytest.mark.mpi


def test_a_resume_refuses_another_client_count_and_changed_data(tiny_bert, toy_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(toy_dataset, data)
    out = tmp_path / "out"
    base = job(tiny_bert, data, out, "--checkpoint-every", 1)  # no --clients: one per rank
    first = run_mpi(2, [*base, "--rounds", "1"])
    assert first.returncode == 0, first.output
    with h5py.File(out / "checkpoint.h5") as f:  # a finished run keeps its last round
        assert f.attrs["round"] == 1

    other_np = run_mpi(1, [*base, "--rounds", "2"])
    assert other_np.returncode == 2, other_np.output
    assert "clients: 2 there, 1 now" in other_np.output and "round 2/2" not in other_np.output

    original = (data / "train.csv").read_text()
    (data / "train.csv").write_text(original + "a brand new review that is great,1\n")
    changed = run_mpi(2, [*base, "--rounds", "2"])
    assert changed.returncode == 2 and "data_sha256" in changed.output, changed.output

    (data / "train.csv").write_text(original)
    resumed = run_mpi(2, [*base, "--rounds", "2"])
    assert resumed.returncode == 0, resumed.output
    results = read_results(out / "results.h5")
    assert list(results["round"]) == [1, 2] and list(results["launch"]) == [0, 1]
    launches = json.loads(results["attrs"]["launches"])
    assert [x["first_round"] for x in launches] == [1, 2]
    assert [x["config"]["rounds"] for x in launches] == [1, 2]
    assert results["config"]["rounds"] == 2  # the file says what ran last, and when
    with h5py.File(out / "checkpoint.h5") as f:
        assert f.attrs["round"] == 2


def test_a_round_that_never_finishes_stops_the_requeues(tiny_bert, toy_dataset, tmp_path):
    """Preempted in the same round launch after launch (a round longer than the time
    limit): the second time (limit 2) fedmpi exits 3, which no job script requeues."""
    out = tmp_path / "out"
    args = job(tiny_bert, toy_dataset, out, "--clients", 2, "--rounds", 3)
    env = {"FEDMPI_FAULT": "1:1:preempt", "FEDMPI_MAX_STALLED_LAUNCHES": "2"}
    first = run_mpi(2, args, env=env)
    assert first.returncode == EXIT_PREEMPTED, first.output
    second = run_mpi(2, args, env=env)
    assert second.returncode == EXIT_STALLED, second.output
    assert "cut short in 2 launches in a row" in second.output
    assert "Not requeueing" in second.output
