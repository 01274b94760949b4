"""Faults under real MPI: no hang, bit-exact checkpoint/resume, preemption, NaN clients, a
resume that would be wrong, a failed model save, a diverged model."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import SCRIPTS, finish, job, mpiexec_command, run_mpi, start_job, wait_for_line
from test_checkpoint import with_one_weight_changed

from fedmpi.preemption import EXIT_PREEMPTED
from fedmpi.results import read_results

pytestmark = pytest.mark.mpi
FAULT_DEADLINE_S = 60  # start-up of 4 ranks on 2 cores included; the abort itself takes ~1 s


# The three ways a rank can fail: during set-up (agreed, one message), inside the round
# while its peers block in the Allreduce, and on rank 0 while writing results. (A fault in
# local training or evaluation takes the same path as the second.)
@pytest.mark.parametrize("fault", ["2:0:setup", "3:2:aggregate", "0:2:results"])
def test_a_failing_rank_ends_the_whole_job(fault, tiny_bert, toy_dataset, tmp_path):
    start = time.monotonic()
    result = run_mpi(
        4,
        job(tiny_bert, toy_dataset, tmp_path / "out", "--clients", 4, "--rounds", 3),
        timeout=FAULT_DEADLINE_S,
        env={"FEDMPI_FAULT": fault},
    )
    assert result.returncode != 0, result.output
    rank = fault.split(":")[0]
    assert f"injected fault FEDMPI_FAULT={fault}" in result.output
    if not fault.endswith("setup"):  # set-up failures are agreed on and reported once
        assert f"fedmpi: rank {rank}: error: InjectedFault" in result.output
    assert time.monotonic() - start < FAULT_DEADLINE_S


def launch(np_: int, args: list[str], **env) -> subprocess.Popen:
    """A background MPI job in its own session, so the test can kill all of it."""
    return start_job([*mpiexec_command(), "-n", str(np_), sys.executable, *args], env)


def rank_pids(marker: str) -> list[int]:
    """PIDs of the Python ranks whose command line holds ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if (
            argv
            and argv[0].decode(errors="replace") == sys.executable
            and marker.encode() in b" ".join(argv)
        ):
            pids.append(int(entry.name))
    return sorted(pids)


def test_a_killed_rank_ends_the_whole_job(tiny_bert, toy_dataset, tmp_path):
    out = tmp_path / "killed"
    proc = launch(4, job(tiny_bert, toy_dataset, out, "--clients", 4, "--rounds", 200))
    wait_for_line(proc, "round 1/200")
    victim = rank_pids(str(out))[2]
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    code, output, _ = finish(proc, timeout=30)
    assert code != 0, output
    assert time.monotonic() - killed_at < 30


ROUNDS = 3
COMMON = ("--rounds", ROUNDS, "--lr", "2e-3", "--local-epochs", 2, "--checkpoint-every", 1)
CONFIGS = {
    # One client per rank, plain FedAvg: the parameters are reduced in place.
    "fedavg": ("--clients", 2),
    # State that must survive a checkpoint: the server's Adam moments and each client's
    # own AdamW moments; 3 of 4 clients a round, so some have none yet.
    "stateful": (
        "--clients",
        4,
        "--clients-per-round",
        3,
        "--server-opt",
        "adam",
        "--server-lr",
        "0.01",
        "--keep-local-opt",
    ),
    # LoRA: the checkpoint holds adapters and head; the base is reloaded, not restored.
    "lora": ("--clients", 2, "--peft", "lora"),
}


@pytest.fixture(scope="module")
def references(tiny_bert, toy_dataset, tmp_path_factory):
    """The same jobs run straight through, by configuration name (made on first use)."""
    made = {}

    def reference(name: str) -> Path:
        if name not in made:
            out = tmp_path_factory.mktemp(f"straight-{name}") / "out"
            result = run_mpi(2, job(tiny_bert, toy_dataset, out, *COMMON, *CONFIGS[name]))
            assert result.returncode == 0, result.output
            made[name] = out
        return made[name]

    return reference


def final_state(out: Path) -> dict[str, np.ndarray]:
    """The last round's checkpoint: parameters, server state, clients' optimizer states."""
    with h5py.File(out / "checkpoint.h5") as f:
        assert f.attrs["round"] == ROUNDS
        names = ["params", *(f"server/{k}" for k in f.get("server", {}))]
        state = {name: f[name][()] for name in names}
    for path in sorted((out / "client-states").glob("*.h5")):
        with h5py.File(path) as f:
            state.update({f"{path.name}/{k}": f[k][()] for k in f})
    return state


