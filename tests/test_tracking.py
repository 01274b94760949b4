"""Live tracking (fedmpi.tracking) in process: what a results row becomes, read back from
TensorBoard's event files and from an offline W&B run's transaction log."""

from __future__ import annotations

import json
import math
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedmpi import checkpoint
from fedmpi.config import Config, parse_value
from fedmpi.errors import UsageError
from fedmpi.tracking import (
    WANDB_RUN_ID_NAME,
    TensorBoardTracker,
    Trackers,
    WandbTracker,
    split_row,
)

GROUPS = ["embeddings", "layer.0", "classifier"]
N_CLIENTS = 4


def make_row(round_: int, shift: float = 0.0) -> dict:
    """A results row shaped like fedmpi.train's: scalars (one NaN: not scored), per-client
    arrays (NaN for clients not sampled), per-group vectors, and arrays that are neither."""
    return {
        "round": round_,
        "clients/cohort": np.array([1, 1, 0, 1], dtype=np.int8),
        "metrics/train_loss": 0.7 - 0.1 * round_ + shift,
        "metrics/test_accuracy": 0.5 + 0.1 * round_ + shift,
        "metrics/val_accuracy": np.nan,
        "metrics/test_confusion": np.array([[3, 1], [2, 4]]),
        "comm/payload_bytes": 4096,
        "timing/round_s": np.float64(1.25 * round_),
        "privacy/epsilon": math.inf if round_ == 1 else 2.0 * round_,
        "privacy/clipped_update_norm": np.array([0.5, 1.0, np.nan, 1.5]) * round_ + shift,
        "clients/test_accuracy": np.full(N_CLIENTS, np.nan),  # nobody scored: no histogram
        "diagnostics/client_update_norm": np.array([1.0, 2.0, np.nan, 3.0]) * round_ + shift,
        "diagnostics/client_update_cosine_by_group": np.array(
            [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [np.nan] * 3, [0.7, 0.8, np.nan]]
        ),
        "diagnostics/layer_drift": np.array([0.01, 0.02, np.nan]) * round_,
        "sync/param_crc32": np.array([7, 7, 7, 7], dtype=np.int64),  # per rank
    }


def test_a_row_splits_into_scalars_and_per_client_histograms():
    step, scalars, histograms = split_row(make_row(2), N_CLIENTS, GROUPS)
    assert step == 2
    assert scalars == {
        "metrics/train_loss": pytest.approx(0.5),
        "metrics/test_accuracy": pytest.approx(0.7),
        "comm/payload_bytes": 4096.0,
        "timing/round_s": 2.5,
        "privacy/epsilon": 4.0,
        "diagnostics/layer_drift/embeddings": pytest.approx(0.02),
        "diagnostics/layer_drift/layer.0": pytest.approx(0.04),
    }  # NaN (not measured), the round itself, per-rank CRCs and confusion matrices left out
    assert sorted(histograms) == [
        "clients/cohort",
        "diagnostics/client_update_cosine_by_group/classifier",
        "diagnostics/client_update_cosine_by_group/embeddings",
        "diagnostics/client_update_cosine_by_group/layer.0",
        "diagnostics/client_update_norm",
        "privacy/clipped_update_norm",
    ]
    assert histograms["diagnostics/client_update_norm"].tolist() == [2.0, 4.0, 6.0]
    assert histograms["clients/cohort"].tolist() == [1, 1, 0, 1]
    assert histograms["diagnostics/client_update_cosine_by_group/classifier"].tolist() == [
        0.3,
        0.6,
    ]
    assert split_row(make_row(1), N_CLIENTS, GROUPS)[1]["privacy/epsilon"] == math.inf


# --- TensorBoard -------------------------------------------------------------------------


def read_events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def test_tensorboard_events_hold_every_scalar_and_histogram_live(tmp_path, monkeypatch):
    from tensorboard.summary.writer.record_writer import RecordWriter

    write = RecordWriter.write

    def slow_write(self, data):  # a slow disk: the writer thread lags behind log_round
        time.sleep(0.005)
        write(self, data)

    monkeypatch.setattr(RecordWriter, "write", slow_write)
    trackers = Trackers([TensorBoardTracker(tmp_path / "tb", first_round=1)], N_CLIENTS, GROUPS)
    for round_ in (1, 2):
        trackers.log_round(make_row(round_))
    live = read_events(tmp_path / "tb")  # flushed each round: all of it before close
    _, scalars, histograms = split_row(make_row(2), N_CLIENTS, GROUPS)
    assert all(live.Scalars(tag)[-1].step == 2 for tag in scalars)
    assert all(live.Histograms(tag)[-1].step == 2 for tag in histograms)
    trackers.close()

    events = read_events(tmp_path / "tb")
    expected = [split_row(make_row(r), N_CLIENTS, GROUPS) for r in (1, 2)]
    assert set(events.Tags()["scalars"]) == set(expected[0][1]) | set(expected[1][1])
    assert set(events.Tags()["histograms"]) == set(expected[0][2])
    for step, scalars, histograms in expected:
        for tag, value in scalars.items():
            (event,) = [e for e in events.Scalars(tag) if e.step == step]
            assert event.value == pytest.approx(value, rel=1e-6), tag
        for tag, values in histograms.items():
            (event,) = [e for e in events.Histograms(tag) if e.step == step]
            histogram = event.histogram_value
            assert histogram.num == len(values), tag  # NaN dropped, nothing else
            assert histogram.sum == pytest.approx(values.sum()), tag
            assert (histogram.min, histogram.max) == (values.min(), values.max()), tag
            assert sum(histogram.bucket) == len(values), tag


