"""Summarise many runs: ``python -m fedmpi.report RUN_DIR... [--out DIR]``.

The paper's study (arXiv 2102.00875) is a grid of runs (model x task x number of clients),
each writing its own ``results.h5``. This command gathers them into one table (``summary.md``
and ``summary.csv``, one row per model x dataset x clients) and figures (``fedmpi.report_plots``),
so the questions the paper asks can be read off directly: how accuracy falls as clients
grow, how much slower convergence gets (rounds to reach 90% of the 1-client run's final
accuracy), and which runs collapsed to chance.

A RUN_DIR is a run directory holding ``results.h5``, a parent directory (searched
recursively), or a ``results.h5`` file itself. Missing paths and unreadable files are
reported with one line and exit code 2, like ``python -m fedmpi``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from fedmpi.results import RESULTS_NAME, read_results

PROG = "python -m fedmpi.report"
COLLAPSE_MARGIN = 0.02  # "collapsed": final accuracy within 2 points of chance
REACH_FRACTION = 0.9  # convergence speed: rounds to 90% of the 1-client final accuracy
_EPS = 1e-9  # so that exactly 2 points from chance counts as within 2 points

COLUMNS = [
    "model",
    "dataset",
    "clients",
    "rounds",
    "classes",
    "chance",
    "final_accuracy",
    "best_accuracy",
    "best_round",
    "rounds_to_90pct",
    "collapsed",
    "run",
]


class ReportError(Exception):
    """A problem with the input that the user must fix: printed as one line, exit code 2."""


@dataclass
class Run:
    """What the report needs from one results file."""

    path: Path
    model: str
    dataset: str
    clients: int
    classes: int
    rounds: np.ndarray  # round numbers (1-based), one per row written
    accuracy: np.ndarray  # test accuracy per round, NaN where not evaluated
    mean_cosine: np.ndarray | None = None  # mean client-update cosine per round
    global_norm: np.ndarray | None = None  # norm of the global update per round

    @property
    def chance(self) -> float:
        return 1.0 / self.classes

    def evaluated(self) -> tuple[np.ndarray, np.ndarray]:
        """(rounds, accuracy) of the rounds that were evaluated (NaNs dropped)."""
        keep = ~np.isnan(self.accuracy)
        return self.rounds[keep], self.accuracy[keep]

    @property
    def final_accuracy(self) -> float:
        """The last evaluated round's accuracy (a killed run keeps the rounds it finished)."""
        _, acc = self.evaluated()
        return float(acc[-1]) if acc.size else math.nan

    @property
    def best(self) -> tuple[float, int | None]:
        rounds, acc = self.evaluated()
        if not acc.size:
            return math.nan, None
        i = int(np.argmax(acc))
        return float(acc[i]), int(rounds[i])

    @property
    def collapsed(self) -> bool | None:
        final = self.final_accuracy
        if math.isnan(final):
            return None
        return abs(final - self.chance) <= COLLAPSE_MARGIN + _EPS

    def first_round_reaching(self, target: float) -> int | None:
        rounds, acc = self.evaluated()
        hits = np.flatnonzero(acc >= target - _EPS)
        return int(rounds[hits[0]]) if hits.size else None


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
    unique = dict.fromkeys(p.resolve() for p in found)
    return list(unique)


def _display_name(value: str) -> str:
    """A local path is shown by its last component; names and hub ids as given."""
    if value.startswith(("/", ".", "~")):
        return Path(value).name or value
    return value


def _per_round(data: dict[str, Any], key: str, n: int) -> np.ndarray | None:
    """A per-round dataset cut or NaN-padded to ``n`` rows (datasets are appended one by one,
    so a run killed mid-round may hold one row more in some of them)."""
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
    cfg = data["config"]
    labels = data["label_names"]
    if not isinstance(cfg, dict) or "model" not in cfg or "dataset" not in cfg:
        raise ReportError(f"{path}: its 'config' attribute has no model/dataset")
    if not isinstance(labels, list) or len(labels) < 2:
        raise ReportError(f"{path}: 'label_names' must list at least 2 classes")
    accuracy = np.asarray(data.get("metrics/test_accuracy", []), dtype=float).reshape(-1)
    n = len(accuracy)
    if n == 0:
        raise ReportError(f"{path}: no metrics/test_accuracy (no round finished?)")
    rounds = _per_round(data, "round", n)
    rounds = np.arange(1, n + 1) if rounds is None or np.isnan(rounds).any() else rounds
    cosine = _per_round(data, "diagnostics/client_update_cosine", n)
    return Run(
        path=path,
        model=_display_name(str(cfg["model"])),
        dataset=_display_name(str(cfg["dataset"])),
        clients=_num_clients(data, cfg, path),
        classes=len(labels),
        rounds=rounds.astype(int),
        accuracy=accuracy,
        mean_cosine=None if cosine is None else _row_mean(cosine.reshape(n, -1)),
        global_norm=_per_round(data, "diagnostics/global_update_norm", n),
    )


