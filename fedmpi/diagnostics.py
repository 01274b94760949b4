"""Per-round health of the federation, for the question of why many clients can collapse.

``--diagnostics`` chooses what is measured, at a cost of passes over the parameters:

* ``off``: nothing but the non-finite check (one read of each client's parameters);
* ``norms``: each client's update norm ``|theta_k - g|`` (exact, doubling as the
  non-finite check) and the global update norm ``|g' - g|``;
* ``full`` (default): also, on a fixed strided sample of each update (exact for small
  models; ``sample_stride`` sizes it), the cosine of each client's update to the weighted
  mean update of the *other* clients (leave-one-out: uncorrelated updates give about 0 at
  any number of clients, where a mean that includes the client would give about
  1/sqrt(K)), overall, without the embeddings (whose rows move only for the tokens a
  client saw) and per layer group; and each layer group's relative change ``|g'_G - g_G| / |g_G|``.
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import torch
from mpi4py import MPI

from fedmpi import results_keys as rk
from fedmpi.comm import World
from fedmpi.config import DIAGNOSTICS_LEVELS as LEVELS
from fedmpi.flat import FlatParameters
from fedmpi.hooks import RoundContext, RoundHook

SAMPLE_SIZE = 2**20  # coordinates of one client's sample, at most
FEDERATION_SAMPLES = 2**24  # coordinates of all clients' samples together, at most
EMBEDDINGS = "embeddings"
# Layer groups by parameter name, first match wins: BERT/ALBERT/DistilBERT/MPNet encoders,
# GPT-2 (h.N), Llama/Qwen/Mistral (layers.N); heads and norms by their usual names.
_GROUPS = (
    (re.compile(r"(?:^|\.)(?:layer|layers|h|block)\.(\d+)\."), "layer.{}"),
    (re.compile(r"albert_layer_groups\.(\d+)\."), "albert_layer_groups.{}"),
    (re.compile(r"embedding_hidden_mapping_in"), "embedding_projection"),
    (re.compile(r"embeddings|embed_tokens|(?:^|\.)wte\.|(?:^|\.)wpe\."), EMBEDDINGS),
    (re.compile(r"pre_classifier"), "pre_classifier"),
    (re.compile(r"classifier|(?:^|\.)score\."), "classifier"),
    (re.compile(r"pooler"), "pooler"),
    (re.compile(r"(?:^|\.)(?:norm|ln_f|final_layer_norm)\."), "final_norm"),
    (re.compile(r"relative_attention_bias"), "relative_attention_bias"),
)


def layer_group(name: str) -> str:
    """The layer group of a parameter name; unknown names keep their module path."""
    for pattern, label in _GROUPS:
        match = pattern.search(name)
        if match:
            return label.format(*match.groups())
    return name.rsplit(".", 1)[0]


def squared_distance(a: torch.Tensor, b: torch.Tensor | None = None, chunk: int = 1 << 16) -> float:
    """``|a - b|^2`` (``|a|^2`` without ``b``) in cache-sized chunks summed in float64: no
    temporary the size of the model, and accurate where one fp32 reduction over 10^8 terms
    is not. On a GPU the sum stays on the device (one synchronisation); on the CPU Python
    floats are cheapest."""
    scratch = torch.empty(min(chunk, a.numel()), dtype=a.dtype, device=a.device)
    on_cpu = a.device.type == "cpu"
    total = 0.0 if on_cpu else torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, a.numel(), chunk):
        piece = scratch[: min(chunk, a.numel() - start)]
        if b is None:
            piece.copy_(a[start : start + chunk])
        else:
            torch.sub(a[start : start + chunk], b[start : start + chunk], out=piece)
        dot = torch.dot(piece, piece)
        total += float(dot) if on_cpu else dot
    return float(total)


def sample_stride(numel: int, n_clients: int) -> int:
    """The stride of the sample each client's update keeps until the Allreduce: at most
    SAMPLE_SIZE coordinates, and at most FEDERATION_SAMPLES over the ``n_clients`` (64 MiB
    of fp32 for the whole job, however many clients a rank hosts: 200 clients of MiniLM
    once held ~400 MiB a rank in samples). It depends on the client count, never on
    ``-np``, so the cosines do not either; up to 16 clients keep 2**20 coordinates."""
    per_client = min(SAMPLE_SIZE, max(1, FEDERATION_SAMPLES // max(1, n_clients)))
    return max(1, math.ceil(numel / per_client))


class UpdateDiagnostics(RoundHook):
    """The round's first hook: it measures each client's update (its norm doubles as the
    non-finite check that drops a client), observes the average after the Allreduce and
    gathers every client's numbers for the results row."""

    def __init__(self, flat: FlatParameters, n_clients: int, level: str = "full") -> None:
        if level not in LEVELS:
            raise ValueError(f"unknown diagnostics level {level!r}")
        self.flat, self.n_clients, self.level = flat, n_clients, level
        self.stride = sample_stride(flat.numel, n_clients)
        self.group_names = list(dict.fromkeys(layer_group(n) for n in flat.names))
        self.group_of_param = [self.group_names.index(layer_group(n)) for n in flat.names]
        # The sample as runs of coordinates of one layer group: (group, start, stop).
        group_of_coord = np.repeat(self.group_of_param, [p.numel() for p in flat.params])
        sampled = group_of_coord[:: self.stride]
        edges = np.flatnonzero(np.diff(sampled)) + 1
        bounds = np.concatenate(([0], edges, [len(sampled)]))
        self.runs = [(int(sampled[a]), int(a), int(b)) for a, b in itertools.pairwise(bounds)]
        self.embeddings = self._group_index(EMBEDDINGS)
        self.norms = np.zeros(n_clients)
        self.skipped = np.zeros(n_clients)
        self.cosines = np.zeros((n_clients, 2 + len(self.group_names)))
        self.samples: dict[int, tuple[float, torch.Tensor]] = {}  # client -> (weight, update)
        self.health: dict[str, np.ndarray | float] = {}  # the last round's row

    # ---------------------------------------------------------------- as a round hook

    def start(self, ctx: RoundContext) -> None:
        self.start_round()

    def client_update(
        self, ctx: RoundContext, client: int, weight: float, norm: float
    ) -> float | None:
        return self.record_client(client, weight, ctx.params, ctx.start)

    def after_allreduce(self, ctx: RoundContext, average: torch.Tensor, arrived: float) -> None:
        self.observe_average(average, ctx.denominator, ctx.start)

    def after_server_step(self, ctx: RoundContext) -> None:
        self.health = self.finish_round(ctx.world, ctx.cohort, ctx.params, ctx.start)

    def row(self, ctx: RoundContext) -> dict:
        return self.health

    # ---------------------------------------------------------------- the measurements

    def _group_index(self, name: str) -> int:
        return self.group_names.index(name) if name in self.group_names else -1

    def start_round(self) -> None:
        self.norms[:] = 0.0
        self.skipped[:] = 0.0
        self.samples.clear()

    def record_client(
        self, client: int, weight: float, params: torch.Tensor, start: torch.Tensor
    ) -> float | None:
        """Call after ``client`` trained, while ``params`` holds its model; returns its
        update norm (NaN at level ``off``), or None when the update is not finite (the
        client is then recorded as skipped)."""
        if self.level == "off":
            # One fp32 reduction, no copy: NaN and inf propagate through a sum (it could
            # overflow only past 3e38, for parameters that have diverged anyway).
            finite = math.isfinite(float(params.sum()))
            norm = math.nan
        else:
            norm = math.sqrt(squared_distance(params, start))
            finite = math.isfinite(norm)
        if not finite:
            self.skipped[client] = 1.0
            return None
        self.norms[client] = norm
        if self.level == "full":
            self.samples[client] = (weight, params[:: self.stride] - start[:: self.stride])
        return norm

    def observe_average(
        self, average: torch.Tensor, denominator: float, start: torch.Tensor
    ) -> None:
        """Cosines of this rank's clients to the others' mean update; call after the
        Allreduce, before the server step consumes ``average`` (the weighted mean of the
        clients' models, with weights summing to ``denominator``)."""
        self.cosines = np.zeros((self.n_clients, 2 + len(self.group_names)))
        if self.level != "full":
            return
        mean_update = average[:: self.stride] - start[:: self.stride]
        for client, (weight, update) in self.samples.items():
            self.cosines[client] = self._leave_one_out_cosines(
                update, weight, mean_update, denominator
            )

    def finish_round(
        self, world: World, cohort: np.ndarray, new: torch.Tensor, start: torch.Tensor
    ) -> dict[str, np.ndarray | float]:
        """Gather every client's numbers (one small Allreduce) and the global ones, once
        ``new`` holds the round's new global model."""
        gathered = np.concatenate([self.norms, self.cosines.ravel(), self.skipped])
        world.comm.Allreduce(MPI.IN_PLACE, gathered, op=MPI.SUM)
        norms = gathered[: self.n_clients]
        cosines = gathered[self.n_clients : -self.n_clients].reshape(self.cosines.shape)
        skipped = gathered[-self.n_clients :]
        absent = np.ones(self.n_clients, dtype=bool)  # not sampled, or skipped as non-finite
        absent[cohort] = False
        absent |= skipped > 0
        norms[absent] = np.nan
        cosines[absent] = np.nan
        row: dict[str, np.ndarray | float] = {rk.SKIPPED: (skipped > 0).astype(np.int8)}
        if self.level == "off":
            return row
        row[rk.UPDATE_NORM] = norms
        if self.level == "norms":
            row[rk.GLOBAL_UPDATE_NORM] = math.sqrt(squared_distance(new, start))
            return row
        drift_sq, size_sq = self._group_drift(new, start)
        row[rk.GLOBAL_UPDATE_NORM] = float(np.sqrt(drift_sq.sum()))
        row[rk.UPDATE_COSINE] = cosines[:, 0]
        row[rk.UPDATE_COSINE_NO_EMBEDDINGS] = cosines[:, 1]
        row[rk.UPDATE_COSINE_BY_GROUP] = cosines[:, 2:]
        row[rk.LAYER_DRIFT] = np.sqrt(drift_sq / np.maximum(size_sq, 1e-30))
        return row

    def _leave_one_out_cosines(
        self, update: torch.Tensor, weight: float, mean_update: torch.Tensor, total: float
    ) -> np.ndarray:
        """Cosines of ``update`` to the others' weighted mean, ``(total * mean - weight *
        update) / (total - weight)``: overall, without embeddings, per group (NaN where
        undefined: a lone client, or a group that did not move)."""
        if total - weight <= 1e-12 * total:
            return np.full(2 + len(self.group_names), np.nan)
        others = (mean_update * total - update * weight) / (total - weight)
        by_group = np.zeros((3, len(self.group_names)))  # dot, |update|^2, |others|^2
        for group, lo, hi in self.runs:
            u, o = update[lo:hi], others[lo:hi]
            by_group[:, group] += [
                float(torch.dot(u, o)),
                float(torch.dot(u, u)),
                float(torch.dot(o, o)),
            ]
        outside = np.arange(len(self.group_names)) != self.embeddings
        sums = np.stack([by_group.sum(axis=1), by_group[:, outside].sum(axis=1)], axis=1)
        dots, left, right = np.concatenate([sums, by_group], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cosine = dots / np.sqrt(left * right)
        return np.where(left * right > 0, cosine, np.nan)

    def _group_drift(self, new: torch.Tensor, start: torch.Tensor) -> tuple[np.ndarray, ...]:
        """Per layer group, ``|new - start|^2`` and ``|start|^2``."""
        drift_sq = np.zeros(len(self.group_names))
        size_sq = np.zeros(len(self.group_names))
        for param, group, offset in zip(
            self.flat.params, self.group_of_param, self.flat.offsets, strict=True
        ):
            span = slice(offset, offset + param.numel())
            drift_sq[group] += squared_distance(new[span], start[span])
            size_sq[group] += float(torch.linalg.vector_norm(start[span])) ** 2
        return drift_sq, size_sq