def assert_same_run(out: Path, reference: Path) -> None:
    got_state, want_state = final_state(out), final_state(reference)
    assert got_state.keys() == want_state.keys()
    for name, value in want_state.items():
        assert np.array_equal(got_state[name], value), name  # bit-identical
    got, want = read_results(out / "results.h5"), read_results(reference / "results.h5")
    assert list(got["round"]) == list(range(1, ROUNDS + 1))  # each round exactly once
    for key in ("metrics/test_accuracy", "metrics/test_loss", "metrics/train_loss"):
        assert np.array_equal(got[key], want[key]), key


@pytest.mark.parametrize("name", CONFIGS)
def test_resume_after_sigkill_is_bit_identical(name, references, tiny_bert, toy_dataset, tmp_path):
    """Killed after round 2 and relaunched, the run ends bit-identical to one run straight
    through in another launch: so resumes are exact, and so is the same seed and
    configuration launched twice (determinism needs no test of its own)."""
    out = tmp_path / "resumed"
    args = job(tiny_bert, toy_dataset, out, *COMMON, *CONFIGS[name])
    proc = launch(2, args)
    wait_for_line(proc, f"round 2/{ROUNDS} |")
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, as a node failure would
    proc.wait()
    with h5py.File(out / "checkpoint.h5") as f:
        assert 2 <= f.attrs["round"] < ROUNDS
    result = run_mpi(2, args)  # the same command: resumes automatically
    assert result.returncode == 0, result.output
    assert "resuming from" in result.output
    assert_same_run(out, references(name))
    if name == "stateful":  # the kept optimizer states were restored, not restarted
        assert len(list((out / "client-states").glob("*.h5"))) == 4


@pytest.mark.parametrize(
    ("signum", "name"), [(signal.SIGUSR1, "stateful"), (signal.SIGTERM, "fedavg")]
)
def test_preemption_checkpoints_and_exits_for_requeue(
    signum, name, references, tiny_bert, toy_dataset, tmp_path
):
    out = tmp_path / "preempted"
    args = job(tiny_bert, toy_dataset, out, *COMMON, *CONFIGS[name])
    proc = launch(2, args)
    wait_for_line(proc, f"round 1/{ROUNDS} |")
    os.kill(rank_pids(str(out))[1], signum)  # one rank only: the others learn it in the Allreduce
    code, output, _ = finish(proc, timeout=60)
    assert code == EXIT_PREEMPTED, output
    assert "preempted in round" in output and "keep its state" not in output  # exact
    result = run_mpi(2, args)
    assert result.returncode == 0, result.output
    assert_same_run(out, references(name))


def test_a_finished_run_without_checkpoints_leaves_none(tiny_bert, toy_dataset, tmp_path):
    """Preempted (a checkpoint of round 0 is written), resumed, finished with
    --checkpoint-every 0: no stale checkpoint remains for a later --rounds N+1 to resume."""
    out = tmp_path / "out"
    args = job(tiny_bert, toy_dataset, out, "--clients", 2, "--rounds", 2)
    preempted = run_mpi(2, args, env={"FEDMPI_FAULT": "0:1:preempt"})
    assert preempted.returncode == EXIT_PREEMPTED, preempted.output
    assert (out / "checkpoint.h5").exists()
    resumed = run_mpi(2, args)
    assert resumed.returncode == 0 and "resuming from" in resumed.output, resumed.output
    assert not (out / "checkpoint.h5").exists() and not (out / "preemptions.json").exists()


def test_nonfinite_client_is_skipped_or_aborts(tiny_bert, toy_dataset, tmp_path):
    nan_on_rank_1 = {"FEDMPI_FAULT": "1:2:nan"}
    skipped = run_mpi(
        2,
        job(
            tiny_bert,
            toy_dataset,
            tmp_path / "skip",
            "--clients",
            2,
            "--rounds",
            3,
            "--on-nonfinite",
            "skip",
        ),
        env=nan_on_rank_1,
    )
    assert skipped.returncode == 0, skipped.output
    assert "client 1 produced non-finite parameters in round 2: skipped" in skipped.output
    results = read_results(tmp_path / "skip" / "results.h5")
    assert results["clients/skipped"].tolist() == [[0, 0], [0, 1], [0, 0]]
    assert np.all(np.isfinite(results["metrics/test_loss"]))  # the average was not poisoned

    aborted = run_mpi(
        2,
        job(tiny_bert, toy_dataset, tmp_path / "abort", "--clients", 2, "--rounds", 3),
        env=nan_on_rank_1,
        timeout=FAULT_DEADLINE_S,
    )
    assert aborted.returncode != 0
    assert (
        "rank 1: error: RuntimeError: client 1 produced non-finite parameters in round 2"
        in aborted.output
    )


