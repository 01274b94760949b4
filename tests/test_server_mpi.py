"""Server optimizers and weighting under real MPI, in the FedSGD setting (each client one
full-batch SGD step a round, dropout off), where the clients' weighted average is known in
closed form: ``x - lr * (weighted mean of the clients' full-batch gradients)``.

The reference computes those gradients with plain PyTorch on the data itself and applies
Reddi et al.'s Algorithm 2 in numpy (``conftest.Algorithm2``); the fedmpi runs stop
after round 2 and resume from their checkpoint for round 3.
"""

import csv

import numpy as np
import pytest
import torch
from conftest import BETA1, BETA2, ETA, MOMENTUM, TAU, Algorithm2, fedmpi_args, run_mpi
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedmpi.results import read_results

pytestmark = pytest.mark.mpi
LOCAL_LR, SEQ = 0.5, 32


def full_batch_gradient(model, tokenizer, rows) -> np.ndarray:
    """The mean cross-entropy's gradient over ``rows`` (text, label), flattened."""
    batch = tokenizer(
        [t for t, _ in rows],
        truncation=True,
        max_length=SEQ,
        padding=True,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    model.zero_grad()
    model(**batch, labels=torch.tensor([y for _, y in rows])).loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().numpy()


def reference_model(tiny_bert, groups, weights, server: str, rounds: int):
    """x_T of FedSGD with the given client data (lists of rows) and averaging weights."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert).train()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    x = torch.nn.utils.parameters_to_vector(model.parameters()).detach().double().numpy()
    optimizer = Algorithm2(server, x)
    total = sum(weights)
    for _ in range(rounds):
        grads = [full_batch_gradient(model, tokenizer, rows) for rows in groups]
        average = x - LOCAL_LR * sum(w / total * g for w, g in zip(weights, grads, strict=True))
        x = optimizer.step(x, average)
        torch.nn.utils.vector_to_parameters(torch.from_numpy(x).float(), model.parameters())
    return model


def run_two_launches(np_, model, data, out, *extra) -> None:
    """Rounds 1-2, then a resumed launch for round 3 (the same output directory)."""
    args = [
        "--optimizer",
        "sgd",
        "--lr",
        LOCAL_LR,
        "--batch-size",
        10_000,
        "--checkpoint-every",
        1,
        "--threads",
        1,
        *extra,
    ]
    for rounds, more in ((2, ()), (3, ("--save-model",))):
        result = run_mpi(
            np_,
            fedmpi_args(model, data, out, out.parent / "cache", "--rounds", rounds, *args, *more),
        )
        assert result.returncode == 0, result.output
    assert "resuming from" in result.output and list(read_results(out / "results.h5")["round"]) == [
        1,
        2,
        3,
    ]


def assert_same_model(saved_dir, reference, tiny_bert) -> None:
    federated = AutoModelForSequenceClassification.from_pretrained(saved_dir).state_dict()
    initial = AutoModelForSequenceClassification.from_pretrained(tiny_bert).state_dict()
    moved = 0
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(federated[name], value, rtol=1e-4, atol=1e-5, msg=name)
        moved += not torch.equal(value, initial[name])
    assert moved > 10  # the comparison is not between two untouched models


def toy_rows(path):
    with open(path, newline="") as handle:
        return [(r["text"], int(r["label"])) for r in csv.DictReader(handle)]


@pytest.mark.parametrize("server", ["avgm", "adagrad", "adam", "yogi"])
def test_server_optimizer_matches_algorithm_2_across_a_resume(
    server, tiny_bert_no_dropout, toy_dataset, tmp_path
):
    # One client holding all the data: its one full-batch step is the centralized one.
    rows = toy_rows(toy_dataset / "train.csv")
    run_two_launches(
        2,
        tiny_bert_no_dropout,
        toy_dataset,
        tmp_path / "out",
        "--clients",
        2,
        "--server-opt",
        server,
        "--server-lr",
        ETA,
        "--server-momentum",
        MOMENTUM,
        "--server-beta1",
        BETA1,
        "--server-beta2",
        BETA2,
        "--server-tau",
        TAU,
    )
    # Two IID shards of 200 weighted by size: their mean gradient is the union's.
    reference = reference_model(tiny_bert_no_dropout, [rows], [1.0], server, rounds=3)
    assert_same_model(tmp_path / "out" / "model", reference, tiny_bert_no_dropout)


def test_uniform_weighting_averages_clients_not_examples(
    tiny_bert_no_dropout, toy_dataset, tmp_path
):
    """Two natural groups of 60 and 340 examples on two clients: ``--weighting uniform``
    gives each client weight 1/2, where FedAvg would give 0.15 and 0.85."""
    rows = toy_rows(toy_dataset / "train.csv")
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label", "group"])
        writer.writerows((t, y, "small" if i < 60 else "large") for i, (t, y) in enumerate(rows))
    (data / "test.csv").write_text((toy_dataset / "test.csv").read_text())
    run_two_launches(
        1,
        tiny_bert_no_dropout,
        data,
        tmp_path / "out",
        "--clients",
        2,
        "--partition",
        "by:group",
        "--weighting",
        "uniform",
    )
    groups = [rows[:60], rows[60:]]
    assert sorted(read_results(tmp_path / "out" / "results.h5")["clients/sizes"]) == [60, 340]
    uniform = reference_model(tiny_bert_no_dropout, groups, [1.0, 1.0], "fedavg", rounds=3)
    assert_same_model(tmp_path / "out" / "model", uniform, tiny_bert_no_dropout)
    by_size = reference_model(tiny_bert_no_dropout, groups, [60.0, 340.0], "fedavg", rounds=3)
    with pytest.raises(AssertionError):  # the test can tell the two weightings apart
        assert_same_model(tmp_path / "out" / "model", by_size, tiny_bert_no_dropout)
