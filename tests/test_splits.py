"""Clean splits on hand-made examples: deduplication, stratification, groups kept whole."""

import numpy as np

from fedmpi.splits import deduplicate, normalise, stratified_group_split


def test_normalise_ignores_case_and_whitespace():
    assert normalise("  A  Good\tfilm\n") == normalise("a good film") == "a good film"


def test_duplicates_keep_the_first_copy_and_conflicting_texts_go():
    texts = ["A b", "a  B", "c", "d", "D ", "e"]
    labels = np.array([0, 0, 1, 0, 1, 1])
    result = deduplicate(texts, labels)
    # "a b" twice with one label: the first kept; "d" with labels 0 and 1: both dropped.
    assert result.keep.tolist() == [0, 2, 5]
    assert (result.duplicates, result.conflicting) == (1, 2)


def test_without_groups_each_class_is_split_in_proportion():
    labels = np.array([0] * 70 + [1] * 30)
    train, test = stratified_group_split(labels, None, 0.2, seed=3)
    assert np.bincount(labels[test]).tolist() == [14, 6]  # 20 % of 70 and of 30
    assert sorted(train.tolist() + test.tolist()) == list(range(100))
    other_train, other_test = stratified_group_split(labels, None, 0.2, seed=4)
    assert set(other_test.tolist()) != set(test.tolist())  # the seed picks which ones


def test_groups_never_straddle_and_the_split_follows_the_target():
    # 40 groups of 5; each group is all one label; 24 groups of class 0, 16 of class 1.
    groups = np.repeat(np.arange(40), 5)
    labels = np.where(groups < 24, 0, 1)
    train, test = stratified_group_split(labels, groups, 0.25, seed=0)
    assert not set(groups[train]) & set(groups[test])
    # Whole groups of 5 can hit the targets 0.25 * 120 = 30 and 0.25 * 80 = 20 exactly.
    assert np.bincount(labels[test]).tolist() == [30, 20]
