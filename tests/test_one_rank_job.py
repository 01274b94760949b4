"""The whole federated job in this process, on one rank: fedmpi's command line with a
one-rank MPI world (mpi4py's singleton start, no ``mpiexec``), checked against plain
PyTorch.

In the FedSGD setting (each client one full-batch SGD step a round, dropout off) FedAvg
weighted by shard size is gradient descent on the union of the shards, so two rounds of
three clients of unequal shards (``quantity:1``) must end where two full-batch steps on
all the training rows end; the reported training loss of round 1 is the loss of the
initial model on all of them, and the reported test accuracy is the saved model's. A
wrong weighting, a lost or doubled local step, a server step that drops or rescales the
average, or a training loss summed wrongly all land far outside the tolerances.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fedmpi_args
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedmpi.results import read_results

LR, ROUNDS, SEQ = 0.5, 2, 32


def read_csv(path) -> tuple[list[str], torch.Tensor]:
    rows = [line.rsplit(",", 1) for line in path.read_text().splitlines()[1:]]
    return [text for text, _ in rows], torch.tensor([int(label) for _, label in rows])


def tokenized(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    return tokenizer(
        texts,
        truncation=True,
        max_length=SEQ,
        padding=True,
        return_tensors="pt",
        return_token_type_ids=False,
    )


@pytest.fixture(scope="module")
def centralized(tiny_bert_no_dropout, toy_dataset):
    """Full-batch gradient descent on every training row, in plain PyTorch: the initial
    model's loss and the model after ROUNDS steps."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_no_dropout)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_no_dropout)
    texts, labels = read_csv(toy_dataset / "train.csv")
    batch = tokenized(tokenizer, texts)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    losses = []
    for _ in range(ROUNDS):
        loss = model(**batch, labels=labels).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict(), losses


def test_one_rank_fedsgd_is_centralized_gradient_descent(
    in_process, centralized, tiny_bert_no_dropout, toy_dataset, tmp_path
):
    out = tmp_path / "out"
    args = fedmpi_args(
        tiny_bert_no_dropout,
        toy_dataset,
        out,
        tmp_path / "cache",
        *("--clients", 3, "--partition", "quantity:1", "--optimizer", "sgd", "--lr", LR),
        *("--batch-size", 10_000, "--rounds", ROUNDS, "--threads", 1, "--save-model"),
    )
    assert in_process(args) == 0
    results = read_results(out / "results.h5")
    sizes = results["clients/sizes"]
    assert sizes.sum() == 400 and len(set(sizes)) == 3, sizes  # unequal shards: weights matter
    assert list(results["clients/rank"]) == [0, 0, 0]

    central_state, central_losses = centralized
    federated = AutoModelForSequenceClassification.from_pretrained(out / "model")
    initial = AutoModelForSequenceClassification.from_pretrained(tiny_bert_no_dropout)
    fed_state, initial_state = federated.state_dict(), initial.state_dict()
    moved = 0
    for name, value in central_state.items():
        assert torch.allclose(fed_state[name], value, rtol=1e-4, atol=2e-6), name
        moved += not torch.equal(value, initial_state[name])
    assert moved > 10  # the comparison is not between two untouched models
    np.testing.assert_allclose(results["metrics/train_loss"], central_losses, rtol=1e-5)

    # The reported accuracy is the saved model's on the test rows.
    texts, labels = read_csv(toy_dataset / "test.csv")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    with torch.inference_mode():
        predicted = federated.eval()(**tokenized(tokenizer, texts)).logits.argmax(-1)
    accuracy = (predicted == labels).double().mean().item()
    assert results["metrics/test_accuracy"][-1] == pytest.approx(accuracy, abs=1e-9)
