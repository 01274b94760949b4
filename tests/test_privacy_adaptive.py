"""Adaptive clipping (Andrew et al. 2021) in-process, through the DPFedAvg hook on one
rank: the clip bound against the paper's update rule written out here by hand, with the
noise on the count drawn from the --dp-noise-seed key as docs/privacy.md says; the update
noise multiplier z_Delta = (z^-2 - (2 sigma_b)^-2)^-1/2 and what the accountant charges;
the bound carried through a checkpoint bit for bit; the settings refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mpi4py import MPI
from test_privacy_accounting import assert_in_bracket, reference_epsilon

from fedmpi import results_keys as rk
from fedmpi.comm import World
from fedmpi.config import Config
from fedmpi.errors import UsageError
from fedmpi.hooks import RoundContext
from fedmpi.privacy import ClientLevelDP, DPFedAvg, enumerate_noise, prv_epsilon

DIM = 64  # parameters of the toy model
SEED = 11  # --dp-noise-seed


def adaptive_config(clients: int = 8, **values) -> Config:
    settings = {
        "clients": clients,
        "dp_clip": 1.0,
        "dp_noise": 1.0,
        "dp_clip_quantile": 0.5,
        "dp_clip_count_noise": 2.0,
        "dp_noise_seed": SEED,
        "weighting": "uniform",
        **values,
    }
    return Config(**settings)


def count_draw(seed: int, round_: int) -> float:
    """The count's standard normal as docs/privacy.md derives it: the key is the
    SeedSequence of (seed, 0xD9), 2 x 64 bits; Philox's counter holds the round in its
    third word and 1 in its fourth."""
    key = np.random.SeedSequence([seed, 0xD9]).generate_state(2, dtype=np.uint64)
    return float(np.random.Generator(np.random.Philox(key=key, counter=[0, 0, round_, 1])).normal())


def update_of_norm(rng: np.random.Generator, norm: float) -> torch.Tensor:
    direction = rng.standard_normal(DIM)
    return torch.from_numpy(direction / np.linalg.norm(direction) * norm).float()


class Simulation:
    """The hook around rounds of clients whose update norms the test chooses: each
    client's parameters are the round's start plus an update of that norm."""

    def __init__(self, cfg: Config, dp: ClientLevelDP | None = None):
        self.cfg = cfg
        participants = np.arange(cfg.clients)
        self.dp = dp if dp is not None else ClientLevelDP(cfg, cfg.clients)
        self.hook = DPFedAvg(self.dp, participants, cfg.seed, cfg.clients)
        self.world = World.from_comm(MPI.COMM_WORLD)
        self.start = torch.zeros(DIM)

    def round(
        self, round_: int, norms: dict[int, float], row: bool = True
    ) -> tuple[dict, torch.Tensor]:
        """One round in which the clients of ``norms`` came; returns the row (without the
        accountants' seconds unless ``row``: only the bound and the share) and the noised
        new model."""
        rng = np.random.default_rng(round_)
        params = torch.zeros(DIM)
        ctx = RoundContext(
            round_, np.array(sorted(norms)), self.start, params, self.dp.denominator, self.world
        )
        self.hook.start(ctx)
        payload = torch.zeros(DIM)
        for client, norm in sorted(norms.items()):
            params.copy_(self.start + update_of_norm(rng, norm))
            assert self.hook.client_update(ctx, client, 1.0, math.nan) is not None
            payload += params / self.dp.denominator
        self.clean = payload.clone()  # the average before the noise
        self.hook.after_allreduce(ctx, payload, float(len(norms)))
        self.start = payload.clone()
        if not row:
            return {
                rk.CLIP_BOUND: self.hook.round_bound,
                rk.UNCLIPPED_FRACTION: self.hook.unclipped_share,
            }, payload
        return self.hook.row(ctx), payload


def norms_of_round(round_: int, clients: int) -> dict[int, float]:
    """Update norms spread over [0.05, 4]: some within any bound the rule reaches, some not."""
    rng = np.random.default_rng(100 + round_)
    return {
        k: float(v) for k, v in enumerate(np.exp(rng.uniform(np.log(0.05), np.log(4), clients)))
    }


def test_the_bound_follows_the_papers_rule_written_out_by_hand():
    """Everyone every round (q = 1, the cohort is its expected size D = 8): Andrew et al.'s
    Algorithm 1, b_t = (sum of indicators + N(0, sigma_b^2)) / D, clamped to [0, 1] as TFF
    does, and C_{t+1} = C_t exp(-eta (b_t - Q)). sigma_b = 4 makes the noise matter (and
    the clamp bind in some rounds)."""
    cfg = adaptive_config(dp_clip_count_noise=4.0)
    sim = Simulation(cfg)
    bound, quantile, eta, sigma, expected = 1.0, 0.5, 0.2, 4.0, 8.0
    z_delta = (1 - (2 * sigma) ** -2) ** -0.5
    bounds, shares, clamped = [], [], 0
    for round_ in range(1, 13):
        norms = norms_of_round(round_, 8)
        row, model = sim.round(round_, norms, row=round_ in (1, 12))
        indicators = sum(norm <= bound for norm in norms.values())
        share = (indicators + sigma * count_draw(SEED, round_)) / expected
        clamped += not 0 <= share <= 1
        share = min(1.0, max(0.0, share))
        assert row[rk.CLIP_BOUND] == pytest.approx(bound, rel=1e-12), round_
        assert row[rk.UNCLIPPED_FRACTION] == pytest.approx(share, rel=1e-12, abs=1e-12)
        bounds.append(bound)
        shares.append(share)
        bound = bound * math.exp(-eta * (share - quantile))
        assert sim.dp.bound == pytest.approx(bound, rel=1e-12)
        norms_after = sim.hook.gathered[:8]  # each client's clipped norm
        assert np.all(norms_after <= bounds[-1] * (1 + 1e-6))
        # The round's update noise is z_Delta C_t / D times its draws: C_t, not C_{t+1}.
        ((_, draws),) = enumerate_noise(sim.dp.key, round_, DIM)
        noise = (model - sim.clean).numpy()
        np.testing.assert_allclose(noise, z_delta * bounds[-1] / expected * draws, rtol=1e-4)
    assert clamped > 0  # the clamp was exercised
    assert len({round(b, 6) for b in bounds}) == len(bounds)  # the bound moved every round


def test_with_poisson_cohorts_the_count_is_centred_as_tff_does():
    """q = 0.5 of 8: cohorts of 1 to 7 around D = 4. Each indicator enters as b_k - 1/2
    (sensitivity 1/2, what z_Delta's formula assumes): b_t = (sum_k (b_k - 1/2) +
    N(0, sigma_b^2)) / D + 1/2, the paper's formula when the cohort is D."""
    cfg = adaptive_config(clients_per_round=0.5, dp_clip_count_noise=0.8)
    sim = Simulation(cfg)
    bound, sizes = 1.0, set()
    for round_ in range(1, 13):
        cohort = sim.hook.cohort(round_)
        everyone = norms_of_round(round_, 8)
        norms = {int(k): everyone[int(k)] for k in cohort}
        row, _ = sim.round(round_, norms, row=round_ == 12)
        sizes.add(len(norms))
        centred = sum((norm <= bound) - 0.5 for norm in norms.values())
        share = min(1.0, max(0.0, (centred + 0.8 * count_draw(SEED, round_)) / 4 + 0.5))
        assert row[rk.UNCLIPPED_FRACTION] == pytest.approx(share, rel=1e-12, abs=1e-12)
        bound *= math.exp(-0.2 * (share - 0.5))
        assert sim.dp.bound == pytest.approx(bound, rel=1e-12)
    assert sizes - {4}  # some cohorts were not of the expected size


def test_a_simulated_cohort_scales_the_count_noise_like_the_update_noise():
    """The noise of a cohort of N = 80 (from 8,000) on a real cohort of D = 8: sigma_b
    defaults to N / 20 = 4, and the count's noise is sigma_b D / N on the sum, so b_t =
    (sum of indicators) / D + sigma_b / N * xi: the noise a cohort of 80 would see."""
    cfg = adaptive_config(dp_clip_count_noise=None, dp_noise_cohort=80, dp_population=8000)
    sim = Simulation(cfg)
    assert sim.dp.count_noise == 4.0
    bound = 1.0
    for round_ in range(1, 7):
        norms = norms_of_round(round_, 8)
        row, _ = sim.round(round_, norms, row=False)
        indicators = sum(norm <= bound for norm in norms.values())
        share = min(1.0, max(0.0, indicators / 8 + 4.0 / 80 * count_draw(SEED, round_)))
        assert row[rk.UNCLIPPED_FRACTION] == pytest.approx(share, rel=1e-12, abs=1e-12)
        bound *= math.exp(-0.2 * (share - 0.5))
        assert sim.dp.bound == pytest.approx(bound, rel=1e-12)


def test_the_bound_converges_to_the_quantile_of_the_norms():
    """Without noise on the count (sigma_b = 0, z = 0): every client's norm is the same
    each round (0.1, 0.2, ..., 1.0), and the bound settles near their 0.3 quantile."""
    cfg = adaptive_config(
        clients=10, dp_noise=0.0, dp_clip_count_noise=0.0, dp_clip_quantile=0.3, dp_clip=5.0
    )
    sim = Simulation(cfg)
    norms = {k: 0.1 * (k + 1) for k in range(10)}
    for round_ in range(1, 120):
        row, _ = sim.round(round_, norms, row=round_ == 119)
    assert 0.28 < sim.dp.bound < 0.42
    assert row[rk.EPSILON] == math.inf  # no noise: no privacy


def test_the_update_noise_grows_so_update_and_count_spend_what_z_alone_would():
    """z = 1, sigma_b = 0.6: z_Delta = (1 - 1/1.2^2)^-1/2 = 1.81. The update's noise has
    std z_Delta C / D; the accountant charges z: the same epsilon as fixed clipping at z,
    more than the update's noise alone would cost (the count's share is paid)."""
    cfg = adaptive_config(clients=10, clients_per_round=0.5, dp_clip=2.0, dp_clip_count_noise=0.6)
    z_delta = (1 - 1 / 1.2**2) ** -0.5
    dp = ClientLevelDP(cfg, 10)
    assert dp.update_noise == pytest.approx(z_delta, rel=1e-15)
    average = torch.zeros(400_000)
    dp.privatise(average, torch.zeros_like(average), dp.denominator, 1)
    assert float(average.std()) == pytest.approx(z_delta * 2.0 / 5, rel=0.01)
    for _ in range(3):
        dp.privatise(torch.zeros(4), torch.zeros(4), dp.denominator, 1)
    fixed = ClientLevelDP(Config(clients=10, clients_per_round=0.5, dp_clip=2.0, dp_noise=1.0), 10)
    fixed.rounds = dp.rounds
    assert dp.rounds == 4 and dp.epsilon() == fixed.epsilon()
    assert_in_bracket(dp.epsilon(), reference_epsilon(1.0, 0.5, 4, dp.delta))
    assert dp.epsilon() > 1.5 * prv_epsilon(z_delta, 0.5, 4, dp.delta)
    assert dp.results_attrs()[rk.DP_UPDATE_NOISE] == dp.update_noise
    assert dp.results_attrs()[rk.DP_CLIP_COUNT_NOISE] == 0.6


def test_the_default_count_noise_is_tffs():
    """sigma_b defaults to the expected cohort / 20 (TFF's 0.05 * clients_per_round), 0
    without noise; the step to 0.2."""
    dp = ClientLevelDP(
        adaptive_config(clients=100, clients_per_round=0.4, dp_clip_count_noise=None), 100
    )
    assert dp.count_noise == pytest.approx(2.0) and dp.clip_lr == 0.2
    assert dp.update_noise == pytest.approx((1 - 1 / 16) ** -0.5)
    quiet = adaptive_config(clients=100, dp_noise=0.0, dp_clip_count_noise=None)
    assert ClientLevelDP(quiet, 100).count_noise == 0.0


def test_the_bound_survives_a_checkpoint_bit_for_bit():
    """Rounds 1-6 straight, against rounds 1-3, the state saved and loaded into a fresh
    ClientLevelDP (which starts at the configured bound), then rounds 4-6: the same bounds
    and the same noised models, bit for bit."""
    cfg = adaptive_config()
    straight = Simulation(cfg)
    first = Simulation(cfg)
    for round_ in range(1, 4):
        straight.round(round_, norms_of_round(round_, 8), row=False)
        first.round(round_, norms_of_round(round_, 8), row=False)
    saved = {k: v.copy() for k, v in first.dp.state().items()}
    assert saved["clip_bound"][0] != 1.0
    resumed_dp = ClientLevelDP(cfg, 8)
    resumed_dp.load_state(saved)
    resumed = Simulation(cfg, resumed_dp)
    resumed.start = first.start.clone()
    for round_ in range(4, 7):
        a_row, a_model = straight.round(round_, norms_of_round(round_, 8))
        b_row, b_model = resumed.round(round_, norms_of_round(round_, 8))
        assert a_row[rk.CLIP_BOUND] == b_row[rk.CLIP_BOUND]
        assert torch.equal(a_model, b_model)
    assert straight.dp.bound == resumed.dp.bound and straight.dp.rounds == resumed.dp.rounds == 6


def test_fixed_clipping_writes_no_bound_and_keeps_its_bound():
    cfg = Config(clients=4, dp_clip=1.0, dp_noise=1.0, dp_noise_seed=3, weighting="uniform")
    sim = Simulation(cfg)
    row, _ = sim.round(1, {0: 0.5, 1: 2.0, 2: 3.0, 3: 0.1})
    assert rk.CLIP_BOUND not in row and rk.UNCLIPPED_FRACTION not in row
    assert sim.dp.bound == 1.0 and not sim.dp.adaptive
    assert rk.DP_UPDATE_NOISE not in sim.dp.results_attrs()


def validate(**values) -> None:
    Config(weighting="uniform", train_samples=None, **values).validate(1)


ADAPTIVE = {"clients": 40, "dp_clip": 1.0, "dp_noise": 1.0, "dp_clip_quantile": 0.5}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"clients": 4, "dp_clip_quantile": 0.5}, "--dp-clip-quantile needs --dp-clip"),
        ({"clients": 4, "dp_clip": 1.0, "dp_clip_lr": 0.1}, "need --dp-clip-quantile"),
        ({"clients": 4, "dp_clip": 1.0, "dp_clip_count_noise": 1.0}, "need --dp-clip-quantile"),
        ({**ADAPTIVE, "dp_clip_quantile": 1.0}, r"--dp-clip-quantile must be in \(0, 1\)"),
        ({**ADAPTIVE, "dp_clip_quantile": 0.0}, r"--dp-clip-quantile must be in \(0, 1\)"),
        ({**ADAPTIVE, "dp_clip": math.inf, "dp_noise": 0.0}, "needs a finite --dp-clip"),
        ({**ADAPTIVE, "dp_clip_lr": 0.0}, "--dp-clip-lr must be positive"),
        ({**ADAPTIVE, "dp_clip_count_noise": -1.0}, "--dp-clip-count-noise must be >= 0"),
        # 40 clients expected: sigma_b = 2 by default, so z must stay below 4
        ({**ADAPTIVE, "dp_noise": 4.0}, "needs --dp-clip-count-noise above 2, got 2"),
        ({**ADAPTIVE, "dp_clip_count_noise": 0.5}, "needs --dp-clip-count-noise above 0.5"),
    ],
)
def test_adaptive_clipping_settings_are_refused(values, message):
    with pytest.raises(UsageError, match=message):
        validate(**values)


def test_adaptive_clipping_settings_that_are_fine():
    validate(**ADAPTIVE)  # sigma_b = 2 > z / 2
    validate(**{**ADAPTIVE, "dp_noise": 3.9, "dp_clip_lr": 0.5})
    validate(**{**ADAPTIVE, "dp_noise": 0.0})  # clipping only: nothing to split
    validate(**{**ADAPTIVE, "dp_noise": 4.0, "dp_clip_count_noise": 2.5})
    # A simulated cohort of 400 makes the default sigma_b 20: room for z = 4
    validate(**{**ADAPTIVE, "dp_noise": 4.0, "dp_noise_cohort": 400, "dp_population": 10**5})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dp_clip_quantile": 1.5}, "--dp-clip-quantile must be in (0, 1)"),
        ({"dp_noise": 5.0}, "with adaptive clipping needs --dp-clip-count-noise above"),
    ],
)
def test_refusal_messages_of_docs_errors_md(values, message):
    """docs/errors.md's rows that name this module: their messages, verbatim."""
    with pytest.raises(UsageError) as refused:
        validate(**{**ADAPTIVE, **values})
    assert message in str(refused.value)
