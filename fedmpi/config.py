"""The run's configuration: one dataclass, its defaults, and its validation.

Every field is a command-line flag (``max_seq_len`` -> ``--max-seq-len``) and a key of the
YAML config file; the field's metadata is the flag's help text, so ``--help``, the config
file and the results file all describe the same object.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from fedmpi.errors import UsageError
from fedmpi.partition import PartitionSpec

SERVER_OPTIMIZERS = ("fedavg", "avgm", "adam", "yogi", "adagrad")
DIAGNOSTICS_LEVELS = ("off", "norms", "full")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class Config:
    """Everything that determines a run. Defaults are the offline demo: a few minutes on 2 CPUs."""

    # What to train on.
    model: str = _opt(
        "minilm",
        "model: a built-in (minilm, mpnet, distil-minilm, albert-tiny), a paper alias (bert, "
        "albert, distilbert), a Hugging Face hub id, or a local directory",
    )
    dataset: str = _opt(
        "rotten_tomatoes",
        "dataset: a built-in (rotten_tomatoes, tweets, bbc_news, debates, spooky), a hub id, "
        "or a local CSV/TSV/JSON/JSONL/parquet file or directory",
    )
    dataset_config: str | None = _opt(None, "hub dataset configuration name (e.g. sst2 for glue)")
    text_column: str | None = _opt(None, "text column (default: auto-detect 'text', 'sentence')")
    label_column: str | None = _opt(None, "label column (default: auto-detect 'label', 'labels')")
    test_fraction: float = _opt(
        0.2, "fraction held out as the test set when the data has no labelled test split"
    )
    split_by: str | None = _opt(
        None,
        "column whose values never straddle the train/test split fedmpi makes (default: "
        "movie_name for rotten_tomatoes, none otherwise)",
    )
    data_seed: int = _opt(
        0,
        "seed of the data: the train/test split, the training subset and the test subset "
        "(never --seed, so every --seed is scored on the same test set)",
    )
    train_samples: int | None = _opt(
        2000,
        "cap on the total training set, split among the clients (a random subset drawn "
        "with --data-seed); 'all' for no cap",
        nullable="all",
    )
    test_samples: int | None = _opt(
        1000,
        "cap on the test set (a random subset drawn with --data-seed); 'all' for no cap",
        nullable="all",
    )
    val_samples: int = _opt(
        0,
        "validation examples held out of the training side (grouped by --split-by like the "
        "test set, drawn with --data-seed, never trained on) and scored whenever the test "
        "set is: choose learning rates and rounds on them, not on the test set (0: none)",
    )
    max_seq_len: int = _opt(64, "maximum tokens per example (longer ones are truncated)")

    # Federation.
    clients: int | None = _opt(
        None, "number of federated clients (default: one per MPI rank)", nullable="ranks"
    )
    rounds: int = _opt(3, "federated rounds")
    clients_per_round: float | None = _opt(
        None,
        "clients sampled per round: a count, or a fraction of --clients in (0, 1); "
        "'all' for every client",
        nullable="all",
    )
    partition: str = _opt(
        "iid",
        "how examples are split among clients: iid, dirichlet:ALPHA, quantity:BETA, "
        "by:COLUMN, label-sorted",
    )
    weighting: str = _opt(
        "examples",
        "FedAvg weights: 'examples' (shard size, FedAvg) or 'uniform' (plain mean)",
        choices=("examples", "uniform"),
    )
    server_opt: str = _opt(
        "fedavg",
        "server optimizer on the pseudo-gradient (global - average)",
        choices=SERVER_OPTIMIZERS,
    )
    server_lr: float = _opt(1.0, "server learning rate (avgm, adam, yogi, adagrad)")
    server_momentum: float = _opt(0.9, "server momentum of avgm")
    server_beta1: float = _opt(0.9, "first-moment decay of adam, yogi, adagrad")
    server_beta2: float = _opt(0.99, "second-moment decay of adam and yogi")
    server_tau: float = _opt(1e-3, "adaptivity (epsilon) of adam, yogi, adagrad")

    # Local training.
    local_epochs: int = _opt(1, "local epochs per round on each client")
    batch_size: int = _opt(16, "local training batch size")
    lr: float = _opt(5e-5, "local learning rate")
    optimizer: str = _opt("adamw", "local optimizer", choices=("sgd", "adamw"))
    weight_decay: float = _opt(0.0, "weight decay of the local optimizer")
    prox_mu: float = _opt(0.0, "FedProx: weight of the proximal term mu/2 ||w - w_global||^2")
    keep_local_opt: bool = _opt(
        False,
        "keep each client's local optimizer state across rounds (AdamW: 2 extra copies of "
        "the parameters per client on its rank) instead of resetting it every round",
    )
    group_by_length: bool = _opt(
        False, "batch examples of similar length together (less padding, same epoch coverage)"
    )

    # What trains (and travels): the whole model, or LoRA adapters and the head.
    peft: str = _opt(
        "none",
        "parameter-efficient fine-tuning: none (every parameter trains and is averaged) or "
        "lora (only LoRA adapters and the classification head train and travel)",
        choices=("none", "lora"),
    )
    lora_r: int = _opt(8, "LoRA rank")
    lora_alpha: float = _opt(16.0, "LoRA scaling numerator (the update is alpha/r * B A)")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA branch's input")
    lora_targets: str | None = _opt(
        None,
        "comma-separated module names that get adapters (default: peft's choice for the "
        "architecture, e.g. query,value for BERT, q_proj,v_proj for Llama)",
    )
    lora_freeze_a: bool = _opt(
        False,
        "keep every A matrix at its shared initialisation and train only B and the head: "
        "FedAvg of B is then exactly the average of the low-rank updates B A (FFA-LoRA)",
    )
    eval_batch_size: int = _opt(64, "evaluation batch size")
    eval_every: int = _opt(1, "evaluate the global model every N rounds (the last always)")

    # Privacy and evaluation per client.
    dp_clip: float | None = _opt(
        None,
        "DP-FedAvg: clip each client's update to this L2 norm C (turns on client-level DP: "
        "Poisson cohorts, uniform weights, a fixed denominator); inf clips nothing",
    )
    dp_noise: float = _opt(
        0.0, "DP-FedAvg noise multiplier z: Gaussian noise of std z*C on the sum of updates"
    )
    dp_delta: float | None = _opt(
        None, "delta of the (epsilon, delta) guarantee (default: 1 / clients^1.1)"
    )
    eval_clients: bool = _opt(
        False,
        "also evaluate the global model on every client's own held-out examples "
        "(--client-test-fraction of its shard): per-client accuracy",
    )
    client_test_fraction: float = _opt(
        0.2, "fraction of each client's shard held out as its local test set (--eval-clients)"
    )
    holdout_clients: float = _opt(
        0.0,
        "fraction of the clients that never train (in no cohort); the global model is "
        "evaluated on their whole data: generalization to unseen clients",
    )

    # Where and how.
    seed: int = _opt(
        42,
        "training seed: shards, cohorts, data order, dropout and the classifier head "
        "(the data itself follows --data-seed)",
    )
    precision: str = _opt(
        "fp32",
        "compute precision of local training and evaluation (weights and averaging stay fp32)",
        choices=("fp32", "bf16", "fp16"),
    )
    device: str = _opt(
        "auto", "device: auto (CUDA when present), cpu or cuda", choices=("auto", "cpu", "cuda")
    )
    threads: int | None = _opt(
        None, "torch threads per rank (default: the rank's share of its node's cores)"
    )
    output: str | None = _opt(None, "output directory (default: runs/<date>-<model>-<dataset>)")
    overwrite: bool = _opt(False, "allow writing into an output directory that holds results")
    cache_dir: str | None = _opt(
        None, "tokenized-data cache (default: $FEDMPI_CACHE or ~/.cache/fedmpi)"
    )
    node_local_cache: bool = _opt(
        False,
        "--cache-dir is node-local (no filesystem all nodes share): rank 0 tokenizes, then "
        "sends the cache over MPI to one rank per node whose copy is missing or stale",
    )
    checkpoint_every: int = _opt(
        0, "write OUTPUT/checkpoint.h5 every N rounds (0: only when preempted)"
    )
    resume: bool = _opt(False, "resume from OUTPUT/checkpoint.h5 (automatic when OUTPUT holds one)")
    on_nonfinite: str = _opt(
        "abort",
        "a client whose update is NaN/inf: 'abort' the job, or 'skip' it (weight 0, logged)",
        choices=("abort", "skip"),
    )
    save_model: bool = _opt(False, "save the final global model as a Hugging Face directory")
    trust_remote_code: bool = _opt(False, "allow models whose code lives on the hub")
    verify_sync: bool = _opt(
        False, "after each round, check every rank holds bit-identical parameters"
    )
    diagnostics: str = _opt(
        "full",
        "per-round update diagnostics: off (non-finite check only), norms (client and "
        "global update norms), full (also leave-one-out cosines and per-layer drift)",
        choices=DIAGNOSTICS_LEVELS,
    )

    def validate(self, world_size: int) -> None:
        """Raise UsageError naming the first invalid value; cheap checks only (no I/O)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            unbounded = f.name == "dp_clip" and value == math.inf  # "no clipping"
            if (
                field_type(f.name) is float
                and value is not None
                and not math.isfinite(value)
                and not unbounded
            ):
                raise UsageError(f"--{_flag(f.name)} must be a finite number, got {value}")
        for name in ("seed", "data_seed"):
            if not 0 <= getattr(self, name) < 2**32:
                raise UsageError(f"--{_flag(name)} must be in [0, 2^32), got {getattr(self, name)}")
        positive = ("rounds", "local_epochs", "batch_size", "eval_batch_size", "max_seq_len")
        for name in positive:
            if getattr(self, name) < 1:
                raise UsageError(
                    f"--{_flag(name)} must be a positive integer, got {getattr(self, name)}"
                )
        for name in ("train_samples", "test_samples", "clients", "threads", "eval_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{_flag(name)} must be a positive integer, got {value}")
        if self.val_samples < 0:
            raise UsageError(f"--val-samples must be >= 0, got {self.val_samples}")
        if self.checkpoint_every < 0:
            raise UsageError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite contradict each other: choose one")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise UsageError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.test_fraction < 1:
            raise UsageError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        for name in ("server_lr", "server_tau"):
            if not getattr(self, name) > 0:
                raise UsageError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("server_momentum", "server_beta1", "server_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UsageError(f"--{_flag(name)} must be in [0, 1), got {getattr(self, name)}")
        if self.prox_mu < 0:
            raise UsageError(f"--prox-mu must be >= 0, got {self.prox_mu}")
        if self.lora_r < 1:
            raise UsageError(f"--lora-r must be a positive integer, got {self.lora_r}")
        if not self.lora_alpha > 0:
            raise UsageError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.peft == "none" and (self.lora_targets is not None or self.lora_freeze_a):
            raise UsageError("--lora-targets and --lora-freeze-a need --peft lora")
        if not 0 <= self.holdout_clients < 1:
            raise UsageError(f"--holdout-clients must be in [0, 1), got {self.holdout_clients}")
        if not 0 < self.client_test_fraction < 1:
            raise UsageError(
                f"--client-test-fraction must be in (0, 1), got {self.client_test_fraction}"
            )
        if self.participants(world_size) < 1:
            raise UsageError(
                f"--holdout-clients {self.holdout_clients:g} leaves none of the "
                f"{self.num_clients(world_size)} clients to train"
            )
        self._validate_privacy(world_size)
        try:
            PartitionSpec.parse(self.partition)
        except ValueError as exc:
            raise UsageError(f"--partition: {exc}") from None
        if self.clients_per_round is not None:
            per_round = self.clients_per_round
            if not per_round > 0 or (per_round >= 1 and not float(per_round).is_integer()):
                raise UsageError(
                    "--clients-per-round must be a whole count or a fraction in (0, 1), "
                    f"got {per_round}"
                )
            if per_round > self.participants(world_size):
                raise UsageError(
                    f"--clients-per-round {per_round:g} exceeds the "
                    f"{self.participants(world_size)} clients that train"
                )
        for name in (f.name for f in dataclasses.fields(self) if "choices" in f.metadata):
            choices = _FIELDS[name].metadata["choices"]
            value = getattr(self, name)
            if value not in choices:
                raise UsageError(
                    f"--{_flag(name)} must be one of {', '.join(choices)}, got {value!r}"
                )
        if self.num_clients(world_size) < world_size:
            raise UsageError(
                f"{world_size} MPI ranks but only {self.clients} clients: "
                f"{world_size - self.clients} ranks would have no work; "
                f"launch with -np {self.clients} or raise --clients"
            )
        if self.train_samples is not None and self.train_samples < self.num_clients(world_size):
            raise UsageError(
                f"--train-samples {self.train_samples} is fewer than the "
                f"{self.num_clients(world_size)} clients: every client needs an example"
            )

    def _validate_privacy(self, world_size: int) -> None:
        if self.dp_clip is None:
            if self.dp_noise or self.dp_delta is not None:
                raise UsageError("--dp-noise and --dp-delta need --dp-clip (DP-FedAvg)")
            return
        if not self.dp_clip > 0:
            raise UsageError(f"--dp-clip must be positive, got {self.dp_clip}")
        if self.dp_noise < 0:
            raise UsageError(f"--dp-noise must be >= 0, got {self.dp_noise}")
        if self.dp_clip == math.inf and self.dp_noise > 0:
            raise UsageError("--dp-clip inf with --dp-noise > 0 would add infinite noise")
        if self.dp_delta is not None and not 0 < self.dp_delta < 1:
            raise UsageError(f"--dp-delta must be in (0, 1), got {self.dp_delta}")
        if self.weighting != "uniform":
            raise UsageError(
                "--dp-clip: DP-FedAvg weighs every client equally (that bounds one client's "
                "influence): pass --weighting uniform"
            )
        if self.participants(world_size) < 2:
            raise UsageError(
                "--dp-clip: client-level DP with a single training client protects nothing "
                "(its update is the whole average): use more clients"
            )

    def num_clients(self, world_size: int) -> int:
        return self.clients if self.clients is not None else world_size

    def participants(self, world_size: int) -> int:
        """Clients that may train: all but the held-out ones."""
        n = self.num_clients(world_size)
        return n - int(round(self.holdout_clients * n))

    def dp_sample_rate(self, participants: int) -> float:
        """DP-FedAvg's Poisson rate q: clients per round over the participating clients."""
        per_round = self.clients_per_round
        if per_round is None:
            return 1.0
        return per_round if per_round < 1 else min(1.0, per_round / participants)

    def cohort_size(self, world_size: int) -> int | None:
        """Clients per round as a count (None: all of the participating clients)."""
        per_round = self.clients_per_round
        if per_round is None:
            return None
        if per_round < 1:
            return max(1, round(per_round * self.participants(world_size)))
        return int(per_round)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str) -> Config:
        """Build from a mapping (a YAML file); keys may use dashes or underscores. A null is
        a value only for settings that can be none (``clients``, ``train_samples``, ...)."""
        known = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in _FIELDS:
                raise UsageError(f"{source}: unknown key {key!r}")
            if name in known:
                raise UsageError(f"{source}: {key!r} is given twice")
            field_ = _FIELDS[name]
            if value is None and field_.default is not None and "nullable" not in field_.metadata:
                raise UsageError(f"{source}: {key!r} is empty (null): give a value or drop the key")
            known[name] = value if value is None else parse_value(name, value)
        return cls(**known)


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _flag(name: str) -> str:
    return name.replace("_", "-")


