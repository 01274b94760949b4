"""FedAvg of LoRA under real MPI, checked against the algebra (issue 22, item 6).

Two clients with different data (one holds every negative review, the other every
positive one) each take several full-batch SGD steps from the same start; the same local
training is redone here in-process, client by client. With ``--lora-freeze-a`` every A
stays at its shared initialisation, and the federated low-rank update B A is exactly the
average of the clients' B_k A (what the DP studies rely on: the average they noise is the
average of the updates). Without it FedAvg averages A and B separately, and
mean(B_k) mean(A_k) misses mean(B_k A_k) by (B_0 - B_1)(A_0 - A_1) / 4 for two equally
weighted clients: the test sees that term, large, where the algebra puts it.

(One full-batch step per client, as in tests/test_llm_mpi.py, cannot tell the two apart:
after one step every A is still its initialisation.)

The adapters sit on the pooler, which feeds the head directly: in a tiny random BERT its
adapters, A included, move visibly in a few steps.
"""

from __future__ import annotations

import pytest
import torch
from conftest import fedmpi_args, run_mpi, toy_rows, write_csv

from fedmpi.results import read_results

pytestmark = pytest.mark.mpi

LR, STEPS, EXAMPLES = 1.0, 6, 16  # per client: STEPS full-batch SGD steps on EXAMPLES rows
TARGET = "pooler.dense"
SCALE = 16 / 8  # lora_alpha / r, fedmpi's defaults


@pytest.fixture(scope="module")
def split_by_label(tmp_path_factory):
    """train.csv: EXAMPLES negative then EXAMPLES positive reviews, so ``label-sorted``
    gives client 0 the negatives and client 1 the positives."""
    root = tmp_path_factory.mktemp("two-clients")
    rows = toy_rows(300, seed=3)
    train = [r for r in rows if r[1] == 0][:EXAMPLES] + [r for r in rows if r[1] == 1][:EXAMPLES]
    write_csv(root / "train.csv", train)
    write_csv(root / "test.csv", rows[-40:])
    return root, {label: [r for r in train if r[1] == label] for label in (0, 1)}


def federated(model_dir, data_dir, out, freeze: bool) -> dict[str, torch.Tensor]:
    """One round of fedmpi on two ranks, one client each; the saved adapter's tensors."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    args = [
        "--clients", 2, "--partition", "label-sorted", "--weighting", "uniform",
        "--optimizer", "sgd", "--lr", LR, "--batch-size", 10_000, "--local-epochs", STEPS,
        "--rounds", 1, "--peft", "lora", "--lora-targets", TARGET, "--lora-dropout", 0,
        "--threads", 1, "--save-model", *(["--lora-freeze-a"] if freeze else []),
    ]  # fmt: skip
    result = run_mpi(2, fedmpi_args(model_dir, data_dir, out, out.parent / "cache", *args))
    assert result.returncode == 0, result.output
    histogram = read_results(out / "results.h5")["clients/label_histogram"]
    assert histogram.tolist() == [[EXAMPLES, 0], [0, EXAMPLES]]  # client k holds label k
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    return dict(PeftModel.from_pretrained(base, out / "model").state_dict())


def initial_model(model_dir, freeze: bool):
    """fedmpi's start: seed 42, the head then the adapters (B = 0), A frozen or not."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(42)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=[TARGET]
    )
    model = get_peft_model(base, config)
    for name, param in model.named_parameters():
        if freeze and "lora_A" in name:
            param.requires_grad_(False)
    return model


def local_training(model_dir, rows, freeze: bool) -> dict[str, torch.Tensor]:
    """One client's STEPS full-batch SGD steps, in-process, from fedmpi's start."""
    from transformers import AutoTokenizer

    model = initial_model(model_dir, freeze)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer(
        [text for text, _ in rows],
        truncation=True,
        max_length=32,
        padding=True,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    labels = torch.tensor([label for _, label in rows])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    for _ in range(STEPS):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def adapter(state: dict[str, torch.Tensor], part: str) -> torch.Tensor:
    """The pooler's lora_A or lora_B weight in a peft state dict."""
    (name,) = [k for k in state if f"{TARGET}.lora_{part}" in k]
    return state[name]


def head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.split("modules_to_save.")[-1]: v for k, v in state.items() if "modules_to_save" in k}


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """fedmpi's fp32 rounds against the in-process fp32 steps: the same arithmetic up to
    the order of the examples in the batch."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-6, msg=what)


def test_frozen_a_makes_the_federated_update_the_average_of_the_clients_updates(
    tiny_bert_no_dropout, split_by_label, tmp_path
):
    data_dir, rows = split_by_label
    got = federated(tiny_bert_no_dropout, data_dir, tmp_path / "out", freeze=True)
    clients = [local_training(tiny_bert_no_dropout, rows[k], freeze=True) for k in (0, 1)]
    start = initial_model(tiny_bert_no_dropout, freeze=True).state_dict()

    a = adapter(got, "A")
    assert torch.equal(a, adapter(start, "A"))  # A never moved, on any rank
    for client in clients:
        assert torch.equal(adapter(client, "A"), a)
    updates = [SCALE * adapter(c, "B") @ adapter(c, "A") for c in clients]
    close(SCALE * adapter(got, "B") @ a, (updates[0] + updates[1]) / 2, "B A")
    assert float(adapter(got, "B").abs().max()) > 0.05  # B trained (it starts at 0)
    for name, value in head(got).items():
        close(value, (head(clients[0])[name] + head(clients[1])[name]) / 2, name)


def test_without_freezing_a_fedavg_misses_the_average_update_by_the_cross_term(
    tiny_bert_no_dropout, split_by_label, tmp_path
):
    data_dir, rows = split_by_label
    got = federated(tiny_bert_no_dropout, data_dir, tmp_path / "out", freeze=False)
    clients = [local_training(tiny_bert_no_dropout, rows[k], freeze=False) for k in (0, 1)]
    a_k = [adapter(c, "A") for c in clients]
    b_k = [adapter(c, "B") for c in clients]

    close(adapter(got, "A"), (a_k[0] + a_k[1]) / 2, "A")  # FedAvg averages A and B apart
    close(adapter(got, "B"), (b_k[0] + b_k[1]) / 2, "B")
    federated_update = SCALE * adapter(got, "B") @ adapter(got, "A")
    average_update = SCALE * (b_k[0] @ a_k[0] + b_k[1] @ a_k[1]) / 2
    cross = SCALE * (b_k[0] - b_k[1]) @ (a_k[0] - a_k[1]) / 4
    close(federated_update, average_update - cross, "mean(B) mean(A) = mean(B A) - cross")
    # The term is material: a few percent of the update, far beyond the tolerance.
    assert float(cross.norm()) > 0.01 * float(average_update.norm())
    with pytest.raises(AssertionError):
        close(federated_update, average_update, "not the average update")
