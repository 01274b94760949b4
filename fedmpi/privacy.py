"""Client-level differential privacy: DP-FedAvg (McMahan et al. 2018, "Learning
Differentially Private Recurrent Language Models") in an Allreduce world.

This simulates *central* DP with a trusted aggregator: the clipped updates are summed in
the clear by the Allreduce, and the noise is added to the sum afterwards (docs/privacy.md).

* **Sampling**: every client joins a round independently with probability
  ``q = clients per round / clients`` (Poisson sampling, what the accountant assumes); a
  round whose cohort is empty still advances and still adds noise.
* **Clipping**: each client's update ``theta_k - g`` (L2 over the whole flat buffer, in
  float64 chunks) is scaled to norm at most ``C`` (``--dp-clip``) before it enters the
  payload, as ``g + clipped update``: the payload stays in parameter space, like FedAvg's.
* **Fixed denominator**: the payload is divided by the expected cohort size ``D = q K``,
  not by who came, so one client's influence on the average is bounded by ``C / D``; the
  share of ``g`` that a cohort of another size leaves is added back after the Allreduce.
* **Noise**: after the Allreduce every rank adds the same Gaussian noise, standard
  deviation ``z C`` on the sum (``--dp-noise z``), so ``z C / (q K)`` on the average: added
  once, bit-identical everywhere, no extra collective. It is drawn from a 128-bit key that
  rank 0 takes from the operating system and broadcasts once; the key lives in the
  checkpoint (a resume continues the same noise) and nowhere else, so whoever holds the
  results cannot subtract the noise. ``--dp-noise-seed`` derives the key from a given seed
  instead, for runs that must be reproducible.
* **Accountant**: epsilon at ``--dp-delta`` after every round from the privacy-loss
  random variable (PRV) accountant of the subsampled Gaussian mechanism (Gopi et al.
  2021, opacus's ``PRVAccountant``), with the looser RDP bound (opacus's
  ``RDPAccountant``) beside it. Both run redundantly on every rank; their only state is
  the number of rounds, which is checkpointed.
* **A simulated deployment** (pfl-research's ``noise_cohort_size``): ``--dp-noise-cohort
  N`` adds the noise a cohort of N would get on the average, ``z C / N`` instead of
  ``z C / (q K)`` (N at least q K), and ``--dp-population M`` has the accountant sample at
  ``N / M``. The epsilon is then that of the deployment simulated, not of this run, and
  the results say so (``dp_simulated``).
* **Adaptive clipping** (Andrew et al. 2021, "Differentially Private Learning with
  Adaptive Clipping"; ``--dp-clip-quantile``): every client reports whether its update
  was within the round's bound ``C_t``; the count, summed over ranks in the small
  Allreduce the hook does anyway and noised with std ``sigma_b``, gives the noised
  unclipped share ``b_t``, and ``C_{t+1} = C_t exp(-eta (b_t - Q))``. Update and count
  are one Gaussian mechanism of multiplier ``z`` (``--dp-noise``) when the update's
  multiplier is ``z_Delta = (z^-2 - (2 sigma_b)^-2)^-1/2``: the accountant charges ``z``.
  The bound is checkpointed with the round count.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedmpi import results_keys as rk
from fedmpi.config import DEFAULT_CLIP_LR, Config
from fedmpi.diagnostics import squared_distance
from fedmpi.errors import UsageError
from fedmpi.hooks import RoundContext, RoundHook

if TYPE_CHECKING:
    from fedmpi.comm import World

NOISE_CHUNK = 1 << 20  # noise is drawn in slices: no model-sized temporary
NOISE_KEY_WORDS = 2  # the noise key: 2 x 64 bits, a Philox key

# The PRV accountant discretises the privacy loss on [-L, L] with L about the RDP
# epsilon: it evaluates exp(L), which overflows float64 past 709, so beyond that (noise
# far too small to protect anything) only the RDP bound is computed. Its mesh is chosen
# for an absolute epsilon error; where that would need more than PRV_MAX_POINTS points
# (long runs, large epsilons), the allowed error grows instead, keeping a round's
# accounting within a few seconds.
PRV_EPS_ERROR = 0.01
PRV_MAX_LOSS = 700.0
PRV_MAX_POINTS = 1 << 21


def poisson_cohort(participants: np.ndarray, rate: float, seed: int, round_: int) -> np.ndarray:
    """Each participating client joins this round with probability ``rate``, from
    (seed, round) alone: every rank draws the same cohort (possibly empty)."""
    rng = np.random.default_rng([seed, round_, len(participants), 0xD9])
    return np.sort(participants[rng.random(len(participants)) < rate])


def default_delta(n_clients: int) -> float:
    """1 / K^1.1: below 1/K, as a delta meaningful for K clients must be (a mechanism that
    publishes one random client's data outright is (0, 1/K)-DP)."""
    return 1.0 / n_clients**1.1


def noise_key(seed: int | None) -> np.ndarray:
    """The key of the DP noise: derived from ``seed`` when one is given (a reproducible
    run), else 128 bits from the operating system's cryptographic source. The full 128
    bits key the generator (a torch CPU generator would keep only 32 of them, few enough
    to try every one)."""
    if seed is None:
        return np.frombuffer(secrets.token_bytes(8 * NOISE_KEY_WORDS), dtype=np.uint64).copy()
    return np.random.SeedSequence([seed, 0xD9]).generate_state(NOISE_KEY_WORDS, dtype=np.uint64)


def shared_noise_key(cfg: Config, world: World) -> np.ndarray:
    """Collective: rank 0's ``noise_key``, on every rank (the noise must be the same
    everywhere, and only rank 0 may draw the secret)."""
    key = noise_key(cfg.dp_noise_seed) if world.is_root else np.empty(NOISE_KEY_WORDS, np.uint64)
    world.comm.Bcast(key, root=0)
    return key


class ClientLevelDP:
    """Clipping, noise and accounting of DP-FedAvg for one run."""

    def __init__(self, cfg: Config, n_participants: int, key: np.ndarray | None = None) -> None:
        """``key``: the noise key, the same on every rank (``shared_noise_key``); None
        draws one here, for a single process."""
        self.bound = float(cfg.dp_clip)  # the next round's clip bound (adaptive: it moves)
        self.noise = float(cfg.dp_noise)  # z: what the accountant charges, count included
        self.update_noise = cfg.dp_update_noise(n_participants)  # z_Delta (z without adapting)
        self.rate = cfg.dp_sample_rate(n_participants)  # the cohorts' Poisson rate
        self.denominator = self.rate * n_participants  # expected cohort weight (1 each)
        self.noise_cohort = cfg.dp_noise_cohort_size(n_participants)  # m: std z C / m
        self.population = cfg.dp_accounting_population(n_participants)
        self.accountant_rate = cfg.dp_accounting_rate(n_participants)
        self.simulated = cfg.dp_noise_cohort is not None or cfg.dp_population is not None
        self.delta = cfg.dp_delta if cfg.dp_delta is not None else default_delta(self.population)
        self.quantile = cfg.dp_clip_quantile  # None: a fixed bound
        self.clip_lr = cfg.dp_clip_lr if cfg.dp_clip_lr is not None else DEFAULT_CLIP_LR
        self.count_noise = cfg.dp_clip_count_std(n_participants)  # sigma_b
        self.key = noise_key(cfg.dp_noise_seed) if key is None else key
        self.noise_seed_given = cfg.dp_noise_seed is not None
        self.rounds = 0  # rounds accounted so far

    @property
    def adaptive(self) -> bool:
        return self.quantile is not None

    def measure(self, params: torch.Tensor, start: torch.Tensor, norm: float) -> float:
        """The norm of the client's update ``params - start``: ``norm``, or measured
        where it is NaN (not measured, as under ``--diagnostics off``)."""
        return math.sqrt(squared_distance(params, start)) if math.isnan(norm) else norm

    def clip(self, params: torch.Tensor, start: torch.Tensor, norm: float) -> float:
        """Clip the client's update ``params - start`` (of norm ``norm``; NaN when it was
        not measured, as under ``--diagnostics off``) to norm C, in place: ``params``
        becomes ``start + min(1, C / norm) (params - start)``. Returns the clipped update's
        norm, measured. An update within the bound is left untouched, so with C = inf the
        arithmetic is exactly FedAvg's."""
        norm = self.measure(params, start, norm)
        if norm <= self.bound:
            return norm
        params.sub_(start).mul_(self.bound / norm).add_(start)
        return math.sqrt(squared_distance(params, start))

    def privatise(
        self, average: torch.Tensor, start: torch.Tensor, arrived: float, round_: int
    ) -> None:
        """Make the payload's ``sum_k theta_k / D`` (D the fixed denominator, ``arrived``
        the clients that came) the noised global model ``start + sum_k u_k / D + noise``,
        the same on every rank: noise of std ``z_Delta C / m`` (m = D, or the simulated
        cohort)."""
        if arrived != self.denominator:  # the start's share, when the cohort was not q K
            average.add_(start, alpha=1.0 - arrived / self.denominator)
        std = self.update_noise * self.bound / self.noise_cohort
        if std > 0:
            for lo, draw in enumerate_noise(self.key, round_, average.numel()):
                piece = average[lo : lo + len(draw)]
                piece.add_(torch.from_numpy(draw).to(piece.device), alpha=std)
        self.rounds += 1

    def adapt(self, unclipped: float, came: float, round_: int) -> float:
        """Adaptive clipping's step after ``round_`` (Andrew et al. 2021, Algorithm 1
        with TFF's centring): ``unclipped`` of the ``came`` clients had an update within
        the bound. The noised unclipped share

            b = (sum_k (b_k - 1/2) + N(0, (sigma_b D / m)^2)) / D + 1/2,  clamped to [0, 1]

        (each b_k - 1/2 is +-1/2: the count's sensitivity is 1/2; with a cohort of its
        expected size D this is the paper's (sum_k b_k + N(0, sigma_b^2)) / D; a simulated
        cohort m scales the noise down like the update's), then C <- C exp(-eta (b - Q)).
        Returns b. The same on every rank: the count is summed, the noise keyed."""
        share = (unclipped - came / 2) / self.denominator + 0.5
        if self.count_noise > 0:
            share += self.count_noise / self.noise_cohort * count_noise_draw(self.key, round_)
        share = min(1.0, max(0.0, share))
        self.bound *= math.exp(-self.clip_lr * (share - self.quantile))
        return share

    def epsilon(self) -> float:
        """Epsilon at ``delta`` after the rounds so far (``spent_epsilon``)."""
        return spent_epsilon(self.noise, self.accountant_rate, self.rounds, self.delta)

    def epsilon_rdp(self) -> float:
        """Epsilon at ``delta`` from the RDP accountant (what fedmpi reported before the
        PRV accountant; looser), never negative."""
        return rdp_epsilon(self.noise, self.accountant_rate, self.rounds, self.delta)

    def results_attrs(self) -> dict[str, object]:
        """The accountant's inputs, as attributes of results.h5 (never the key)."""
        attrs: dict[str, object] = {
            rk.DP_DELTA: self.delta,
            rk.DP_SAMPLE_RATE: self.rate,
            rk.DP_DENOMINATOR: self.denominator,
            rk.DP_ACCOUNTANT: "prv",
            rk.DP_NOISE_SEED_GIVEN: self.noise_seed_given,
            rk.DP_SIMULATED: self.simulated,
        }
        if self.simulated:
            attrs[rk.DP_NOISE_COHORT] = self.noise_cohort
            attrs[rk.DP_POPULATION] = self.population
            attrs[rk.DP_ACCOUNTANT_RATE] = self.accountant_rate
        if self.adaptive:
            attrs[rk.DP_UPDATE_NOISE] = self.update_noise
            attrs[rk.DP_CLIP_COUNT_NOISE] = self.count_noise
        return attrs

    def describe(self, participants: int) -> str:
        """One log line: the mechanism and what the accountant assumes."""
        source = (
            "--dp-noise-seed (reproducible)"
            if self.noise_seed_given
            else "a secret key drawn by rank 0, kept in the checkpoint only"
        )
        text = (
            f"privacy: DP-FedAvg, clip {self.bound:g}, noise multiplier {self.noise:g}, Poisson "
            f"rate {self.rate:.4g} of {participants} clients (denominator "
            f"{self.denominator:g}), delta {self.delta:.3g}, epsilon by the PRV accountant "
            f"(RDP beside it), noise from {source}; central DP with a trusted aggregator"
        )
        if self.simulated:
            text += (
                f"; SIMULATED: the noise of a cohort of {self.noise_cohort:g}, accounted at "
                f"rate {self.accountant_rate:.4g} of a population of {self.population}: the "
                "epsilon is the simulated deployment's, not this run's"
            )
        if self.adaptive:
            text += (
                f"; adaptive clipping toward the {self.quantile:g} quantile (step "
                f"{self.clip_lr:g}, count noise {self.count_noise:g}, update noise "
                f"multiplier {self.update_noise:.4g})"
            )
        return text

    # The state for checkpoints: the noise key (a resumed run continues the same noise),
    # the accountant's history, which is the number of rounds (the noise multiplier and
    # sample rate are fixed for a run), and the clip bound (adaptive clipping moves it).
    def state(self) -> dict[str, np.ndarray]:
        return {
            "rounds": np.array([self.rounds], dtype=np.int64),
            "noise_key": self.key.copy(),
            "clip_bound": np.array([self.bound], dtype=np.float64),
        }

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if "noise_key" not in state:
            raise UsageError(
                "the checkpoint predates fedmpi's secret DP noise key, so its noise cannot be "
                "continued: pass --overwrite to start the run over"
            )
        self.rounds = int(state["rounds"][0])
        self.key = np.asarray(state["noise_key"], dtype=np.uint64).copy()
        if "clip_bound" in state:  # older checkpoints: a fixed bound, the configured one
            self.bound = float(state["clip_bound"][0])


class DPFedAvg(RoundHook):
    """DP-FedAvg as a round hook around any server optimizer (like Flower's DP wrappers):
    Poisson cohorts, the fixed denominator, each client's update clipped on the way into
    the payload, the noise added on the way out of the Allreduce, adaptive clipping's
    step after it, and epsilon in the row. Placed after the diagnostics hook, it clips
    what they measured and they observe what it noised.

    What the ranks must agree on beyond the payload (each client's clipped norm, who
    came, and the count of unclipped updates) is one small float64 Allreduce of
    2 K + 1 values right after the payload's, on the way out: the count must be known
    before the bound moves, the norms are for the row. Not the payload's tail: that
    belongs to the aggregator, which rescales it, and a few kilobytes more cost one
    latency-bound collective that the row needed anyway."""

    def __init__(self, dp: ClientLevelDP, participants: np.ndarray, seed: int, n_clients: int):
        self.dp, self.participants, self.seed = dp, participants, seed
        self.fixed_denominator = dp.denominator
        self.n_clients = n_clients
        # this rank's clipped norm of each client | 1 if it came | its unclipped updates
        self.local = np.zeros(2 * n_clients + 1)
        self.gathered = np.zeros_like(self.local)
        self.round_bound = dp.bound  # the bound this round clipped with
        self.unclipped_share = math.nan  # the noised share that moved the bound

    def cohort(self, round_: int) -> np.ndarray:
        return poisson_cohort(self.participants, self.dp.rate, self.seed, round_)

    def start(self, ctx: RoundContext) -> None:
        self.local[:] = 0.0
        self.round_bound = self.dp.bound

    def client_update(
        self, ctx: RoundContext, client: int, weight: float, norm: float
    ) -> float | None:
        norm = self.dp.measure(ctx.params, ctx.start, norm)
        if norm <= self.dp.bound:  # b_k: within the bound, left as it is
            self.local[-1] += 1.0
        norm = self.dp.clip(ctx.params, ctx.start, norm)
        self.local[client] = norm
        self.local[self.n_clients + client] = 1.0
        return norm

    def after_allreduce(self, ctx: RoundContext, average: torch.Tensor, arrived: float) -> None:
        from mpi4py import MPI

        self.gathered[:] = self.local
        ctx.world.comm.Allreduce(MPI.IN_PLACE, self.gathered, op=MPI.SUM)
        self.dp.privatise(average, ctx.start, arrived, ctx.round)
        if self.dp.adaptive:
            came = float(self.gathered[self.n_clients : 2 * self.n_clients].sum())
            self.unclipped_share = self.dp.adapt(self.gathered[-1], came, ctx.round)

    def row(self, ctx: RoundContext) -> dict:
        """Epsilon spent so far (tight and RDP), every client's clipped update norm (NaN
        for clients that did not come: not sampled, or skipped) and, under adaptive
        clipping, the bound the round used and the noised share that moved it."""
        norms = self.gathered[: self.n_clients]
        came = self.gathered[self.n_clients : 2 * self.n_clients]
        row = {
            rk.EPSILON: self.dp.epsilon(),
            rk.EPSILON_RDP: self.dp.epsilon_rdp(),
            rk.CLIPPED_UPDATE_NORM: np.where(came > 0, norms, np.nan),
        }
        if self.dp.adaptive:
            row[rk.CLIP_BOUND] = self.round_bound
            row[rk.UNCLIPPED_FRACTION] = self.unclipped_share
        return row


def enumerate_noise(key: np.ndarray, round_: int, numel: int) -> Iterator[tuple[int, np.ndarray]]:
    """Standard normal float32 noise for ``round_``, ``numel`` values in slices of
    NOISE_CHUNK, as (offset, slice): Philox keyed by the 128-bit ``key``, the round in
    the counter's third word (each round has 2^128 blocks of its own)."""
    rng = np.random.Generator(np.random.Philox(key=key, counter=[0, 0, round_, 0]))
    for lo in range(0, numel, NOISE_CHUNK):
        yield lo, rng.standard_normal(min(NOISE_CHUNK, numel - lo), dtype=np.float32)


def count_noise_draw(key: np.ndarray, round_: int) -> float:
    """The standard normal draw of the noise on ``round_``'s count of unclipped clients:
    Philox keyed like the update's noise, the round in the counter's third word and 1 in
    its fourth (the update's streams have 0 there, and never reach it)."""
    rng = np.random.Generator(np.random.Philox(key=key, counter=[0, 0, round_, 1]))
    return float(rng.standard_normal())


def spent_epsilon(noise: float, rate: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` of the Poisson subsampled Gaussian mechanism
    (inf without noise, never negative): the PRV accountant's upper bound, or the RDP one
    where that is tighter or the PRV one cannot be computed. Both bound the same
    mechanism, so the smaller is a valid bound."""
    if rounds == 0:
        return 0.0
    if noise == 0:
        return math.inf
    tight = min(prv_epsilon(noise, rate, rounds, delta), rdp_epsilon(noise, rate, rounds, delta))
    return max(0.0, tight)


def rdp_epsilon(noise: float, rate: float, rounds: int, delta: float) -> float:
    """The RDP accountant's epsilon at ``delta`` (looser than PRV), never negative."""
    if rounds == 0:
        return 0.0
    if noise == 0:
        return math.inf
    from opacus.accountants import RDPAccountant  # heavy import: only under DP

    accountant = RDPAccountant()
    accountant.history = [(noise, rate, rounds)]
    return max(0.0, float(accountant.get_epsilon(delta=delta)))


def prv_epsilon(noise: float, rate: float, rounds: int, delta: float) -> float:
    """The PRV accountant's upper bound on epsilon for ``rounds`` rounds of the Poisson
    subsampled Gaussian mechanism, or inf where it cannot be computed (see PRV_MAX_LOSS)."""
    from opacus.accountants import PRVAccountant  # heavy import: only under DP
    from opacus.accountants.analysis.prv import (
        PoissonSubsampledGaussianPRV,
        compute_safe_domain_size,
    )

    delta_error = delta / 1000  # opacus's default
    half_width = compute_safe_domain_size(
        [PoissonSubsampledGaussianPRV(rate, noise)], [rounds], PRV_EPS_ERROR, delta_error
    )
    if half_width > PRV_MAX_LOSS:
        return math.inf
    # The accountant's mesh for an error eps_error (PRVAccountant._get_domain).
    mesh = PRV_EPS_ERROR / math.sqrt(rounds * math.log(12 / delta_error) / 2)
    eps_error = PRV_EPS_ERROR * max(1.0, 2 * half_width / mesh / PRV_MAX_POINTS)
    accountant = PRVAccountant()
    accountant.history = [(noise, rate, rounds)]
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            value = float(accountant.get_epsilon(delta, eps_error=eps_error))
    except (RuntimeError, ValueError):  # its discretisation failed: no bound from it
        return math.inf
    return value if math.isfinite(value) else math.inf
