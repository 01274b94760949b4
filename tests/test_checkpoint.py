"""Checkpoint files: verified against tampering with arrays *and* attributes, and refused
for another configuration, client count, data or model content; the model's identity is
its content, and a saved model directory is written whole or not at all."""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from fedmpi import checkpoint, models
from fedmpi.config import Config
from fedmpi.errors import UsageError


def with_one_weight_changed(source: Path, dest: Path) -> Path:
    """A copy of model directory ``source`` whose first float32 weight is negated in place:
    the same files, sizes, names, shapes and header, another model."""
    shutil.copytree(source, dest)
    weights = dest / "model.safetensors"
    with open(weights, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        first = min(v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
        entry = next(v for v in header.values() if v.get("data_offsets", [None])[0] == first)
        assert entry["dtype"] == "F32"
        handle.seek(8 + size + first + 3)  # the little-endian float's sign byte
        sign = handle.read(1)[0]
        handle.seek(-1, 1)
        handle.write(bytes([sign ^ 0x80]))
    return dest


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "checkpoint.h5"
    identity = checkpoint.fingerprint(Config(), 2, data_sha256="abc", model_identity="m:1")
    state = {"server/m": np.ones(3, np.float32)}
    checkpoint.save(path, identity, checkpoint.Checkpoint(4, np.arange(3, dtype=np.float32), state))
    return path, identity


def test_a_checkpoint_round_trips(saved):
    path, identity = saved
    loaded = checkpoint.load(path, identity, numel=3)
    assert loaded.round == 4 and loaded.params.tolist() == [0, 1, 2]
    assert loaded.state["server/m"].tolist() == [1, 1, 1]


@pytest.mark.parametrize("attribute,value", [("round", 9), ("config", "{}")])
def test_the_checksum_covers_the_attributes(saved, attribute, value):
    path, identity = saved
    with h5py.File(path, "r+") as f:
        f.attrs[attribute] = value
    with pytest.raises(UsageError, match="fails its checksum"):
        checkpoint.load(path, identity, numel=3)


@pytest.mark.parametrize(
    "clients,data,message",
    [(4, "abc", "clients: 2 there, 4 now"), (2, "xyz", "data_sha256: 'abc' there, 'xyz' now")],
)
def test_another_client_count_or_data_is_refused(saved, clients, data, message):
    path, _ = saved
    with pytest.raises(UsageError, match=message):
        checkpoint.load(path, checkpoint.fingerprint(Config(), clients, data, "m:1"), numel=3)


def test_client_states_are_kept_by_round(tmp_path):
    arrays = {"exp_avg": np.ones(5, np.float32)}
    checkpoint.save_client_state(tmp_path, 3, 1, arrays)
    checkpoint.save_client_state(tmp_path, 3, 2, {"exp_avg": np.zeros(5, np.float32)})
    checkpoint.remove_client_states(tmp_path, [3], keep_round=2)
    assert checkpoint.load_client_state(tmp_path, 3, 1) is None
    assert checkpoint.load_client_state(tmp_path, 3, 2)["exp_avg"].tolist() == [0] * 5


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A small random BERT directory (weights only: the identity needs no tokenizer)."""
    from conftest import random_bert

    path = tmp_path_factory.mktemp("identity") / "model"
    random_bert(vocab=64, width=8, layers=1).save_pretrained(path)
    return path


def test_the_model_identity_is_its_content_wherever_it_lies(tiny_model, tmp_path):
    """One weight changed in place (names, sizes, shapes, header unchanged) is another
    model; the same files elsewhere, or re-saved with other free-form metadata, are not."""
    identity = models.model_identity(str(tiny_model))
    changed = with_one_weight_changed(tiny_model, tmp_path / "changed")
    assert (changed / "model.safetensors").stat().st_size == (
        tiny_model / "model.safetensors"
    ).stat().st_size
    assert models.model_identity(str(changed)) != identity
    moved = shutil.copytree(tiny_model, tmp_path / "elsewhere" / "other-name")
    assert models.model_identity(str(moved)) == identity
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "transformers_version": "0"}))
    assert models.model_identity(str(moved)) == identity
    (moved / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    assert models.model_identity(str(moved)) != identity


def test_a_hub_model_is_identified_by_its_cached_snapshot(tiny_model, tmp_path, monkeypatch):
    """A hub id is hashed in the snapshot its ``refs/main`` names, so a repository that
    moved on between a run and its resume is another model."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--some-org--tiny"
    for commit, source in (("a" * 40, tiny_model), ("b" * 40, tmp_path / "changed")):
        if not source.exists():
            with_one_weight_changed(tiny_model, source)
        shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert models.model_identity("some-org/tiny") == models.model_identity(str(tiny_model))
    (repo / "refs" / "main").write_text("b" * 40)
    assert models.model_identity("some-org/tiny") != models.model_identity(str(tiny_model))
    assert models.model_identity("some-org/not-downloaded") == "hub:some-org/not-downloaded"


def test_a_model_directory_is_replaced_whole_or_not_at_all(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("the previous model")

    def fails(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        models.write_directory(final, fails)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary left behind
    assert [p.name for p in final.iterdir()] == ["old.txt"]  # the old one intact
    models.write_directory(final, lambda folder: (folder / "new.txt").write_text("new"))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert [p.name for p in final.iterdir()] == ["new.txt"]  # replaced whole, no stale file


def test_a_bad_stalled_launch_limit_is_refused_at_start_up(monkeypatch, tmp_path, capsys):
    """Read when the run starts, not when it is first preempted: there a typo would end
    the job with a traceback and exit 1 instead of 75, and the job would not requeue."""
    from fedmpi.checkpointer import Checkpointer
    from fedmpi.comm import World

    monkeypatch.setenv("FEDMPI_MAX_STALLED_LAUNCHES", "three")
    with pytest.raises(SystemExit) as ended:
        Checkpointer(Config(), World.from_comm(), tmp_path, {}, [], None, {})
    assert ended.value.code == 2
    message = capsys.readouterr().err
    assert "fedmpi: error: FEDMPI_MAX_STALLED_LAUNCHES='three': expected a positive" in message
