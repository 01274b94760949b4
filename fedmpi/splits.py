"""Clean train/test splits for corpora that come without one (built-ins, single files).

A test score means something only if the test set is unseen. fedmpi therefore splits a
corpus in three steps, all seeded by ``--data-seed`` and never by ``--seed``:

1. **Deduplicate** exact duplicates after case and whitespace normalisation: one copy of
   each text is kept; a text that occurs with conflicting labels is dropped altogether
   (it cannot be scored fairly on either side).
2. **Group**: examples that share a group value (a movie, with ``--split-by COLUMN``) go
   to the same side, so no test movie is seen in training.
3. **Stratify** by label: groups, largest first, go to the side that keeps the test
   set's label counts closest to ``test_fraction`` of each class's total.

Every function here is pure and deterministic, so rank 0 alone runs them once per cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def normalise(text: str) -> str:
    """The form in which two texts count as duplicates: lower case, single spaces."""
    return " ".join(text.lower().split())


@dataclass(frozen=True)
class Deduplicated:
    keep: np.ndarray  # indices of the examples kept, ascending
    duplicates: int  # extra copies of a text with one label, dropped
    conflicting: int  # copies of texts that carry more than one label, all dropped


def deduplicate(texts: list[str], labels: np.ndarray) -> Deduplicated:
    """Keep the first copy of each normalised text; drop every copy of a conflicting one."""
    first: dict[str, int] = {}
    label_sets: dict[str, set[int]] = {}
    for i, text in enumerate(texts):
        key = normalise(text)
        first.setdefault(key, i)
        label_sets.setdefault(key, set()).add(int(labels[i]))
    conflicting_keys = {key for key, seen in label_sets.items() if len(seen) > 1}
    keep = np.array(
        sorted(i for key, i in first.items() if key not in conflicting_keys), dtype=np.int64
    )
    conflicting = sum(1 for text in texts if normalise(text) in conflicting_keys)
    return Deduplicated(keep, len(texts) - len(keep) - conflicting, conflicting)


def stratified_group_split(
    labels: np.ndarray, groups: np.ndarray | None, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), ascending; every group entirely on one side.

    Groups are visited largest first (ties in a seeded random order); each goes to the
    test side when that brings the test set's per-class counts closer (L1) to
    ``test_fraction`` of each class. Without groups each example is its own group, which
    makes this an exact stratified split; with groups the small ones, visited last, even
    out what the large ones left.
    """
    n = len(labels)
    if groups is None:
        group_ids = np.arange(n)
    else:
        _, group_ids = np.unique(np.asarray(groups), return_inverse=True)
    classes, label_ids = np.unique(labels, return_inverse=True)
    n_groups = int(group_ids.max()) + 1 if n else 0
    counts = np.zeros((n_groups, len(classes)), dtype=np.int64)
    np.add.at(counts, (group_ids, label_ids), 1)
    target = test_fraction * counts.sum(axis=0)

    order = np.random.default_rng(seed).permutation(n_groups)
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    in_test = np.zeros(n_groups, dtype=bool)
    test_counts = np.zeros(len(classes))
    for group in order:
        after = test_counts + counts[group]
        if np.abs(after - target).sum() < np.abs(test_counts - target).sum():
            in_test[group] = True
            test_counts = after
    if not in_test.any() and n_groups > 1:  # tiny data: hold out at least the smallest group
        in_test[order[-1]] = True
    test = np.flatnonzero(in_test[group_ids])
    train = np.flatnonzero(~in_test[group_ids])
    return train, test


def validation_split(
    labels: np.ndarray, groups: np.ndarray | None, n_val: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows left for training, validation rows) of the train side, ascending.

    The validation set is cut like the test set: stratified by label and, with ``groups``
    (the ``--split-by`` column), with no group on both sides, so choosing a learning rate or
    a round on it never looks at a movie a client trains on. Whole groups are moved until
    about ``n_val`` examples are out; when that overshoots, a seeded subset of ``n_val`` of
    them is kept and the rest is used by neither side (they share groups with validation).
    """
    n = len(labels)
    if n_val <= 0:
        return np.arange(n), np.arange(0)
    if n_val >= n:
        raise ValueError(f"{n_val} validation examples leave none of the {n} to train on")
    rest, held = stratified_group_split(labels, groups, n_val / n, seed)
    if len(rest) == 0:
        raise ValueError(f"{n_val} validation examples leave no whole group to train on")
    if len(held) > n_val:
        keep = np.random.default_rng([seed, n, n_val, 0x5A1]).choice(len(held), n_val, False)
        held = np.sort(held[keep])
    return rest, held
