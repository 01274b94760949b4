"""Shared fixtures and helpers: a tiny BERT, a learnable toy corpus, the command line of a
small fedmpi job, an ``mpiexec`` launcher, and the paper's server optimizer as a reference.

MPI tests launch real ``mpiexec`` subprocesses (the venv's MPICH by default, or
``$FEDMPI_MPIEXEC``) under a timeout, so a hang fails the test instead of the CI job.
Every test that launches one is marked ``mpi`` (a module-level ``pytestmark`` in the
``*_mpi.py`` modules), so ``pytest -m "not mpi"`` is the fast in-process layer; a test that
reaches ``mpiexec_command`` without the marker fails, so the marker cannot go stale.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"
POSITIVE = ["good", "great", "excellent", "wonderful", "superb", "delightful"]
NEGATIVE = ["bad", "awful", "terrible", "poor", "dreadful", "boring"]
FILLER = ["the", "movie", "was", "plot", "actor", "scene", "really", "quite", "a", "story"]


_running: pytest.Item | None = None  # the test being run (its fixtures included)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    global _running
    _running = item
    try:
        yield
    finally:
        _running = None


def mpiexec_command() -> list[str]:
    """``mpiexec`` (with ``--oversubscribe`` for Open MPI): the one way tests launch MPI."""
    if _running is not None and _running.get_closest_marker("mpi") is None:
        pytest.fail(
            f"{_running.nodeid} launches mpiexec but is not marked mpi: add "
            "`pytestmark = pytest.mark.mpi` (a *_mpi.py module) or @pytest.mark.mpi",
            pytrace=False,
        )
    exe = os.environ.get("FEDMPI_MPIEXEC") or str(Path(sys.executable).with_name("mpiexec"))
    if not Path(exe).exists():
        exe = shutil.which("mpiexec") or "mpiexec"
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return [exe, "--oversubscribe"] if "Open MPI" in version or "OpenRTE" in version else [exe]


@dataclass
class Completed:
    returncode: int
    output: str


def job_env(extra: dict | None = None) -> dict[str, str]:
    """The environment of every test job: offline hubs, unbuffered output, root allowed."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "PYTHONUNBUFFERED": "1",
        **(extra or {}),
    }


def start_job(command: list[str], env: dict | None = None) -> subprocess.Popen:
    """A background job in its own session (so a test can kill all of it), output piped."""
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=job_env(env),
        start_new_session=True,
    )


def run_mpi(np_: int, args: list[str], timeout: float = 240, env: dict | None = None) -> Completed:
    """``mpiexec -n np_ python ARGS`` with offline hubs; a hang past ``timeout`` fails."""
    full_env = job_env(env)
    command = [*mpiexec_command(), "-n", str(np_), sys.executable, *args]
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"mpiexec -n {np_} hung for {timeout}s: {command}\n{out[-3000:]}")
    return Completed(proc.returncode, proc.stdout + proc.stderr)


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 120) -> str:
    """A background job's output up to the first line holding ``text``; kills the job
    (its whole session) and fails if it ends or the deadline passes first."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"never saw {text!r}:\n{''.join(seen)[-3000:]}")


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    """A background job's exit code, the rest of its output and the seconds it took to
    end; kills it and fails past ``timeout``."""
    start = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the job did not end within {timeout} s")
    return proc.returncode, out, time.monotonic() - start


def fedmpi_args(model, dataset, out, cache, *extra) -> list[str]:
    """``-m fedmpi`` on ``model`` and ``dataset`` with every example and 32 tokens, writing
    to ``out``; ``extra`` flags (any values, made strings) follow."""
    return [
        "-m",
        "fedmpi",
        "--model",
        str(model),
        "--dataset",
        str(dataset),
        "--output",
        str(out),
        "--cache-dir",
        str(cache),
        "--train-samples",
        "all",
        "--test-samples",
        "all",
        "--max-seq-len",
        "32",
        *map(str, extra),
    ]


@pytest.fixture
def in_process():
    """``fedmpi.cli.main`` in this process, given ``fedmpi_args``: a whole job on one rank
    (mpi4py's singleton start, no ``mpiexec``). What a run sets process-wide (its signal
    handlers, torch's thread count and random state) is put back afterwards."""
    import torch

    from fedmpi.cli import main
    from fedmpi.preemption import SIGNALS

    handlers = {signum: signal.getsignal(signum) for signum in SIGNALS}
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()

    def run(args: list[str]) -> int:
        assert args[:2] == ["-m", "fedmpi"]
        return main(args[2:])

    yield run
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    torch.set_num_threads(threads)
    torch.random.set_rng_state(rng)


def job(tiny_bert, toy_dataset, out, *extra) -> list[str]:
    """``fedmpi_args`` with the token cache next to ``out`` and one thread a rank."""
    return fedmpi_args(tiny_bert, toy_dataset, out, out.parent / "cache", "--threads", 1, *extra)


def minilm_dir() -> Path:
    from fedmpi.models import resolve_model

    return Path(resolve_model("minilm"))


def random_bert(vocab: int, width: int, layers: int, dropout: float = 0.0, labels: int = 2):
    """A random BERT classifier small enough for a unit test (seeded: the same every time)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * width,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=labels,
    )
    return BertForSequenceClassification(config)


def save_tiny_bert(path: Path, dropout: float) -> Path:
    """A 2-layer, 32-wide random BERT classifier with MiniLM's real tokenizer."""
    from transformers import AutoTokenizer

    random_bert(vocab=30522, width=32, layers=2, dropout=dropout).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), dropout=0.1)


