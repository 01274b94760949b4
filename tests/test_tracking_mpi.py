"""Live tracking under real MPI: a run and its resumption, tracked to TensorBoard and to
an offline W&B run, read back and compared with what results.h5 holds."""

import json

import numpy as np
import pytest
from conftest import run_mpi
from test_reliability_mpi import job
from test_tracking import read_events, wandb_launches

from fedmpi.results import read_results
from fedmpi.tracking import split_row


@pytest.mark.mpi
def test_tracking_a_run_and_its_resume_matches_results_h5(tiny_bert, toy_dataset, tmp_path):
    out, tb = tmp_path / "out", tmp_path / "tb"
    args = job(
        tiny_bert, toy_dataset, out, "--clients", 4, "--checkpoint-every", 1, "--eval-clients",
        "--tensorboard", tb, "--wandb", "fedmpi-test",
    )  # fmt: skip
    home = tmp_path / "wandb-home"
    env = {
        "WANDB_MODE": "offline",
        **{k: str(home / k) for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")},
    }
    first = run_mpi(2, [*args, "--rounds", "2"], env=env)
    assert first.returncode == 0, first.output
    resumed = run_mpi(2, [*args, "--rounds", "3"], env=env)
    assert resumed.returncode == 0, resumed.output

    results = read_results(out / "results.h5")
    assert list(results["round"]) == [1, 2, 3]
    groups = json.loads(results["attrs"]["layer_groups"])
    tracked = [k for k in results["per_round"] if k != "launch"]  # results.h5's bookkeeping
    rows = [{k: results[k][i] for k in tracked} for i in range(3)]
    expected = [split_row(row, 4, groups) for row in rows]
    assert all(len(histograms) >= 4 for _, _, histograms in expected)  # the check has teeth

    events = read_events(tb)
    for round_, scalars, histograms in expected:
        assert "metrics/test_accuracy" in scalars and "timing/train_s" in scalars
        for tag, value in scalars.items():
            steps = [e for e in events.Scalars(tag) if e.step == round_]
            assert [e.value for e in steps] == [pytest.approx(value, rel=1e-6)], (tag, round_)
        for tag, values in histograms.items():
            (event,) = [e for e in events.Histograms(tag) if e.step == round_]
            assert event.histogram_value.num == len(values), (tag, round_)
            assert event.histogram_value.sum == pytest.approx(values.sum(), rel=1e-6)

    first_launch, second_launch = wandb_launches(out)
    assert first_launch["id"] == second_launch["id"]
    assert sorted(first_launch["history"]) == [1, 2] and sorted(second_launch["history"]) == [3]
    assert second_launch["config"]["rounds"] == 3 and second_launch["config"]["world_size"] == 2
    for launch in (first_launch, second_launch):
        for round_, logged in launch["history"].items():
            _, scalars, histograms = expected[round_ - 1]
            assert {k: logged[k] for k in scalars} == pytest.approx(scalars, rel=1e-9)
            for tag, values in histograms.items():
                assert np.sum(logged[f"{tag}/values"]) == len(values), (tag, round_)
