"""Clients independent of ranks, cohorts, partitions, FedProx, server optimizers (real MPI)."""

import numpy as np
import pytest
import torch
from conftest import fedmpi_args, run_mpi
from transformers import AutoModelForSequenceClassification

from fedmpi.config import Config
from fedmpi.data import load_text_splits
from fedmpi.partition import sample_cohort
from fedmpi.results import read_results

pytestmark = pytest.mark.mpi


def run_fedmpi(np_, tiny_bert, toy_dataset, out, *extra):
    args = fedmpi_args(tiny_bert, toy_dataset, out, out.parent / "cache", "--threads", 1, *extra)
    result = run_mpi(np_, args)
    assert result.returncode == 0, result.output
    return read_results(out / "results.h5")


def test_results_do_not_depend_on_the_number_of_ranks(tiny_bert, toy_dataset, tmp_path):
    """K = 4 clients on 1, 2 and 4 ranks: same shards, data order and dropout per client."""
    models, metrics = [], []
    for np_ in (1, 2, 4):
        out = tmp_path / f"np{np_}"
        results = run_fedmpi(
            np_,
            tiny_bert,
            toy_dataset,
            out,
            "--clients",
            4,
            "--rounds",
            2,
            "--lr",
            "1e-3",
            "--save-model",
        )
        assert results["attrs"]["world_size"] == np_
        models.append(
            AutoModelForSequenceClassification.from_pretrained(out / "model").state_dict()
        )
        metrics.append(
            np.stack(
                [
                    results["metrics/test_accuracy"],
                    results["metrics/test_loss"],
                    results["metrics/train_loss"],
                ]
            )
        )
    for other, other_metrics in zip(models[1:], metrics[1:], strict=True):
        for name, value in models[0].items():
            assert torch.allclose(other[name], value, rtol=1e-5, atol=1e-6), name
        np.testing.assert_allclose(other_metrics, metrics[0], atol=5e-5)


def test_cohorts_partitions_and_histograms_are_logged(tiny_bert, toy_dataset, tmp_path):
    results = run_fedmpi(
        2,
        tiny_bert,
        toy_dataset,
        tmp_path / "out",
        "--clients",
        6,
        "--clients-per-round",
        "0.5",
        "--partition",
        "dirichlet:0.5",
        "--rounds",
        3,
        "--seed",
        5,
    )
    cohort = results["clients/cohort"]
    assert cohort.shape == (3, 6)
    for round_, row in enumerate(cohort, start=1):
        assert np.flatnonzero(row).tolist() == sample_cohort(6, 3, 5, round_).tolist()
    sizes, histogram = results["clients/sizes"], results["clients/label_histogram"]
    assert histogram.shape == (6, 2) and np.array_equal(histogram.sum(axis=1), sizes)
    assert sizes.sum() == 400
    norms = results["diagnostics/client_update_norm"]
    assert np.array_equal(np.isnan(norms), cohort == 0)  # absent clients have no update
    assert np.all(norms[cohort == 1] > 0)


def test_fedprox_keeps_clients_near_the_global_model(tiny_bert, toy_dataset, tmp_path):
    common = ("--clients", 2, "--rounds", 1, "--lr", "5e-3", "--local-epochs", 2)
    plain = run_fedmpi(2, tiny_bert, toy_dataset, tmp_path / "plain", *common)
    prox = run_fedmpi(
        2, tiny_bert, toy_dataset, tmp_path / "prox", *common, "--prox-mu", 50, "--optimizer", "sgd"
    )
    sgd = run_fedmpi(2, tiny_bert, toy_dataset, tmp_path / "sgd", *common, "--optimizer", "sgd")
    prox_norm = prox["diagnostics/client_update_norm"]
    assert np.all(prox_norm < sgd["diagnostics/client_update_norm"])
    assert np.all(np.isfinite(plain["diagnostics/client_update_cosine"]))
    cosine = plain["diagnostics/client_update_cosine"]
    assert np.all((cosine > 0) & (cosine <= 1 + 1e-6))


def test_bf16_autocast_approximates_fp32_training(tiny_bert, toy_dataset, tmp_path):
    """--precision bf16 computes in bf16 (the result is not fp32's bit for bit) yet stays
    within bf16's rounding of it: same losses and update sizes to a few per cent. (The
    server optimizers, --keep-local-opt and uniform weighting are checked exactly against
    references in test_server_mpi.py and test_reliability_mpi.py.)"""
    common = ("--clients", 2, "--rounds", 2, "--lr", "2e-3")
    fp32 = run_fedmpi(2, tiny_bert, toy_dataset, tmp_path / "fp32", *common)
    bf16 = run_fedmpi(2, tiny_bert, toy_dataset, tmp_path / "bf16", *common, "--precision", "bf16")
    for key in ("metrics/train_loss", "diagnostics/global_update_norm"):
        assert not np.array_equal(bf16[key], fp32[key])
        np.testing.assert_allclose(bf16[key], fp32[key], rtol=0.05)


def test_partition_by_a_natural_column_keeps_each_debate_on_one_client(tiny_bert, tmp_path):
    """debates grouped by:debate (4 debates) over 4 clients: one whole debate per client."""
    results = run_fedmpi(
        2,
        tiny_bert,
        "debates",
        tmp_path / "out",
        "--clients",
        4,
        "--partition",
        "by:debate",
        "--rounds",
        1,
    )
    train = load_text_splits(Config(dataset="debates", partition="by:debate"))
    per_debate = sorted(np.unique(np.asarray(train.train_groups), return_counts=True)[1])
    assert sorted(results["clients/sizes"]) == per_debate
