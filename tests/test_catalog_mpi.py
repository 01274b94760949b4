"""The derived offline models train for a round under real MPI (rank 0 builds them)."""

import numpy as np
import pytest
from conftest import run_mpi

from fedmpi.results import read_results

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize(
    "model,architecture",
    [
        ("distil-minilm", "DistilBertForSequenceClassification"),
        ("albert-tiny", "AlbertForSequenceClassification"),
    ],
)
def test_derived_model_runs_one_federated_round(model, architecture, tmp_path):
    out = tmp_path / "out"
    result = run_mpi(
        2,
        [
            "-m",
            "fedmpi",
            "--model",
            model,
            "--dataset",
            "bbc_news",
            "--rounds",
            "1",
            "--train-samples",
            "64",
            "--test-samples",
            "64",
            "--max-seq-len",
            "32",
            "--output",
            str(out),
        ],
        env={"FEDMPI_CACHE": str(tmp_path / "cache")},  # built here, by rank 0, during the run
    )
    assert result.returncode == 0, result.output
    results = read_results(out / "results.h5")
    assert results["label_names"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert f"model: {model} ({architecture})" in result.output
    assert np.isfinite(results["metrics/train_loss"][0])
    assert results["diagnostics/global_update_norm"][0] > 0  # the round moved the model
    assert results["clients/label_histogram"].sum() == 64
    # Accuracy is a count over the 64 test examples, not an arbitrary float.
    correct = results["metrics/test_accuracy"][0] * 64
    assert abs(correct - round(correct)) < 1e-6
    assert list((tmp_path / "cache" / "models").iterdir())  # the model directory was built
