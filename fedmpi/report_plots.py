"""The report's figures (matplotlib, Agg backend: no display needed on a cluster node).

Each line is the mean over a configuration's seeds, its band (or error bar) the 95 %
confidence interval; the dashed line is the test set's majority-class rate, what a model
that always predicts one class scores. Three kinds, each answering one of the study's
questions:

* ``accuracy_<model>_<dataset>[_<setting>].png``: test accuracy per round, one line per
  arm (clients x batch, learning rate): does convergence slow down, or collapse, as
  clients grow?
* ``validation_<model>_<dataset>[_<setting>].png`` (runs with ``--val-samples``): the same
  on the validation set, what rounds and learning rates are chosen on: has an arm
  plateaued, and where does it peak?
* ``final_accuracy_<dataset>.png``: final accuracy against the number of clients (log2
  axis), one line per model (and setting): which models tolerate federated averaging?
* ``diagnostics_<model>_<dataset>[_<setting>].png`` (runs with ``diagnostics/*``): the
  norm of the global update per round and, with ``--diagnostics full``, the mean
  leave-one-out cosine of client updates: is an arm slow because its global steps are
  small (the average of K shorter local trajectories), or because client updates disagree?
* ``privacy_<model>_<dataset>.png`` (DP runs, ``privacy/epsilon``): final test accuracy
  against the epsilon spent, one line per DP variant (LoRA with A frozen or trained), the
  arms without noise (no DP, clipping only) as horizontal bands, and with
  ``--eval-clients`` the clients' own accuracy (mean, the bar one standard deviation
  across clients, the triangle the 10th percentile): what does a privacy budget cost,
  and whom?
* ``compression_<model>_<dataset>.png`` (where a run compressed its updates,
  ``--compress``): final test accuracy against the megabytes one client uploads a round
  (log axis), one point per configuration: what does a smaller upload cost in accuracy?
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from itertools import cycle
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

from fedmpi.report_runs import Group  # noqa: E402


def _slug(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", p).strip("-") for p in parts if p)


def _label(clients: int) -> str:
    return f"{clients} client" + ("" if clients == 1 else "s")


def _title(group: Group) -> str:
    run = group.first
    return f"{run.model} on {run.dataset}" + (f" ({group.setting})" if group.setting else "")


def _save(fig: plt.Figure, path: Path) -> Path:
    for ax in fig.axes:
        if ax.get_xlabel() == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            lo, hi = ax.get_xlim()
            if hi - lo < 2:  # one or two rounds: the locator would still pick fractions
                ax.set_xticks(range(math.ceil(lo), math.floor(hi) + 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _band(ax: plt.Axes, x: np.ndarray, mean: np.ndarray, half: np.ndarray, label: str) -> None:
    (line,) = ax.plot(x, mean, marker="o", markersize=3, label=label)
    ok = ~np.isnan(half)
    if ok.any():
        ax.fill_between(
            x[ok], (mean - half)[ok], (mean + half)[ok], alpha=0.2, color=line.get_color()
        )


def _majority(ax: plt.Axes, groups: list[Group]) -> None:
    rate = groups[0].first.majority_rate
    if not math.isnan(rate):
        ax.axhline(rate, color="gray", linestyle="--", label="majority class")


def _arm(group: Group) -> str:
    run = group.first
    return (
        f"{_label(run.clients)} x batch {run.config.get('batch_size')}, "
        f"lr {run.config.get('lr'):g} (n={len(group.runs)})"
    )


def accuracy_curves(groups: list[Group], path: Path, split: str = "test") -> Path:
    """One model x dataset x setting: test (or validation) accuracy per round, a line per
    arm; the dashed line is that set's majority-class rate."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group in groups:
        values = (lambda r: r.accuracy) if split == "test" else (lambda r: r.val_accuracy)
        rounds, mean, half = group.curve(values)
        _band(ax, rounds, mean, half, _arm(group))
    rate = groups[0].first.majority_rate if split == "test" else groups[0].first.val_majority_rate
    if not math.isnan(rate):
        ax.axhline(rate, color="gray", linestyle="--", label="majority class")
    name = "test" if split == "test" else "validation"
    ax.set(xlabel="round", ylabel=f"{name} accuracy", title=_title(groups[0]))
    ax.legend(fontsize="small")
    return _save(fig, path)