def _num_clients(data: dict[str, Any], cfg: dict[str, Any], path: Path) -> int:
    """``clients/sizes`` is the truth; ``config.clients`` is None for 'one per rank'."""
    if "clients/sizes" in data:
        return int(np.asarray(data["clients/sizes"]).size)
    for value in (cfg.get("clients"), data["attrs"].get("num_clients")):
        if value is not None:
            return int(value)
    raise ReportError(f"{path}: cannot tell the number of clients")


def load_runs(paths: list[Path], skip_invalid: bool = False) -> list[Run]:
    """Load every file; keep the newest of runs that share (model, dataset, clients)."""
    runs: dict[tuple[str, str, int], Run] = {}
    for path in paths:
        try:
            run = load_run(path)
        except ReportError as exc:
            if not skip_invalid:
                raise
            _warn(f"skipped {exc}")
            continue
        key = (run.model, run.dataset, run.clients)
        if key in runs:
            old, new = sorted([runs[key], run], key=lambda r: r.path.stat().st_mtime)
            _warn(f"{'/'.join(map(str, key))}c: two runs, keeping {new.path}, not {old.path}")
            run = new
        runs[key] = run
    return sorted(runs.values(), key=lambda r: (r.model, r.dataset, r.clients))


# ---------------------------------------------------------------------------- the table


def summary_rows(runs: list[Run], root: Path | None = None) -> list[dict[str, Any]]:
    """One dict per run with the COLUMNS; None where a value does not apply."""
    reference = {
        (r.model, r.dataset): r.final_accuracy
        for r in runs
        if r.clients == 1 and not math.isnan(r.final_accuracy)
    }
    rows = []
    for run in runs:
        best, best_round = run.best
        target = reference.get((run.model, run.dataset))
        path = run.path
        if root is not None and path.is_relative_to(root):
            path = path.relative_to(root)
        rows.append(
            {
                "model": run.model,
                "dataset": run.dataset,
                "clients": run.clients,
                "rounds": int(run.rounds.size),
                "classes": run.classes,
                "chance": run.chance,
                "final_accuracy": _or_none(run.final_accuracy),
                "best_accuracy": _or_none(best),
                "best_round": best_round,
                "rounds_to_90pct": (
                    None if target is None else run.first_round_reaching(REACH_FRACTION * target)
                ),
                "collapsed": run.collapsed,
                "run": str(path),
            }
        )
    return rows


def _or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_cell(row[c], 6) for c in COLUMNS])


def write_markdown(rows: list[dict[str, Any]], figures: list[Path], path: Path) -> None:
    lines = [
        "# fedmpi report",
        "",
        f"{len(rows)} runs. `rounds_to_90pct`: first round whose test accuracy reaches "
        f"{REACH_FRACTION:.0%} of the 1-client run's final accuracy (same model and dataset; "
        f"blank without a 1-client run or if never reached). `collapsed`: final accuracy "
        f"within {COLLAPSE_MARGIN:.2f} of chance (1 / classes).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|"
        + "|".join("---" if c in ("model", "dataset", "run") else "---:" for c in COLUMNS)
        + "|",
    ]
    for row in rows:
        cells = [_cell(row[c], 4) for c in COLUMNS]
        if row["collapsed"]:
            cells[COLUMNS.index("collapsed")] = "**yes**"
        lines.append("| " + " | ".join(cells) + " |")
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{f.stem}]({f.name})\n" for f in figures]
    path.write_text("\n".join(lines).rstrip() + "\n")


# ---------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ReportError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Tables and figures from fedmpi runs: final/best accuracy, rounds to "
        "90%% of the 1-client accuracy, collapse to chance, accuracy curves, diagnostics.",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="a run directory (holding results.h5), a parent directory searched "
        "recursively, or a results.h5 file",
    )
    parser.add_argument("--out", default="report", help="output directory (default: ./report)")
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="warn about and skip unreadable results files (e.g. runs still being written) "
        "instead of failing",
    )
    return parser


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        runs = load_runs(find_results(args.runs), args.skip_invalid)
        if not runs:
            raise ReportError("no readable results files")
        out = Path(args.out).expanduser()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReportError(f"cannot create output directory {out}: {exc.strerror}") from exc
    except ReportError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    rows = summary_rows(runs, root=Path.cwd().resolve())
    write_csv(rows, out / "summary.csv")
    figures = _figures(runs, out)
    write_markdown(rows, figures, out / "summary.md")
    print(f"{len(runs)} runs -> {out / 'summary.md'}, summary.csv, {len(figures)} figures")
    return 0


def _figures(runs: list[Run], out: Path) -> list[Path]:
    """The figures, or none (with a warning) where matplotlib is not installed."""
    try:
        from fedmpi import report_plots
    except ImportError as exc:
        _warn(f"figures skipped: {exc} (pip install matplotlib)")
        return []
    return report_plots.write_figures(runs, out)


if __name__ == "__main__":
    sys.exit(main())
