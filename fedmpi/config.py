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
# DP noise is drawn in float32 (numpy's float32 normals stay below 9 in magnitude): noise
# of std z*C whose draws could pass float32's largest value would make the model inf.
FLOAT32_MAX = 3.4028234663852886e38
NOISE_DRAW_BOUND = 10.0
# Adaptive clipping (Andrew et al. 2021): the geometric step of the clip bound, and the
# noise on the count of unclipped clients as a share of the expected cohort (TFF's
# defaults, learning_rate 0.2 and clipped_count_stddev 0.05 * clients_per_round).
DEFAULT_CLIP_LR = 0.2
CLIP_COUNT_NOISE_SHARE = 0.05
# Above 10 a server learning rate is a typo, not a setting: the step would scale the
# clients' average update more than tenfold (avgm) or move every weight by more than 10 a
# round (adam, yogi, adagrad), and the weights diverge or overflow.
MAX_SERVER_LR = 10.0


_SECTION = [""]  # the --help group of the fields declared next (see _section)


def _section(title: str) -> None:
    """Start a group of settings: the fields declared after it show under ``title`` in
    ``--help`` (``Config``'s body calls it between its fields)."""
    _SECTION[0] = title


def _opt(default: Any, help: str, *, math: bool = True, **extra: Any) -> Any:
    """A setting: its default, its help text, its --help group, and ``math=False`` for
    settings that never change what a run computes (where it writes, how often it saves,
    what it logs): a resumed run may change them and the report groups runs across them."""
    return field(
        default=default, metadata={"help": help, "group": _SECTION[0], "math": math, **extra}
    )


