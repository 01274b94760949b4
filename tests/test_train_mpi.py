"""End-to-end federated runs under real mpiexec on a tiny BERT and a learnable toy corpus."""

import json

import numpy as np
import pytest
import torch
from conftest import fedmpi_args, run_mpi
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedmpi.results import read_results

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def learned_run(tiny_bert, toy_dataset, tmp_path_factory):
    """One 2-rank run, shared by the assertions below (MPI start-up is the slow part)."""
    root = tmp_path_factory.mktemp("e2e")
    out = root / "out"
    result = run_mpi(
        2,
        fedmpi_args(
            tiny_bert,
            toy_dataset,
            out,
            root / "cache",
            "--rounds",
            4,
            "--lr",
            "2e-3",
            "--local-epochs",
            2,
            "--verify-sync",
            "--save-model",
        ),
    )
    assert result.returncode == 0, result.output
    return out, result.output


def test_run_improves_over_chance(learned_run):
    out, output = learned_run
    results = read_results(out / "results.h5")
    accuracy = results["metrics/test_accuracy"]
    assert len(accuracy) == 4
    assert accuracy[-1] > 0.8, accuracy  # chance is 0.5 on the balanced toy task
    assert results["metrics/train_loss"][-1] < results["metrics/train_loss"][0]
    assert "round 4/4" in output and "done: final test accuracy" in output


def test_results_file_layout(learned_run):
    out, _ = learned_run
    results = read_results(out / "results.h5")
    for key in [
        "metrics/test_accuracy",
        "metrics/test_loss",
        "metrics/test_macro_f1",
        "metrics/train_loss",
        "timing/round_s",
        "timing/train_s",
        "timing/allreduce_s",
        "timing/eval_s",
    ]:
        assert results[key].shape == (4,), key
        assert np.all(np.isfinite(results[key])), key
    assert list(results["round"]) == [1, 2, 3, 4]
    assert results["config"]["rounds"] == 4 and results["config"]["clients"] is None
    assert list(results["clients/sizes"]) == [200, 200]
    assert list(results["clients/rank"]) == [0, 1]
    assert results["label_names"] == ["0", "1"]


def test_every_rank_holds_identical_parameters_each_round(learned_run):
    out, _ = learned_run
    checksums = read_results(out / "results.h5")["sync/param_crc32"]
    assert checksums.shape == (4, 2)
    assert np.all(checksums == checksums[:, :1])
    assert len(set(checksums[:, 0])) == 4  # the model changed every round


def test_saved_model_loads_and_matches_reported_accuracy(learned_run, toy_dataset):
    out, _ = learned_run
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    rows = [line.rsplit(",", 1) for line in (toy_dataset / "test.csv").read_text().splitlines()[1:]]
    texts, labels = [r[0] for r in rows], torch.tensor([int(r[1]) for r in rows])
    batch = tokenizer(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.inference_mode():
        predicted = model(**batch).logits.argmax(-1)
    accuracy = (predicted == labels).float().mean().item()
    reported = read_results(out / "results.h5")["metrics/test_accuracy"][-1]
    assert accuracy == pytest.approx(reported, abs=1e-9)


def test_fedsgd_equals_centralized_full_batch_gradient_descent(
    tiny_bert_no_dropout, toy_dataset, tmp_path
):
    """K clients, one full-batch SGD step each per round, dropout off: FedAvg weighted by
    shard size is exactly gradient descent on the union of the shards."""
    lr, rounds, seq = 0.5, 2, 32
    result = run_mpi(
        2,
        fedmpi_args(
            tiny_bert_no_dropout,
            toy_dataset,
            tmp_path / "out",
            tmp_path / "cache",
            "--clients",
            4,
            "--optimizer",
            "sgd",
            "--lr",
            lr,
            "--batch-size",
            10_000,
            "--rounds",
            rounds,
            "--save-model",
        ),
    )
    assert result.returncode == 0, result.output
    federated = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model")

    central = AutoModelForSequenceClassification.from_pretrained(tiny_bert_no_dropout)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_no_dropout)
    rows = [
        line.rsplit(",", 1) for line in (toy_dataset / "train.csv").read_text().splitlines()[1:]
    ]
    batch = tokenizer(
        [r[0] for r in rows],
        truncation=True,
        max_length=seq,
        padding=True,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    labels = torch.tensor([int(r[1]) for r in rows])
    optimizer = torch.optim.SGD(central.parameters(), lr=lr)
    central.train()
    for _ in range(rounds):
        central(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    initial = AutoModelForSequenceClassification.from_pretrained(tiny_bert_no_dropout).state_dict()
    fed_state, central_state = federated.state_dict(), central.state_dict()
    moved = 0
    for name, value in central_state.items():
        assert torch.allclose(fed_state[name], value, rtol=1e-4, atol=2e-6), name
        moved += not torch.equal(value, initial[name])
    assert moved > 10  # the comparison is not between two untouched models
    config = json.loads(json.dumps(read_results(tmp_path / "out" / "results.h5")["config"]))
    assert config["clients"] == 4
