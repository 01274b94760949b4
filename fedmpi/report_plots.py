"""The report's figures (matplotlib, Agg backend: no display needed on a cluster node).

Three kinds, each answering one of the study's questions:

* ``accuracy_<model>_<dataset>.png``: test accuracy per round, one line per client count,
  with chance dashed: does convergence slow down, or collapse, as clients grow?
* ``final_accuracy_<dataset>.png``: final accuracy against the number of clients (log2
  axis), one line per model: which architectures tolerate federated averaging?
* ``diagnostics_<model>_<dataset>.png`` (only for runs that recorded ``diagnostics/*``):
  the mean cosine of client updates to their average, and the norm of the global update,
  per round: do client updates disagree (cosine falls) where accuracy collapses?
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

if TYPE_CHECKING:
    from fedmpi.report import Run


def _slug(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", p).strip("-") for p in parts)


def _label(clients: int) -> str:
    return f"{clients} client" + ("" if clients == 1 else "s")


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


def accuracy_curves(runs: list[Run], path: Path) -> Path:
    """One model x dataset: accuracy vs round, a line per client count, chance dashed."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in sorted(runs, key=lambda r: r.clients):
        rounds, acc = run.evaluated()
        ax.plot(rounds, acc, marker="o", markersize=3, label=_label(run.clients))
    ax.axhline(runs[0].chance, color="gray", linestyle="--", label="chance")
    ax.set(xlabel="round", ylabel="test accuracy", title=f"{runs[0].model} on {runs[0].dataset}")
    ax.legend(fontsize="small")
    return _save(fig, path)


def final_vs_clients(runs: list[Run], path: Path) -> Path:
    """One dataset: final accuracy vs number of clients (log2 axis), a line per model."""
    fig, ax = plt.subplots(figsize=(6, 4))
    by_model: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_model[run.model].append(run)
    for model, group in sorted(by_model.items()):
        group = sorted(group, key=lambda r: r.clients)
        ax.plot(
            [r.clients for r in group],
            [r.final_accuracy for r in group],
            marker="o",
            label=model,
        )
    ax.axhline(runs[0].chance, color="gray", linestyle="--", label="chance")
    ax.set_xscale("log", base=2)
    clients = sorted({r.clients for r in runs})
    ax.set_xticks(clients, [str(c) for c in clients])
    ax.set(xlabel="clients", ylabel="final test accuracy", title=runs[0].dataset)
    ax.legend(fontsize="small")
    return _save(fig, path)


def diagnostics(runs: list[Run], path: Path) -> Path:
    """One model x dataset: mean client-update cosine and global update norm per round."""
    fig, (cos_ax, norm_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for run in sorted(runs, key=lambda r: r.clients):
        label = _label(run.clients)
        for ax, values in ((cos_ax, run.mean_cosine), (norm_ax, run.global_norm)):
            if values is not None:
                keep = ~np.isnan(values)
                ax.plot(run.rounds[keep], values[keep], marker="o", markersize=3, label=label)
    title = f"{runs[0].model} on {runs[0].dataset}"
    cos_ax.set(xlabel="round", ylabel="mean cosine(client update, mean update)", title=title)
    norm_ax.set(xlabel="round", ylabel="global update L2 norm", title=title)
    for ax in (cos_ax, norm_ax):
        if ax.lines:
            ax.legend(fontsize="small")
    return _save(fig, path)


def write_figures(runs: list[Run], out: Path) -> list[Path]:
    """Every figure for these runs into ``out``; returns their paths."""
    pairs: dict[tuple[str, str], list[Run]] = defaultdict(list)
    datasets: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        pairs[(run.model, run.dataset)].append(run)
        datasets[run.dataset].append(run)
    figures = []
    for (model, dataset), group in sorted(pairs.items()):
        figures.append(accuracy_curves(group, out / f"accuracy_{_slug(model, dataset)}.png"))
        with_diagnostics = [
            r for r in group if r.mean_cosine is not None or r.global_norm is not None
        ]
        if with_diagnostics:
            name = f"diagnostics_{_slug(model, dataset)}.png"
            figures.append(diagnostics(with_diagnostics, out / name))
    for dataset, group in sorted(datasets.items()):
        figures.append(final_vs_clients(group, out / f"final_accuracy_{_slug(dataset)}.png"))
    return figures
