"""Graceful preemption: SIGTERM or SIGUSR1 (Slurm's ``--signal=USR1@120``) asks the job to
stop at the next local step, checkpoint the last finished round, and exit with 75.

A signal may reach only some ranks; the request travels in the round's Allreduce (one
more number in the payload's tail), so every rank learns of it at the same point.
"""

from __future__ import annotations

import signal

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; the sbatch scripts requeue on it
EXIT_STALLED = 3  # preempted again and again in the same round: requeueing cannot help
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Set by a signal handler; read at step boundaries."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> None:
        for signum in SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.signal = signum

    def request(self) -> None:
        """As if SIGTERM had arrived (fault injection in tests)."""
        self.signal = signal.SIGTERM

    @property
    def requested(self) -> bool:
        return self.signal is not None
