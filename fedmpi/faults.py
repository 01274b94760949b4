"""Test-only fault injection, so the no-hang guarantees can be tested on real MPI jobs.

``FEDMPI_FAULT=RANK:ROUND:PHASE`` makes rank RANK fail in round ROUND at PHASE:

    setup      while loading data and the model (ROUND is ignored; use 0)
    train      during local training
    aggregate  just before the round's Allreduce
    eval       during evaluation
    results    while rank 0 writes the results file
    nan        the rank's clients return non-finite parameters (see --on-nonfinite)
    preempt    the rank acts as if it got SIGTERM during local training (exit 75)

Unset (the normal case), every check is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

FAULT_ENV = "FEDMPI_FAULT"
PHASES = ("setup", "train", "aggregate", "eval", "results", "nan", "preempt")


class InjectedFault(RuntimeError):
    """The failure FEDMPI_FAULT asked for."""


@dataclass(frozen=True)
class Fault:
    rank: int
    round: int
    phase: str

    @classmethod
    def from_env(cls) -> Fault | None:
        text = os.environ.get(FAULT_ENV)
        if not text:
            return None
        try:
            rank, round_, phase = text.split(":")
            fault = cls(int(rank), int(round_), phase)
        except ValueError:
            raise ValueError(f"{FAULT_ENV}={text!r}: expected RANK:ROUND:PHASE") from None
        if phase not in PHASES:
            raise ValueError(f"{FAULT_ENV}={text!r}: PHASE must be one of {', '.join(PHASES)}")
        return fault

    def hits(self, rank: int, round_: int, phase: str) -> bool:
        return (self.rank, self.phase) == (rank, phase) and (
            phase == "setup" or self.round == round_
        )


_FAULT = Fault.from_env()


def should_fail(rank: int, round_: int, phase: str) -> bool:
    return _FAULT is not None and _FAULT.hits(rank, round_, phase)


def inject(rank: int, round_: int, phase: str) -> None:
    """Raise the injected failure if FEDMPI_FAULT names this rank, round and phase."""
    if should_fail(rank, round_, phase):
        raise InjectedFault(f"injected fault {FAULT_ENV}={rank}:{round_}:{phase}")