@dataclass
class Config:
    """Everything that determines a run. Defaults are the offline demo: a few minutes on 2 CPUs."""

    _section("model and data")
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

    _section("federation")
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

    _section("local training")
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

    _section("what trains and travels: the whole model, or LoRA adapters and the head")
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

    _section("evaluation")
    eval_batch_size: int = _opt(64, "evaluation batch size", math=False)
    eval_every: int = _opt(
        1, "evaluate the global model every N rounds (the last always)", math=False
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

    _section("update compression (docs/compression.md)")
    compress: str = _opt(
        "none",
        "each client's update as it would be uploaded: none, bf16, fp16, int8 or int4 (an "
        "fp32 scale per block of 256 values, stochastic rounding: unbiased), topk:F (the "
        "fraction F of largest magnitude) or randk:F (a random fraction F, scaled by 1/F: "
        "unbiased)",
    )
    error_feedback: bool = _opt(
        False,
        "each client keeps what compression dropped from its update and adds it to its next "
        "one (one fp32 copy of the trainable parameters per client on its rank; checkpointed)",
    )

    _section("differential privacy (DP-FedAvg)")
    dp_clip: float | None = _opt(
        None,
        "DP-FedAvg: clip each client's update to this L2 norm C (turns on client-level DP: "
        "Poisson cohorts, uniform weights, a fixed denominator); inf clips nothing",
    )
    dp_noise: float = _opt(
        0.0, "DP-FedAvg noise multiplier z: Gaussian noise of std z*C on the sum of updates"
    )
    dp_delta: float | None = _opt(
        None,
        "delta of the (epsilon, delta) guarantee, below 1 / (clients that train) "
        "(default: 1 / clients^1.1)",
    )
    dp_noise_seed: int | None = _opt(
        None,
        "seed of the DP noise, for a reproducible run (tests, committed studies); without "
        "it rank 0 draws a secret key from the operating system, kept in the checkpoint "
        "only (never in the results or the log)",
        seed=True,
    )
    dp_noise_cohort: int | None = _opt(
        None,
        "simulate a deployment's cohort of N clients (pfl-research's noise_cohort_size): "
        "noise of std z*C/N on the average, as N clients would get, and the accountant's "
        "rate N / --dp-population; at least the expected cohort; the epsilon is then simulated",
    )
    dp_population: int | None = _opt(
        None,
        "the population the accountant samples the cohort from (rate = cohort / M), for a "
        "simulated deployment; the default delta follows it (default: the clients that train)",
    )
    dp_clip_quantile: float | None = _opt(
        None,
        "adaptive clipping (Andrew et al. 2021): move the clip bound, from --dp-clip, toward "
        "this quantile of the clients' update norms, by a noised count of unclipped clients",
    )
    dp_clip_lr: float | None = _opt(
        None,
        f"adaptive clipping's geometric step eta: C <- C exp(-eta (b - quantile)) "
        f"({DEFAULT_CLIP_LR:g} when --dp-clip-quantile is given)",
    )
    dp_clip_count_noise: float | None = _opt(
        None,
        "adaptive clipping: std sigma_b of the noise on the count of unclipped clients "
        f"(default: the expected cohort / {1 / CLIP_COUNT_NOISE_SHARE:g}, as TFF; 0 without "
        "noise); the update's noise multiplier becomes (z^-2 - (2 sigma_b)^-2)^-1/2 so that "
        "both together spend what --dp-noise z alone would",
    )

    _section("where and how")
    seed: int = _opt(
        42,
        "training seed: shards, cohorts, data order, dropout and the classifier head "
        "(the data itself follows --data-seed)",
        seed=True,
    )
    precision: str = _opt(
        "fp32",
        "compute precision of local training and evaluation (weights and averaging stay fp32)",
        choices=("fp32", "bf16", "fp16"),
    )
    device: str = _opt(
        "auto",
        "device: auto (CUDA when present), cpu or cuda",
        choices=("auto", "cpu", "cuda"),
        math=False,
    )
    threads: int | None = _opt(
        None,
        "torch threads per rank (default: the rank's share of its node's cores)",
        math=False,
    )
    output: str | None = _opt(
        None, "output directory (default: runs/<date>-<model>-<dataset>)", math=False
    )
    overwrite: bool = _opt(
        False, "allow writing into an output directory that holds results", math=False
    )
    cache_dir: str | None = _opt(
        None,
        "tokenized-data cache (default: $FEDMPI_CACHE or ~/.cache/fedmpi)",
        math=False,
    )
    node_local_cache: bool = _opt(
        False,
        "--cache-dir is node-local (no filesystem all nodes share): rank 0 tokenizes, then "
        "sends the cache over MPI to one rank per node whose copy is missing or stale",
        math=False,
    )
    checkpoint_every: int = _opt(
        0,
        "write OUTPUT/checkpoint.h5 every N rounds (0: only when preempted)",
        math=False,
    )
    resume: bool = _opt(
        False, "resume from OUTPUT/checkpoint.h5 (automatic when OUTPUT holds one)", math=False
    )
    on_nonfinite: str = _opt(
        "abort",
        "a client whose update is NaN/inf: 'abort' the job, or 'skip' it (weight 0, logged)",
        choices=("abort", "skip"),
        math=False,
    )
    save_model: bool = _opt(
        False, "save the final global model as a Hugging Face directory", math=False
    )
    trust_remote_code: bool = _opt(False, "allow models whose code lives on the hub", math=False)
    verify_sync: bool = _opt(
        False,
        "after each round, check every rank holds bit-identical parameters",
        math=False,
    )
    diagnostics: str = _opt(
        "full",
        "per-round update diagnostics: off (non-finite check only), norms (client and "
        "global update norms), full (also leave-one-out cosines and per-layer drift)",
        choices=DIAGNOSTICS_LEVELS,
        math=False,
    )

    _section("live tracking (rank 0 streams every round's row; docs/tracking.md)")
    tensorboard: str | None = _opt(
        None,
        "write every round's scalars and per-client histograms as TensorBoard events to "
        "this directory, one per run; 'none' for no TensorBoard",
        nullable="none",
        math=False,
    )
    wandb: str | None = _opt(
        None,
        "log every round and the configuration to this Weights & Biases project "
        "(WANDB_MODE=offline keeps the run on disk for `wandb sync`); 'none' for no W&B",
        nullable="none",
        math=False,
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
        if self.server_lr > MAX_SERVER_LR:
            raise UsageError(
                f"--server-lr must be at most {MAX_SERVER_LR:g}, got {self.server_lr:g}: the "
                "server step scales the clients' average update by it (avgm) or moves every "
                "weight by about it a round (adam, yogi, adagrad)"
            )
        if self.server_tau > 1:  # its square seeds the second moments, in float32
            raise UsageError(
                f"--server-tau must be at most 1, got {self.server_tau:g}: it is the small "
                "constant of adam, yogi and adagrad that keeps their step finite (default 1e-3)"
            )
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
        self._validate_compression()
        self._validate_tracking()
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
            training = self.participants(world_size)
            if self.dp_clip is None and per_round < 1 and round(per_round * training) < 1:
                raise UsageError(  # a fixed-size cohort; under DP it is a Poisson rate
                    f"--clients-per-round {per_round:g} of the {training} clients that train "
                    f"rounds to no client: use a fraction above {0.5 / training:.3g}, or a count"
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
            if self.dp_noise_seed is not None:
                raise UsageError("--dp-noise-seed needs --dp-clip (DP-FedAvg)")
            if self.dp_noise_cohort is not None or self.dp_population is not None:
                raise UsageError("--dp-noise-cohort and --dp-population need --dp-clip (DP-FedAvg)")
            if self.dp_clip_quantile is not None:
                raise UsageError("--dp-clip-quantile needs --dp-clip (its initial clip bound)")
        if self.dp_clip_quantile is None and (
            self.dp_clip_lr is not None or self.dp_clip_count_noise is not None
        ):
            raise UsageError(
                "--dp-clip-lr and --dp-clip-count-noise need --dp-clip-quantile (adaptive clipping)"
            )
        if self.dp_clip is None:
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
        population = self.participants(world_size)
        per_round = self.clients_per_round
        if per_round is not None and 0 < per_round < 1 and per_round * population < 1:
            raise UsageError(
                f"--clients-per-round {per_round:g} of the {population} clients that train "
                f"expects {per_round * population:.3g} clients a round: DP-FedAvg divides by "
                "the expected cohort, which must be at least one client"
            )
        self._validate_simulation(population)
        accounted = self.dp_accounting_population(population)
        if self.dp_delta is not None and self.dp_delta >= 1 / accounted:
            whose = "the clients that train" if self.dp_population is None else "--dp-population"
            raise UsageError(
                f"--dp-delta {self.dp_delta:g} is not below 1 / {accounted} ({whose}): at "
                "that delta, publishing one random client's data outright meets the "
                f"guarantee; use less than {1 / accounted:.3g} (default 1 / K^1.1)"
            )
        self._validate_adaptive_clipping(population)
        update_noise = self.dp_update_noise(population)
        if update_noise > 0 and update_noise * self.dp_clip * NOISE_DRAW_BOUND > FLOAT32_MAX:
            raise UsageError(
                f"--dp-noise {self.dp_noise:g} times --dp-clip {self.dp_clip:g}: noise of "
                f"standard deviation {update_noise * self.dp_clip:.3g} (draws up to "
                f"{NOISE_DRAW_BOUND:g} times that) overflows float32, whose largest value is "
                f"{FLOAT32_MAX:.3g}"
            )
        if self.dp_noise_seed is not None and not 0 <= self.dp_noise_seed < 2**32:
            raise UsageError(f"--dp-noise-seed must be in [0, 2^32), got {self.dp_noise_seed}")

    def _validate_simulation(self, participants: int) -> None:
        """--dp-noise-cohort N and --dp-population M (a simulated deployment): N at least
        the real expected cohort (less would add less noise than this run's own cohort
        needs), M at least the clients that train, N at most M."""
        cohort, population = self.dp_noise_cohort, self.dp_population
        for name, value in (("dp_noise_cohort", cohort), ("dp_population", population)):
            if value is not None and value < 1:
                raise UsageError(f"--{_flag(name)} must be a positive integer, got {value}")
        if population is not None and population < participants:
            raise UsageError(
                f"--dp-population {population} is below the {participants} clients that "
                "train: the simulated population must hold them"
            )
        if cohort is None:
            return
        if population is None:
            raise UsageError(
                f"--dp-noise-cohort {cohort} needs --dp-population M: the population a cohort "
                f"of {cohort} is drawn from, for the accountant's rate {cohort} / M"
            )
        expected = self.dp_sample_rate(participants) * participants
        if cohort < expected * (1 - 1e-12):
            raise UsageError(
                f"--dp-noise-cohort {cohort} is below this run's expected cohort of "
                f"{expected:g} clients a round: it would add less noise than the real cohort "
                f"needs; use at least {math.ceil(expected * (1 - 1e-12))}"
            )
        if cohort > population:
            raise UsageError(
                f"--dp-noise-cohort {cohort} exceeds --dp-population {population}: a cohort "
                "is drawn from the population"
            )

    def _validate_adaptive_clipping(self, participants: int) -> None:
        """--dp-clip-quantile Q (and its step and count noise): Q in (0, 1), a finite
        initial bound, a positive step, and count noise large enough that the update's
        noise multiplier (z^-2 - (2 sigma_b)^-2)^-1/2 exists."""
        quantile = self.dp_clip_quantile
        if quantile is None:
            return
        if not 0 < quantile < 1:
            raise UsageError(f"--dp-clip-quantile must be in (0, 1), got {quantile:g}")
        if self.dp_clip == math.inf:
            raise UsageError(
                "--dp-clip-quantile needs a finite --dp-clip: it is the initial clip bound"
            )
        if self.dp_clip_lr is not None and not self.dp_clip_lr > 0:
            raise UsageError(f"--dp-clip-lr must be positive, got {self.dp_clip_lr:g}")
        if self.dp_clip_count_noise is not None and self.dp_clip_count_noise < 0:
            raise UsageError(
                f"--dp-clip-count-noise must be >= 0, got {self.dp_clip_count_noise:g}"
            )
        sigma = self.dp_clip_count_std(participants)
        if self.dp_noise > 0 and not 2 * sigma > self.dp_noise:
            share = 1 / CLIP_COUNT_NOISE_SHARE
            default = (
                f" (the default: the noise cohort {self.dp_noise_cohort_size(participants):g} "
                f"/ {share:g}; a cohort above {self.dp_noise / 2 * share:g} clients, or "
                "--dp-noise-cohort, makes it enough)"
                if self.dp_clip_count_noise is None
                else ""
            )
            raise UsageError(
                f"--dp-noise {self.dp_noise:g} with adaptive clipping needs "
                f"--dp-clip-count-noise above {self.dp_noise / 2:g}, got {sigma:g}{default}: "
                "the count of unclipped clients takes a share of the privacy budget, and the "
                "update's noise multiplier (z^-2 - (2 sigma_b)^-2)^-1/2 exists only if "
                "2 sigma_b > z"
            )

    def _validate_compression(self) -> None:
        from fedmpi.compression import CompressionSpec  # torch: imported only to validate

        try:
            spec = CompressionSpec.parse(self.compress)
        except ValueError as exc:
            raise UsageError(f"--compress: {exc}") from None
        if self.error_feedback and spec.kind == "none":
            raise UsageError(
                "--error-feedback needs --compress (with none, nothing is dropped to feed back)"
            )

    def _validate_tracking(self) -> None:
        """Refuse what W&B or TensorBoard would refuse only after set-up: an empty
        directory, or a project name W&B rejects (its own rules: at most 128 characters,
        none of / \\ # ? % :)."""
        if self.tensorboard is not None and not self.tensorboard.strip():
            raise UsageError("--tensorboard needs a directory, got an empty string")
        if self.wandb is None:
            return
        bad = sorted(set(self.wandb) & set("/\\#?%:"))
        if not self.wandb.strip() or len(self.wandb) > 128 or bad:
            reason = f"it contains {' '.join(bad)}" if bad else "it needs 1 to 128 characters"
            raise UsageError(f"--wandb: {self.wandb!r} is not a W&B project name: {reason}")

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

    def dp_noise_cohort_size(self, participants: int) -> float:
        """m, the cohort whose noise DP-FedAvg adds (std z C / m on the average): the
        expected cohort q K, or --dp-noise-cohort (a simulated deployment)."""
        if self.dp_noise_cohort is not None:
            return float(self.dp_noise_cohort)
        return self.dp_sample_rate(participants) * participants

    def dp_accounting_population(self, participants: int) -> int:
        """The population the accountant samples from: --dp-population, or the clients
        that train."""
        return self.dp_population if self.dp_population is not None else participants

    def dp_accounting_rate(self, participants: int) -> float:
        """The accountant's sampling rate: q, or m / --dp-population (simulated)."""
        if self.dp_population is None:
            return self.dp_sample_rate(participants)
        return self.dp_noise_cohort_size(participants) / self.dp_population

    def dp_clip_count_std(self, participants: int) -> float:
        """sigma_b, the std of the noise on the count of unclipped clients (adaptive
        clipping; 0 without it): --dp-clip-count-noise, or m / 20 (0 without noise)."""
        if self.dp_clip_quantile is None:
            return 0.0
        if self.dp_clip_count_noise is not None:
            return self.dp_clip_count_noise
        if self.dp_noise == 0:
            return 0.0
        return CLIP_COUNT_NOISE_SHARE * self.dp_noise_cohort_size(participants)

    def dp_update_noise(self, participants: int) -> float:
        """z_Delta, the noise multiplier of the update: --dp-noise z, or under adaptive
        clipping (z^-2 - (2 sigma_b)^-2)^-1/2, so that the update and the count together
        are one Gaussian mechanism of multiplier z (Andrew et al. 2021, section 3); inf
        where no z_Delta does that (2 sigma_b <= z, refused)."""
        z = self.dp_noise
        if self.dp_clip_quantile is None or z == 0:
            return z
        sigma = self.dp_clip_count_std(participants)
        if not 2 * sigma > z:
            return math.inf
        return (z**-2 - (2 * sigma) ** -2) ** -0.5

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


def outside_the_math() -> set[str]:
    """Settings that never change what a run computes (``math=False``)."""
    return {f.name for f in _FIELDS.values() if not f.metadata["math"]}


def seeds() -> set[str]:
    """Settings that are seeds: they change the math, but are what varies between the
    repetitions of one configuration."""
    return {f.name for f in _FIELDS.values() if f.metadata.get("seed")}


def config_fields() -> list[dataclasses.Field]:
    """The Config fields, in declaration order (the order of --help)."""
    return list(_FIELDS.values())