def final_vs_clients(groups: list[Group], path: Path) -> Path:
    """One dataset: final accuracy vs number of clients (log2 axis), a line per model."""
    fig, ax = plt.subplots(figsize=(6, 4))
    lines: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for group in groups:
        run = group.first
        detail = f"batch {run.config.get('batch_size')}, lr {run.config.get('lr'):g}"
        lines[(run.model, ", ".join(x for x in (detail, group.setting) if x))].append(group)
    for (model, setting), members in sorted(lines.items()):
        members = sorted(members, key=lambda g: g.first.clients)
        stats = [g.stat(lambda r: r.final_accuracy) for g in members]
        ax.errorbar(
            [g.first.clients for g in members],
            [m for m, _ in stats],
            yerr=[0.0 if math.isnan(h) else h for _, h in stats],
            marker="o",
            capsize=3,
            label=model + (f" ({setting})" if setting else ""),
        )
    _majority(ax, groups)
    ax.set_xscale("log", base=2)
    clients = sorted({g.first.clients for g in groups})
    ax.set_xticks(clients, [str(c) for c in clients])
    ax.set(xlabel="clients", ylabel="final test accuracy", title=groups[0].first.dataset)
    ax.legend(fontsize="small")
    return _save(fig, path)


def diagnostics(groups: list[Group], path: Path) -> Path:
    """One model x dataset x setting: the global update's norm per round (log scale) and,
    where recorded, the mean leave-one-out client cosine."""
    panels = [("global_norm", "global update L2 norm")]
    if any(all(r.mean_cosine is not None for r in g.runs) for g in groups):
        panels.append(("mean_cosine", "mean cosine(client update, others' mean)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (values, ylabel) in zip(axes[0], panels, strict=True):
        for group in groups:
            if all(getattr(r, values) is not None for r in group.runs):
                rounds, mean, half = group.curve(lambda r, v=values: getattr(r, v))
                if mean.size:
                    _band(ax, rounds, mean, half, _arm(group))
        ax.set(xlabel="round", ylabel=ylabel, title=_title(groups[0]))
        if values == "global_norm":
            ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize="small")
    return _save(fig, path)


def _epsilon(group: Group) -> float:
    return group.stat(lambda r: r.final_epsilon)[0]


def _dp_series(group: Group) -> str:
    """What a DP point is besides its noise: LoRA with A frozen or trained, else DP."""
    config = group.first.config
    if config.get("peft") != "lora":
        return "DP"
    return "DP, LoRA, A frozen" if config.get("lora_freeze_a") else "DP, LoRA, A trained"


def privacy_utility(groups: list[Group], path: Path) -> Path:
    """One model x dataset: final accuracy (mean, 95 % interval) against final epsilon,
    one line per DP variant (LoRA with A frozen or trained); the arms without noise
    (infinite epsilon: no DP, or clipping only) are horizontal lines with their interval
    as a band."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    finite = sorted((g for g in groups if math.isfinite(_epsilon(g))), key=_epsilon)
    series: dict[str, list[Group]] = defaultdict(list)
    for group in finite:
        series[_dp_series(group)].append(group)
    shifts = np.linspace(0.96, 1.04, len(series)) if len(series) > 1 else [1.0]
    for (name, members), shift in zip(sorted(series.items()), shifts, strict=True):
        eps = [_epsilon(g) * shift for g in members]  # apart, so the bars do not overlap
        acc = [g.stat(lambda r: r.final_accuracy) for g in members]
        ax.errorbar(
            eps,
            [m for m, _ in acc],
            yerr=[0.0 if math.isnan(h) else h for _, h in acc],
            marker="o",
            capsize=3,
            label=f"{name} (n={min(len(g.runs) for g in members)})",
        )
        spreads = [g.first.final_client_spread() for g in members]
        if all(spreads):
            ax.errorbar(
                eps,
                [s["mean"] for s in spreads],
                yerr=[s["std"] for s in spreads],
                marker="s",
                linestyle=":",
                capsize=3,
                label=f"{name}: clients' own test sets (mean, sd)",
            )
            ax.scatter(eps, [s["p10"] for s in spreads], marker="v", label="clients, 10th pct")
    if finite:
        ax.set_xscale("log")
        ax.set_xticks(sorted({round(_epsilon(g), 2) for g in finite}))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    unbounded = [g for g in groups if not math.isfinite(_epsilon(g))]
    for group, color in zip(unbounded, cycle(("green", "purple", "brown")), strict=False):
        mean, half = group.stat(lambda r: r.final_accuracy)
        clip = group.first.config.get("dp_clip")
        clipped = clip is not None and math.isfinite(float(clip))
        name = f"clipping only (C = {float(clip):g})" if clipped else "no DP"
        ax.axhline(mean, color=color, linestyle="-.", label=f"{name} (n={len(group.runs)})")
        if not math.isnan(half):
            ax.axhspan(mean - half, mean + half, color=color, alpha=0.1)
    _majority(ax, groups)
    run = groups[0].first
    simulated = any(r.dp_simulated for g in finite for r in g.runs)
    xlabel = "epsilon (of the simulated deployment: --dp-noise-cohort)" if simulated else "epsilon"
    ax.set(xlabel=xlabel, ylabel="final test accuracy", title=f"{run.model} on {run.dataset}")
    ax.legend(fontsize="x-small")
    return _save(fig, path)


def compression_utility(groups: list[Group], path: Path) -> Path:
    """One model x dataset: final accuracy (mean, 95 % interval) vs the bytes a client
    uploads a round, a point per configuration labelled by its setting."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group in sorted(groups, key=lambda g: -g.first.bytes_per_client_round):
        mean, half = group.stat(lambda r: r.final_accuracy)
        megabytes = group.first.bytes_per_client_round / 1e6
        label = f"{group.setting or 'fp32'} (n={len(group.runs)})"
        ax.errorbar(
            [megabytes],
            [mean],
            yerr=[0.0 if math.isnan(half) else half],
            marker="o",
            capsize=3,
            linestyle="none",
            label=label,
        )
    _majority(ax, groups)
    ax.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    run = groups[0].first
    ax.set(
        xlabel="MB one client uploads a round",
        ylabel="final test accuracy",
        title=f"{run.model} on {run.dataset}",
    )
    ax.legend(fontsize="x-small")
    return _save(fig, path)


def write_figures(groups: list[Group], out: Path) -> list[Path]:
    """Every figure for these groups into ``out``; returns their paths."""
    curves: dict[tuple[str, str, str], list[Group]] = defaultdict(list)
    datasets: dict[str, list[Group]] = defaultdict(list)
    private: dict[tuple[str, str], list[Group]] = defaultdict(list)
    by_task: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for group in groups:
        by_task[(group.first.model, group.first.dataset)].append(group)
        curves[(group.first.model, group.first.dataset, group.setting)].append(group)
        datasets[group.first.dataset].append(group)
        if group.first.epsilon is not None:
            private[(group.first.model, group.first.dataset)].append(group)
    figures = []
    for (model, dataset, setting), members in sorted(curves.items()):
        slug = _slug(model, dataset, setting)
        figures.append(accuracy_curves(members, out / f"accuracy_{slug}.png"))
        validated = [g for g in members if all(r.val_accuracy is not None for r in g.runs)]
        if validated:
            figures.append(
                accuracy_curves(validated, out / f"validation_{slug}.png", split="validation")
            )
        with_diagnostics = [g for g in members if all(r.global_norm is not None for r in g.runs)]
        if with_diagnostics:
            figures.append(diagnostics(with_diagnostics, out / f"diagnostics_{slug}.png"))
    for dataset, members in sorted(datasets.items()):
        figures.append(final_vs_clients(members, out / f"final_accuracy_{_slug(dataset)}.png"))
    for (model, dataset), members in sorted(private.items()):
        figures.append(privacy_utility(members, out / f"privacy_{_slug(model, dataset)}.png"))
    for (model, dataset), members in sorted(by_task.items()):
        if any(r.upload_bytes is not None for g in members for r in g.runs):
            path = out / f"compression_{_slug(model, dataset)}.png"
            figures.append(compression_utility(members, path))
    return figures
