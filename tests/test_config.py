"""Command line and config file: defaults, precedence, and validation messages."""

import pytest

from fedmpi.cli import build_parser, parse_config
from fedmpi.config import Config, config_fields
from fedmpi.errors import UsageError


def test_defaults_are_the_offline_demo():
    cfg = parse_config([], world_size=4)
    assert (cfg.model, cfg.dataset, cfg.clients, cfg.num_clients(4)) == (
        "minilm",
        "rotten_tomatoes",
        None,
        4,
    )


def test_every_config_field_is_a_documented_flag():
    help_text = build_parser().format_help()
    for f in config_fields():
        flag = "--" + f.name.replace("_", "-")
        assert flag in help_text, flag
    assert "(default: 3)" in help_text  # rounds


def test_flags_override_yaml_and_yaml_overrides_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rounds: 7\nbatch-size: 8\nlr: 1e-4\ntrain_samples: all\n")
    cfg = parse_config(["--config", str(path), "--rounds", "2"], world_size=1)
    assert (cfg.rounds, cfg.batch_size, cfg.lr, cfg.train_samples) == (2, 8, 1e-4, None)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--rounds", "0"], "--rounds must be a positive integer"),
        (["--batch-size", "-3"], "--batch-size must be a positive integer"),
        (["--local-epochs", "0"], "--local-epochs must be a positive integer"),
        (["--lr", "0"], "--lr must be positive"),
        (["--test-fraction", "1.5"], "--test-fraction must be in (0, 1)"),
        (["--train-samples", "3"], "--train-samples 3 is fewer than the 4 clients"),
        (["--clients", "2"], "4 MPI ranks but only 2 clients"),
        (["--max-seq-len", "x"], "expects an integer"),
    ],
)
def test_invalid_values_are_rejected(argv, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(argv, world_size=4)


def test_yaml_values_are_type_checked(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rounds: many\n")
    with pytest.raises(UsageError, match="--rounds expects an integer"):
        parse_config(["--config", str(path)], world_size=1)


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("- rounds\n")
    with pytest.raises(UsageError, match="must hold a mapping"):
        parse_config(["--config", str(path)], world_size=1)


def test_config_round_trips_through_json():
    cfg = Config(rounds=5, train_samples=None)
    import json

    assert Config.from_mapping(json.loads(cfg.to_json()), "json") == cfg


@pytest.mark.parametrize(
    "text,message",
    [
        ("rounds: ~\n", "'rounds' is empty \\(null\\)"),
        ("rounds: [1, 2]\n", "--rounds expects a single value"),
        ("rounds: yes\n", "--rounds expects an integer, got True"),
        ("lr: .nan\n", "--lr must be a finite number"),
        ("rounds: 2\nrounds: 3\n", "'rounds' is given twice"),
        ("batch-size: 2\nbatch_size: 3\n", "'batch_size' is given twice"),
        ("model: {name: x}\n", "--model expects a single value"),
        ("- rounds\n", "must hold a mapping"),
        ("rounds: [\n", "is not valid YAML"),
    ],
)
def test_every_yaml_value_is_validated_like_a_flag(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        parse_config(["--config", str(path)], world_size=1)


def test_a_yaml_null_is_fine_where_the_default_is_none(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("clients: ~\noutput: null\n")
    assert parse_config(["--config", str(path)], world_size=2).clients is None


def test_a_binary_config_file_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(UsageError, match="is not a text"):
        parse_config(["--config", str(path)], world_size=1)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lr", "inf"], "--lr must be a finite number"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
        (["--server-lr=-inf"], "--server-lr must be a finite number"),
        (["--seed", "-1"], "--seed must be in \\[0, 2\\^32\\)"),
        (["--data-seed", str(2**40)], "--data-seed must be in"),
        (["--prox-mu", "inf"], "--prox-mu must be a finite number"),
        (["--clients-per-round", "nan"], "--clients-per-round must be a finite number"),
        (["--server-beta2", "1"], "--server-beta2 must be in \\[0, 1\\)"),
    ],
)
def test_non_finite_and_out_of_range_numbers_are_refused(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_config(argv, world_size=1)
