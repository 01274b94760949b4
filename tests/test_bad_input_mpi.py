"""Every bad input of docs/errors.md at np=2: one line, printed once, exit 2, no hang.

Placeholders in the arguments: {model} a tiny local BERT, {data} a directory with
train.csv and test.csv, {out} the run's output directory (prepared per case).
"""

import re
import shutil
from pathlib import Path

import h5py
import pytest
from conftest import REPO, run_mpi, toy_rows, write_csv

BASE = [
    "--model",
    "{model}",
    "--dataset",
    "{data}",
    "--output",
    "{out}",
    "--max-seq-len",
    "32",
    "--train-samples",
    "all",
    "--test-samples",
    "all",
]

# (case, extra arguments, expected message, how {out} is prepared)
CASES = [
    (
        "unknown hub model id",
        ["--model", "no-such-org/no-such-model"],
        "cannot load the tokenizer of model 'no-such-org/no-such-model'",
        None,
    ),
    (
        "missing local model directory",
        ["--model", "./no/such/model"],
        "model directory './no/such/model' does not exist",
        None,
    ),
    (
        "unknown dataset",
        ["--dataset", "no_such_dataset_zz"],
        "cannot load dataset 'no_such_dataset_zz'",
        None,
    ),
    (
        "missing text column",
        ["--text-column", "body"],
        "text column 'body' not found; the data has columns ['text', 'label']",
        None,
    ),
    ("missing label column", ["--label-column", "stars"], "label column 'stars' not found", None),
    ("empty data file", ["--dataset", "{empty}"], "is empty", None),
    (
        "fewer examples than clients (data)",
        ["--dataset", "{three_rows}", "--clients", "4"],
        "training examples cannot give each of 4 clients one",
        None,
    ),
    (
        "fewer examples than clients (cap)",
        ["--clients", "4", "--train-samples", "3"],
        "--train-samples 3 is fewer than the 4 clients",
        None,
    ),
    (
        "a client with an empty shard",
        ["--dataset", "debates", "--partition", "by:debate", "--clients", "8"],
        "the column has 4 distinct values: fewer than the 8 clients",
        None,
    ),
    ("non-positive rounds", ["--rounds", "0"], "--rounds must be a positive integer, got 0", None),
    (
        "non-positive local epochs",
        ["--local-epochs", "-1"],
        "--local-epochs must be a positive integer, got -1",
        None,
    ),
    (
        "non-positive batch size",
        ["--batch-size", "0"],
        "--batch-size must be a positive integer, got 0",
        None,
    ),
    ("non-positive learning rate", ["--lr", "0"], "--lr must be positive, got 0.0", None),
    (
        "max length beyond the model's positions",
        ["--max-seq-len", "512"],
        "--max-seq-len 512 exceeds the model's 128 positions",
        None,
    ),
    (
        "unwritable output directory",
        ["--output", "/proc/fedmpi-out"],
        "output directory /proc/fedmpi-out is not writable",
        None,
    ),
    (
        "existing output without --resume/--overwrite",
        [],
        "already holds results.h5 and no checkpoint: pass --overwrite",
        "results",
    ),
    ("--resume without a checkpoint", ["--resume"], "holds no checkpoint.h5 to resume from", None),
    ("corrupt checkpoint", [], "is corrupt or truncated", "garbage"),
    ("truncated checkpoint", [], "is corrupt or truncated", "truncated"),
    ("checkpoint failing its checksum", [], "fails its checksum", "tampered"),
    (
        "checkpoint of another configuration",
        ["--lr", "1e-3"],
        "belongs to another configuration (lr: 0.002 there, 0.001 now)",
        "checkpoint",
    ),
    (
        "checkpoint of another model",
        ["--model", "{other_model}"],
        "belongs to another configuration (model:",
        "checkpoint",
    ),
    ("-np larger than the clients", ["--clients", "1"], "2 MPI ranks but only 1 clients", None),
    (
        "YAML config with an unknown key",
        ["--config", "{yaml}"],
        "unknown key 'learning_rate'",
        None,
    ),
    (
        "CUDA requested, none available",
        ["--device", "cuda"],
        "--device cuda was requested but no CUDA device is available",
        None,
    ),
    (
        "unknown partition",
        ["--partition", "zipf:2"],
        "--partition: unknown partition 'zipf:2'",
        None,
    ),
    (
        "more clients per round than clients",
        ["--clients", "2", "--clients-per-round", "5"],
        "--clients-per-round 5 exceeds the 2 clients",
        None,
    ),
    (
        "a value of the wrong type",
        ["--rounds", "three"],
        "argument --rounds: expects an integer, got 'three'",
        None,
    ),
    ("an unknown flag", ["--no-such-flag"], "unrecognized arguments: --no-such-flag", None),
]


@pytest.fixture(scope="module")
def inputs(tiny_bert, tiny_bert_no_dropout, toy_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "empty.csv").write_text("")
    write_csv(root / "three.csv", toy_rows(3, seed=0))
    (root / "run.yaml").write_text("rounds: 2\nlearning_rate: 0.1\n")
    reference = root / "reference"  # a real checkpoint to corrupt or mismatch
    args = [a.format(model=tiny_bert, data=toy_dataset, out=reference) for a in BASE]
    done = run_mpi(
        2,
        [
            "-m",
            "fedmpi",
            *args,
            "--cache-dir",
            str(root / "cache"),
            "--rounds",
            "1",
            "--lr",
            "2e-3",
            "--checkpoint-every",
            "1",
        ],
    )
    assert done.returncode == 0, done.output
    return {
        "model": tiny_bert,
        "other_model": tiny_bert_no_dropout,
        "data": toy_dataset,
        "empty": root / "empty.csv",
        "three_rows": root / "three.csv",
        "yaml": root / "run.yaml",
        "checkpoint": reference / "checkpoint.h5",
        "cache": root / "cache",
    }


def prepare_output(out: Path, how: str | None, checkpoint: Path) -> None:
    if how is None:
        return
    out.mkdir(parents=True)
    target = out / "checkpoint.h5"
    if how == "results":
        (out / "results.h5").write_bytes(b"")
    elif how == "garbage":
        target.write_bytes(b"not an HDF5 file at all")
    elif how == "truncated":
        target.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    else:
        shutil.copy(checkpoint, target)
        if how == "tampered":
            with h5py.File(target, "r+") as f:
                f["params"][0] += 1.0


@pytest.mark.parametrize("case,extra,message,prepare", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_once_with_exit_2_without_hanging(
    case, extra, message, prepare, inputs, tmp_path
):
    out = tmp_path / "out"
    prepare_output(out, prepare, inputs["checkpoint"])
    values = {**inputs, "out": out}
    args = [
        "-m",
        "fedmpi",
        *[a.format(**values) for a in BASE],
        "--cache-dir",
        str(inputs["cache"]),
        "--lr",
        "2e-3",
        "--rounds",
        "1",
        *[a.format(**values) for a in extra],
    ]
    result = run_mpi(2, args, timeout=120)
    assert result.returncode == 2, result.output
    assert message in result.output
    assert result.output.count("fedmpi: error:") == 1, result.output
    assert "Traceback" not in result.output
    assert "round 1/" not in result.output  # rejected before any training


def test_docs_table_lists_every_case():
    table = (REPO / "docs" / "errors.md").read_text()
    rows = {m.group(1) for m in re.finditer(r"^\| (.+?) \|", table, re.MULTILINE)}
    for case, _, message, _ in CASES:
        assert case in rows, f"docs/errors.md lacks the case {case!r}"
        assert message.split("{")[0] in table, f"docs/errors.md lacks the message {message!r}"
