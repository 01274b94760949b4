"""Client-level differential privacy: DP-FedAvg (McMahan et al. 2018, "Learning
Differentially Private Recurrent Language Models") in an Allreduce world.

This simulates *central* DP with a trusted aggregator: the clipped updates are summed in
the clear by the Allreduce, and the noise is added to the sum afterwards.

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
  deviation ``z C`` on the sum (``--dp-noise z``), so ``z C / (q K)`` on the average, drawn
  from a generator keyed by (seed, round): added once, bit-identical everywhere, no extra
  collective.
* **Accountant**: the RDP accountant of the subsampled Gaussian mechanism (opacus's
  ``RDPAccountant``) gives epsilon at ``--dp-delta`` after every round. It runs
  redundantly on every rank, and its history is checkpointed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedmpi.config import Config
from fedmpi.diagnostics import squared_distance

NOISE_CHUNK = 1 << 20  # noise is drawn in slices: no model-sized temporary


def poisson_cohort(participants: np.ndarray, rate: float, seed: int, round_: int) -> np.ndarray:
    """Each participating client joins this round with probability ``rate``, from
    (seed, round) alone: every rank draws the same cohort (possibly empty)."""
    rng = np.random.default_rng([seed, round_, len(participants), 0xD9])
    return np.sort(participants[rng.random(len(participants)) < rate])


def default_delta(n_clients: int) -> float:
    """1 / K^1.1: below 1/K, as a delta meaningful for K clients must be."""
    return 1.0 / n_clients**1.1


class ClientLevelDP:
    """Clipping, noise and accounting of DP-FedAvg for one run."""

    def __init__(self, cfg: Config, n_participants: int) -> None:
        self.bound = float(cfg.dp_clip)
        self.noise = float(cfg.dp_noise)
        self.rate = cfg.dp_sample_rate(n_participants)
        self.denominator = self.rate * n_participants  # expected cohort weight (1 each)
        self.delta = cfg.dp_delta if cfg.dp_delta is not None else default_delta(n_participants)
        self.seed = cfg.seed
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
            generator = torch.Generator(device=average.device)
            generator.manual_seed(
                int(np.random.SeedSequence([self.seed, round_, 0xD9]).generate_state(1)[0])
            )
            for lo in range(0, average.numel(), NOISE_CHUNK):
                piece = average[lo : lo + NOISE_CHUNK]
                piece.add_(
                    torch.randn(
                        piece.shape, generator=generator, device=piece.device, dtype=piece.dtype
                    ),
                    alpha=std,
                )
        self.rounds += 1

    def epsilon(self) -> float:
        """Epsilon at ``delta`` after the rounds so far (inf without noise)."""
        if self.rounds == 0:
            return 0.0
        if self.noise == 0:
            return math.inf
        from opacus.accountants import RDPAccountant  # heavy import: only under DP

        accountant = RDPAccountant()
        accountant.history = [(self.noise, self.rate, self.rounds)]
        return float(accountant.get_epsilon(delta=self.delta))

    # The accountant's state for checkpoints: the noise multiplier and sample rate are
    # fixed for a run, so the history is the number of rounds.
    def state(self) -> dict[str, np.ndarray]:
        return {"rounds": np.array([self.rounds], dtype=np.int64)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.rounds = int(state["rounds"][0])
