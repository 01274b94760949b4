"""Checkpoint files: verified against tampering with arrays *and* attributes, and refused
for another configuration, client count or data."""

import h5py
import numpy as np
import pytest

from fedmpi import checkpoint
from fedmpi.config import Config
from fedmpi.errors import UsageError


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
