"""Today's checkpoints under real MPI: bf16 and fp16 weights, decoder classifiers whose
tokenizers have no pad token (Llama, Qwen2, GPT-2), and LoRA adapters as the payload."""

import re

import h5py
import numpy as np
import pytest
import torch
from conftest import fedmpi_args, run_mpi, save_tiny_bert_in, save_tiny_decoder

from fedmpi.results import read_results

pytestmark = pytest.mark.mpi

# (model kind, checkpoint dtype, extra flags, what the start-up line must say)
CASES = [
    ("llama", "bfloat16", ["--peft", "lora"], "frozen in bfloat16, compute in bf16"),
    ("qwen2", "float16", [], "trainable in float32, compute in fp32"),
    (
        "gpt2",
        "float16",
        ["--peft", "lora", "--lora-freeze-a"],
        "frozen in float32, compute in fp32",
    ),
    ("bert", "bfloat16", [], "trainable in float32, compute in fp32"),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    return {
        kind: save_tiny_bert_in(root / kind, dtype)
        if kind == "bert"
        else save_tiny_decoder(root / kind, kind, dtype)
        for kind, dtype, _, _ in CASES
    }


def lora_trainable(hidden: int, q_out: int, v_out: int, layers: int, r: int, head: int) -> int:
    """Adapters on q and v of every layer, r (in + out) each, plus the head's weights."""
    return layers * r * ((hidden + q_out) + (hidden + v_out)) + head


@pytest.mark.parametrize("kind,dtype,extra,startup", CASES, ids=[c[0] for c in CASES])
def test_checkpoints_of_any_dtype_and_decoders_train(
    kind, dtype, extra, startup, checkpoints, toy_dataset, tmp_path
):
    out = tmp_path / "out"
    args = ["--rounds", 2, "--lr", "5e-3", "--verify-sync", "--checkpoint-every", 1, *extra]
    result = run_mpi(2, fedmpi_args(checkpoints[kind], toy_dataset, out, tmp_path / "c", *args))
    assert result.returncode == 0, result.output
    assert startup in result.output
    results = read_results(out / "results.h5")
    assert np.all(np.isfinite(results["metrics/train_loss"]))
    assert np.all(results["sync/param_crc32"] == results["sync/param_crc32"][:, :1])
    trainable = int(re.search(r"([\d,]+) trainable of", result.output)[1].replace(",", ""))
    assert results["comm/payload_bytes"].tolist() == [(trainable + 4) * 4] * 2
    with h5py.File(out / "checkpoint.h5") as f:
        assert f["params"].shape == (trainable,)  # the checkpoint holds what trains, only
    if "--peft" in extra:
        assert "frozen weights unchanged on every rank" in result.output
        # Tiny decoders: hidden 32, 4 heads of 8; llama's 2 key-value heads make v 16 wide;
        # gpt2 adapts its fused c_attn (32 -> 96). A and B both, or B (and the head) only.
        expected = {
            "llama": lora_trainable(32, 32, 16, layers=2, r=8, head=32 * 2),
            "gpt2": 2 * 8 * 96 + 32 * 2,  # B of c_attn only (A frozen), plus the head
        }[kind]
        assert trainable == expected


def test_the_saved_adapter_gives_the_trained_models_logits(checkpoints, toy_dataset, tmp_path):
    """--save-model writes a peft adapter; on the base it reproduces, bit for bit, the
    logits of the model whose trained parameters the checkpoint holds."""
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "out"
    args = [
        "--rounds",
        1,
        "--lr",
        "5e-3",
        "--peft",
        "lora",
        "--save-model",
        "--checkpoint-every",
        1,
    ]
    base_dir = checkpoints["llama"]
    result = run_mpi(2, fedmpi_args(base_dir, toy_dataset, out, tmp_path / "c", *args))
    assert result.returncode == 0, result.output

    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    batch = tokenizer(
        ["a good movie", "the plot was awful really"], return_tensors="pt", padding=True
    )

    def base():
        return AutoModelForSequenceClassification.from_pretrained(
            base_dir, num_labels=2, dtype=torch.bfloat16, pad_token_id=tokenizer.pad_token_id
        )

    reloaded = PeftModel.from_pretrained(base(), out / "model").eval()
    rebuilt = get_peft_model(
        base(),
        LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, modules_to_save=["score"]),
    )
    trainable = [p for p in rebuilt.parameters() if p.requires_grad]
    with h5py.File(out / "checkpoint.h5") as f:
        flat = torch.from_numpy(f["params"][()])
    for p in trainable:
        p.data = p.data.float()
    torch.nn.utils.vector_to_parameters(flat, trainable)
    rebuilt.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = rebuilt(**batch).logits.float()
        got = reloaded(**batch).logits.float()
    assert not torch.allclose(want, torch.zeros_like(want))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_lora_with_frozen_a_in_the_fedsgd_setting_is_centralized_descent(
    tiny_bert_no_dropout, toy_dataset, tmp_path
):
    """Four clients, one full-batch SGD step each per round, A frozen, dropout off: the
    average of the clients' B is one gradient step on the union, round after round."""
    import csv

    from peft import LoraConfig, PeftModel, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    lr, rounds = 0.5, 2
    out = tmp_path / "out"
    args = [
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
        "--peft",
        "lora",
        "--lora-freeze-a",
        "--lora-dropout",
        0,
        "--save-model",
    ]
    result = run_mpi(2, fedmpi_args(tiny_bert_no_dropout, toy_dataset, out, tmp_path / "c", *args))
    assert result.returncode == 0, result.output

    # The reference: the same initialisation (seed 42, head then adapters), plain descent.
    torch.manual_seed(42)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_no_dropout, num_labels=2)
    central = get_peft_model(
        base, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.0)
    )
    for name, param in central.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_no_dropout)
    with open(toy_dataset / "train.csv", newline="") as handle:
        rows = [(r["text"], int(r["label"])) for r in csv.DictReader(handle)]
    batch = tokenizer(
        [t for t, _ in rows],
        truncation=True,
        max_length=32,
        padding=True,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    labels = torch.tensor([y for _, y in rows])
    optimizer = torch.optim.SGD([p for p in central.parameters() if p.requires_grad], lr=lr)
    central.train()
    for _ in range(rounds):
        central(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    federated = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert_no_dropout, num_labels=2),
        out / "model",
    )
    want = {k: v for k, v in central.state_dict().items() if "lora_" in k or "modules_to_save" in k}
    got = federated.state_dict()
    moved = 0
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=2e-6, msg=name)
        moved += "lora_B" in name and bool(value.abs().sum() > 0)  # B starts at zero
    assert moved >= 4
