"""The keys of ``OUTPUT/results.h5``, named once: each one's kind, shape, when it is
written and what it means.

Everything that writes the file (``fedmpi.train``'s set-up of it, ``fedmpi.prepare``'s
test-set identity, ``fedmpi.round``'s row, the hooks' rows in ``fedmpi.diagnostics`` and
``fedmpi.privacy``) takes its keys from here, ``fedmpi.results.ResultsWriter`` refuses a
key that is not named here (or is written as another kind), the report
(``fedmpi.report_runs``) and the live trackers read through these names, and the results
table of docs/results.md is generated from ``KEYS`` (``python -m fedmpi.reference``;
``tests/test_docs.py`` checks it). A new key is one ``_key(...)`` line below.

Kinds: an **attribute** of the file's root (a number or a string; JSON for lists), a
**static** dataset written once, or a **per round** dataset with one row per round (NaN,
or -1 for integers, in rounds that did not measure it; row i belongs to ``round[i]``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

ATTRIBUTE, STATIC, PER_ROUND = "attribute", "static", "per round"
KINDS = (ATTRIBUTE, STATIC, PER_ROUND)


@dataclass(frozen=True)
class Key:
    name: str
    kind: str  # ATTRIBUTE, STATIC or PER_ROUND
    shape: str  # of one value (a row, for PER_ROUND): "" for a scalar, else its axes
    when: str  # the settings under which it is written, as Markdown ("" = always)
    meaning: str


KEYS: dict[str, Key] = {}


def _key(name: str, kind: str, meaning: str, *, shape: str = "", when: str = "") -> str:
    assert kind in KINDS and name not in KEYS, name
    KEYS[name] = Key(name, kind, shape, when, meaning)
    return name


def named(name: str) -> str:
    """``name``, if it is a results key named here; else a KeyError saying where to name it."""
    if name not in KEYS:
        raise KeyError(
            f"{name!r} is not a results.h5 key named in fedmpi/results_keys.py: add a "
            "_key(...) line there (kind, shape, when, meaning), then regenerate "
            "docs/results.md with python -m fedmpi.reference"
        )
    return name


def check(kind: str, names: Iterable[str]) -> None:
    """Raise ValueError unless every one of ``names`` is named here, as a key of ``kind``."""
    for name in names:
        try:
            key = KEYS[named(name)]
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        if key.kind != kind:
            raise ValueError(f"results key {name!r} is {key.kind}, not {kind}")


# Scored sets (``metric(split, measure)``): the test set, the validation set
# (--val-samples), the training clients' own test rows and the held-out clients' rows.
SPLITS = ("test", "val", "client_test", "holdout")


def metric(split: str, measure: str) -> str:
    """``metrics/{split}_{measure}``, e.g. ``metric("val", "accuracy")``."""
    return named(f"metrics/{split}_{measure}")


def timing(phase: str) -> str:
    """``timing/{phase}_s``, the seconds rank 0 spent in one phase of the round."""
    return named(f"timing/{phase}_s")


_VAL = "`--val-samples`"
_CLIENTS = "`--eval-clients`"
_DP = "`--dp-clip`"
_NORMS = "`--diagnostics norms` or `full`"
_FULL = "`--diagnostics full`"

# ------------------------------------------------------------------ root attributes
CONFIG = _key("config", ATTRIBUTE, "the run's full configuration (the latest launch's) as JSON")
LABEL_NAMES = _key("label_names", ATTRIBUTE, "class names in label-id order, as JSON")
LAUNCHES = _key(
    "launches",
    ATTRIBUTE,
    "JSON list, one entry per launch of the run (resumes add one): its first round, "
    "configuration, code revision, ranks and start time",
)
NUM_CLIENTS = _key("num_clients", ATTRIBUTE, "federated clients")
WORLD_SIZE = _key("world_size", ATTRIBUTE, "MPI ranks of the latest launch")
LAYER_GROUPS = _key(
    "layer_groups",
    ATTRIBUTE,
    "JSON list of the layer groups that `diagnostics/layer_drift` and "
    "`diagnostics/client_update_cosine_by_group` are per",
)
CODE_REVISION = _key(
    "code_revision", ATTRIBUTE, "the git commit that ran (`+dirty` if the tree was edited)"
)
DATA_SHA256 = _key("data_sha256", ATTRIBUTE, "the tokenized data set's content hash")
HOW_SPLIT = _key("how_split", ATTRIBUTE, "how train and test were split, and what was dropped")
MAJORITY_CLASS = _key("majority_class", ATTRIBUTE, "the test set's most frequent class")
MAJORITY_RATE = _key(
    "majority_rate", ATTRIBUTE, "its share of the test set: a constant predictor's accuracy"
)
MAJORITY_MACRO_F1 = _key("majority_macro_f1", ATTRIBUTE, "the macro-F1 of that constant predictor")
CHANCE = _key("chance", ATTRIBUTE, "1 / classes")
TEST_EXAMPLES = _key("test_examples", ATTRIBUTE, "examples in the evaluated test set")
TEST_SHA256 = _key(
    "test_sha256",
    ATTRIBUTE,
    "hash of the evaluated test examples (equal hashes: scored on the same examples)",
)
VAL_EXAMPLES = _key("val_examples", ATTRIBUTE, "examples in the validation set", when=_VAL)
VAL_MAJORITY_RATE = _key(
    "val_majority_rate", ATTRIBUTE, "the validation set's majority-class share", when=_VAL
)
VAL_SHA256 = _key("val_sha256", ATTRIBUTE, "hash of the validation examples", when=_VAL)
DP_DELTA = _key("dp_delta", ATTRIBUTE, "delta of the reported epsilons", when=_DP)
DP_SAMPLE_RATE = _key("dp_sample_rate", ATTRIBUTE, "q, the Poisson rate of the cohorts", when=_DP)
DP_DENOMINATOR = _key(
    "dp_denominator", ATTRIBUTE, "q K, the fixed denominator of the average", when=_DP
)
DP_ACCOUNTANT = _key(
    "dp_accountant",
    ATTRIBUTE,
    "`prv`: what `privacy/epsilon` comes from (files without it hold RDP epsilons there)",
    when=_DP,
)
DP_NOISE_SEED_GIVEN = _key(
    "dp_noise_seed_given",
    ATTRIBUTE,
    "whether `--dp-noise-seed` made the noise reproducible (else a secret key)",
    when=_DP,
)
DP_SIMULATED = _key(
    "dp_simulated",
    ATTRIBUTE,
    "whether the epsilon is of a simulated deployment (`--dp-noise-cohort`, "
    "`--dp-population`): the noise of another cohort, the rate of another population",
    when=_DP,
)
DP_NOISE_COHORT = _key(
    "dp_noise_cohort",
    ATTRIBUTE,
    "m, the cohort whose noise was added (std z C / m on the average)",
    when="`--dp-noise-cohort` or `--dp-population`",
)
DP_POPULATION = _key(
    "dp_population",
    ATTRIBUTE,
    "the population the accountant samples from",
    when="`--dp-noise-cohort` or `--dp-population`",
)
DP_ACCOUNTANT_RATE = _key(
    "dp_accountant_rate",
    ATTRIBUTE,
    "the accountant's sampling rate, `dp_noise_cohort` / `dp_population`",
    when="`--dp-noise-cohort` or `--dp-population`",
)
DP_UPDATE_NOISE = _key(
    "dp_update_noise",
    ATTRIBUTE,
    "z_Delta, the update's noise multiplier: (z^-2 - (2 sigma_b)^-2)^-1/2, so that update "
    "and count together spend what `--dp-noise` z alone would",
    when="`--dp-clip-quantile`",
)
DP_CLIP_COUNT_NOISE = _key(
    "dp_clip_count_noise",
    ATTRIBUTE,
    "sigma_b, the std of the noise on the count of unclipped clients",
    when="`--dp-clip-quantile`",
)

# ------------------------------------------------------------------ written once
CLIENT_SIZES = _key("clients/sizes", STATIC, "each client's training examples", shape="clients")
CLIENT_RANK = _key("clients/rank", STATIC, "the rank hosting each client", shape="clients")
CLIENT_LABEL_HISTOGRAM = _key(
    "clients/label_histogram",
    STATIC,
    "each client's training examples per class",
    shape="clients x classes",
)
CLIENT_HOLDOUT = _key(
    "clients/holdout",
    STATIC,
    "1 for a client that never trains (`--holdout-clients`)",
    shape="clients",
)
CLIENT_EVAL_SIZES = _key(
    "clients/eval_sizes",
    STATIC,
    "each client's examples it is scored on: its local test rows (`--eval-clients`), a "
    "held-out client's whole shard; else 0",
    shape="clients",
)

# ------------------------------------------------------------------ one row per round
ROUND = _key("round", PER_ROUND, "the round number")
LAUNCH = _key("launch", PER_ROUND, "which launch (index into `launches`) ran the round")
TRAIN_LOSS = _key(
    "metrics/train_loss", PER_ROUND, "mean local training loss over all clients and local steps"
)
for _split, _when, _what in (
    ("test", "", "the global model on the test set"),
    ("val", _VAL, "the global model on the validation set"),
):
    _key(f"metrics/{_split}_accuracy", PER_ROUND, f"{_what}: accuracy", when=_when)
    _key(f"metrics/{_split}_loss", PER_ROUND, f"{_what}: mean loss", when=_when)
    _key(f"metrics/{_split}_macro_f1", PER_ROUND, f"{_what}: macro-F1", when=_when)
    _key(
        f"metrics/{_split}_confusion",
        PER_ROUND,
        f"{_what}: confusion matrix, rows the true class, columns the predicted one",
        shape="classes x classes",
        when=_when,
    )
for _split, _when, _what in (
    ("client_test", _CLIENTS, "the training clients' own test rows, pooled"),
    ("holdout", "`--holdout-clients`", "the held-out clients' whole shards, pooled"),
):
    _key(f"metrics/{_split}_accuracy", PER_ROUND, f"{_what}: accuracy", when=_when)
    _key(f"metrics/{_split}_macro_f1", PER_ROUND, f"{_what}: macro-F1", when=_when)
TEST_ACCURACY = metric("test", "accuracy")
TEST_LOSS = metric("test", "loss")
TEST_MACRO_F1 = metric("test", "macro_f1")
TEST_CONFUSION = metric("test", "confusion")
VAL_ACCURACY = metric("val", "accuracy")
HOLDOUT_ACCURACY = metric("holdout", "accuracy")
CLIENT_TEST_ACCURACY = _key(
    "clients/test_accuracy",
    PER_ROUND,
    "each client's accuracy on its own test rows, a held-out client's on its whole shard "
    "(NaN: none)",
    shape="clients",
    when="`--eval-clients` or `--holdout-clients`",
)
COHORT = _key("clients/cohort", PER_ROUND, "1 for each client that trained", shape="clients")
SKIPPED = _key(
    "clients/skipped",
    PER_ROUND,
    "1 for a client skipped as non-finite (`--on-nonfinite skip`)",
    shape="clients",
)
PAYLOAD_BYTES = _key("comm/payload_bytes", PER_ROUND, "bytes in the round's Allreduce")
CLIENT_UPLOAD_BYTES = _key(
    "comm/client_upload_bytes",
    PER_ROUND,
    "bytes each client's compressed update would take on a wire: values, scales, indices "
    "(NaN: it uploaded nothing); docs/compression.md",
    shape="clients",
    when="--compress",
)
for _phase, _what in (
    ("train", "local training of its clients"),
    ("wait", "waiting for the slowest rank before the Allreduce"),
    ("allreduce", "the Allreduce and the server step"),
    ("diagnostics", "the hooks after the server step (diagnostics' gathering)"),
    ("eval", "evaluation"),
    ("round", "the whole round"),
):
    _key(f"timing/{_phase}_s", PER_ROUND, f"rank 0's seconds: {_what}")
ROUND_SECONDS = timing("round")
UPDATE_NORM = _key(
    "diagnostics/client_update_norm",
    PER_ROUND,
    "each client's update L2 norm (NaN: not in the cohort, or skipped)",
    shape="clients",
    when=_NORMS,
)
GLOBAL_UPDATE_NORM = _key(
    "diagnostics/global_update_norm",
    PER_ROUND,
    "the global model's change over the round, L2 norm",
    when=_NORMS,
)
UPDATE_COSINE = _key(
    "diagnostics/client_update_cosine",
    PER_ROUND,
    "cosine of each client's update to the mean of the *other* clients' updates",
    shape="clients",
    when=_FULL,
)
UPDATE_COSINE_NO_EMBEDDINGS = _key(
    "diagnostics/client_update_cosine_no_embeddings",
    PER_ROUND,
    "the same without the embeddings",
    shape="clients",
    when=_FULL,
)
UPDATE_COSINE_BY_GROUP = _key(
    "diagnostics/client_update_cosine_by_group",
    PER_ROUND,
    "the same per layer group (`layer_groups`)",
    shape="clients x groups",
    when=_FULL,
)
LAYER_DRIFT = _key(
    "diagnostics/layer_drift",
    PER_ROUND,
    "the global model's change per layer group, relative to the group's norm",
    shape="groups",
    when=_FULL,
)
EPSILON = _key(
    "privacy/epsilon",
    PER_ROUND,
    "epsilon spent so far at `dp_delta` (PRV accountant; inf without noise)",
    when=_DP,
)
EPSILON_RDP = _key(
    "privacy/epsilon_rdp", PER_ROUND, "the RDP accountant's epsilon, looser", when=_DP
)
CLIPPED_UPDATE_NORM = _key(
    "privacy/clipped_update_norm",
    PER_ROUND,
    "each client's update norm after clipping (NaN: not in the cohort, or skipped)",
    shape="clients",
    when=_DP,
)
CLIP_BOUND = _key(
    "privacy/clip_bound",
    PER_ROUND,
    "the clip bound C the round clipped with (adaptive clipping moves it every round)",
    when="`--dp-clip-quantile`",
)
UNCLIPPED_FRACTION = _key(
    "privacy/unclipped_fraction",
    PER_ROUND,
    "the noised share of the cohort whose update was within the bound, in [0, 1]: what "
    "moved the bound for the next round",
    when="`--dp-clip-quantile`",
)
PARAM_CRC32 = _key(
    "sync/param_crc32",
    PER_ROUND,
    "each rank's CRC32 of its parameters (all equal, or the run stopped)",
    shape="ranks",
    when="`--verify-sync`",
)


def markdown_table() -> str:
    """The results table of docs/results.md: every key, in the order named here."""
    lines = ["| key | kind | shape | written | meaning |", "|---|---|---|---|---|"]
    for key in KEYS.values():
        shape = key.shape or "scalar"
        when = f"with {key.when}" if key.when else "always"
        lines.append(f"| `{key.name}` | {key.kind} | {shape} | {when} | {key.meaning} |")
    return "\n".join(lines) + "\n"
