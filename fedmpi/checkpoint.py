"""Checkpoints: the global model and the server optimizer's state at the end of a round.

Written by rank 0 to ``OUTPUT/checkpoint.h5`` (HDF5, no pickle) atomically: a temporary
file in the same directory, fsync, rename. A SHA-256 over the arrays detects corruption;
a fingerprint of the configuration refuses a checkpoint of another run.

Nothing else needs saving: every random stream (shards, cohorts, data order, dropout) is a
function of (seed, client, round), and the local optimizers restart every round, so the
round number is the whole sampler and RNG state. (With ``--keep-local-opt`` the clients'
optimizer moments are not checkpointed: they restart from zero after a resume.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from fedmpi.config import Config
from fedmpi.errors import UsageError

CHECKPOINT_NAME = "checkpoint.h5"
FORMAT = 1
# Settings that may change between a run and its resumption without changing the math.
RESUMABLE = {
    "rounds",
    "output",
    "overwrite",
    "resume",
    "checkpoint_every",
    "eval_every",
    "threads",
    "device",
    "cache_dir",
    "save_model",
    "verify_sync",
    "eval_batch_size",
    "on_nonfinite",
}


@dataclass
class Checkpoint:
    round: int  # rounds completed
    params: np.ndarray  # the global model's flat fp32 parameters
    server_state: dict[str, np.ndarray]


def fingerprint(cfg: Config) -> dict:
    """The configuration that determines the result, as a JSON-able dict."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE}


def _digest(arrays: dict[str, np.ndarray]) -> str:
    sha = hashlib.sha256()
    for name in sorted(arrays):
        sha.update(name.encode())
        sha.update(np.ascontiguousarray(arrays[name]).view(np.uint8))
    return sha.hexdigest()


def save(path: Path, cfg: Config, checkpoint: Checkpoint) -> None:
    arrays = {
        "params": checkpoint.params,
        **{f"server/{k}": v for k, v in checkpoint.server_state.items()},
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".checkpoint-", suffix=".h5.tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            for name, array in arrays.items():
                f.create_dataset(name, data=array)
            f.attrs["format"] = FORMAT
            f.attrs["round"] = checkpoint.round
            f.attrs["config"] = json.dumps(fingerprint(cfg), sort_keys=True)
            f.attrs["sha256"] = _digest(arrays)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: Path, cfg: Config, numel: int) -> Checkpoint:
    """Read and verify a checkpoint for this configuration, or raise UsageError saying why."""
    try:
        with h5py.File(path, "r") as f:
            arrays = {name: f[name][()] for name in _dataset_names(f)}
            attrs = {k: f.attrs[k] for k in ("format", "round", "config", "sha256")}
    except (OSError, KeyError) as exc:
        raise UsageError(
            f"checkpoint {path} is corrupt or truncated ({exc}): remove it, or pass "
            "--overwrite to start over"
        ) from None
    if attrs["sha256"] != _digest(arrays):
        raise UsageError(f"checkpoint {path} fails its checksum: remove it, or pass --overwrite")
    saved, current = json.loads(attrs["config"]), fingerprint(cfg)
    differing = sorted(k for k in current.keys() | saved.keys() if saved.get(k) != current.get(k))
    if differing:
        details = ", ".join(
            f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in differing
        )
        raise UsageError(
            f"checkpoint {path} belongs to another configuration ({details}): "
            "pass --overwrite to start over, or another --output"
        )
    if arrays["params"].shape != (numel,):
        raise UsageError(
            f"checkpoint {path} holds {arrays['params'].size} parameters, the model "
            f"has {numel}: it belongs to another model"
        )
    server = {name.split("/", 1)[1]: a for name, a in arrays.items() if name.startswith("server/")}
    return Checkpoint(int(attrs["round"]), arrays["params"], server)


def _dataset_names(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names
