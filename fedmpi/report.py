"""Summarise many runs: ``python -m fedmpi.report RUN_DIR... [--output DIR] [--reach X]``.

The paper's study (arXiv 2102.00875) is a grid of runs (model x task x number of clients),
each writing its own ``results.h5``, repeated over seeds. This command groups the runs by
their whole configuration except the seed (``fedmpi.report_runs``) and writes one row per
group to ``summary.csv`` and ``summary.md``: the number of seeds, the mean and 95 %
confidence half-width of the final and best accuracy and macro-F1, the test set's
majority-class rate, how many seeds collapsed (not better than the majority class), the
rounds each needs to reach X % of the 1-client (centralized) best accuracy, the bytes sent
and the seconds per round; and figures with error bands (``fedmpi.report_plots``).

A RUN_DIR is a run directory holding ``results.h5``, a parent directory (searched
recursively), or a ``results.h5`` file itself. Run paths in the tables are relative to the
arguments' common directory, so the same runs give the same files from any working
directory. Missing paths and unreadable files are reported with one line and exit code 2,
like ``python -m fedmpi``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from fedmpi.report_runs import (
    COLLAPSE_F1_MARGIN,
    COLLAPSE_STANDARD_ERRORS,
    Group,
    ReportError,
    find_results,
    group_runs,
    load_run,
)

PROG = "python -m fedmpi.report"
DEFAULT_REACH = 90.0

COLUMNS = [
    "model",
    "dataset",
    "clients",
    "setting",
    "seeds",
    "rounds",
    "majority_rate",
    "final_accuracy",
    "final_accuracy_ci95",
    "best_accuracy",
    "best_accuracy_ci95",
    "final_macro_f1",
    "final_macro_f1_ci95",
    "best_macro_f1",
    "best_macro_f1_ci95",
    "collapsed",
    "rounds_to_reach",
    "reached",
    "bytes_per_client_round",
    "bytes_total",
    "seconds_per_round",
    "epsilon",
    "client_accuracy_mean",
    "client_accuracy_worst",
    "client_accuracy_p10",
    "client_accuracy_std",
    "holdout_accuracy",
    "runs",
]


def summary_rows(groups: list[Group], reach: float, root: Path) -> list[dict[str, Any]]:
    """One dict per group with the COLUMNS; None where a value does not apply."""
    references = {
        g.first.group_key(): g.stat(lambda r: r.best[0])[0] for g in groups if g.first.clients == 1
    }
    rows = []
    for group in groups:
        run = group.first
        target = references.get(run.reference_key())
        reaching = (
            []
            if target is None
            else [r.first_round_reaching(reach / 100 * target) for r in group.runs]
        )
        reached = [x for x in reaching if x is not None]
        final_acc = group.stat(lambda r: r.final_accuracy)
        best_acc = group.stat(lambda r: r.best[0])
        final_f1 = group.stat(lambda r: r.final_macro_f1)
        best_f1 = group.stat(lambda r: r.best_macro_f1)
        collapsed = [r.collapsed for r in group.runs if r.collapsed is not None]
        rows.append(
            {
                "model": run.model,
                "dataset": run.dataset,
                "clients": run.clients,
                "setting": group.setting,
                "seeds": len(group.runs),
                "rounds": int(max(r.rounds.size for r in group.runs)),
                "majority_rate": _or_none(run.majority_rate),
                "final_accuracy": _or_none(final_acc[0]),
                "final_accuracy_ci95": _or_none(final_acc[1]),
                "best_accuracy": _or_none(best_acc[0]),
                "best_accuracy_ci95": _or_none(best_acc[1]),
                "final_macro_f1": _or_none(final_f1[0]),
                "final_macro_f1_ci95": _or_none(final_f1[1]),
                "best_macro_f1": _or_none(best_f1[0]),
                "best_macro_f1_ci95": _or_none(best_f1[1]),
                "collapsed": f"{sum(collapsed)}/{len(group.runs)}" if collapsed else None,
                "rounds_to_reach": sum(reached) / len(reached) if reached else None,
                "reached": None if target is None else f"{len(reached)}/{len(group.runs)}",
                "bytes_per_client_round": _or_none(_payload(group)),
                "bytes_total": _or_none(group.stat(lambda r: r.bytes_total)[0]),
                "seconds_per_round": _or_none(
                    group.stat(lambda r: float(_nanmean(r.round_seconds)))[0]
                ),
                "epsilon": _or_none(group.stat(lambda r: r.final_epsilon)[0]),
                **{
                    f"client_accuracy_{key}": _or_none(
                        group.stat(lambda r, k=key: r.final_client_spread().get(k, math.nan))[0]
                    )
                    for key in ("mean", "worst", "p10", "std")
                },
                "holdout_accuracy": _or_none(group.stat(lambda r: r.final_holdout_accuracy)[0]),
                "runs": ";".join(_relative(r.path, root) for r in group.runs),
            }
        )
    return rows


def _payload(group: Group) -> float:
    values = [r.payload_bytes for r in group.runs if r.payload_bytes is not None]
    return float(values[0][0]) if values else math.nan


def _nanmean(values: np.ndarray | None) -> float:
    if values is None or np.isnan(values).all():
        return math.nan
    return float(np.nanmean(values))


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _or_none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_cell(row[c], 6) for c in COLUMNS])


def _pm(row: dict[str, Any], key: str) -> str:
    mean, half = row[key], row[f"{key}_ci95"]
    if mean is None:
        return ""
    return f"{mean:.3f}" + ("" if half is None else f" ± {half:.3f}")


def write_markdown(
    rows: list[dict[str, Any]], figures: list[Path], reach: float, path: Path
) -> None:
    lines = [
        "# fedmpi report",
        "",
        f"{len(rows)} configurations, {sum(r['seeds'] for r in rows)} runs. Each row: the mean "
        "over its seeds ± the half-width of a 95 % Student-t confidence interval (none for "
        f"one seed). `collapsed`: seeds whose final accuracy is within "
        f"{COLLAPSE_STANDARD_ERRORS:g} standard errors of the test set's majority-class rate "
        f"(or whose macro-F1 is within {COLLAPSE_F1_MARGIN:g} of a constant predictor's). "
        f"`rounds to {reach:g} %`: mean first round reaching {reach:g} % of the 1-client "
        "run's mean best accuracy (same configuration otherwise), over the seeds that "
        "reached it (`reached`). Bytes: what one client uploads per round (the Allreduce "
        "payload), and all clients over the run.",
        "",
        "| model | dataset | clients | setting | seeds | majority | final acc | best acc "
        f"| final macro-F1 | collapsed | rounds to {reach:g} % | reached | MB/client/round "
        "| s/round |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [
            row["model"],
            row["dataset"],
            str(row["clients"]),
            row["setting"],
            str(row["seeds"]),
            _cell(row["majority_rate"], 3),
            _pm(row, "final_accuracy"),
            _pm(row, "best_accuracy"),
            _pm(row, "final_macro_f1"),
            _cell(row["collapsed"], 0),
            _cell(row["rounds_to_reach"], 1),
            _cell(row["reached"], 0),
            ""
            if row["bytes_per_client_round"] is None
            else f"{row['bytes_per_client_round'] / 1e6:.1f}",
            _cell(row["seconds_per_round"], 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    clients = [r for r in rows if r["client_accuracy_mean"] is not None or r["epsilon"] is not None]
    if clients:
        lines += [
            "",
            "## Privacy and clients",
            "",
            "Per-client accuracy on each client's own held-out examples at the last scored "
            "round (mean over seeds of: the mean, worst, 10th percentile and standard "
            "deviation across clients); `unseen`: pooled accuracy on clients that never "
            "trained; epsilon of DP-FedAvg after the last round (inf: no noise).",
            "",
            "| model | dataset | clients | setting | seeds | final acc | epsilon | client mean "
            "| worst | p10 | spread (sd) | unseen |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in clients:
            cells = [
                row["model"],
                row["dataset"],
                str(row["clients"]),
                row["setting"],
                str(row["seeds"]),
                _pm(row, "final_accuracy"),
                _cell(row["epsilon"], 2),
            ]
            cells += [
                _cell(row[f"client_accuracy_{k}"], 3) for k in ("mean", "worst", "p10", "std")
            ]
            cells.append(_cell(row["holdout_accuracy"], 3))
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
        description="Tables and figures from fedmpi runs, grouped over seeds: accuracy and "
        "macro-F1 with 95%% intervals, majority-class baselines and collapse, rounds to "
        "reach the 1-client accuracy, bytes and seconds per round.",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="a run directory (holding results.h5), a parent directory searched "
        "recursively, or a results.h5 file",
    )
    parser.add_argument(
        "--output",
        "--out",
        dest="output",
        default="report",
        help="output directory (default: ./report)",
    )
    parser.add_argument(
        "--reach",
        type=float,
        default=DEFAULT_REACH,
        metavar="X",
        help="convergence speed: rounds to reach X %% of the 1-client run's best accuracy "
        f"(default: {DEFAULT_REACH:g})",
    )
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
        if not 0 < args.reach <= 100:
            raise ReportError(f"--reach must be in (0, 100], got {args.reach:g}")
        runs = []
        for path in find_results(args.runs):
            try:
                runs.append(load_run(path))
            except ReportError as exc:
                if not args.skip_invalid:
                    raise
                _warn(f"skipped {exc}")
        if not runs:
            raise ReportError("no readable results files")
        out = Path(args.output).expanduser()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReportError(f"cannot create output directory {out}: {exc.strerror}") from exc
    except ReportError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    groups = group_runs(runs, _warn)
    root = Path(os.path.commonpath([Path(p).expanduser().resolve() for p in args.runs]))
    if root.is_file():
        root = root.parent
    rows = summary_rows(groups, args.reach, root)
    write_csv(rows, out / "summary.csv")
    figures = _figures(groups, out)
    write_markdown(rows, figures, args.reach, out / "summary.md")
    print(
        f"{len(runs)} runs in {len(groups)} configurations -> {out / 'summary.md'}, "
        f"summary.csv, {len(figures)} figures"
    )
    return 0


def _figures(groups: list[Group], out: Path) -> list[Path]:
    """The figures, or none (with a warning) where matplotlib is not installed."""
    try:
        from fedmpi import report_plots
    except ImportError as exc:
        _warn(f"figures skipped: {exc} (pip install matplotlib)")
        return []
    return report_plots.write_figures(groups, out)


if __name__ == "__main__":
    sys.exit(main())
