"""Shards, cohorts and client-to-rank assignment: pure, seeded, identical on every rank."""

import numpy as np
import pytest

from fedmpi.partition import (
    PartitionSpec,
    assign_clients,
    make_shards,
    sample_cohort,
    subsample,
)

ROWS = np.arange(0, 2000, 2)  # arbitrary row ids, 1000 examples
LABELS = np.repeat(np.arange(4), 250)  # 4 balanced classes
GROUPS = np.arange(1000) // 37  # 28 natural groups of (mostly) 37


def shards_of(spec: str, k: int, seed: int = 0):
    return make_shards(PartitionSpec.parse(spec), ROWS, LABELS, GROUPS, k, seed)


def skew(shards) -> float:
    """Mean over clients of the largest class's share: 0.25 for IID, 1 for one class each."""
    shares = []
    for shard in shards:
        counts = np.bincount(LABELS[np.searchsorted(ROWS, shard)], minlength=4)
        shares.append(counts.max() / counts.sum())
    return float(np.mean(shares))


def test_subsample_is_a_seeded_subset():
    rows = subsample(1000, 100, seed=3)
    assert len(rows) == 100 and len(set(rows)) == 100 and rows.max() < 1000
    assert np.array_equal(rows, subsample(1000, 100, seed=3))
    assert not np.array_equal(rows, subsample(1000, 100, seed=4))
    assert np.array_equal(subsample(10, None, seed=0), np.arange(10))


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.3", "quantity:0.5", "by:g", "label-sorted"])
@pytest.mark.parametrize("k", [1, 4, 10])
def test_every_partition_uses_each_example_at_most_once_and_feeds_every_client(spec, k):
    shards = shards_of(spec, k)
    assert len(shards) == k
    assert all(len(s) > 0 for s in shards)
    together = np.concatenate(shards)
    assert len(together) == len(set(together.tolist())) == len(ROWS)
    assert set(together.tolist()) == set(ROWS.tolist())
    again = shards_of(spec, k)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))


def test_iid_shards_are_equal_and_unskewed():
    shards = shards_of("iid", 8)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert skew(shards) < 0.4


def test_dirichlet_skews_labels_more_as_alpha_falls():
    assert (
        skew(shards_of("dirichlet:0.05", 8))
        > skew(shards_of("dirichlet:1", 8))
        > skew(shards_of("iid", 8))
    )
    assert skew(shards_of("dirichlet:0.05", 8)) > 0.7


def test_quantity_skews_sizes_not_labels():
    sizes = sorted(map(len, shards_of("quantity:0.3", 8)))
    assert sizes[-1] > 3 * sizes[0]
    assert skew(shards_of("quantity:100", 8)) < 0.4


def test_label_sorted_gives_each_client_few_labels():
    shards = shards_of("label-sorted", 4)
    assert skew(shards) == 1.0  # 4 classes of 250 over 4 clients: one class each


def test_by_column_keeps_groups_whole():
    shards = shards_of("by:g", 5)
    owners = {}
    for client, shard in enumerate(shards):
        for group in np.unique(GROUPS[np.searchsorted(ROWS, shard)]):
            assert owners.setdefault(group, client) == client
    assert max(map(len, shards)) - min(map(len, shards)) <= 37  # balanced by whole groups


def test_impossible_partitions_are_errors():
    with pytest.raises(ValueError, match="cannot be split"):
        make_shards(PartitionSpec.parse("iid"), ROWS[:3], LABELS[:3], None, 4, 0)
    with pytest.raises(ValueError, match="distinct values"):
        shards_of("by:g", 40)
    for bad in ["dirichlet", "dirichlet:-1", "by", "zipf:2", "iid:3"]:
        with pytest.raises(ValueError):
            PartitionSpec.parse(bad)


def test_cohorts_are_seeded_by_round_and_cover_the_requested_count():
    first = sample_cohort(10, 3, seed=1, round_=1)
    assert len(first) == 3 and len(set(first)) == 3 and first.max() < 10
    assert np.array_equal(first, sample_cohort(10, 3, seed=1, round_=1))
    draws = {tuple(sample_cohort(10, 3, seed=1, round_=r)) for r in range(1, 20)}
    assert len(draws) > 5
    assert np.array_equal(sample_cohort(10, None, seed=1, round_=4), np.arange(10))


def test_equal_clients_map_one_to_one_onto_ranks():
    assert assign_clients([5, 5, 5, 5], 4) == [[0], [1], [2], [3]]


def test_assignment_balances_work_largest_first():
    sizes = [10, 1, 1, 1, 9, 2]
    assignment = assign_clients(sizes, 2)
    loads = [sum(sizes[k] for k in clients) for clients in assignment]
    assert sorted(sum(assignment, [])) == list(range(6))
    assert abs(loads[0] - loads[1]) <= 1
