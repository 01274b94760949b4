"""Runs and groups of runs, as the report reads them: what one results file says, which
runs are seeds of one configuration, and the statistics over those seeds.

Used by ``fedmpi.report`` (tables, command line) and ``fedmpi.report_plots`` (figures).

Every run ends in one **outcome**, by rules anyone can recompute from its results.h5
(``m`` the test set's majority-class rate, ``n`` its examples, "final" the last evaluated
round):

* **collapsed**: in the final round at least 95 % of the test predictions fall in one class
  (``metrics/test_confusion``: the largest column sum over the total) *and* the final
  ``metrics/train_loss`` is at least 0.95 x its round-1 value: a constant predictor that
  did not learn. This takes precedence over the other two.
* **learned**: the final test accuracy exceeds ``m + 2 sqrt(m (1 - m) / n)``, two standard
  errors above what a constant predictor of the majority class scores.
* **slow**: neither: it trains, but is not yet clear of the majority band.

Runs written before confusion matrices were recorded have an outcome only where their
training loss fell (then they cannot have collapsed); otherwise none (shown empty).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmpi import results_keys as rk
from fedmpi.config import outside_the_math, seeds
from fedmpi.results import RESULTS_NAME, read_results

LEARNED_STANDARD_ERRORS = 2.0
COLLAPSE_PREDICTION_SHARE = 0.95
COLLAPSE_LOSS_RATIO = 0.95
OUTCOMES = ("learned", "slow", "collapsed")
_EPS = 1e-9
# Settings that do not change what a run computes, or are what varies between its seeds.
NOT_CONFIGURATION = outside_the_math() | seeds()
# Shown as their own columns (or, for clients, derived from the file), not in "setting".
OWN_COLUMNS = ("model", "dataset", "clients", "batch_size", "lr")


class ReportError(Exception):
    """A problem with the input that the user must fix: printed as one line, exit code 2."""


@dataclass
class Run:
    """What the report needs from one results file."""

    path: Path
    config: dict[str, Any]  # the run's configuration, clients resolved to a number
    classes: int
    rounds: np.ndarray  # round numbers (1-based), one per row
    accuracy: np.ndarray  # test accuracy per round, NaN where not evaluated
    macro_f1: np.ndarray
    majority_rate: float = math.nan  # of the evaluated test set (NaN in old files)
    majority_macro_f1: float = math.nan
    test_examples: int = 0
    test_sha256: str = ""
    payload_bytes: np.ndarray | None = None  # per round, what one rank sends
    upload_bytes: np.ndarray | None = None  # (rounds, clients): compressed uploads, NaN: none
    cohort_sizes: np.ndarray | None = None  # per round, clients that trained
    round_seconds: np.ndarray | None = None
    mean_cosine: np.ndarray | None = None  # per round, mean leave-one-out client cosine
    global_norm: np.ndarray | None = None
    epsilon: np.ndarray | None = None  # per round, DP-FedAvg's epsilon
    dp_simulated: bool = False  # that epsilon is a simulated deployment's (--dp-noise-cohort)
    client_accuracy: np.ndarray | None = None  # (rounds, clients), on each client's own rows
    holdout_accuracy: np.ndarray | None = None  # per round, pooled over never-trained clients
    train_loss: np.ndarray | None = None  # per round
    test_confusion: np.ndarray | None = None  # (rounds, C, C), -1 where not evaluated
    val_accuracy: np.ndarray | None = None  # per round (--val-samples), NaN where not scored
    val_majority_rate: float = math.nan

    @property
    def model(self) -> str:
        return _display_name(str(self.config["model"]))

    @property
    def dataset(self) -> str:
        return _display_name(str(self.config["dataset"]))

    @property
    def clients(self) -> int:
        return int(self.config["clients"])

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def chance(self) -> float:
        return 1.0 / self.classes

    def evaluated(self, values: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(rounds, values) of the rounds that were evaluated (accuracy by default)."""
        values = self.accuracy if values is None else values
        keep = ~np.isnan(self.accuracy)
        return self.rounds[keep], values[keep]

    @property
    def final_accuracy(self) -> float:
        """The last evaluated round's accuracy (a killed run keeps the rounds it finished)."""
        _, acc = self.evaluated()
        return float(acc[-1]) if acc.size else math.nan

    @property
    def final_macro_f1(self) -> float:
        _, f1 = self.evaluated(self.macro_f1)
        return float(f1[-1]) if f1.size else math.nan

    @property
    def best(self) -> tuple[float, int | None]:
        rounds, acc = self.evaluated()
        if not acc.size:
            return math.nan, None
        i = int(np.argmax(acc))
        return float(acc[i]), int(rounds[i])

    @property
    def best_macro_f1(self) -> float:
        _, f1 = self.evaluated(self.macro_f1)
        return float(np.max(f1)) if f1.size else math.nan

    @property
    def finished(self) -> bool:
        """Whether the file holds every round its configuration asked for."""
        return int(self.rounds[-1]) >= int(self.config.get("rounds", 0))

    @property
    def learned_threshold(self) -> float:
        """The accuracy a run must beat to count as learned (see the module doc)."""
        p, n = self.majority_rate, self.test_examples
        return p + LEARNED_STANDARD_ERRORS * math.sqrt(p * (1 - p) / n) if n else math.nan

    @property
    def final_prediction_share(self) -> float:
        """The share of the final evaluation's test predictions in its most predicted class."""
        if self.test_confusion is None:
            return math.nan
        scored = [c for c in self.test_confusion if c.min() >= 0 and c.sum() > 0]
        if not scored:
            return math.nan
        final = scored[-1]
        return float(final.sum(axis=0).max() / final.sum())

    @property
    def final_loss_ratio(self) -> float:
        """The final round's training loss over round 1's."""
        if self.train_loss is None or np.isnan(self.train_loss[[0, -1]]).any():
            return math.nan
        return float(self.train_loss[-1] / self.train_loss[0])

    @property
    def outcome(self) -> str | None:
        """learned, slow or collapsed (module doc); None where the file cannot tell."""
        share, ratio = self.final_prediction_share, self.final_loss_ratio
        if math.isnan(ratio) or math.isnan(self.learned_threshold):
            return None
        if ratio >= COLLAPSE_LOSS_RATIO - _EPS:  # the loss did not fall: look at predictions
            if math.isnan(share):  # a file from before confusion matrices were recorded
                return None
            if share >= COLLAPSE_PREDICTION_SHARE - _EPS:
                return "collapsed"
        return "learned" if self.final_accuracy > self.learned_threshold + _EPS else "slow"

    @property
    def selected_round(self) -> int | None:
        """The evaluated round of the highest validation accuracy (the earliest on ties):
        the round a user would keep without looking at the test set."""
        if self.val_accuracy is None:
            return None
        scored = ~np.isnan(self.val_accuracy)
        if not scored.any():
            return None
        best = np.flatnonzero(scored & (self.val_accuracy >= np.nanmax(self.val_accuracy)))
        return int(self.rounds[best[0]])

    def at_round(self, values: np.ndarray | None, round_: int | None) -> float:
        """``values`` (per round) at round ``round_``, NaN where there is none."""
        if values is None or round_ is None:
            return math.nan
        where = np.flatnonzero(self.rounds == round_)
        return float(values[where[0]]) if where.size else math.nan

    def first_round_reaching(self, target: float) -> int | None:
        rounds, acc = self.evaluated()
        hits = np.flatnonzero(acc >= target - _EPS)
        return int(rounds[hits[0]]) if hits.size else None

    def final_client_spread(self) -> dict[str, float]:
        """Across the clients that trained, at the last round they were scored: mean,
        worst, 10th percentile and standard deviation of their own accuracy."""
        if self.client_accuracy is None:
            return {}
        scored = [row for row in self.client_accuracy if not np.isnan(row).all()]
        if not scored:
            return {}
        last = scored[-1][~np.isnan(scored[-1])]
        return {
            "mean": float(last.mean()),
            "worst": float(last.min()),
            "p10": float(np.percentile(last, 10)),
            "std": float(last.std(ddof=1)) if last.size > 1 else math.nan,
        }

    @property
    def final_epsilon(self) -> float:
        return float(self.epsilon[-1]) if self.epsilon is not None else math.nan

    @property
    def final_holdout_accuracy(self) -> float:
        if self.holdout_accuracy is None:
            return math.nan
        values = self.holdout_accuracy[~np.isnan(self.holdout_accuracy)]
        return float(values[-1]) if values.size else math.nan

    @property
    def bytes_total(self) -> float:
        """Bytes all participating clients uploaded over the run: their compressed uploads
        where recorded (``--compress``), else each sends the payload."""
        if self.upload_bytes is not None:
            return float(np.nansum(self.upload_bytes))
        if self.payload_bytes is None or self.cohort_sizes is None:
            return math.nan
        return float(np.sum(self.payload_bytes * self.cohort_sizes))

    @property
    def bytes_per_client_round(self) -> float:
        """What one client uploads in a round: the mean of its compressed uploads where
        recorded (``--compress``), else the first round's Allreduce payload."""
        if self.upload_bytes is not None and np.isfinite(self.upload_bytes).any():
            return float(np.nanmean(self.upload_bytes))
        return float(self.payload_bytes[0]) if self.payload_bytes is not None else math.nan

    def group_key(self) -> str:
        """The configuration without what varies between seeds of one experiment."""
        return json.dumps(
            {k: v for k, v in self.config.items() if k not in NOT_CONFIGURATION}, sort_keys=True
        )

    def reference_key(self) -> str:
        """The key of the 1-client (centralized) version of this run's configuration."""
        config = {k: v for k, v in self.config.items() if k not in NOT_CONFIGURATION}
        config.update(clients=1, clients_per_round=None)
        return json.dumps(config, sort_keys=True)


