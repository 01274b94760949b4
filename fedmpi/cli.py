"""Command line: ``python -m fedmpi [--config FILE.yaml] [flags]``, flags overriding the file.

Every rank parses the same arguments, so every rank reaches the same verdict; only rank 0
prints help or errors. Invalid input ends the job with exit code 2 before any training.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import yaml

from fedmpi import allocator
from fedmpi.comm import World, abort_on_error, collectively
from fedmpi.config import Config, config_fields, field_type, parse_value
from fedmpi.errors import UsageError

EPILOG = """\
examples:
  mpirun -np 4 python -m fedmpi                      # offline demo: MiniLM on Rotten Tomatoes
  mpirun -np 32 python -m fedmpi --model bert --dataset imdb --optimizer sgd --lr 2e-5 \\
      --batch-size 32 --max-seq-len 128 --local-epochs 2 --train-samples 32000 --rounds 10
  python -m fedmpi --config run.yaml --rounds 5       # flags override the file
"""


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (agreed on by all ranks) and prints on rank 0 only."""

    def __init__(self, *args: Any, is_root: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.is_root = is_root

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)

    def _print_message(self, message: str, file: Any = None) -> None:
        if self.is_root and message:
            (file or sys.stdout).write(message)


def build_parser(is_root: bool = True) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m fedmpi",
        description="Federated fine-tuning of a transformer text classifier over MPI: every "
        "rank hosts clients, one weighted Allreduce per round is FedAvg.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # only flags given on the command line are set
        is_root=is_root,
    )
    parser.add_argument(
        "--config", metavar="FILE.yaml", help="YAML file of settings (keys as flag names)"
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in config_fields():
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata['help']} (default: {show_default(f)})"
        if field_type(f.name) is bool:
            groups[group].add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            groups[group].add_argument(
                flag,
                type=lambda raw, name=f.name: _argparse_value(name, raw),
                choices=f.metadata.get("choices"),
                metavar=f.name.upper() if "choices" not in f.metadata else None,
                help=text,
            )
    return parser


def show_default(f: Any) -> str:
    """A setting's default as --help shows it (and docs/cli.md's table)."""
    if f.default is None:
        return f.metadata.get("nullable") or "see text"
    return str(f.default)


def _argparse_value(name: str, raw: str) -> Any:
    try:
        return parse_value(name, raw)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(" ", 1)[-1]) from None  # drop "--flag"


def parse_config(argv: list[str] | None, world_size: int, is_root: bool = True) -> Config:
    """Defaults < YAML file < command-line flags, then validated (and FEDMPI_MALLOC, which
    ``python -m fedmpi`` read before MPI could report on it)."""
    allocator.chosen_library(dict(os.environ))
    flags = vars(build_parser(is_root).parse_args(argv))
    values: dict[str, Any] = {}
    config_file = flags.pop("config", None)
    if config_file is not None:
        from_file = _read_yaml(Path(config_file))
        Config.from_mapping(from_file, source=config_file)  # its errors name its own keys
        values.update({str(k).replace("-", "_"): v for k, v in from_file.items()})
    values.update(flags)
    cfg = Config.from_mapping(values, source=config_file or "command line")
    cfg.validate(world_size)
    from fedmpi.sparse_wire import requested_wire  # torch: after --help has had its say

    requested_wire(cfg.compress, dict(os.environ))
    return cfg


class _DuplicateKey(Exception):
    pass


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice (plain YAML keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = str(self.construct_object(key_node, deep=deep)).replace("-", "_")
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not a text (UTF-8) file") from None
    try:
        loaded = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except _DuplicateKey as exc:
        raise UsageError(f"config file {path}: {exc.args[0]!r} is given twice") from None
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UsageError(f"config file {path} is not valid YAML: {first}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UsageError(f"config file {path} must hold a mapping of settings")
    return loaded


def main(argv: list[str] | None = None) -> int:
    world = World.from_comm()
    with abort_on_error(world):
        cfg = collectively(world, lambda: parse_config(argv, world.size, world.is_root))
        from fedmpi.train import run  # heavy imports (torch, transformers) after validation

        run(cfg, world)
    return 0
