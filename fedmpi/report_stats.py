"""Comparisons between configurations that a reviewer accepts with few seeds.

With 3-5 seeds per configuration, normal-theory tests lean on an assumption nobody can
check. The report therefore compares two configurations by an **exact permutation test**
of the difference in mean final test accuracy (every way of relabelling the pooled seeds,
two-sided), states the difference with a Welch 95 % interval, and adjusts the p-values of
all comparisons in one file together (**Holm**), so that "A differs from B" is claimed only
where ``p_holm < 0.05``. With n seeds per side the smallest possible p is
``2 / C(2n, n)``: 0.10 for 3 vs 3, 0.0079 for 5 vs 5.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

MAX_EXACT_RELABELLINGS = 2_000_000


def permutation_p(a: list[float], b: list[float]) -> float:
    """Two-sided exact permutation p-value of mean(a) - mean(b): the share of all
    C(n_a + n_b, n_a) relabellings whose absolute difference is at least the observed one."""
    pooled = np.asarray(a + b, dtype=float)
    n_a, total = len(a), len(a) + len(b)
    if n_a == 0 or len(b) == 0:
        return math.nan
    count = math.comb(total, n_a)
    if count > MAX_EXACT_RELABELLINGS:
        raise ValueError(f"{count} relabellings: too many seeds for an exact test")
    observed = abs(pooled[:n_a].mean() - pooled[n_a:].mean())
    whole = pooled.sum()
    hits = 0
    for chosen in itertools.combinations(range(total), n_a):
        first = pooled[list(chosen)].sum()
        diff = abs(first / n_a - (whole - first) / (total - n_a))
        hits += diff >= observed - 1e-12
    return hits / count


def welch_interval(a: list[float], b: list[float]) -> tuple[float, float]:
    """95 % interval of mean(a) - mean(b) with Welch's degrees of freedom (NaN if a side
    has fewer than 2 values, or both have no spread)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size < 2 or y.size < 2:
        return math.nan, math.nan
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    diff = x.mean() - y.mean()
    if va + vb == 0:
        return diff, diff
    df = (va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1))
    from scipy.stats import t

    half = t.ppf(0.975, df) * math.sqrt(va + vb)
    return diff - half, diff + half


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error), in the input's order; NaN stays NaN."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m = len(indexed)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


@dataclass
class Comparison:
    """Configuration ``a`` against ``b`` on one value per seed."""

    model: str
    dataset: str
    a: str
    b: str
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    low: float
    high: float
    p: float
    p_holm: float = math.nan

    @property
    def difference(self) -> float:
        return self.mean_a - self.mean_b


def compare(model: str, dataset: str, named: list[tuple[str, list[float]]]) -> list[Comparison]:
    """Every pair of the named samples (in the given order), unadjusted."""
    rows = []
    for (name_a, a), (name_b, b) in itertools.combinations(named, 2):
        low, high = welch_interval(a, b)
        rows.append(
            Comparison(
                model,
                dataset,
                name_a,
                name_b,
                len(a),
                len(b),
                float(np.mean(a)),
                float(np.mean(b)),
                low,
                high,
                permutation_p(a, b),
            )  # fmt: skip
        )
    return rows


def adjust(rows: list[Comparison]) -> list[Comparison]:
    """Holm-adjust the p-values of all rows together (one family: the whole file)."""
    for row, adjusted in zip(rows, holm([r.p for r in rows]), strict=True):
        row.p_holm = adjusted
    return rows
