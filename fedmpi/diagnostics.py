"""Per-round health of the federation, for the question of why many clients can collapse.

Logged every round at the cost of a few passes over the parameters:

* each client's update norm ``|theta_k - g|`` (exact);
* the cosine of each client's update to the weighted mean update, on a fixed strided
  sample of at most 2**20 coordinates (exact for smaller models) so that each client's
  update need not be kept in full;
* the global update norm ``|g' - g|`` and, per layer group (embeddings, each encoder
  layer, pooler, classifier), its relative change ``|g'_G - g_G| / |g_G|``.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
from mpi4py import MPI

from fedmpi.comm import World
from fedmpi.flat import FlatParameters

SAMPLE_SIZE = 2**20
_GROUP = re.compile(
    r"(embeddings|layer\.\d+|albert_layer_groups\.\d+|pooler|pre_classifier|classifier)"
)


def squared_distance(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 16) -> float:
    """``|a - b|^2`` in cache-sized chunks summed in float64: no temporary the size of the
    model, and accurate where one fp32 reduction over 10^8 terms is not. On a GPU the sum
    stays on the device (one synchronisation); on the CPU Python floats are cheapest."""
    scratch = torch.empty(min(chunk, a.numel()), dtype=a.dtype, device=a.device)
    on_cpu = a.device.type == "cpu"
    total = 0.0 if on_cpu else torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, a.numel(), chunk):
        piece = scratch[: min(chunk, a.numel() - start)]
        torch.sub(a[start : start + chunk], b[start : start + chunk], out=piece)
        dot = torch.dot(piece, piece)
        total += float(dot) if on_cpu else dot
    return float(total)


def layer_group(name: str) -> str:
    match = _GROUP.search(name)
    return match.group(1) if match else "other"


class UpdateDiagnostics:
    def __init__(self, flat: FlatParameters, n_clients: int) -> None:
        self.flat = flat
        self.n_clients = n_clients
        self.stride = max(1, flat.numel // SAMPLE_SIZE)
        self.group_names = list(dict.fromkeys(layer_group(n) for n in flat.names))
        self.group_of_param = [self.group_names.index(layer_group(n)) for n in flat.names]
        self.norms = np.zeros(n_clients)
        self.skipped = np.zeros(n_clients)
        self.samples: dict[int, torch.Tensor] = {}

    def start_round(self) -> None:
        self.norms[:] = 0.0
        self.skipped[:] = 0.0
        self.samples.clear()

    def record_client(self, client: int, params: torch.Tensor, start: torch.Tensor) -> bool:
        """Call after client ``client`` trained, while ``params`` still holds its model.

        Returns False when the update is not finite (its norm is NaN or inf: the check
        costs nothing extra); such a client is recorded as skipped.
        """
        norm = math.sqrt(squared_distance(params, start))
        if not math.isfinite(norm):
            self.skipped[client] = 1.0
            return False
        self.norms[client] = norm
        self.samples[client] = params[:: self.stride] - start[:: self.stride]
        return True

    def mean_update_sample(
        self, weighted_sum: torch.Tensor, total_weight: float, start: torch.Tensor
    ) -> torch.Tensor:
        """The weighted mean update's sample; call before the server step reuses the sum."""
        return weighted_sum[:: self.stride] / total_weight - start[:: self.stride]

    def finish_round(
        self,
        world: World,
        cohort: np.ndarray,
        mean_sample: torch.Tensor,
        new: torch.Tensor,
        start: torch.Tensor,
    ) -> dict[str, np.ndarray | float]:
        """Gather every client's numbers (one small Allreduce) and the global ones."""
        cosines = np.zeros(self.n_clients)
        mean_norm = float(torch.linalg.vector_norm(mean_sample))
        for client, sample in self.samples.items():
            denominator = float(torch.linalg.vector_norm(sample)) * mean_norm
            cosines[client] = (
                float(torch.dot(sample, mean_sample)) / denominator if denominator else 0.0
            )
        gathered = np.concatenate([self.norms, cosines, self.skipped])
        world.comm.Allreduce(MPI.IN_PLACE, gathered, op=MPI.SUM)
        norms, cosines, skipped = np.split(gathered, 3)
        absent = np.ones(self.n_clients, dtype=bool)  # not sampled, or skipped as non-finite
        absent[cohort] = False
        absent |= skipped > 0
        norms[absent] = np.nan
        cosines[absent] = np.nan

        drift_sq = np.zeros(len(self.group_names))
        size_sq = np.zeros(len(self.group_names))
        for param, group, offset in zip(
            self.flat.params, self.group_of_param, self.flat.offsets, strict=True
        ):
            span = slice(offset, offset + param.numel())
            drift_sq[group] += squared_distance(new[span], start[span])
            size_sq[group] += float(torch.linalg.vector_norm(start[span])) ** 2
        return {
            "clients/skipped": (skipped > 0).astype(np.int8),
            "diagnostics/client_update_norm": norms,
            "diagnostics/client_update_cosine": cosines,
            "diagnostics/global_update_norm": float(np.sqrt(drift_sq.sum())),
            "diagnostics/layer_drift": np.sqrt(drift_sq / np.maximum(size_sq, 1e-30)),
        }