def _display_name(value: str) -> str:
    """A local path is shown by its last component; names and hub ids as given."""
    if value.startswith(("/", ".", "~")):
        return Path(value).name or value
    return value


# ---------------------------------------------------------------------------- loading


def find_results(paths: list[str]) -> list[Path]:
    """Every results file under the given paths, in a stable order."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            hits = sorted(path.rglob(RESULTS_NAME))
            if not hits:
                raise ReportError(f"{raw}: no {RESULTS_NAME} in this directory or below")
            found.extend(hits)
        else:
            raise ReportError(f"{raw}: no such file or directory")
    return list(dict.fromkeys(p.resolve() for p in found))


def _per_round(data: dict[str, Any], key: str, n: int) -> np.ndarray | None:
    """A per-round dataset cut or NaN-padded to ``n`` rows."""
    if key not in data:
        return None
    values = np.asarray(data[key], dtype=float)
    out = np.full((n, *values.shape[1:]), np.nan)
    m = min(n, values.shape[0])
    out[:m] = values[:m]
    return out


def _row_mean(values: np.ndarray) -> np.ndarray:
    """Mean over clients, ignoring NaN (clients not sampled); NaN for an all-NaN row."""
    ok = ~np.isnan(values)
    counts = ok.sum(axis=1)
    sums = np.where(ok, values, 0.0).sum(axis=1)
    return np.divide(sums, counts, out=np.full(len(values), np.nan), where=counts > 0)


def load_run(path: Path) -> Run:
    """Read one results file, raising ReportError (one line) if it is not a usable one."""
    try:
        data = read_results(path)
    except Exception as exc:  # h5py raises OSError/KeyError/...; json may raise ValueError
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReportError(f"{path}: not a readable fedmpi results file ({detail})") from exc
    cfg, labels, attrs = data["config"], data["label_names"], data["attrs"]
    if not isinstance(cfg, dict) or "model" not in cfg or "dataset" not in cfg:
        raise ReportError(f"{path}: its 'config' attribute has no model/dataset")
    if not isinstance(labels, list) or len(labels) < 2:
        raise ReportError(f"{path}: 'label_names' must list at least 2 classes")
    accuracy = np.asarray(data.get(rk.TEST_ACCURACY, []), dtype=float).reshape(-1)
    n = len(accuracy)
    if n == 0:
        raise ReportError(f"{path}: no {rk.TEST_ACCURACY} (no round finished?)")
    rounds = _per_round(data, rk.ROUND, n)
    rounds = np.arange(1, n + 1) if rounds is None or np.isnan(rounds).any() else rounds
    cohort = _per_round(data, rk.COHORT, n)
    cosine = _per_round(data, rk.UPDATE_COSINE, n)
    macro_f1 = _per_round(data, rk.TEST_MACRO_F1, n)
    return Run(
        path=path,
        config={**cfg, "clients": _num_clients(data, cfg, path)},
        classes=len(labels),
        rounds=rounds.astype(int),
        accuracy=accuracy,
        macro_f1=np.full(n, np.nan) if macro_f1 is None else macro_f1,
        majority_rate=float(attrs.get(rk.MAJORITY_RATE, math.nan)),
        majority_macro_f1=float(attrs.get(rk.MAJORITY_MACRO_F1, math.nan)),
        test_examples=int(attrs.get(rk.TEST_EXAMPLES, 0)),
        test_sha256=str(attrs.get(rk.TEST_SHA256, "")),
        payload_bytes=_per_round(data, rk.PAYLOAD_BYTES, n),
        upload_bytes=_per_round(data, rk.CLIENT_UPLOAD_BYTES, n),
        cohort_sizes=None if cohort is None else cohort.reshape(n, -1).sum(axis=1),
        round_seconds=_per_round(data, rk.ROUND_SECONDS, n),
        mean_cosine=None if cosine is None else _row_mean(cosine.reshape(n, -1)),
        global_norm=_per_round(data, rk.GLOBAL_UPDATE_NORM, n),
        epsilon=_per_round(data, rk.EPSILON, n),
        dp_simulated=bool(attrs.get(rk.DP_SIMULATED, False)),
        client_accuracy=_clients_that_trained(data, n),
        holdout_accuracy=_per_round(data, rk.HOLDOUT_ACCURACY, n),
        train_loss=_per_round(data, rk.TRAIN_LOSS, n),
        test_confusion=_per_round(data, rk.TEST_CONFUSION, n),
        val_accuracy=_per_round(data, rk.VAL_ACCURACY, n),
        val_majority_rate=float(attrs.get(rk.VAL_MAJORITY_RATE, math.nan)),
    )


def _clients_that_trained(data: dict[str, Any], n: int) -> np.ndarray | None:
    """``clients/test_accuracy`` without the held-out clients (they are reported pooled)."""
    accuracy = _per_round(data, rk.CLIENT_TEST_ACCURACY, n)
    if accuracy is None:
        return None
    holdout = np.asarray(data.get(rk.CLIENT_HOLDOUT, np.zeros(accuracy.shape[1]))).astype(bool)
    return accuracy[:, ~holdout]


def _num_clients(data: dict[str, Any], cfg: dict[str, Any], path: Path) -> int:
    """``clients/sizes`` is the truth; ``config.clients`` is None for 'one per rank'."""
    if rk.CLIENT_SIZES in data:
        return int(np.asarray(data[rk.CLIENT_SIZES]).size)
    for value in (cfg.get("clients"), data["attrs"].get(rk.NUM_CLIENTS)):
        if value is not None:
            return int(value)
    raise ReportError(f"{path}: cannot tell the number of clients")


# ---------------------------------------------------------------------------- groups


def mean_and_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % Student-t confidence interval (NaN for n < 2)."""
    x = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1 or not np.isfinite(x).all():  # one value, or inf (no DP noise)
        return float(x.mean()), math.nan
    from scipy.stats import t

    half = t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(half)


