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
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedmpi.config import Config
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
        self.bound = float(cfg.dp_clip)
        self.noise = float(cfg.dp_noise)
        self.rate = cfg.dp_sample_rate(n_participants)
        self.denominator = self.rate * n_participants  # expected cohort weight (1 each)
        self.delta = cfg.dp_delta if cfg.dp_delta is not None else default_delta(n_participants)
        self.key = noise_key(cfg.dp_noise_seed) if key is None else key
        self.rounds = 0  # rounds accounted so far

    def clip(self, params: torch.Tensor, start: torch.Tensor, norm: float) -> float:
        """Clip the client's update ``params - start`` (of norm ``norm``; NaN when it was
        not measured, as under ``--diagnostics off``) to norm C, in place: ``params``
        becomes ``start + min(1, C / norm) (params - start)``. Returns the clipped update's
        norm, measured. An update within the bound is left untouched, so with C = inf the
        arithmetic is exactly FedAvg's."""
        if math.isnan(norm):
            norm = math.sqrt(squared_distance(params, start))
        if norm <= self.bound:
            return norm
        params.sub_(start).mul_(self.bound / norm).add_(start)
        return math.sqrt(squared_distance(params, start))

    def privatise(
        self, average: torch.Tensor, start: torch.Tensor, arrived: float, round_: int
    ) -> None:
        """Make the payload's ``sum_k theta_k / D`` (D the fixed denominator, ``arrived``
        the clients that came) the noised global model ``start + sum_k u_k / D + noise``,
        the same on every rank."""
        if arrived != self.denominator:  # the start's share, when the cohort was not q K
            average.add_(start, alpha=1.0 - arrived / self.denominator)
        std = self.noise * self.bound / self.denominator
        if std > 0:
            for lo, draw in enumerate_noise(self.key, round_, average.numel()):
                piece = average[lo : lo + len(draw)]
                piece.add_(torch.from_numpy(draw).to(piece.device), alpha=std)
        self.rounds += 1

    def epsilon(self) -> float:
        """Epsilon at ``delta`` after the rounds so far (inf without noise, never
        negative): the PRV accountant's upper bound, or the RDP one where that is tighter
        or the PRV one cannot be computed. Both bound the same mechanism, so the smaller
        is a valid bound."""
        if self.rounds == 0:
            return 0.0
        if self.noise == 0:
            return math.inf
        tight = min(prv_epsilon(self.noise, self.rate, self.rounds, self.delta), self.epsilon_rdp())
        return max(0.0, tight)

    def epsilon_rdp(self) -> float:
        """Epsilon at ``delta`` from the RDP accountant (what fedmpi reported before the
        PRV accountant; looser), never negative."""
        if self.rounds == 0:
            return 0.0
        if self.noise == 0:
            return math.inf
        from opacus.accountants import RDPAccountant  # heavy import: only under DP

        accountant = RDPAccountant()
        accountant.history = [(self.noise, self.rate, self.rounds)]
        return max(0.0, float(accountant.get_epsilon(delta=self.delta)))

    # The state for checkpoints: the noise key (a resumed run continues the same noise),
    # and the accountant's history, which is the number of rounds (the noise multiplier
    # and sample rate are fixed for a run).
    def state(self) -> dict[str, np.ndarray]:
        return {"rounds": np.array([self.rounds], dtype=np.int64), "noise_key": self.key.copy()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if "noise_key" not in state:
            raise UsageError(
                "the checkpoint predates fedmpi's secret DP noise key, so its noise cannot be "
                "continued: pass --overwrite to start the run over"
            )
        self.rounds = int(state["rounds"][0])
        self.key = np.asarray(state["noise_key"], dtype=np.uint64).copy()


class DPFedAvg(RoundHook):
    """DP-FedAvg as a round hook around any server optimizer (like Flower's DP wrappers):
    Poisson cohorts, the fixed denominator, each client's update clipped on the way into
    the payload, the noise added on the way out of the Allreduce, and epsilon in the row.
    Placed after the diagnostics hook, it clips what they measured and they observe what
    it noised."""

    def __init__(self, dp: ClientLevelDP, participants: np.ndarray, seed: int, n_clients: int):
        self.dp, self.participants, self.seed = dp, participants, seed
        self.fixed_denominator = dp.denominator
        self.clipped = np.zeros(2 * n_clients)  # each client's clipped norm | 1 if it came

    def cohort(self, round_: int) -> np.ndarray:
        return poisson_cohort(self.participants, self.dp.rate, self.seed, round_)

    def start(self, ctx: RoundContext) -> None:
        self.clipped[:] = 0.0

    def client_update(
        self, ctx: RoundContext, client: int, weight: float, norm: float
    ) -> float | None:
        norm = self.dp.clip(ctx.params, ctx.start, norm)
        self.clipped[client] = norm
        self.clipped[len(self.clipped) // 2 + client] = 1.0
        return norm

    def after_allreduce(self, ctx: RoundContext, average: torch.Tensor, arrived: float) -> None:
        self.dp.privatise(average, ctx.start, arrived, ctx.round)

    def row(self, ctx: RoundContext) -> dict:
        """Epsilon spent so far (tight and RDP) and every client's clipped update norm
        (NaN for clients that did not come: not sampled, or skipped), one small Allreduce."""
        from mpi4py import MPI

        gathered = self.clipped.copy()
        ctx.world.comm.Allreduce(MPI.IN_PLACE, gathered, op=MPI.SUM)
        norms, came = np.split(gathered, 2)
        return {
            "privacy/epsilon": self.dp.epsilon(),
            "privacy/epsilon_rdp": self.dp.epsilon_rdp(),
            "privacy/clipped_update_norm": np.where(came > 0, norms, np.nan),
        }


def enumerate_noise(key: np.ndarray, round_: int, numel: int) -> Iterator[tuple[int, np.ndarray]]:
    """Standard normal float32 noise for ``round_``, ``numel`` values in slices of
    NOISE_CHUNK, as (offset, slice): Philox keyed by the 128-bit ``key``, the round in
    the counter's third word (each round has 2^128 blocks of its own)."""
    rng = np.random.Generator(np.random.Philox(key=key, counter=[0, 0, round_, 0]))
    for lo in range(0, numel, NOISE_CHUNK):
        yield lo, rng.standard_normal(min(NOISE_CHUNK, numel - lo), dtype=np.float32)


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
