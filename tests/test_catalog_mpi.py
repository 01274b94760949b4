"""The derived offline models train for a round under real MPI (rank 0 builds them)."""

import numpy as np
import pytest
from conftest import run_mpi

from fedmpi.results import read_results


@pytest.mark.parametrize("model", ["distil-minilm", "albert-tiny"])
def test_derived_model_runs_one_federated_round(model, tmp_path):
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
    assert np.isfinite(results["metrics/train_loss"][0])
    assert 0 <= results["metrics/test_accuracy"][0] <= 1
    assert list((tmp_path / "cache" / "models").iterdir())  # the model directory was built