@dataclass
class Group:
    """The finished runs of one configuration that differ only in ``--seed``; runs of it
    that stopped before their last round are kept apart in ``unfinished``, never averaged."""

    runs: list[Run]
    setting: str = ""  # the configuration keys that tell this group from others
    unfinished: list[Run] = field(default_factory=list)

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def arm(self) -> str:
        """A short name: clients x batch, the learning rate, and the rest of the setting."""
        run = self.first
        name = f"{run.clients}x{run.config.get('batch_size')} lr {run.config.get('lr'):g}"
        return name + (f" ({self.setting})" if self.setting else "")

    def stat(self, value) -> tuple[float, float]:
        return mean_and_ci95([value(r) for r in self.runs])

    def outcomes(self) -> dict[str, int] | None:
        """How many seeds ended in each outcome; None if any run cannot tell."""
        found = [r.outcome for r in self.runs]
        if None in found:
            return None
        return {name: found.count(name) for name in OUTCOMES}

    def curve(self, values) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rounds, mean, ci95) per round over the seeds, of ``values(run)`` (per-round
        arrays; rounds evaluated in every run)."""
        n = min(len(r.rounds) for r in self.runs)
        stacked = np.stack([values(r)[:n] for r in self.runs])
        rounds = self.first.rounds[:n]
        keep = ~np.isnan(stacked).any(axis=0)
        stats = [mean_and_ci95(list(column)) for column in stacked[:, keep].T]
        mean = np.array([m for m, _ in stats])
        half = np.array([h for _, h in stats])
        return rounds[keep], mean, half


def group_runs(runs: list[Run], warn) -> list[Group]:
    """Runs with the same configuration but the seed are one group; a second run of the
    same configuration *and* seed replaces the older one (with a warning); unfinished runs
    are kept apart (with a warning), and groups whose runs were scored on different test
    sets are flagged."""
    by_key: dict[str, dict[int, Run]] = {}
    for run in runs:
        seeds = by_key.setdefault(run.group_key(), {})
        if run.seed in seeds:
            old, new = sorted([seeds[run.seed], run], key=lambda r: r.path.stat().st_mtime)
            warn(
                f"two runs of one configuration and seed {run.seed}: keeping {new.path}, "
                f"not {old.path}"
            )
            run = new
        seeds[run.seed] = run
    groups = []
    for seeds in by_key.values():
        ordered = sorted(seeds.values(), key=lambda r: r.seed)
        done = [r for r in ordered if r.finished]
        for run in ordered:
            if not run.finished:
                warn(
                    f"{run.path}: stopped after round {int(run.rounds[-1])} of "
                    f"{run.config.get('rounds')}: left out of its group's statistics"
                )
        if done:
            groups.append(Group(done, unfinished=[r for r in ordered if not r.finished]))
    varying = _varying_keys([g.first for g in groups])
    for group in groups:
        group.setting = ", ".join(
            f"{k}={group.first.config.get(k)}" for k in varying if k not in OWN_COLUMNS
        )
        if len({r.test_sha256 for r in group.runs}) > 1:
            warn(
                f"{group.first.model}/{group.first.dataset}/{group.arm}: "
                "its seeds were scored on different test sets (test_sha256 differs)"
            )
    return sorted(
        groups,
        key=lambda g: (
            g.first.model,
            g.first.dataset,
            g.setting,
            g.first.clients,
            g.first.config.get("batch_size", 0),
            g.first.config.get("lr", 0),
        ),
    )


def _varying_keys(runs: list[Run]) -> list[str]:
    """Configuration keys whose values differ among these runs (seeds excluded)."""
    keys = sorted({k for r in runs for k in r.config} - NOT_CONFIGURATION)
    return [k for k in keys if len({json.dumps(r.config.get(k)) for r in runs}) > 1]