@pytest.fixture(scope="session")
def tiny_bert_no_dropout(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-nodrop"), dropout=0.0)


def toy_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """Sentences whose label is whether they hold a positive or a negative word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.choices(FILLER, k=rng.randint(3, 12))
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, int]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory) -> Path:
    """A directory with train.csv (400 rows) and test.csv (200 rows)."""
    root = tmp_path_factory.mktemp("toy-data")
    write_csv(root / "train.csv", toy_rows(400, seed=1))
    write_csv(root / "test.csv", toy_rows(200, seed=2))
    return root


def word_tokenizer(pad: bool):
    """A word-level fast tokenizer over the toy vocabulary, with bos/eos/unk and, like most
    decoder LLM tokenizers, no pad token unless ``pad``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(POSITIVE + NEGATIVE + FILLER + ["brand", "new", "review", "that", "is"]))
    specials = ["<unk>", "<s>", "</s>"] + (["<pad>"] if pad else [])
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        **({"pad_token": "<pad>"} if pad else {}),
    )


def save_tiny_decoder(path: Path, kind: str, dtype: str) -> Path:
    """A 2-layer random decoder (llama, qwen2 or gpt2) saved in ``dtype``, with a
    tokenizer that has no pad token: what hub LLM checkpoints look like, in miniature."""
    import torch
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    tokenizer = word_tokenizer(pad=False)
    common = {"vocab_size": len(tokenizer), "bos_token_id": 1, "eos_token_id": 2}
    config = {
        "llama": lambda: LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **common,
        ),
        "qwen2": lambda: Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **common,
        ),
        "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common),
    }[kind]()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_bert_in(path: Path, dtype: str) -> Path:
    """The tiny random BERT of ``save_tiny_bert``, stored in ``dtype``."""
    import torch
    from transformers import AutoTokenizer

    random_bert(vocab=30522, width=32, layers=2).to(getattr(torch, dtype)).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(path)
    return path


# Reddi et al. 2021 ("Adaptive Federated Optimization"), Algorithm 2, in the paper's own
# notation and float64, independently of ``fedmpi.server``: the clients' average update is
# ``Delta_t = avg_t - x_t`` and the server *adds* ``eta * m_t / (sqrt(v_t) + tau)``. FedAvgM
# follows Hsu et al. 2019 (server momentum on the same Delta). The reference of
# test_server.py (in-process) and test_server_mpi.py (whole runs).
ETA, BETA1, BETA2, TAU, MOMENTUM = 0.1, 0.9, 0.99, 1e-3, 0.8


class Algorithm2:
    """The server side of Algorithm 2, one round at a time (v_{-1} = tau^2, m_{-1} = 0)."""

    def __init__(self, name: str, x0: np.ndarray) -> None:
        self.name = name
        self.m = np.zeros(x0.shape)
        self.v = np.full(x0.shape, TAU**2)

    def step(self, x: np.ndarray, average: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        delta = average.astype(np.float64) - x  # Delta_t
        if self.name == "fedavg":
            return x + delta
        if self.name == "avgm":
            self.m = MOMENTUM * self.m + delta
            return x + ETA * self.m
        self.m = BETA1 * self.m + (1 - BETA1) * delta
        if self.name == "adagrad":
            self.v = self.v + delta**2
        elif self.name == "yogi":
            self.v = self.v - (1 - BETA2) * delta**2 * np.sign(self.v - delta**2)
        else:  # adam
            self.v = BETA2 * self.v + (1 - BETA2) * delta**2
        return x + ETA * self.m / (np.sqrt(self.v) + TAU)
