"""Bad input at np=2: one clear message, printed once, exit code 2 on every rank, no hang."""

import pytest
from conftest import run_mpi

CASES = [
    (["--model", "./no/such/model"], "model directory './no/such/model' does not exist"),
    (["--dataset", "no_such_dataset_zz"], "cannot load dataset 'no_such_dataset_zz'"),
    (["--rounds", "0"], "--rounds must be a positive integer, got 0"),
    (["--rounds", "three"], "argument --rounds: expects an integer"),
    (["--lr", "-1"], "--lr must be positive, got -1.0"),
    (["--optimizer", "lamb"], "argument --optimizer: invalid choice: 'lamb'"),
    (["--clients", "1"], "2 MPI ranks but only 1 clients"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
]


@pytest.mark.parametrize("args,message", CASES, ids=[c[0][0] for c in CASES])
def test_bad_argument_fails_once_without_hanging(args, message, tmp_path):
    result = run_mpi(
        2,
        [
            "-m",
            "fedmpi",
            "--output",
            str(tmp_path / "out"),
            "--cache-dir",
            str(tmp_path / "cache"),
            *args,
        ],
        timeout=120,
    )
    assert result.returncode == 2, result.output
    assert message in result.output
    assert result.output.count("error:") == 1, result.output
    assert "Traceback" not in result.output


def test_unknown_config_key_is_rejected(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("rounds: 2\nlearning_rate: 0.1\n")
    result = run_mpi(2, ["-m", "fedmpi", "--config", str(config)], timeout=120)
    assert result.returncode == 2, result.output
    assert "unknown key 'learning_rate'" in result.output
    assert result.output.count("error:") == 1
