"""Checkpoints: the state at the end of a round, from which a resumed run continues exactly.

``OUTPUT/checkpoint.h5`` (HDF5, no pickle), written by rank 0: the global model's flat
parameters, the server optimizer's state, and any other state a module registers (the
privacy accountant). With ``--keep-local-opt`` each client's optimizer state is written
by the rank hosting it to ``OUTPUT/client-states/client-K-round-R.h5`` (so it never has to
travel, and a resume at another ``-np`` finds it by client, not by rank).

Every file is written atomically (temporary file, fsync, rename); a SHA-256 over the
arrays *and* the round, fingerprint and format detects corruption and tampering; the
fingerprint (the configuration that determines the result, the number of clients, the
identity of the data, the content of the model's weights) refuses a checkpoint of another
run.

Nothing else needs saving: every random stream (shards, cohorts, data order, dropout) is
a function of (seed, client, round), so the round number is the whole sampler and RNG
state. The DP noise is a function of (noise key, round): the key is secret, drawn by
rank 0 unless ``--dp-noise-seed`` is given, and travels in the checkpoint only (the
privacy state, dataset ``privacy/noise_key``), so a resumed run continues the same noise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from fedmpi import atomic
from fedmpi.config import Config, outside_the_math
from fedmpi.errors import UsageError

CHECKPOINT_NAME = "checkpoint.h5"
CLIENT_STATES = "client-states"
FORMAT = 2
# Settings that may change between a run and its resumption: those outside the math, and
# the number of rounds (a resumed run may be extended).
RESUMABLE = outside_the_math() | {"rounds"}


@dataclass
class Checkpoint:
    round: int  # rounds completed
    params: np.ndarray  # the global model's flat fp32 parameters
    state: dict[str, np.ndarray]  # e.g. "server/m", "accountant/..."


def fingerprint(cfg: Config, num_clients: int, data_sha256: str, model_identity: str) -> dict:
    """What determines the result: the configuration (less RESUMABLE settings), the
    number of clients (``--clients`` may be omitted, then it follows ``-np``), the
    identity of the tokenized data (a changed file changes it) and the model's content
    (``models.model_identity``: its config and every byte of its weights, wherever it
    lies; under LoRA the base is not in the checkpoint: it must be the same one)."""
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE}
    return {**values, "clients": num_clients, "data_sha256": data_sha256, "model": model_identity}


def _digest(arrays: dict[str, np.ndarray], attrs: dict[str, object]) -> str:
    sha = hashlib.sha256(json.dumps(attrs, sort_keys=True).encode())
    for name in sorted(arrays):
        sha.update(name.encode())
        sha.update(np.ascontiguousarray(arrays[name]).view(np.uint8))
    return sha.hexdigest()


def _write_atomically(path: Path, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as tmp, h5py.File(tmp, "w") as f:
        for name, array in arrays.items():
            f.create_dataset(name, data=array)
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["sha256"] = _digest(arrays, attrs)


def _read_verified(path: Path, attr_names: tuple[str, ...]) -> tuple[dict, dict]:
    try:
        with h5py.File(path, "r") as f:
            arrays = {name: f[name][()] for name in _dataset_names(f)}
            attrs = {k: _plain(f.attrs[k]) for k in attr_names}
            stored = f.attrs["sha256"]
    except (OSError, KeyError) as exc:
        raise UsageError(
            f"checkpoint {path} is corrupt or truncated ({exc}): remove it, or pass "
            "--overwrite to start over"
        ) from None
    if stored != _digest(arrays, attrs):
        raise UsageError(f"checkpoint {path} fails its checksum: remove it, or pass --overwrite")
    return arrays, attrs


def save(path: Path, identity: dict, checkpoint: Checkpoint) -> None:
    arrays = {"params": checkpoint.params, **checkpoint.state}
    attrs = {
        "format": FORMAT,
        "round": checkpoint.round,
        "config": json.dumps(identity, sort_keys=True),
    }
    _write_atomically(path, arrays, attrs)


def load(path: Path, identity: dict, numel: int) -> Checkpoint:
    """Read and verify a checkpoint for this fingerprint, or raise UsageError saying why."""
    arrays, attrs = _read_verified(path, ("format", "round", "config"))
    if attrs["format"] != FORMAT:
        raise UsageError(
            f"checkpoint {path} has format {attrs['format']}, this fedmpi writes {FORMAT}: "
            "pass --overwrite to start over"
        )
    saved = json.loads(attrs["config"])
    differing = sorted(k for k in identity.keys() | saved.keys() if saved.get(k) != identity.get(k))
    if differing:
        details = ", ".join(
            f"{k}: {saved.get(k)!r} there, {identity.get(k)!r} now" for k in differing
        )
        hint = (
            " (without --clients there is one client per rank: resume at the same -np, or "
            "pass --clients)"
            if "clients" in differing
            else ""
        )
        raise UsageError(
            f"checkpoint {path} belongs to another configuration ({details}){hint}: "
            "pass --overwrite to start over, or another --output"
        )
    if arrays["params"].shape != (numel,):
        raise UsageError(
            f"checkpoint {path} holds {arrays['params'].size} parameters, the model "
            f"has {numel}: it belongs to another model"
        )
    params = arrays.pop("params")
    return Checkpoint(int(attrs["round"]), params, arrays)


def client_state_path(out_dir: Path, client: int, round_: int) -> Path:
    return out_dir / CLIENT_STATES / f"client-{client}-round-{round_}.h5"


def save_client_state(out_dir: Path, client: int, round_: int, arrays: dict) -> None:
    attrs = {"format": FORMAT, "round": round_, "client": client}
    _write_atomically(client_state_path(out_dir, client, round_), arrays, attrs)


def load_client_state(out_dir: Path, client: int, round_: int) -> dict[str, np.ndarray] | None:
    """A client's optimizer state at the end of ``round_`` (None: it had none yet)."""
    path = client_state_path(out_dir, client, round_)
    if not path.exists():
        return None
    arrays, _ = _read_verified(path, ("format", "round", "client"))
    return arrays


def remove_client_states(out_dir: Path, clients: list[int], keep_round: int | None) -> None:
    """Delete these clients' state files of every round but ``keep_round``."""
    folder = out_dir / CLIENT_STATES
    for client in clients:
        for path in folder.glob(f"client-{client}-round-*.h5"):
            if keep_round is None or path != client_state_path(out_dir, client, keep_round):
                path.unlink(missing_ok=True)


def _dataset_names(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value