# A resume that would be silently wrong, or fail after set-up: each case copies a finished
# run (checkpoint of round ROUNDS), breaks one thing, and resumes it with the same command.
# All cases run in one 2-rank job (in-process, like test_bad_input_mpi.py).
RESUME_CASES = {
    "a LoRA base whose weights changed": (
        "lora",
        "belongs to another configuration (model: 'sha256:",
    ),
    "a client's optimizer state removed": ("stateful", "which is missing: restore it"),
    "results.h5 removed": ("stateful", "but no results.h5 with the results of those rounds"),
    "results.h5 corrupt": ("stateful", "results.h5 is corrupt or truncated"),
}


@pytest.fixture(scope="module")
def broken_resumes(references, tiny_bert, toy_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken-resumes")
    changed = with_one_weight_changed(tiny_bert, root / "changed-base")
    cases = []
    for i, (name, (config, _)) in enumerate(RESUME_CASES.items()):
        out = shutil.copytree(references(config), root / f"case-{i}")
        model = tiny_bert
        if name.startswith("a LoRA base"):
            model = changed
        elif name.startswith("a client's"):
            next((out / "client-states").glob("*.h5")).unlink()
        elif name == "results.h5 removed":
            (out / "results.h5").unlink()
        else:
            (out / "results.h5").write_bytes(b"not HDF5")
        args = job(model, toy_dataset, out, *COMMON, *CONFIGS[config])
        cases.append(args[2:])  # in-process: without "-m fedmpi"
    (root / "cases.json").write_text(json.dumps(cases))
    result = run_mpi(
        2, [str(SCRIPTS / "check_bad_inputs.py"), str(root / "cases.json"), str(root / "out.json")]
    )
    assert result.returncode == 0, result.output[-3000:]
    return dict(zip(RESUME_CASES, json.loads((root / "out.json").read_text()), strict=True))


@pytest.mark.parametrize("case", RESUME_CASES)
def test_a_resume_that_would_be_wrong_is_refused(case, broken_resumes):
    outcome = broken_resumes[case]
    output = "".join(outcome["outputs"])
    assert outcome["codes"] == [2, 2], output
    assert RESUME_CASES[case][1] in output
    assert output.count("fedmpi: error:") == 1 and "Traceback" not in output, output


def test_a_failed_save_loses_nothing_and_a_rerun_finishes_it(tiny_bert, toy_dataset, tmp_path):
    """The disk fills up while --save-model writes (after the last round; no periodic
    checkpoints): the job ends with one line and exit 2, a checkpoint of the last round
    and the results stay, no half model is left; the same command then saves the model
    without training again."""
    out = tmp_path / "out"
    args = job(tiny_bert, toy_dataset, out, "--clients", 2, "--rounds", 2, "--save-model")
    failed = run_mpi(2, [str(SCRIPTS / "run_sabotaged.py"), "full-disk", *args[2:]])
    assert failed.returncode == 2, failed.output
    assert failed.output.count("fedmpi: error: --save-model: cannot write the model") == 1
    assert "rerun the same command" in failed.output and "Traceback" not in failed.output
    assert "done:" not in failed.output
    with h5py.File(out / "checkpoint.h5") as f:
        assert f.attrs["round"] == 2
    assert sorted(p.name for p in out.iterdir()) == [
        ".fedmpi.lock",
        "checkpoint.h5",
        "results.h5",
    ]  # no model, whole or half
    rerun = run_mpi(2, args)
    assert rerun.returncode == 0, rerun.output
    assert "nothing to train" in rerun.output and "round 1/" not in rerun.output
    assert not (out / "checkpoint.h5").exists()  # --checkpoint-every 0: none left, as ever
    assert list(read_results(out / "results.h5")["round"]) == [1, 2]
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(out / "model")


def test_a_diverged_model_is_never_done(tiny_bert, toy_dataset, tmp_path):
    """The server step overflows in the last round: one line, exit 2 on every rank, no
    'done' and no saved model (a NaN test loss alone ends the job the same way)."""
    out = tmp_path / "out"
    args = job(tiny_bert, toy_dataset, out, "--clients", 2, "--rounds", 1, "--save-model")
    result = run_mpi(2, [str(SCRIPTS / "run_sabotaged.py"), "diverge", *args[2:]])
    assert result.returncode == 2, result.output
    assert result.output.count("fedmpi: error: training diverged: the global model") == 1
    assert "1 NaN or infinite weights" in result.output
    assert "done:" not in result.output and "Traceback" not in result.output
    assert not (out / "model").exists()
