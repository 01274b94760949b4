"""Summarise many runs: ``python -m fedmpi.report RUN_DIR... [--output DIR] [--reach X]``.

The paper's study (arXiv 2102.00875) is a grid of runs (model x task x number of clients),
each writing its own ``results.h5``, repeated over seeds. This command groups the finished
runs by their whole configuration except the seed (``fedmpi.report_runs``) and writes:

* ``summary.csv`` and ``summary.md``: one row per group: the number of seeds, the mean and
  95 % confidence half-width of the final accuracy and macro-F1, the test accuracy at the
  round validation selects, the test set's majority-class rate, how many seeds **learned**,
  are **slow** or **collapsed** (rules in ``fedmpi.report_runs``), the rounds each needs to
  reach X % of the 1-client (centralized) best accuracy, the bytes sent and the seconds
  per round;
* ``comparisons.csv``: every pair of groups of one model and task, the difference in mean
  final test accuracy with its 95 % interval, an exact permutation p-value and its Holm
  adjustment over the file (``fedmpi.report_stats``);
* figures with error bands (``fedmpi.report_plots``).

Every warning (an unfinished run left out, a replaced duplicate, seeds scored on different
test sets) is printed and written into summary.md.

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

from fedmpi import report_stats
from fedmpi.report_runs import (
    COLLAPSE_LOSS_RATIO,
    COLLAPSE_PREDICTION_SHARE,
    LEARNED_STANDARD_ERRORS,
    OUTCOMES,
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
    "batch_size",
    "lr",
    "setting",
    "seeds",
    "unfinished",
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
    *OUTCOMES,
    "selected_round",
    "val_at_selected",
    "test_at_selected",
    "test_at_selected_ci95",
    "rounds_to_reach",
    "reached",
    "bytes_per_client_round",
    "bytes_total",
    "seconds_per_round",
    "epsilon",
    "epsilon_simulated",
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
        outcomes = group.outcomes()
        selected = group.stat(lambda r: r.selected_round or math.nan)
        test_at = group.stat(lambda r: r.at_round(r.accuracy, r.selected_round))
        rows.append(
            {
                "model": run.model,
                "dataset": run.dataset,
                "clients": run.clients,
                "batch_size": run.config.get("batch_size"),
                "lr": f"{run.config.get('lr'):g}",
                "setting": group.setting,
                "seeds": len(group.runs),
                "unfinished": len(group.unfinished),
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
                **{
                    name: None if outcomes is None else f"{outcomes[name]}/{len(group.runs)}"
                    for name in OUTCOMES
                },
                "selected_round": _or_none(selected[0]),
                "val_at_selected": _or_none(
                    group.stat(lambda r: r.at_round(r.val_accuracy, r.selected_round))[0]
                ),
                "test_at_selected": _or_none(test_at[0]),
                "test_at_selected_ci95": _or_none(test_at[1]),
                "rounds_to_reach": sum(reached) / len(reached) if reached else None,
                "reached": None if target is None else f"{len(reached)}/{len(group.runs)}",
                "bytes_per_client_round": _or_none(_payload(group)),
                "bytes_total": _or_none(group.stat(lambda r: r.bytes_total)[0]),
                "seconds_per_round": _or_none(
                    group.stat(lambda r: float(_nanmean(r.round_seconds)))[0]
                ),
                "epsilon": _or_none(group.stat(lambda r: r.final_epsilon)[0]),
                "epsilon_simulated": (
                    any(r.dp_simulated for r in group.runs) if run.epsilon is not None else None
                ),
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
    """Bytes a client sends a round: its compressed upload (``comm/client_upload_bytes``)
    where the runs record it, else the Allreduce payload."""
    values = [r.bytes_per_client_round for r in group.runs]
    return next((v for v in values if not math.isnan(v)), math.nan)


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


def write_comparisons(rows: list[report_stats.Comparison], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(COMPARISON_COLUMNS)
        for row in rows:
            writer.writerow([_cell(getattr(row, c), 6) for c in COMPARISON_COLUMNS])


COMPARISON_COLUMNS = [
    "model", "dataset", "a", "b", "n_a", "n_b", "mean_a", "mean_b", "difference",
    "low", "high", "p", "p_holm",
]  # fmt: skip


def comparisons(groups: list[Group]) -> list[report_stats.Comparison]:
    """Every pair of groups of one model and task on final test accuracy, Holm-adjusted
    over all of them."""
    by_task: dict[tuple[str, str], list[Group]] = {}
    for group in groups:
        by_task.setdefault((group.first.model, group.first.dataset), []).append(group)
    rows = []
    for (model, dataset), members in by_task.items():
        named = [(g.arm, [r.final_accuracy for r in g.runs]) for g in members]
        rows += report_stats.compare(model, dataset, named)
    return report_stats.adjust(rows)


def _outcome_cell(row: dict[str, Any]) -> str:
    if row["learned"] is None:
        return ""
    return " / ".join(row[name].split("/")[0] for name in OUTCOMES) + f" of {row['seeds']}"


def write_markdown(
    rows: list[dict[str, Any]],
    compared: list[report_stats.Comparison],
    figures: list[Path],
    warnings: list[str],
    reach: float,
    path: Path,
) -> None:
    lines = [
        "# fedmpi report",
        "",
        f"{len(rows)} configurations, {sum(r['seeds'] for r in rows)} finished runs. Each "
        "row: the mean over its seeds ± the half-width of a 95 % Student-t confidence "
        "interval (none for one seed). Outcomes, per seed, from its final round: "
        f"**collapsed** if >= {COLLAPSE_PREDICTION_SHARE:.0%} of the test predictions fall "
        f"in one class and the training loss ended >= {COLLAPSE_LOSS_RATIO:g} x its round-1 "
        f"value; else **learned** if the test accuracy exceeds the majority rate m by more "
        f"than {LEARNED_STANDARD_ERRORS:g} standard errors, m + "
        f"{LEARNED_STANDARD_ERRORS:g} sqrt(m (1 - m) / n); else **slow**. `selected`: the "
        "round of the best validation accuracy (--val-samples), and the test accuracy "
        f"there. `rounds to {reach:g} %`: mean first round reaching {reach:g} % of the "
        "1-client run's mean best test accuracy (same configuration otherwise), over the "
        "seeds that reached it (`reached`). Bytes: what one client uploads per round (its "
        "compressed update with --compress, else the Allreduce payload).",
        "",
        "| model | dataset | arm | seeds | majority | final acc | selected round "
        "| test acc at selected | final macro-F1 | learned / slow / collapsed "
        f"| rounds to {reach:g} % | reached | MB/client/round | s/round |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        arm = f"{row['clients']}x{row['batch_size']} lr {row['lr']}" + (
            f" ({row['setting']})" if row["setting"] else ""
        )
        cells = [
            row["model"],
            row["dataset"],
            arm,
            str(row["seeds"]),
            _cell(row["majority_rate"], 3),
            _pm(row, "final_accuracy"),
            _cell(row["selected_round"], 1),
            _pm(row, "test_at_selected"),
            _pm(row, "final_macro_f1"),
            _outcome_cell(row),
            _cell(row["rounds_to_reach"], 1),
            _cell(row["reached"], 0),
            ""
            if row["bytes_per_client_round"] is None
            else f"{row['bytes_per_client_round'] / 1e6:.1f}",
            _cell(row["seconds_per_round"], 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if compared:
        lines += [
            "",
            "## Comparisons",
            "",
            "Final test accuracy, a - b: the difference of the means with its Welch 95 % "
            "interval, the exact permutation p-value over the seeds and its Holm adjustment "
            "over every comparison in this report (comparisons.csv). Only rows with "
            "p_holm < 0.05 support a claim that a and b differ.",
            "",
            "| model | dataset | a | b | a - b | 95 % interval | p | p_holm |",
            "|---|---|---|---|---:|---|---:|---:|",
        ]
        for c in compared:
            interval = "" if math.isnan(c.low) else f"[{c.low:+.3f}, {c.high:+.3f}]"
            mark = " **" if c.p_holm < 0.05 else ""
            lines.append(
                f"| {c.model} | {c.dataset} | {c.a} | {c.b} | {c.difference:+.3f} | "
                f"{interval} | {c.p:.4f} | {c.p_holm:.4f}{mark} |"
            )
    clients = [r for r in rows if r["client_accuracy_mean"] is not None or r["epsilon"] is not None]
    if clients:
        lines += [
            "",
            "## Privacy and clients",
            "",
            "Per-client accuracy on each client's own held-out examples at the last scored "
            "round (mean over seeds of: the mean, worst, 10th percentile and standard "
            "deviation across clients); `unseen`: pooled accuracy on clients that never "
            "trained; epsilon of DP-FedAvg after the last round (inf: no noise; "
            "`simulated`: the epsilon of the deployment that --dp-noise-cohort and "
            "--dp-population describe, whose noise the run added, not of the run's own "
            "clients).",
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
                _cell(row["epsilon"], 2) + (" (simulated)" if row["epsilon_simulated"] else ""),
            ]
            cells += [
                _cell(row[f"client_accuracy_{k}"], 3) for k in ("mean", "worst", "p10", "std")
            ]
            cells.append(_cell(row["holdout_accuracy"], 3))
            lines.append("| " + " | ".join(cells) + " |")
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
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


class _Warnings(list):
    """Warnings as they are printed, kept for summary.md."""

    def __call__(self, message: str) -> None:
        print(f"{PROG}: warning: {message}", file=sys.stderr)
        self.append(message)


def main(argv: list[str] | None = None) -> int:
    warn = _Warnings()
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
                warn(f"skipped {exc}")
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

    groups = group_runs(runs, warn)
    if not groups:
        print(f"{PROG}: error: no finished run (every run stopped early)", file=sys.stderr)
        return 2
    root = Path(os.path.commonpath([Path(p).expanduser().resolve() for p in args.runs]))
    if root.is_file():
        root = root.parent
    rows = summary_rows(groups, args.reach, root)
    write_csv(rows, out / "summary.csv")
    compared = comparisons(groups)
    write_comparisons(compared, out / "comparisons.csv")
    figures = _figures(groups, out, warn)
    write_markdown(rows, compared, figures, warn, args.reach, out / "summary.md")
    print(
        f"{len(runs)} runs in {len(groups)} configurations -> {out / 'summary.md'}, "
        f"summary.csv, comparisons.csv, {len(figures)} figures"
    )
    return 0


def _figures(groups: list[Group], out: Path, warn) -> list[Path]:
    """The figures, or none (with a warning) where matplotlib is not installed."""
    try:
        from fedmpi import report_plots
    except ImportError as exc:
        warn(f"figures skipped: {exc} (pip install matplotlib)")
        return []
    return report_plots.write_figures(groups, out)


if __name__ == "__main__":
    sys.exit(main())
