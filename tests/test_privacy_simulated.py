"""A simulated deployment in-process (--dp-noise-cohort N, --dp-population M, as
pfl-research's noise_cohort_size): the noise a cohort of N would get on the average, the
accountant at rate N / M, the refusals, the results' flag and the report's mark."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from test_privacy_accounting import assert_in_bracket, reference_epsilon

from fedmpi import results_keys as rk
from fedmpi.config import Config
from fedmpi.errors import UsageError
from fedmpi.privacy import ClientLevelDP, default_delta, prv_epsilon
from fedmpi.report import main as report_main
from fedmpi.results import RESULTS_NAME, ResultsWriter


def dp_config(**values) -> Config:
    return Config(clients=4, dp_clip=2.0, dp_noise=1.5, weighting="uniform", **values)


def noise_std(cfg: Config, n: int = 400_000) -> float:
    """The std of the noise one round adds to each coordinate of the average."""
    dp = ClientLevelDP(cfg, cfg.clients)
    average = torch.zeros(n)
    dp.privatise(average, torch.zeros(n), dp.denominator, 1)
    return float(average.std())


def test_the_noise_is_that_of_the_simulated_cohort():
    """4 clients, everyone every round (D = 4), z = 1.5, C = 2: std z C / D = 0.75 on the
    average; simulating a cohort of 40, z C / 40 = 0.075. In pfl-research's terms the
    noise on the real cohort's sum is z C times noise_scale = cohort / noise_cohort_size
    = 4 / 40, which over the real cohort is the same 0.075. --dp-population alone keeps the
    noise of the real cohort."""
    assert noise_std(dp_config()) == pytest.approx(0.75, rel=0.01)
    assert noise_std(dp_config(dp_noise_cohort=40, dp_population=4000)) == pytest.approx(
        0.075, rel=0.01
    )
    pfl_sum_std = 1.5 * 2.0 * (4 / 40)
    assert pfl_sum_std / 4 == pytest.approx(0.075)
    assert noise_std(dp_config(dp_population=4000)) == pytest.approx(0.75, rel=0.01)


def test_the_accountant_samples_the_simulated_cohort_from_the_population():
    """N = 40 of M = 4000 (q = 0.01), 3 rounds, z = 1.5: epsilon is the subsampled Gaussian
    mechanism's at that rate (inside the independent bracket), at the default delta of the
    population 1 / M^1.1; not the real run's (everyone every round, q = 1)."""
    cfg = dp_config(dp_noise_cohort=40, dp_population=4000)
    dp = ClientLevelDP(cfg, 4)
    for round_ in range(1, 4):
        dp.privatise(torch.zeros(8), torch.zeros(8), dp.denominator, round_)
    assert dp.accountant_rate == 0.01 and dp.rate == 1.0 and dp.denominator == 4
    assert dp.delta == default_delta(4000) < 1 / 4000
    assert_in_bracket(dp.epsilon(), reference_epsilon(1.5, 0.01, 3, dp.delta))
    real = prv_epsilon(1.5, 1.0, 3, dp.delta)
    assert dp.epsilon() < real / 5
    only_population = ClientLevelDP(dp_config(dp_population=4000), 4)
    assert only_population.accountant_rate == 4 / 4000 and only_population.noise_cohort == 4


def test_the_results_flag_a_simulation():
    plain = ClientLevelDP(dp_config(), 4).results_attrs()
    assert plain[rk.DP_SIMULATED] is False and rk.DP_NOISE_COHORT not in plain
    simulated = ClientLevelDP(dp_config(dp_noise_cohort=40, dp_population=4000), 4)
    attrs = simulated.results_attrs()
    assert attrs[rk.DP_SIMULATED] is True
    assert (attrs[rk.DP_NOISE_COHORT], attrs[rk.DP_POPULATION]) == (40, 4000)
    assert attrs[rk.DP_ACCOUNTANT_RATE] == 0.01 and attrs[rk.DP_SAMPLE_RATE] == 1.0
    assert "SIMULATED: the noise of a cohort of 40" in simulated.describe(4)
    assert "SIMULATED" not in ClientLevelDP(dp_config(), 4).describe(4)


def validate(**values) -> None:
    Config(weighting="uniform", train_samples=None, **values).validate(1)


