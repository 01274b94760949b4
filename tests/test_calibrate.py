"""``python -m fedmpi.calibrate``: the noise multiplier for a target epsilon is tight
against fedmpi's own accountant and agrees with opacus's independent calibration."""

from __future__ import annotations

import pytest

from fedmpi.calibrate import RELATIVE_TOLERANCE, main, noise_for_epsilon
from fedmpi.privacy import spent_epsilon

RATE, ROUNDS, DELTA = 0.05, 20, 1e-5


def test_the_noise_spends_at_most_the_target_and_no_less_noise_would():
    z = noise_for_epsilon(3.0, RATE, ROUNDS, DELTA)
    assert spent_epsilon(z, RATE, ROUNDS, DELTA) <= 3.0
    assert spent_epsilon(z * (1 - 2 * RELATIVE_TOLERANCE), RATE, ROUNDS, DELTA) > 3.0


def test_it_agrees_with_opacus_prv_calibration():
    """opacus's get_noise_multiplier bisects its PRV accountant's epsilon (to 0.01 in
    epsilon); fedmpi reports min(PRV, RDP), which is PRV in this regime."""
    from opacus.accountants.utils import get_noise_multiplier

    theirs = get_noise_multiplier(
        target_epsilon=3.0, target_delta=DELTA, sample_rate=RATE, steps=ROUNDS, accountant="prv"
    )
    assert noise_for_epsilon(3.0, RATE, ROUNDS, DELTA) == pytest.approx(theirs, rel=0.02)


def test_the_command_prints_a_row_per_target(capsys):
    assert main(["--epsilon", "8", "--rounds", "5", "--cohort", "10", "--population", "200"]) == 0
    out = capsys.readouterr().out
    assert "q = 0.05, 5 rounds, delta = " in out
    assert out.strip().splitlines()[-1].startswith("| 8 | ")


@pytest.mark.parametrize(
    "argv",
    [
        ["--epsilon", "0", "--rounds", "5", "--rate", "0.1", "--delta", "1e-5"],
        ["--epsilon", "1", "--rounds", "0", "--rate", "0.1", "--delta", "1e-5"],
        ["--epsilon", "1", "--rounds", "5", "--rate", "1.5", "--delta", "1e-5"],
        ["--epsilon", "1", "--rounds", "5", "--rate", "0.1"],  # no delta, no population
        ["--epsilon", "1", "--rounds", "5", "--cohort", "10"],  # no population
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m fedmpi.calibrate: error: ")


def test_the_privacy_study_noise_levels_are_the_calibrated_ones():
    """jobs/local_study.sh (STUDY=privacy) hard-codes z for epsilon 1, 3, 8 after 10
    rounds at q = 1000 / 100000; recalibrated here for epsilon 8."""
    import re
    from pathlib import Path

    script = (Path(__file__).parent.parent / "jobs" / "local_study.sh").read_text()
    levels = dict(re.findall(r'\[eps(\d+)\]="\$dp --dp-noise (0\.\d+)"', script))
    assert set(levels) == {"1", "3", "8"}
    z = noise_for_epsilon(8.0, 1000 / 100000, 10, 1 / 100000**1.1)
    assert float(levels["8"]) == pytest.approx(z, rel=2e-3)
