"""``fedmpi.results_keys`` names every key of results.h5: a real run's file holds no other,
each where its kind says and in the shape the docs' table gives; the writer refuses a key
the module does not name."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import fedmpi_args

from fedmpi import results_keys as rk
from fedmpi.results import ResultsWriter, read_results

CLIENTS, ROUNDS = 3, 2


@pytest.fixture(scope="module")
def many_features(tmp_path_factory, tiny_bert, toy_dataset):
    """Arguments of one small job that writes as many optional keys as the flags allow:
    validation, per-client and held-out evaluation, DP, full diagnostics, sync checks."""
    tmp = tmp_path_factory.mktemp("keys")
    out = tmp / "out"
    args = fedmpi_args(
        tiny_bert,
        toy_dataset,
        out,
        tmp / "cache",
        *("--clients", CLIENTS, "--rounds", ROUNDS, "--threads", 1, "--val-samples", 20),
        *("--eval-clients", "--holdout-clients", 0.34, "--verify-sync", "--diagnostics", "full"),
        *("--weighting", "uniform", "--dp-clip", 1.0, "--dp-noise", 0.1, "--dp-noise-seed", 1),
    )
    return args, out / "results.h5"


def test_a_real_results_file_holds_only_named_keys_in_their_kind_and_shape(
    in_process, many_features
):
    args, path = many_features
    assert in_process(args) == 0
    data = read_results(path)
    found = {
        rk.ATTRIBUTE: set(data["attrs"]),
        rk.STATIC: set(data["static"]),
        rk.PER_ROUND: set(data["per_round"]),
    }
    for kind, names in found.items():
        unnamed = sorted(names - set(rk.KEYS))
        assert not unnamed, f"results.h5 holds keys fedmpi/results_keys.py does not name: {unnamed}"
        wrong = sorted(n for n in names if rk.KEYS[n].kind != kind)
        assert not wrong, f"written as {kind}, named as another kind: {wrong}"

    # The job exercised the optional features, so their keys were checked too.
    for name in (rk.VAL_ACCURACY, rk.HOLDOUT_ACCURACY, rk.CLIENT_TEST_ACCURACY, rk.EPSILON):
        assert name in found[rk.PER_ROUND], name
    for name in (rk.PARAM_CRC32, rk.LAYER_DRIFT, rk.UPDATE_COSINE_BY_GROUP, rk.LAUNCH):
        assert name in found[rk.PER_ROUND], name
    assert {rk.DP_DELTA, rk.VAL_SHA256, rk.LAYER_GROUPS} <= found[rk.ATTRIBUTE]

    # Every dataset has the shape the docs' table gives it (one row per round first).
    groups = len(json.loads(data["attrs"][rk.LAYER_GROUPS]))
    axes = {"clients": CLIENTS, "classes": 2, "groups": groups, "ranks": 1}
    for name in found[rk.STATIC] | found[rk.PER_ROUND]:
        key = rk.KEYS[name]
        want = tuple(axes[a] for a in key.shape.split(" x ")) if key.shape else ()
        if key.kind == rk.PER_ROUND:
            want = (ROUNDS, *want)
        assert np.shape(data[name]) == want, (name, key.shape)
    for name in found[rk.ATTRIBUTE]:
        assert not rk.KEYS[name].shape, name


def test_the_writer_refuses_a_key_the_module_does_not_name(tmp_path):
    attrs = {rk.CONFIG: "{}", rk.LABEL_NAMES: "[]"}
    with pytest.raises(ValueError, match="not a results.h5 key named in fedmpi/results_keys"):
        ResultsWriter(tmp_path / "a.h5", {**attrs, "no_such_attribute": 1}, {}, {})
    with pytest.raises(ValueError, match="is per round, not static"):
        ResultsWriter(tmp_path / "b.h5", attrs, {rk.TRAIN_LOSS: np.zeros(2)}, {})
    writer = ResultsWriter(tmp_path / "c.h5", attrs, {}, {})
    with pytest.raises(ValueError, match="'metrics/no_such_metric' is not a results.h5 key"):
        writer.append({rk.ROUND: 1, "metrics/no_such_metric": 0.5})
    writer.append({rk.ROUND: 1, rk.TRAIN_LOSS: 0.5})
    assert read_results(tmp_path / "c.h5")[rk.TRAIN_LOSS].tolist() == [0.5]


def test_every_key_is_documented_and_of_a_known_kind():
    for key in rk.KEYS.values():
        assert key.kind in rk.KINDS and key.meaning.strip(), key
    assert rk.metric("val", "accuracy") == rk.VAL_ACCURACY
    with pytest.raises(KeyError, match="add a _key"):
        rk.metric("train", "confusion")
