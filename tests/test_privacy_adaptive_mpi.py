"""Adaptive clipping and a simulated cohort in one real job at -np 2: the count of
unclipped clients is summed over both ranks (the bound follows the paper's rule over all
four clients, and the ranks stay identical), the results flag the simulation, and a run
resumed from its checkpoint ends bit for bit like an uninterrupted one (the bound is
checkpointed)."""

import math

import numpy as np
import pytest
from conftest import fedmpi_args, run_mpi
from test_privacy_accounting import assert_in_bracket, reference_epsilon
from test_privacy_adaptive import count_draw

from fedmpi import results_keys as rk
from fedmpi.results import read_results

NOISE_SEED, CLIP, QUANTILE, COUNT_NOISE, COHORT, POPULATION = 5, 4.0, 0.5, 10.0, 400, 40_000


def adaptive_run(tiny_bert, toy_dataset, out, rounds):
    """4 clients on 2 ranks, everyone every round (D = 4), the noise of a cohort of 400
    drawn from 40,000, z = 1, adaptive clipping from 4 (about the updates' norms) toward
    the median with sigma_b = 10 (on a cohort of 400), pre-clip norms recorded
    (--diagnostics norms)."""
    args = fedmpi_args(
        tiny_bert, toy_dataset, out, out.parent / "cache", "--threads", 1,
        "--clients", 4, "--weighting", "uniform", "--lr", "1e-2", "--rounds", rounds,
        "--dp-clip", CLIP, "--dp-noise", 1.0, "--dp-noise-seed", NOISE_SEED,
        "--dp-clip-quantile", QUANTILE, "--dp-clip-count-noise", COUNT_NOISE,
        "--dp-noise-cohort", COHORT, "--dp-population", POPULATION,
        "--diagnostics", "norms", "--verify-sync", "--checkpoint-every", 1,
    )  # fmt: skip
    result = run_mpi(2, args)
    assert result.returncode == 0, result.output
    return result


@pytest.mark.mpi
def test_adaptive_clipping_sums_the_count_over_ranks_and_resumes_bit_exact(
    tiny_bert, toy_dataset, tmp_path
):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    first = adaptive_run(tiny_bert, toy_dataset, straight, 3)
    assert "SIMULATED" in first.output and "adaptive clipping toward the 0.5" in first.output
    adaptive_run(tiny_bert, toy_dataset, interrupted, 2)
    assert "resuming from" in adaptive_run(tiny_bert, toy_dataset, interrupted, 3).output

    r = read_results(straight / "results.h5")
    assert np.bincount(r[rk.CLIENT_RANK]).tolist() == [2, 2]
    attrs = r["attrs"]
    assert attrs[rk.DP_SIMULATED] is True and attrs[rk.DP_ACCOUNTANT_RATE] == COHORT / POPULATION
    assert attrs[rk.DP_UPDATE_NOISE] == pytest.approx((1 - 1 / (2 * COUNT_NOISE) ** 2) ** -0.5)

    # The paper's rule over all four clients' pre-clip norms (two on each rank): a count
    # summed on one rank only would move the bound otherwise, and the ranks apart.
    bound, norms, counts = CLIP, r[rk.UPDATE_NORM], []
    for round_ in range(1, 4):
        assert r[rk.CLIP_BOUND][round_ - 1] == pytest.approx(bound, rel=1e-12)
        unclipped = int(np.sum(norms[round_ - 1] <= bound))
        counts.append(unclipped)
        noise = COUNT_NOISE / COHORT * count_draw(NOISE_SEED, round_)
        share = min(1.0, max(0.0, (unclipped - 2) / 4 + 0.5 + noise))
        assert r[rk.UNCLIPPED_FRACTION][round_ - 1] == pytest.approx(share, rel=1e-12)
        bound *= math.exp(-0.2 * (share - QUANTILE))
        clipped = r[rk.CLIPPED_UPDATE_NORM][round_ - 1]
        assert np.all(clipped <= r[rk.CLIP_BOUND][round_ - 1] * (1 + 1e-5))
    assert 0 < sum(counts) < norms.size  # some within the bound (so counted), some clipped
    assert np.all(r[rk.PARAM_CRC32] == r[rk.PARAM_CRC32][:, :1])  # identical on both ranks

    # The accountant: z = 1 at rate 40 / 4,000 and the population's delta.
    assert attrs[rk.DP_DELTA] == pytest.approx(1 / POPULATION**1.1)
    for rounds, epsilon in enumerate(r[rk.EPSILON], start=1):
        assert_in_bracket(
            epsilon, reference_epsilon(1.0, COHORT / POPULATION, rounds, attrs[rk.DP_DELTA])
        )

    # Resumed after round 2: the same bound and the same parameters in round 3.
    resumed = read_results(interrupted / "results.h5")
    assert resumed[rk.CLIP_BOUND].tolist() == r[rk.CLIP_BOUND].tolist()
    assert resumed[rk.PARAM_CRC32].tolist() == r[rk.PARAM_CRC32].tolist()