def field_type(name: str) -> type:
    """The scalar type of a field (int, float, bool or str), from its annotation."""
    annotation = str(_FIELDS[name].type)
    for kind in (bool, int, float):
        if annotation.startswith(kind.__name__):
            return kind
    return str


def parse_value(name: str, raw: Any) -> Any:
    """Convert a flag's or a YAML key's value to the field's type, or raise UsageError.

    YAML gives typed values: a list, a mapping, or a boolean where a number or a name is
    expected is refused rather than coerced (``rounds: yes`` is not 1 round)."""
    kind = field_type(name)
    nullable = _FIELDS[name].metadata.get("nullable")
    if isinstance(raw, list | dict | tuple | set):
        raise UsageError(f"--{_flag(name)} expects a single value, got {raw!r}")
    if isinstance(raw, bool) and kind is not bool:
        raise UsageError(f"--{_flag(name)} expects {_EXPECTED[kind]}, got {raw!r}")
    if nullable is not None and str(raw).lower() == nullable:
        return None
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("true", "yes", "1", "on"):
            return True
        if str(raw).lower() in ("false", "no", "0", "off"):
            return False
        raise UsageError(f"--{_flag(name)} expects true or false, got {raw!r}")
    try:
        if kind is int:
            return int(raw) if isinstance(raw, float) and raw.is_integer() else int(str(raw), 10)
        return kind(raw)
    except ValueError:
        hint = f" or '{nullable}'" if nullable else ""
        raise UsageError(f"--{_flag(name)} expects {_EXPECTED[kind]}{hint}, got {raw!r}") from None


_EXPECTED = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def config_fields() -> list[dataclasses.Field]:
    """The Config fields, in declaration order (the order of --help)."""
    return list(_FIELDS.values())
