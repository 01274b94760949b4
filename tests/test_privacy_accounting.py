"""DP-FedAvg in-process: the epsilon fedmpi reports against an independent computation of
the same mechanism, the privacy inputs refused before training, and the secret noise key.

The reference accountant here shares no code with opacus: it discretises the privacy
loss of one round of the Poisson subsampled Gaussian mechanism on a grid, rounding every
loss up (an upper bound on delta, so on epsilon) and down (a lower bound), composes the
rounds by FFT, and reads epsilon off the hockey-stick divergence, for both neighbouring
directions (a client removed, a client added).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.special import ndtr

from fedmpi.config import Config
from fedmpi.errors import UsageError
from fedmpi.privacy import ClientLevelDP, default_delta, noise_key
from fedmpi.results import read_results

ROOT = Path(__file__).resolve().parents[1]
TAIL_SD = 12.0  # the grid covers the Gaussians to 12 standard deviations


def _loss(x: np.ndarray, z: float, q: float) -> np.ndarray:
    """The privacy loss log(P(x) / Q(x)) of P = (1-q) N(0, z^2) + q N(1, z^2) against
    Q = N(0, z^2): log(1 - q + q exp((2x - 1) / (2 z^2))), increasing in x."""
    base = np.log1p(-q) if q < 1 else -np.inf
    return np.logaddexp(base, np.log(q) + (2 * x - 1) / (2 * z * z))


def _inverse_loss(t: np.ndarray, z: float, q: float) -> np.ndarray:
    """The x at which ``_loss`` is t (-inf below its infimum log(1 - q))."""
    floor = np.log1p(-q) if q < 1 else -np.inf
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inside = t + np.log1p(-(1 - q) * np.exp(-t)) - np.log(q)
        return np.where(t > floor, z * z * inside + 0.5, -np.inf)


def _composed_epsilon(
    cdf, lo: float, hi: float, rounds: int, delta: float, h: float, up: bool
) -> float:
    """Epsilon of ``rounds`` compositions of the loss whose CDF is ``cdf`` (mass mostly on
    [lo, hi]), each loss rounded to the grid h Z: up (pessimistic) or down (optimistic)."""
    i0, i1 = math.floor(lo / h), math.ceil(hi / h)
    grid = np.arange(i0, i1 + 1) * h
    at = cdf(grid)
    inner = np.clip(np.diff(at), 0, None)  # mass in (grid[i-1], grid[i]]
    if up:  # to grid[i]; below the grid to its first point; above it: infinite loss
        pmf, infinite = np.concatenate([[at[0]], inner]), 1 - at[-1]
    else:  # to grid[i-1]; above the grid to its last point; below it dropped (no loss)
        pmf, infinite = np.concatenate([inner, [1 - at[-1]]]), 0.0
    n = rounds * (len(pmf) - 1) + 1
    size = 1 << (n - 1).bit_length()
    composed = np.clip(np.fft.irfft(np.fft.rfft(pmf, size) ** rounds, size)[:n], 0, None)
    losses = (rounds * i0 + np.arange(n)) * h
    tail = 1 - (1 - infinite) ** rounds

    def hockey_stick(eps: float) -> float:
        over = losses > eps
        return float(np.sum(composed[over] * -np.expm1(eps - losses[over]))) + tail

    if hockey_stick(0.0) <= delta:
        return 0.0
    return brentq(lambda e: hockey_stick(e) - delta, 0.0, losses[-1] + 1, xtol=1e-9)


def reference_epsilon(
    z: float, q: float, rounds: int, delta: float, h: float = 1e-3
) -> tuple[float, float]:
    """(lower, upper) bounds on the epsilon of ``rounds`` rounds of the Poisson subsampled
    Gaussian mechanism (noise multiplier z, rate q) at ``delta``, the worse of removing and
    adding a client; the bracket is about rounds * h wide."""
    reach = TAIL_SD * z

    def remove(t):  # X ~ P, loss l(X)
        x = _inverse_loss(t, z, q)
        return (1 - q) * ndtr(x / z) + q * ndtr((x - 1) / z)

    def add(t):  # X ~ Q, loss -l(X): P(-l(X) <= t) = P(X >= x(-t))
        return ndtr(-_inverse_loss(-t, z, q) / z)

    ranges = {
        remove: (_loss(-reach, z, q), _loss(1 + reach, z, q)),
        add: (-_loss(reach, z, q), -_loss(-reach, z, q)),
    }
    bounds = [
        [_composed_epsilon(cdf, lo, hi, rounds, delta, h, up) for up in (False, True)]
        for cdf, (lo, hi) in ranges.items()
    ]
    return max(b[0] for b in bounds), max(b[1] for b in bounds)


def assert_in_bracket(epsilon: float, bracket: tuple[float, float]) -> None:
    """``epsilon`` is at least the reference's lower bound (it is a valid bound) and at
    most its upper bound plus opacus's own error (its ``eps_error`` of 0.01 is added to
    the answer, and its discretisation has an error of about as much)."""
    lower, upper = bracket
    assert lower <= epsilon <= upper + 0.02 + 1e-4 * upper, (lower, epsilon, upper)


def dp_after(cfg: Config, participants: int, rounds: int) -> ClientLevelDP:
    """A ClientLevelDP that has privatised ``rounds`` rounds (of a small payload)."""
    dp = ClientLevelDP(cfg, participants)
    average, start = torch.zeros(10), torch.zeros(10)
    for round_ in range(1, rounds + 1):
        dp.privatise(average, start, dp.denominator, round_)
    return dp


def study_config(noise: float) -> Config:
    """The DP settings of privacy study v1 (study/privacy/v1)."""
    return Config(
        clients=400, clients_per_round=40, dp_clip=2.8, dp_noise=noise, weighting="uniform"
    )


@pytest.mark.parametrize(("noise", "issue_prv"), [(0.1, 253.4), (0.3, 24.6), (1.0, 1.61)])
def test_epsilon_of_the_committed_study_is_the_tight_one(noise, issue_prv):
    """The committed study (400 clients, q = 0.1, 12 rounds, delta 1/400^1.1): epsilon lies
    in the independent bracket (opacus's PRV bound adds its own error of 0.01), agrees with
    the numbers of issue 22 (253 / 24.6 / 1.61), and the RDP epsilon beside it is what the
    committed results files report."""
    (committed,) = ROOT.glob(f"study/privacy/v1/runs/*-dp-z{noise}-s1/results.h5")
    results = read_results(committed)
    rounds = results["config"]["rounds"]
    assert rounds == 12 and results["attrs"]["dp_sample_rate"] == 0.1

    dp = dp_after(study_config(noise), 400, rounds)
    assert dp.delta == pytest.approx(results["attrs"]["dp_delta"], rel=1e-12)
    epsilon = dp.epsilon()
    assert_in_bracket(epsilon, reference_epsilon(noise, dp.rate, rounds, dp.delta))
    assert epsilon == pytest.approx(issue_prv, rel=0.005)
    assert dp.epsilon_rdp() == pytest.approx(results["privacy/epsilon"][-1], rel=1e-9)
    assert epsilon < 0.8 * dp.epsilon_rdp()


@pytest.mark.parametrize(
    ("participants", "per_round", "noise", "rounds", "delta"),
    [(6, 0.5, 1.0, 3, None), (50, 5, 0.7, 20, 1e-5), (10, None, 2.0, 4, None)],
)
def test_epsilon_in_other_regimes_lies_in_the_independent_bracket(
    participants, per_round, noise, rounds, delta
):
    """Other rates (a half, a tenth, everyone), deltas and round counts."""
    cfg = Config(
        clients=participants,
        clients_per_round=per_round,
        dp_clip=1.0,
        dp_noise=noise,
        dp_delta=delta,
        weighting="uniform",
    )
    dp = dp_after(cfg, participants, rounds)
    assert_in_bracket(dp.epsilon(), reference_epsilon(noise, dp.rate, rounds, dp.delta))


def test_epsilon_is_never_negative():
    """Two clients, everyone every round, much noise: at the default delta (0.47) both
    accountants' raw answers are negative; the reference says any epsilon >= 0 holds,
    and fedmpi reports 0, not a negative number."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    cfg = Config(clients=2, dp_clip=1.0, dp_noise=5.0, weighting="uniform")
    dp = dp_after(cfg, 2, 1)
    assert dp.delta == default_delta(2) < 0.5
    for accountant in (PRVAccountant(), RDPAccountant()):
        accountant.history = [(5.0, 1.0, 1)]
        with np.errstate(divide="ignore"):  # opacus takes log(1 - q) at q = 1
            assert accountant.get_epsilon(delta=dp.delta) < 0
    assert reference_epsilon(5.0, 1.0, 1, dp.delta) == (0.0, 0.0)
    assert dp.epsilon() == 0.0 and dp.epsilon_rdp() == 0.0


def test_too_little_noise_for_the_prv_accountant_falls_back_to_rdp():
    """z = 0.02: epsilon in the tens of thousands, beyond what the PRV accountant can
    discretise (exp overflows); the RDP bound is reported, promptly, not inf."""
    from opacus.accountants import RDPAccountant

    cfg = Config(clients=100, clients_per_round=10, dp_clip=1.0, dp_noise=0.02, weighting="uniform")
    dp = dp_after(cfg, 100, 12)
    rdp = RDPAccountant()
    rdp.history = [(0.02, 0.1, 12)]
    assert dp.epsilon() == dp.epsilon_rdp() == pytest.approx(rdp.get_epsilon(delta=dp.delta))
    assert 1e4 < dp.epsilon() < math.inf


def validate(**values) -> None:
    """Config.validate on one rank, with DP's uniform weights and every example."""
    Config(weighting="uniform", train_samples=None, **values).validate(1)


@pytest.mark.parametrize("clients", [2, 3, 10, 400, 10**6])
def test_the_default_delta_is_below_one_over_the_population(clients):
    assert default_delta(clients) < 1 / clients
    validate(clients=clients, dp_clip=1.0, dp_noise=1.0)


def test_a_delta_of_one_over_the_population_is_refused():
    """6 of 8 clients train (2 held out): the population is 6."""
    common = {"clients": 8, "holdout_clients": 0.25, "dp_clip": 1.0, "dp_noise": 1.0}
    validate(**common, dp_delta=0.999 / 6)
    for delta in (1 / 6, 0.2, 0.5):
        with pytest.raises(UsageError, match=r"--dp-delta .* is not below 1 / 6 \(the clients"):
            validate(**common, dp_delta=delta)


def test_an_expected_cohort_below_one_client_is_refused():
    common = {"clients": 20, "dp_clip": 1.0, "dp_noise": 1.0}
    validate(**common, clients_per_round=0.05)  # exactly one client expected
    with pytest.raises(UsageError, match=r"expects 0\.8 clients a round"):
        validate(**common, clients_per_round=0.04)
    validate(**common, clients_per_round=1)  # a count is at least one client


def test_noise_and_clip_whose_product_overflows_float32_are_refused():
    float32_max = float(np.finfo(np.float32).max)
    common = {"clients": 4, "dp_noise": 1e30}
    validate(**common, dp_clip=float32_max / 1e32)  # std 3.4e36: draws of 10 std fit
    with pytest.raises(UsageError, match="overflows float32"):
        validate(**common, dp_clip=float32_max / 1e30)
    with pytest.raises(UsageError, match="overflows float32"):
        validate(clients=4, dp_noise=1e200, dp_clip=1e200)  # inf in float64 already
    validate(clients=4, dp_noise=0.0, dp_clip=1e300)  # no noise: nothing to overflow


def test_numpys_float32_normals_stay_within_the_bound_the_overflow_check_assumes():
    """The check allows draws up to 10 standard deviations; numpy's float32 ziggurat
    cannot go past r + log(2^24) / r = 8.2 (r = 3.654), so 2^24 draws stay below it."""
    from fedmpi.config import NOISE_DRAW_BOUND

    draws = np.random.default_rng(0).standard_normal(1 << 24, dtype=np.float32)
    assert np.abs(draws).max() < 8.3 < NOISE_DRAW_BOUND


def test_a_noise_seed_needs_dp_and_a_32_bit_value():
    with pytest.raises(UsageError, match="--dp-noise-seed needs --dp-clip"):
        validate(clients=4, dp_noise_seed=3)
    with pytest.raises(UsageError, match=r"--dp-noise-seed must be in \[0, 2\^32\)"):
        validate(clients=4, dp_clip=1.0, dp_noise_seed=2**32)
    validate(clients=4, dp_clip=1.0, dp_noise_seed=2**32 - 1)


def noise_of(cfg: Config, round_: int, n: int = 200_000) -> torch.Tensor:
    """The noise one round adds to a zero model (4 clients, everyone: D = 4)."""
    dp = ClientLevelDP(cfg, 4)
    average = torch.zeros(n)
    dp.privatise(average, torch.zeros(n), dp.denominator, round_)
    return average


def dp_config(**values) -> Config:
    return Config(clients=4, dp_clip=2.0, dp_noise=1.5, weighting="uniform", **values)


def test_the_noise_is_secret_by_default_and_reproducible_with_a_seed():
    """Without --dp-noise-seed, two runs of one configuration (same --seed) add different
    noise: the key is not a function of anything public. With it, the same noise, and a
    different seed or round gives unrelated noise. The std is z C / D = 1.5 * 2 / 4."""
    secret = [noise_of(dp_config(), 1) for _ in range(2)]
    assert not torch.equal(secret[0], secret[1])
    assert abs(float(torch.corrcoef(torch.stack(secret))[0, 1])) < 0.02
    seeded = noise_of(dp_config(dp_noise_seed=5), 1)
    assert torch.equal(seeded, noise_of(dp_config(dp_noise_seed=5, seed=7), 1))
    for other in (noise_of(dp_config(dp_noise_seed=6), 1), noise_of(dp_config(dp_noise_seed=5), 2)):
        assert abs(float(torch.corrcoef(torch.stack([seeded, other]))[0, 1])) < 0.02
    for noise in (*secret, seeded):
        assert float(noise.std()) == pytest.approx(0.75, rel=0.01)
        assert abs(float(noise.mean())) < 0.01


def test_the_key_has_128_random_bits_and_every_bit_changes_the_noise():
    """The key is 2 x 64 bits from the OS: over 64 draws every bit is set at least once
    (a narrower source leaves some never set: odds 2^-64 per bit otherwise). Keys that
    differ in one high bit add different noise: no generator that keeps 32 or 64 bits of
    the key (a torch CPU generator keeps 32 of its seed) would see the difference."""
    words = np.stack([noise_key(None) for _ in range(64)])
    assert words.dtype == np.uint64 and words.shape == (64, 2)
    assert np.bitwise_or.reduce(words, axis=0).tolist() == [2**64 - 1] * 2
    base = np.array([12345, 678], dtype=np.uint64)
    noises = []
    for flip in (None, (0, 40), (0, 63), (1, 40), (1, 63)):
        key = base.copy()
        if flip is not None:
            key[flip[0]] ^= np.uint64(1 << flip[1])
        dp = ClientLevelDP(dp_config(), 4, key)
        average = torch.zeros(1000)
        dp.privatise(average, torch.zeros(1000), dp.denominator, 1)
        noises.append(average)
    for i, one in enumerate(noises):
        assert not any(torch.equal(one, other) for other in noises[i + 1 :])


def test_the_key_survives_a_checkpoint():
    """A ClientLevelDP restored from another's state adds the same noise in the next
    round (a resume is bit-exact), though it drew a secret of its own first."""

    first = dp_after(dp_config(), 4, 2)
    state = {k: v.copy() for k, v in first.state().items()}
    resumed = ClientLevelDP(dp_config(), 4)  # a fresh secret, replaced by the saved one
    resumed.load_state(state)
    assert resumed.rounds == 2
    draws = [torch.zeros(1000), torch.zeros(1000)]
    for dp, average in zip((first, resumed), draws, strict=True):
        dp.privatise(average, torch.zeros(1000), dp.denominator, 3)
    assert torch.equal(draws[0], draws[1]) and draws[0].abs().sum() > 0


def test_a_checkpoint_without_a_noise_key_is_refused():
    """Written before the key existed: its noise cannot be continued."""
    dp = ClientLevelDP(dp_config(), 4)
    with pytest.raises(UsageError, match="predates fedmpi's secret DP noise key"):
        dp.load_state({"rounds": np.array([3])})