SIMULATED = {"clients": 40, "clients_per_round": 10, "dp_clip": 1.0, "dp_noise": 1.0}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dp_noise_cohort": 9, "dp_population": 10**4}, "below this run's expected cohort of 10"),
        ({"clients_per_round": 0.3, "dp_noise_cohort": 11, "dp_population": 10**4}, "of 12 "),
        ({"dp_noise_cohort": 100}, "--dp-noise-cohort 100 needs --dp-population"),
        ({"dp_population": 39}, "--dp-population 39 is below the 40 clients that train"),
        ({"dp_noise_cohort": 500, "dp_population": 400}, "exceeds --dp-population 400"),
        ({"dp_noise_cohort": 0, "dp_population": 400}, "--dp-noise-cohort must be a positive"),
        ({"dp_population": 100, "dp_delta": 0.01}, r"is not below 1 / 100 \(--dp-population\)"),
        ({"dp_clip": None, "dp_noise": 0.0, "dp_population": 100}, "need --dp-clip"),
    ],
)
def test_simulation_settings_are_refused(values, message):
    with pytest.raises(UsageError, match=message):
        validate(**{**SIMULATED, **values})


def test_simulation_settings_that_are_fine():
    validate(**SIMULATED, dp_noise_cohort=10, dp_population=40)  # the real thing, spelled out
    validate(**SIMULATED, dp_noise_cohort=1000, dp_population=10**6, dp_delta=1e-7)
    validate(**{**SIMULATED, "clients_per_round": 0.3}, dp_noise_cohort=12, dp_population=400)
    validate(**SIMULATED, dp_population=100, dp_delta=0.0099)


def test_refusal_message_of_docs_errors_md():
    """docs/errors.md's row that names this module: its message, verbatim."""
    with pytest.raises(UsageError) as refused:
        validate(**SIMULATED, dp_noise_cohort=5, dp_population=1000)
    assert "--dp-noise-cohort 5 is below this run's expected cohort of 10 clients" in str(
        refused.value
    )


def write_run(path, epsilon: float, simulated: bool | None, seed: int, noise: float) -> None:
    """A DP run's results file as fedmpi writes it (through ResultsWriter)."""
    path.mkdir(parents=True)
    extra = {"dp_noise_cohort": 40, "dp_population": 4000} if simulated else {}
    cfg = Config(
        model="m", dataset="toy", clients=4, rounds=2, seed=seed, dp_clip=1.0, dp_noise=noise,
        weighting="uniform", **extra,
    )  # fmt: skip
    attrs = {
        rk.CONFIG: cfg.to_json(),
        rk.LABEL_NAMES: json.dumps(["a", "b"]),
        rk.MAJORITY_RATE: 0.5,
        rk.TEST_EXAMPLES: 100,
        **({} if simulated is None else {rk.DP_SIMULATED: simulated}),
    }
    writer = ResultsWriter(path / RESULTS_NAME, attrs, {rk.CLIENT_SIZES: np.full(4, 10)}, {})
    for round_ in (1, 2):
        writer.append({rk.ROUND: round_, rk.TEST_ACCURACY: 0.6, rk.EPSILON: epsilon * round_ / 2})


def test_the_report_marks_a_simulated_epsilon(tmp_path):
    """A simulated run's epsilon is marked in summary.md and summary.csv; a real one's,
    and one from a file written before the flag existed, are not."""
    write_run(tmp_path / "runs" / "sim", 2.5, True, 1, 1.0)
    write_run(tmp_path / "runs" / "real", 7.5, False, 1, 0.5)
    write_run(tmp_path / "runs" / "old", 9.5, None, 1, 0.3)
    out = tmp_path / "report"
    assert report_main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    with open(out / "summary.csv") as handle:
        rows = {float(r["epsilon"]): r for r in csv.DictReader(handle)}
    assert [rows[e]["epsilon_simulated"] for e in (2.5, 7.5, 9.5)] == ["True", "False", "False"]
    summary = (out / "summary.md").read_text()
    assert "| 2.50 (simulated) |" in summary
    assert "| 7.50 |" in summary and "| 9.50 |" in summary
    assert summary.count("(simulated) |") == 1
    assert not math.isnan(float(rows[2.5]["final_accuracy"]))
