"""Every bad input of docs/errors.md at np=2: one line, printed once, exit 2, no hang.

Placeholders in the arguments: {model} a tiny local BERT, {data} a directory with
train.csv and test.csv, {out} the run's output directory (prepared per case).
"""

import fcntl
import json
import os
import re
import shutil
from pathlib import Path

import h5py
import pytest
from conftest import REPO, SCRIPTS, run_mpi, toy_rows, write_csv
from test_checkpoint import with_one_weight_changed

pytestmark = pytest.mark.mpi

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
    ("an output path that is a file", ["--output", "{a_file}"], "is a file, not a directory", None),
    ("a second job on the same output", [], "is in use by another fedmpi job", "locked"),
    (
        "--save-model where OUTPUT/model is a file",
        ["--save-model"],
        "exists and is not a directory, so the trained model could not be written there",
        "model_file",
    ),
    (
        "--keep-local-opt where OUTPUT/client-states is a file",
        ["--keep-local-opt"],
        "exists and is not a directory, so the clients' states could not be written there",
        "states_file",
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
    (
        "checkpoint of a model whose weights changed in place",
        ["--model", "{changed_model}"],
        "belongs to another configuration (model: 'sha256:",
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
    # Config files: every value gets the validation of a flag.
    ("YAML null value", ["--config", "{yaml_null}"], "'batch-size' is empty (null)", None),
    ("YAML list value", ["--config", "{yaml_list}"], "--batch-size expects a single value", None),
    (
        "YAML boolean for a number",
        ["--config", "{yaml_bool}"],
        "--batch-size expects an integer, got True",
        None,
    ),
    ("YAML key given twice", ["--config", "{yaml_twice}"], "'rounds' is given twice", None),
    ("YAML file that is not text", ["--config", "{binary}"], "is not a text (UTF-8) file", None),
    (
        "YAML file that is not a mapping",
        ["--config", "{yaml_list_top}"],
        "must hold a mapping of settings",
        None,
    ),
    ("missing config file", ["--config", "{missing}"], "cannot read config file", None),
    # Numbers: finite and in range, before any work.
    ("infinite learning rate", ["--lr", "inf"], "--lr must be a finite number, got inf", None),
    ("NaN learning rate", ["--lr", "nan"], "--lr must be a finite number, got nan", None),
    ("negative weight decay", ["--weight-decay", "-0.1"], "--weight-decay must be >= 0", None),
    ("negative seed", ["--seed=-1"], "--seed must be in [0, 2^32)", None),
    (
        "data seed out of range",
        ["--data-seed", "4294967296"],
        "--data-seed must be in [0, 2^32)",
        None,
    ),
    (
        "non-positive server learning rate",
        ["--server-lr", "0"],
        "--server-lr must be positive",
        None,
    ),
    ("server moment decay of 1", ["--server-beta1", "1"], "--server-beta1 must be in [0, 1)", None),
    (
        "server learning rate far too large",
        ["--server-opt", "adam", "--server-lr", "1e30"],
        "--server-lr must be at most 10, got 1e+30",
        None,
    ),
    (
        "server adaptivity far too large",
        ["--server-opt", "adam", "--server-tau", "1e30"],
        "--server-tau must be at most 1, got 1e+30",
        None,
    ),
    (
        "a cohort fraction that rounds to no client",
        ["--clients", "4", "--clients-per-round", "0.1"],
        "--clients-per-round 0.1 of the 4 clients that train rounds to no client",
        None,
    ),
    (
        "max length below the special tokens",
        ["--max-seq-len", "2"],
        "--max-seq-len 2 leaves no room for text: the tokenizer adds 2 special token(s)",
        None,
    ),
    ("negative proximal weight", ["--prox-mu=-1"], "--prox-mu must be >= 0", None),
    ("test fraction of 0", ["--test-fraction", "0"], "--test-fraction must be in (0, 1)", None),
    (
        "non-positive eval interval",
        ["--eval-every", "0"],
        "--eval-every must be a positive integer",
        None,
    ),
    (
        "negative checkpoint interval",
        ["--checkpoint-every=-1"],
        "--checkpoint-every must be >= 0",
        None,
    ),
    ("non-positive threads", ["--threads", "0"], "--threads must be a positive integer", None),
    (
        "--resume with --overwrite",
        ["--resume", "--overwrite"],
        "--resume and --overwrite contradict each other",
        None,
    ),
    (
        "a fractional count of clients per round",
        ["--clients", "4", "--clients-per-round", "2.5"],
        "--clients-per-round must be a whole count or a fraction in (0, 1)",
        None,
    ),
    (
        "unknown diagnostics level",
        ["--diagnostics", "some"],
        "argument --diagnostics: invalid choice: 'some'",
        None,
    ),
    ("fp16 on a CPU", ["--precision", "fp16"], "--precision fp16 needs a CUDA device", None),
    (
        "max length far beyond the model's (before tokenizing)",
        ["--max-seq-len", "100000"],
        "--max-seq-len 100000 exceeds the model's 128 positions",
        None,
    ),
    # Data.
    (
        "cache directory that is a file",
        ["--cache-dir", "{a_file}"],
        "cannot write the token cache in",
        None,
    ),
    (
        "cache directory that is not writable",
        ["--cache-dir", "/proc/fedmpi-cache"],
        "cannot write the token cache in /proc/fedmpi-cache",
        None,
    ),
    (
        "continuous labels",
        ["--dataset", "{continuous}"],
        "is not a class (continuous labels are not supported",
        None,
    ),
    (
        "missing labels",
        ["--dataset", "{unlabelled}"],
        "is missing: every example needs a label",
        None,
    ),
    (
        "labels that are lists",
        ["--dataset", "{list_labels}"],
        "is a list, not a class name or number",
        None,
    ),
    (
        "a single label value",
        ["--dataset", "{one_label}"],
        "has 1 label value(s): need at least 2",
        None,
    ),
    ("unsupported data file type", ["--dataset", "{xlsx}"], "unsupported file type", None),
    (
        "--split-by a missing column",
        ["--dataset", "{one_file}", "--split-by", "movie"],
        "--split-by movie: dataset",
        None,
    ),
    (
        "--split-by with the data's own test split",
        ["--split-by", "label"],
        "--split-by applies only to data that fedmpi splits",
        None,
    ),
    (
        "a Dirichlet concentration of 0",
        ["--partition", "dirichlet:0"],
        "needs a positive concentration",
        None,
    ),
    (
        "partition by: without a column",
        ["--partition", "by:"],
        "partition 'by' needs a column: by:COLUMN",
        None,
    ),
    ("spooky without its CSV", ["--dataset", "spooky"], "FEDMPI_SPOOKY_CSV", None),
    (
        "model weights that are not safetensors",
        ["--model", "{corrupt_model}"],
        "are corrupt or truncated (no valid safetensors header",
        None,
    ),
    # Privacy, held-out clients, LoRA.
    (
        "DP with shard-size weights",
        ["--clients", "4", "--dp-clip", "1"],
        "DP-FedAvg weighs every client equally",
        None,
    ),
    (
        "DP with a clip bound of 0",
        ["--dp-clip", "0", "--weighting", "uniform"],
        "--dp-clip must be positive",
        None,
    ),
    (
        "DP with negative noise",
        ["--dp-clip", "1", "--dp-noise=-1", "--weighting", "uniform"],
        "--dp-noise must be >= 0",
        None,
    ),
    (
        "DP noise without clipping",
        ["--dp-noise", "1"],
        "--dp-noise and --dp-delta need --dp-clip",
        None,
    ),
    (
        "DP with a cohort of 1 of 1",
        ["--clients", "2", "--holdout-clients", "0.5", "--dp-clip", "1", "--weighting", "uniform"],
        "client-level DP with a single training client protects nothing",
        None,
    ),
    (
        "every client held out",
        ["--holdout-clients", "1"],
        "--holdout-clients must be in [0, 1)",
        None,
    ),
    (
        "client test fraction of 1",
        ["--eval-clients", "--client-test-fraction", "1"],
        "--client-test-fraction must be in (0, 1)",
        None,
    ),
    (
        "LoRA rank 0",
        ["--peft", "lora", "--lora-r", "0"],
        "--lora-r must be a positive integer",
        None,
    ),
    (
        "LoRA settings without LoRA",
        ["--lora-freeze-a"],
        "--lora-targets and --lora-freeze-a need --peft lora",
        None,
    ),
    (
        "LoRA targets the model lacks",
        ["--peft", "lora", "--lora-targets", "no_such_proj"],
        "--lora-targets no_such_proj: no such module in this bert model",
        None,
    ),
    (
        "LoRA targets, one of which the model lacks",
        ["--peft", "lora", "--lora-targets", "query,no_such_proj"],
        "--lora-targets no_such_proj: no such module in this bert model",
        None,
    ),
    (
        "LoRA rank above the adapted layers' width",
        ["--peft", "lora", "--lora-r", "64"],
        "--lora-r 64 exceeds the width of the adapted layers",
        None,
    ),
    # Checkpoints.
    (
        "checkpoint of another client count",
        ["--clients", "4"],
        "belongs to another configuration (clients: 2 there, 4 now)",
        "checkpoint",
    ),
]


@pytest.fixture(scope="module")
def inputs(tiny_bert, tiny_bert_no_dropout, toy_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "empty.csv").write_text("")
    write_csv(root / "three.csv", toy_rows(3, seed=0))
    write_csv(root / "one_file.csv", toy_rows(40, seed=0))
    (root / "run.yaml").write_text("rounds: 2\nlearning_rate: 0.1\n")
    (root / "null.yaml").write_text("batch-size: ~\n")
    (root / "list.yaml").write_text("batch-size: [1, 2]\n")
    (root / "bool.yaml").write_text("batch-size: yes\n")
    (root / "twice.yaml").write_text("rounds: 2\nrounds: 3\n")
    (root / "top.yaml").write_text("- rounds\n- 2\n")
    (root / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    (root / "a_file").write_text("not a directory")
    (root / "data.xlsx").write_bytes(b"PK\x03\x04")
    rows = "".join(f"words {i} here,{label}\n" for i, label in enumerate(["0.5", "1.25"] * 10))
    (root / "continuous.csv").write_text("text,label\n" + rows)
    (root / "unlabelled.csv").write_text("text,label\na,1\nb,\nc,0\nd,1\n")
    (root / "one_label.csv").write_text("text,label\na,1\nb,1\nc,1\nd,1\n")
    (root / "lists.jsonl").write_text(
        "".join(f'{{"text": "t{i}", "label": [{i % 2}]}}\n' for i in range(10))
    )
    with_one_weight_changed(tiny_bert, root / "changed-model")
    corrupt = shutil.copytree(tiny_bert, root / "corrupt-model")
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
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
        "root": root,
        "model": tiny_bert,
        "other_model": tiny_bert_no_dropout,
        "changed_model": root / "changed-model",
        "corrupt_model": corrupt,
        "data": toy_dataset,
        "empty": root / "empty.csv",
        "three_rows": root / "three.csv",
        "one_file": root / "one_file.csv",
        "yaml": root / "run.yaml",
        "yaml_null": root / "null.yaml",
        "yaml_list": root / "list.yaml",
        "yaml_bool": root / "bool.yaml",
        "yaml_twice": root / "twice.yaml",
        "yaml_list_top": root / "top.yaml",
        "binary": root / "binary.yaml",
        "missing": root / "no-such.yaml",
        "a_file": root / "a_file",
        "xlsx": root / "data.xlsx",
        "continuous": root / "continuous.csv",
        "unlabelled": root / "unlabelled.csv",
        "one_label": root / "one_label.csv",
        "list_labels": root / "lists.jsonl",
        "checkpoint": reference / "checkpoint.h5",
        "cache": root / "cache",
    }


def prepare_output(out: Path, how: str | None, checkpoint: Path, held: list) -> None:
    """Make ``out`` what case ``how`` needs; a lock taken for a case (as a running job
    would hold it) goes into ``held``, to be kept until every case has run."""
    if how is None:
        return
    out.mkdir(parents=True)
    target = out / "checkpoint.h5"
    if how == "results":
        (out / "results.h5").write_bytes(b"")
    elif how == "locked":
        lock = open(out / ".fedmpi.lock", "a+")  # noqa: SIM115 (held while the cases run)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(f"pid {os.getpid()}, the test\n")
        lock.flush()
        held.append(lock)
    elif how in ("model_file", "states_file"):
        (out / {"model_file": "model", "states_file": "client-states"}[how]).write_text("")
    elif how == "garbage":
        target.write_bytes(b"not an HDF5 file at all")
    elif how == "truncated":
        target.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    else:
        shutil.copy(checkpoint, target)
        if how == "tampered":
            with h5py.File(target, "r+") as f:
                f["params"][0] += 1.0


@pytest.fixture(scope="module")
def outcomes(inputs, tmp_path_factory):
    """Every case, each with its own output directory, in one 2-rank MPI job."""
    root = tmp_path_factory.mktemp("cases")
    cases, held = [], []
    for i, (_, extra, _, prepare) in enumerate(CASES):
        out = root / f"case-{i}" / "out"
        prepare_output(out, prepare, inputs["checkpoint"], held)
        values = {**inputs, "out": out}
        cases.append(
            [
                *[a.format(**values) for a in BASE],
                "--cache-dir",
                str(inputs["cache"]),
                "--lr",
                "2e-3",
                "--rounds",
                "1",
                *[a.format(**values) for a in extra],
            ]
        )
    (root / "cases.json").write_text(json.dumps(cases))
    result = run_mpi(
        2,
        [str(SCRIPTS / "check_bad_inputs.py"), str(root / "cases.json"), str(root / "out.json")],
        timeout=900,
        env={"FEDMPI_SPOOKY_CSV": ""},
    )
    for lock in held:
        lock.close()
    assert result.returncode == 0, result.output[-3000:]
    return dict(
        zip([c[0] for c in CASES], json.loads((root / "out.json").read_text()), strict=True)
    )


@pytest.mark.parametrize("case,message", [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_once_with_exit_2_without_hanging(case, message, outcomes):
    outcome = outcomes[case]
    output = "".join(outcome["outputs"])
    assert outcome["codes"] == [2, 2], output  # every rank, the same agreed exit
    assert message in output
    assert output.count("fedmpi: error:") == 1, output  # printed once, by one rank
    assert "Traceback" not in output
    assert "round 1/" not in output  # rejected before any training


def test_a_huge_max_length_leaves_no_cache_behind(outcomes, inputs):
    """Refused before tokenizing: no token cache was written for it."""
    assert outcomes["max length far beyond the model's (before tokenizing)"]["codes"] == [2, 2]
    with_widths = [h5py.File(p, "r").attrs["max_seq_len"] for p in inputs["cache"].glob("*.h5")]
    assert 100000 not in with_widths


def test_every_case_of_the_docs_table_is_run():
    """The other direction: each row of docs/errors.md's table of bad inputs is a case here
    (once), or names the test module that runs it, which checks its message."""
    lines = (REPO / "docs" / "errors.md").read_text().splitlines()
    start = lines.index("| case | example | message contains |")
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        cells = line.split(" | ")
        rows.append((cells[0].removeprefix("| "), cells[-1].removesuffix(" |")))
    cases = {c[0] for c in CASES}
    assert len(cases) == len(CASES), "a case is in CASES twice"
    assert len({case for case, _ in rows}) == len(rows), "docs/errors.md lists a case twice"
    for case, message in rows:
        elsewhere = re.search(r"\(`(tests/test_\w+\.py)`\)$", case)
        if elsewhere:
            assert message in (REPO / elsewhere.group(1)).read_text(), case
        else:
            assert case in cases, f"docs/errors.md's case {case!r} is not run here"


def test_docs_table_lists_every_case():
    table = (REPO / "docs" / "errors.md").read_text()
    rows = {m.group(1) for m in re.finditer(r"^\| (.+?) \|", table, re.MULTILINE)}
    for case, _, message, _ in CASES:
        assert case in rows, f"docs/errors.md lacks the case {case!r}"
        assert message.split("{")[0] in table, f"docs/errors.md lacks the message {message!r}"
