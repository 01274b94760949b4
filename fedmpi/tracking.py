"""Live tracking from rank 0: every round's results row streamed to TensorBoard and W&B.

``results.h5`` is the record of a run, but it is rewritten whole after each round and
read after the fact; a researcher watching a sweep wants curves that grow while it runs.
``--tensorboard DIR`` and ``--wandb PROJECT`` send the same row that ``results.h5`` gets,
with the round as the step:

* every scalar of the row (``metrics/*``, ``timing/*``, ``comm/*``, ``privacy/*``,
  ``diagnostics/*``), NaN skipped (NaN means "not measured this round");
* every per-client array as a histogram of its finite values (NaN marks clients that
  were not sampled, were skipped or were not scored);
* the per-layer-group vectors of the diagnostics, one scalar (drift) or one histogram
  (cosines) per layer group.

Arrays that are neither per client nor per layer group (the per-rank checksums of
``--verify-sync``, confusion matrices) stay in ``results.h5`` only.

A resumed run logs only the rounds after its checkpoint, and never shows a round twice:
TensorBoard is told to purge every event from the first round this launch trains on
(events a killed launch wrote after the checkpoint), and W&B continues the same run (its
id is kept in ``OUTPUT/wandb-run-id``).
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedmpi import atomic
from fedmpi import results_keys as rk
from fedmpi.config import Config
from fedmpi.errors import UsageError

if TYPE_CHECKING:
    from fedmpi.comm import World
    from fedmpi.prepare import Job

WANDB_RUN_ID_NAME = "wandb-run-id"
# Row arrays with one value per layer group rather than per client: one curve each.
_PER_GROUP_SCALARS = (rk.LAYER_DRIFT,)
# Row arrays of (clients, layer groups): one histogram over the clients per group.
_PER_GROUP_HISTOGRAMS = (rk.UPDATE_COSINE_BY_GROUP,)
# One CRC32 per rank: identical, or the run has already aborted; nothing to plot.
_UNTRACKED = (rk.PARAM_CRC32,)
_INSTALL = "pip install 'fedmpi[tracking]'"


def split_row(
    row: dict[str, Any], n_clients: int, layer_groups: Sequence[str]
) -> tuple[int, dict[str, float], dict[str, np.ndarray]]:
    """The round, its scalars and its histograms (finite values only) from a results row.

    A 1-D array of ``n_clients`` values is per client, other arrays are left out, and the
    exceptions are named above: shapes alone cannot tell them apart (with one client per
    rank, the per-rank checksums have the per-client shape; so may the layer groups)."""
    scalars: dict[str, float] = {}
    histograms: dict[str, np.ndarray] = {}
    for key, value in row.items():
        if key == rk.ROUND or key in _UNTRACKED:
            continue
        array = np.asarray(value, dtype=np.float64)
        if array.ndim == 0:
            if not math.isnan(array):
                scalars[key] = float(array)
        elif key in _PER_GROUP_SCALARS:
            for group, x in zip(layer_groups, array, strict=True):
                if not math.isnan(x):
                    scalars[f"{key}/{group}"] = float(x)
        elif key in _PER_GROUP_HISTOGRAMS:
            for group, column in zip(layer_groups, array.T, strict=True):
                histograms[f"{key}/{group}"] = column
        elif array.shape == (n_clients,):
            histograms[key] = array
    finite = {k: v[np.isfinite(v)] for k, v in histograms.items()}
    return int(row[rk.ROUND]), scalars, {k: v for k, v in finite.items() if v.size}


class Tracker(Protocol):
    """One place rounds go: TensorBoard or W&B."""

    def log(self, step: int, scalars: dict[str, float], histograms: dict[str, np.ndarray]) -> None:
        """Record one round."""

    def close(self) -> None:
        """Flush and release; nothing is logged after."""


class Trackers:
    """Rank 0's trackers; ``log_round`` takes the row ``results.h5`` gets."""

    def __init__(
        self, trackers: Sequence[Tracker], n_clients: int, layer_groups: Sequence[str]
    ) -> None:
        self.trackers = list(trackers)
        self.n_clients = n_clients
        self.layer_groups = list(layer_groups)

    @classmethod
    def open(
        cls, cfg: Config, world: World, job: Job, layer_groups: Sequence[str], rounds_done: int
    ) -> Trackers | None:
        """Rank 0's trackers (None on the other ranks, or when none is asked for).

        Raises UsageError (a missing package, W&B refusing the run) so that, called under
        ``comm.collectively``, every rank exits with code 2 before the first round."""
        if not world.is_root or (cfg.tensorboard is None and cfg.wandb is None):
            return None
        trackers: list[Tracker] = []
        if cfg.tensorboard is not None:
            trackers.append(TensorBoardTracker(Path(cfg.tensorboard), rounds_done + 1))
        if cfg.wandb is not None:
            config = {
                **json.loads(cfg.to_json()),
                "num_clients": job.plan.n_clients,
                "world_size": world.size,
            }
            trackers.append(WandbTracker(cfg.wandb, job.out_dir, config, rounds_done))
        return cls(trackers, job.plan.n_clients, layer_groups)

    def log_round(self, row: dict[str, Any]) -> None:
        step, scalars, histograms = split_row(row, self.n_clients, self.layer_groups)
        for tracker in self.trackers:
            tracker.log(step, scalars, histograms)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


