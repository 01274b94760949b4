"""Writing and resuming checkpoints across ranks (the files themselves: ``checkpoint``).

Rank 0 writes the global state (parameters, server optimizer, accountant); with
``--keep-local-opt`` (and ``--error-feedback``) the rank hosting each client writes that
client's optimizer state (and compression residual) first, so the main file, written
last, only ever names complete client files. A resume
reads on rank 0, verifies, and broadcasts with the buffer protocol.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fedmpi import atomic, checkpoint
from fedmpi.client import LocalOptimizers
from fedmpi.comm import World, collectively, log, root_computes, wait_for_all
from fedmpi.config import Config
from fedmpi.errors import UsageError
from fedmpi.results import RESULTS_NAME, read_results

PREEMPTIONS_NAME = "preemptions.json"
CLIENTS_WITH_STATE = "client_states/clients"  # in the main file: whose state files it needs
MAX_STALLED_ENV = "FEDMPI_MAX_STALLED_LAUNCHES"


class Stateful(Protocol):
    """Round-to-round state other than the parameters (a server optimizer, an accountant)."""

    def state(self) -> dict[str, np.ndarray | torch.Tensor]: ...

    def load_state(self, state: dict[str, np.ndarray]) -> None: ...


class ClientStateful(Protocol):
    """State kept per client on the rank hosting it (``--keep-local-opt``'s optimizers,
    ``--error-feedback``'s residuals), saved in the client's own file."""

    def state_arrays(self, client: int) -> dict[str, np.ndarray] | None: ...

    def load_state(self, client: int, arrays: dict[str, np.ndarray]) -> None: ...


class Checkpointer:
    def __init__(
        self,
        cfg: Config,
        world: World,
        out_dir: Path,
        identity: dict,
        my_clients: list[int],
        optimizers: LocalOptimizers,
        stateful: dict[str, Stateful],
        per_client: dict[str, ClientStateful] | None = None,
    ) -> None:
        """``identity``: ``checkpoint.fingerprint`` of this run; ``stateful``: named state
        to save beside the parameters (keys become HDF5 groups); ``per_client``: named
        per-client state to save in the client files beside the optimizer state (its keys
        prefixed with the name; the optimizer's are not, as before)."""
        self.cfg, self.world, self.out_dir = cfg, world, out_dir
        self.path = out_dir / checkpoint.CHECKPOINT_NAME
        self.identity = identity
        self.my_clients = my_clients
        self.optimizers = optimizers
        self.stateful = stateful
        self.per_client: dict[str, ClientStateful] = {
            **({"": optimizers} if cfg.keep_local_opt else {}),
            **(per_client or {}),
        }
        self.saved_round: int | None = None  # the round of the checkpoint on disk, if any
        # Read at start-up: a typo found only when preempted would end the job with a
        # traceback and exit 1 instead of 75, and the job would not be requeued.
        self._max_stalled = collectively(world, _max_stalled_launches)

    def save(self, round_done: int, params: torch.Tensor) -> None:
        """Collective: every rank calls it at the same point. With ``--keep-local-opt`` the
        main file also lists the clients whose state files it goes with, so a resume
        notices one that went missing instead of silently restarting that client."""
        with_state: list[int] = []
        if self.per_client:
            for client in self.my_clients:
                arrays = self._client_arrays(client)
                if arrays is not None:
                    checkpoint.save_client_state(self.out_dir, client, round_done, arrays)
                    with_state.append(client)
            wait_for_all(self.world)  # every client file exists before the main file names it
            with_state = sorted(sum(self.world.comm.allgather(with_state), []))  # a few ints
        if self.world.is_root:
            state = {
                f"{owner}/{name}": _numpy(value)
                for owner, stateful in self.stateful.items()
                for name, value in stateful.state().items()
            }
            if self.per_client:
                state[CLIENTS_WITH_STATE] = np.array(with_state, dtype=np.int64)
            checkpoint.save(
                self.path,
                self.identity,
                checkpoint.Checkpoint(round_done, _numpy(params), state),
            )
        wait_for_all(self.world)  # nobody exits (and gets the job killed) before it is written
        if self.per_client:
            checkpoint.remove_client_states(self.out_dir, self.my_clients, keep_round=round_done)
        self.saved_round = round_done

    def save_preempted(self, round_done: int, params: torch.Tensor) -> bool:
        """The checkpoint a preempted round falls back to; False when it is not exact.

        When the last finished round is already on disk nothing is written: that file also
        holds the clients' optimizer states (and residuals) as they were before the void
        round. Otherwise the clients of this rank that trained in the void round keep the
        state they reached.
        """
        if self.saved_round == round_done:
            return True
        self.save(round_done, params)
        return not self.per_client

    def count_stalled_launches(self, round_done: int) -> int:
        """Collective: how many launches in a row were preempted right after resuming from
        ``round_done`` (this one included), kept in OUTPUT/preemptions.json. A job whose
        single round outlasts its time limit would otherwise requeue forever."""

        def count() -> int:
            path = self.out_dir / PREEMPTIONS_NAME
            seen = json.loads(path.read_text()) if path.exists() else {}
            stalled = seen.get("launches", 0) + 1 if seen.get("round") == round_done else 1
            with atomic.replacing(path) as tmp:
                tmp.write_text(json.dumps({"round": round_done, "launches": stalled}) + "\n")
            return stalled

        return root_computes(self.world, count)

    def max_stalled_launches(self) -> int:
        """Preempted launches in a row, in one round, after which fedmpi stops requeueing."""
        return self._max_stalled

    def finish(
        self, last_round: int, params: torch.Tensor, save_model: Callable[[], None] | None
    ) -> None:
        """Collective. A finished run leaves a checkpoint of its last round (to extend it
        with more rounds) when it checkpoints at all, and none otherwise.

        ``save_model`` (rank 0 runs it) is called while a checkpoint of the last round is
        on disk, written for the purpose if need be: when the save fails (a full disk),
        nothing is lost, and rerunning the same command resumes at the end and saves.
        """
        if self.world.is_root:
            (self.out_dir / PREEMPTIONS_NAME).unlink(missing_ok=True)
        if (self.cfg.checkpoint_every or save_model) and self.saved_round != last_round:
            self.save(last_round, params)
        if save_model is not None:
            collectively(self.world, lambda: save_model() if self.world.is_root else None)
        if self.cfg.checkpoint_every:
            return
        if self.world.is_root:
            self.path.unlink(missing_ok=True)
        checkpoint.remove_client_states(self.out_dir, self.my_clients, keep_round=None)
        self.saved_round = None

    def resume(self, params: torch.Tensor) -> int:
        """Load OUTPUT's checkpoint on rank 0 (verified, and refused when results.h5 lacks
        its rounds or a client's state file it lists is gone), broadcast it into ``params``
        and the registered state; returns the rounds done."""
        world = self.world

        def load() -> checkpoint.Checkpoint | None:
            if not world.is_root:
                return None
            loaded = checkpoint.load(self.path, self.identity, params.numel())
            _check_results_continue(self.out_dir, loaded.round)
            return loaded

        loaded = collectively(world, load)
        layout = world.comm.bcast(
            (loaded.round, {k: (v.shape, v.dtype.str) for k, v in loaded.state.items()})
            if loaded
            else None,
            root=0,
        )
        rounds_done, shapes = layout
        arrays = {"params": loaded.params if loaded else np.empty(params.numel(), np.float32)}
        for name, (shape, dtype) in shapes.items():
            arrays[name] = loaded.state[name] if loaded else np.empty(shape, np.dtype(dtype))
        for array in arrays.values():
            world.comm.Bcast(array, root=0)
        params.copy_(torch.from_numpy(arrays.pop("params")))
        for owner, stateful in self.stateful.items():
            prefix = f"{owner}/"
            stateful.load_state(
                {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}
            )
        if self.per_client:
            listed = set(arrays.get(CLIENTS_WITH_STATE, np.array([], np.int64)).tolist())

            def load_clients() -> None:
                for client in self.my_clients:
                    state = checkpoint.load_client_state(self.out_dir, client, rounds_done)
                    if state is not None:
                        self._load_client(client, state)
                    elif client in listed:
                        missing = checkpoint.client_state_path(self.out_dir, client, rounds_done)
                        raise UsageError(
                            f"checkpoint {self.path} goes with client {client}'s state "
                            f"{missing}, which is missing: restore it, or pass "
                            "--overwrite to start over"
                        )

            collectively(world, load_clients)
        self.saved_round = rounds_done
        log(world, f"resuming from {self.path}: {rounds_done} rounds done")
        return rounds_done

    def _client_arrays(self, client: int) -> dict[str, np.ndarray] | None:
        """What the client's file holds: each part's arrays, prefixed with its name."""
        arrays = {}
        for name, part in self.per_client.items():
            state = part.state_arrays(client)
            if state is not None:
                arrays.update({f"{name}/{k}" if name else k: v for k, v in state.items()})
        return arrays or None

    def _load_client(self, client: int, arrays: dict[str, np.ndarray]) -> None:
        """Hand each part its arrays from the client's file (a part the file has none of
        had no state yet for this client)."""
        for name, part in self.per_client.items():
            prefix = f"{name}/"
            state = {
                k.removeprefix(prefix): v
                for k, v in arrays.items()
                if (k.startswith(prefix) if name else "/" not in k)
            }
            if state:
                part.load_state(client, state)


def _max_stalled_launches() -> int:
    """``FEDMPI_MAX_STALLED_LAUNCHES`` (default 3), or bad input."""
    raw = os.environ.get(MAX_STALLED_ENV, "3")
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit < 1:
        raise UsageError(f"{MAX_STALLED_ENV}={raw!r}: expected a positive whole number")
    return limit


def _check_results_continue(out_dir: Path, rounds_done: int) -> None:
    """A resumed run appends to results.h5: refuse one that lacks rounds the checkpoint
    holds (removed, truncated, corrupt), which the run would otherwise silently go on
    without, or fail on after set-up."""
    if not rounds_done:
        return  # preempted in round 1: no round to continue
    path = out_dir / RESULTS_NAME
    hint = "restore it, or pass --overwrite to start over"
    if not path.exists():
        raise UsageError(
            f"{out_dir} holds a checkpoint of round {rounds_done} but no {RESULTS_NAME} with "
            f"the results of those rounds: {hint}"
        )
    try:
        written = set(np.asarray(read_results(path).get("round", [])).tolist())
    except (OSError, KeyError, ValueError) as exc:
        raise UsageError(f"{path} is corrupt or truncated ({exc}): {hint}") from exc
    lost = sorted(set(range(1, rounds_done + 1)) - written)
    if lost:
        raise UsageError(
            f"{path} lacks round(s) {lost[0]}-{lost[-1]} of the checkpoint's {rounds_done}: {hint}"
        )


def _numpy(value: np.ndarray | torch.Tensor) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
