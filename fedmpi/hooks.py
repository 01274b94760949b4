"""What a per-round feature can do, and when: the hook interface of ``fedmpi.round``.

A feature that acts on every round (diagnostics, update compression, differential privacy,
FedProx; deadline dropouts or personalization next) is a ``RoundHook``. The round
calls its hooks at fixed points of its phases; a hook overrides only the methods it needs.

Hooks are layers around the aggregation, like Flower's strategy wrappers: on the way *in*
(``client_update``) they run in list order, on the way *out* (``after_allreduce``) in
reverse order. With ``[diagnostics, compression, privacy]`` a client's update is
measured, compressed as it would be sent, then clipped; after the Allreduce the noise is
added, then the noised average is observed.

    round:  cohort -> start -> local training  (adjust_gradients at every local step)
                            -> client_update     per client, in list order
                            -> Allreduce -> after_allreduce  in reverse order
                            -> server step -> after_server_step -> evaluation -> row
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedmpi.comm import World


@dataclass
class RoundContext:
    """One round, as its hooks see it."""

    round: int
    cohort: np.ndarray  # the clients that train this round, the same on every rank
    start: torch.Tensor  # the global model the round started from (flat)
    params: torch.Tensor  # the flat parameters: a client's model while it trains, then global
    denominator: float  # what the payload's weights are divided by
    world: World


class RoundHook:
    """A per-round feature; every method is optional (the defaults do nothing)."""

    # Divide the payload by this fixed number instead of the weight that arrives, and keep
    # it when a client drops out (DP-FedAvg bounds one client's influence so).
    fixed_denominator: float | None = None

    def cohort(self, round_: int) -> np.ndarray | None:
        """The round's cohort, replacing the default draw (the first hook that gives one
        wins); None keeps the default."""
        return None

    def start(self, ctx: RoundContext) -> None:
        """Before any client of the round trains."""

    def adjust_gradients(self) -> None:
        """At every local step, between the backward pass and the optimizer step."""

    def client_update(
        self, ctx: RoundContext, client: int, weight: float, norm: float
    ) -> float | None:
        """After ``client`` trained, while ``ctx.params`` holds its model and before it
        joins the payload: observe or transform it in place. ``norm`` is its update's
        norm as far as known (NaN where not measured); return the norm after this hook,
        or None to leave the client out of the round (a non-finite update)."""
        return norm

    def after_allreduce(self, ctx: RoundContext, average: torch.Tensor, arrived: float) -> None:
        """After the Allreduce, before the server step: ``average`` is the payload's
        head, ``arrived`` the weight that came."""

    def after_server_step(self, ctx: RoundContext) -> None:
        """Once ``ctx.params`` holds the round's new global model."""

    def row(self, ctx: RoundContext) -> dict:
        """This hook's entries of the round's results row (collective calls allowed:
        every rank asks every hook)."""
        return {}


def overrides(hook: RoundHook, method: str) -> bool:
    """Whether ``hook`` implements ``method`` (so the round can skip a per-step call)."""
    return getattr(type(hook), method) is not getattr(RoundHook, method)