class TensorBoardTracker:
    """Event files in ``log_dir``, flushed every round so ``tensorboard`` shows it live."""

    def __init__(self, log_dir: Path, first_round: int) -> None:
        """``first_round``: the first round this launch trains. Events of that round and
        later ones already in ``log_dir`` (a killed launch's, after its checkpoint; or an
        earlier run's, when a run starts over) are purged from what TensorBoard reads."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise UsageError(
                f"--tensorboard needs the tensorboard package ({_reason(exc)}): {_INSTALL}"
            ) from None
        try:
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=first_round)
        except OSError as exc:
            raise UsageError(f"--tensorboard: cannot write to {log_dir}: {exc}") from None

    def log(self, step: int, scalars: dict[str, float], histograms: dict[str, np.ndarray]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        for tag, values in histograms.items():
            self.writer.add_histogram(tag, values, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per fedmpi run: a resumed launch continues it (same id, from the
    rounds after its checkpoint) and updates its configuration to this launch's.

    ``WANDB_MODE`` (offline, disabled), ``WANDB_ENTITY`` and the other W&B variables apply
    as usual; its files go to ``OUTPUT/wandb``."""

    def __init__(self, project: str, out_dir: Path, config: dict, rounds_done: int) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise UsageError(
                f"--wandb needs the wandb package ({_reason(exc)}): {_INSTALL}"
            ) from None
        run_id = _wandb_run_id(out_dir, resuming=rounds_done > 0)
        try:
            self.run = wandb.init(
                project=project,
                name=out_dir.name,
                id=run_id,
                resume="allow",
                dir=out_dir,
                config=config,
            )
        except wandb.errors.Error as exc:  # no API key, no network, a refused project
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise UsageError(
                f"--wandb: {first_line} (WANDB_MODE=offline logs to disk, for `wandb sync` later)"
            ) from None
        self.histogram = wandb.Histogram

    def log(self, step: int, scalars: dict[str, float], histograms: dict[str, np.ndarray]) -> None:
        values = {**scalars, **{k: self.histogram(v) for k, v in histograms.items()}}
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def _wandb_run_id(out_dir: Path, resuming: bool) -> str:
    """The run's W&B id: the stored one when resuming, else a new one (a run started
    over with --overwrite is a new W&B run), stored for the next launch."""
    path = out_dir / WANDB_RUN_ID_NAME
    if resuming and path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(8)
    with atomic.replacing(path) as tmp:
        tmp.write_text(run_id + "\n")
    return run_id


def _reason(exc: ImportError) -> str:
    """Why an import failed, in a few words: not installed, or installed but broken."""
    missing = isinstance(exc, ModuleNotFoundError) and exc.name in ("wandb", "tensorboard")
    return "not installed" if missing else f"cannot import it: {exc}"