def test_a_resumed_launch_replaces_the_rounds_after_the_checkpoint(tmp_path):
    """A launch killed after round 3 whose checkpoint holds round 2: the next launch
    trains round 3 again, and TensorBoard shows its round 3, once."""
    killed = Trackers([TensorBoardTracker(tmp_path / "tb", first_round=1)], N_CLIENTS, GROUPS)
    for round_ in (1, 2, 3):
        killed.log_round(make_row(round_))
    killed.close()
    resumed = Trackers([TensorBoardTracker(tmp_path / "tb", first_round=3)], N_CLIENTS, GROUPS)
    for round_ in (3, 4):
        resumed.log_round(make_row(round_, shift=0.01))
    resumed.close()

    events = read_events(tmp_path / "tb")
    accuracy = {e.step: e.value for e in events.Scalars("metrics/test_accuracy")}
    assert [e.step for e in events.Scalars("metrics/test_accuracy")] == [1, 2, 3, 4]
    assert accuracy[2] == pytest.approx(0.7)  # the killed launch's, kept
    assert accuracy[3] == pytest.approx(0.81)  # the resumed launch's
    norms = [e.step for e in events.Histograms("diagnostics/client_update_norm")]
    assert norms == [1, 2, 3, 4]


def test_a_fresh_run_hides_an_earlier_runs_events_in_the_same_directory(tmp_path):
    old = Trackers([TensorBoardTracker(tmp_path / "tb", first_round=1)], N_CLIENTS, GROUPS)
    for round_ in (1, 2, 3):
        old.log_round(make_row(round_))
    old.close()
    new = Trackers([TensorBoardTracker(tmp_path / "tb", first_round=1)], N_CLIENTS, GROUPS)
    new.log_round(make_row(1, shift=0.05))
    new.close()
    events = read_events(tmp_path / "tb")
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("metrics/test_accuracy")] == [
        (1, 0.65)
    ]


# --- Weights & Biases (offline) ------------------------------------------------------------


def wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` transaction log, parsed with W&B's own protobuf schema.

    The file is a LevelDB log (32 KiB blocks of chunks: CRC32C, length, type; FULL, or
    FIRST/MIDDLE/LAST pieces of one record) after a 7-byte ``:W&B`` header. wandb ships no
    Python reader any more (its Go core reads it), so the container is unpacked here."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):  # FULL, FIRST
            pending = chunk
        elif kind in (3, 4):  # MIDDLE, LAST
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_launches(out_dir: Path) -> list[dict]:
    """Per offline launch (oldest first): run id, config and history ({step: {key: value}})."""
    launches = []
    for path in sorted(out_dir.glob("wandb/offline-run-*/run-*.wandb")):
        records = wandb_records(path)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        config = {u.key: json.loads(u.value_json) for u in run.config.update}
        for r in records:
            if r.WhichOneof("record_type") == "config":
                config.update({u.key: json.loads(u.value_json) for u in r.config.update})
        history = {}
        for r in records:
            if r.WhichOneof("record_type") == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in r.history.item
                }
                history[r.history.step.num] = items
        launches.append(
            {"id": run.run_id, "project": run.project, "config": config, "history": history}
        )
    return launches


def wandb_teardown() -> None:
    """Wait for wandb's service to end: it may still be writing a run's transaction log
    when ``run.finish()`` returns (at exit, wandb waits the same way)."""
    import wandb

    wandb.teardown()


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch) -> Iterator[None]:
    """W&B offline, its settings and caches under tmp_path (nothing in $HOME)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    yield
    wandb_teardown()  # also: wandb keeps the settings of its first run in the process


def test_an_offline_wandb_run_holds_the_config_every_round_and_a_resume(tmp_path, wandb_offline):
    out = tmp_path / "run-a"
    out.mkdir()
    config = {**json.loads(Config(rounds=4).to_json()), "num_clients": N_CLIENTS}
    first = Trackers([WandbTracker("fedmpi-test", out, config, rounds_done=0)], N_CLIENTS, GROUPS)
    for round_ in (1, 2):
        first.log_round(make_row(round_))
    first.close()
    time.sleep(1 - time.time() % 1)  # wandb names a launch's directory by the second and id
    resumed = Trackers([WandbTracker("fedmpi-test", out, config, rounds_done=2)], N_CLIENTS, GROUPS)
    resumed.log_round(make_row(3))
    resumed.close()
    wandb_teardown()

    launches = wandb_launches(out)
    assert len(launches) == 2
    run_id = (out / WANDB_RUN_ID_NAME).read_text().strip()
    assert [x["id"] for x in launches] == [run_id, run_id]  # one W&B run, continued
    assert launches[0]["project"] == "fedmpi-test"
    assert launches[0]["config"]["rounds"] == 4 and launches[0]["config"]["num_clients"] == 4
    assert sorted(launches[0]["history"]) == [1, 2]
    assert sorted(launches[1]["history"]) == [3]  # only the rounds after the checkpoint
    for launch in launches:
        for step, logged in launch["history"].items():
            _, scalars, histograms = split_row(make_row(step), N_CLIENTS, GROUPS)
            assert {k: logged[k] for k in scalars} == pytest.approx(scalars)
            for key, values in histograms.items():
                assert logged[f"{key}/_type"] == "histogram"
                assert sum(logged[f"{key}/values"]) == len(values), key  # NaN dropped
                bins = logged[f"{key}/bins"]
                assert (bins[0], bins[-1]) == pytest.approx((values.min(), values.max()))
            assert not any(k.startswith(("sync/", "metrics/val", "clients/test")) for k in logged)


def test_a_new_run_in_the_same_output_is_a_new_wandb_run(tmp_path, wandb_offline):
    out = tmp_path / "run-b"
    out.mkdir()
    WandbTracker("fedmpi-test", out, {}, rounds_done=0).close()
    first_id = (out / WANDB_RUN_ID_NAME).read_text()
    WandbTracker("fedmpi-test", out, {}, rounds_done=0).close()  # started over (--overwrite)
    wandb_teardown()
    assert (out / WANDB_RUN_ID_NAME).read_text() != first_id
    assert len({x["id"] for x in wandb_launches(out)}) == 2


# --- Refusals -----------------------------------------------------------------------------


def test_a_missing_package_is_one_clear_usage_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees uninstalled
    with pytest.raises(UsageError, match=r"^--wandb needs the wandb package \(not installed\)"):
        WandbTracker("p", tmp_path, {}, rounds_done=0)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(UsageError, match=r"^--tensorboard needs the tensorboard package \(not i"):
        TensorBoardTracker(tmp_path / "tb", first_round=1)
    assert not (tmp_path / "tb").exists()


def test_wandb_refusing_the_run_is_one_line_usage_error(tmp_path, monkeypatch):
    """Online without an API key: wandb's own error, one line, with the offline way out."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no stored key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    with pytest.raises(UsageError) as caught:
        WandbTracker("p", tmp_path, {}, rounds_done=0)
    message = str(caught.value)
    assert message.startswith("--wandb: ") and "WANDB_MODE=offline" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"tensorboard": " "}, "--tensorboard needs a directory"),
        ({"wandb": ""}, "it needs 1 to 128 characters"),
        ({"wandb": "x" * 129}, "it needs 1 to 128 characters"),
        ({"wandb": "team/project"}, "it contains /"),
        ({"wandb": "a:b?"}, "it contains : ?"),
    ],
)
def test_tracking_flags_are_validated(flags, message):
    with pytest.raises(UsageError, match=message):
        Config(**flags).validate(world_size=2)


def test_valid_tracking_flags_pass_and_do_not_block_a_resume():
    tracked = Config(tensorboard="tb/run", wandb="fedmpi-" + "x" * 121)
    tracked.validate(world_size=2)
    assert parse_value("wandb", "none") is None  # a config file's tracker turned off
    assert parse_value("tensorboard", "None") is None
    identity = [checkpoint.fingerprint(c, 2, "sha", "m") for c in (tracked, Config())]
    assert identity[0] == identity[1]  # adding or changing a tracker never refuses a resume


def test_only_rank_0_with_a_flag_gets_trackers(tmp_path):
    job = SimpleNamespace(plan=SimpleNamespace(n_clients=N_CLIENTS), out_dir=tmp_path)
    root, other = SimpleNamespace(is_root=True, size=2), SimpleNamespace(is_root=False, size=2)
    tracked = Config(tensorboard=str(tmp_path / "tb"))
    assert Trackers.open(tracked, other, job, GROUPS, 0) is None
    assert Trackers.open(Config(), root, job, GROUPS, 0) is None
    trackers = Trackers.open(tracked, root, job, GROUPS, 0)
    assert [type(t) for t in trackers.trackers] == [TensorBoardTracker]
    trackers.close()
