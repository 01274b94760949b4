"""Shards and client-to-rank assignment: pure, seeded, identical on every rank."""

import numpy as np
import pytest

from fedmpi.partition import assign_clients, iid_shards, subsample


def test_subsample_is_a_seeded_subset():
    rows = subsample(1000, 100, seed=3)
    assert len(rows) == 100 and len(set(rows)) == 100 and rows.max() < 1000
    assert np.array_equal(rows, subsample(1000, 100, seed=3))
    assert not np.array_equal(rows, subsample(1000, 100, seed=4))
    assert np.array_equal(subsample(10, None, seed=0), np.arange(10))


@pytest.mark.parametrize("n,k", [(10, 3), (400, 4), (7, 7), (1000, 32)])
def test_iid_shards_partition_the_rows_equally(n, k):
    rows = np.arange(n) * 2  # arbitrary row ids
    shards = iid_shards(rows, k, seed=0)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    together = np.concatenate(shards)
    assert sorted(together) == sorted(rows)  # every example exactly once


def test_iid_shards_refuse_more_clients_than_examples():
    with pytest.raises(ValueError):
        iid_shards(np.arange(3), 4, seed=0)


def test_equal_clients_map_one_to_one_onto_ranks():
    assert assign_clients([5, 5, 5, 5], 4) == [[0], [1], [2], [3]]


def test_assignment_balances_work_largest_first():
    sizes = [10, 1, 1, 1, 9, 2]
    assignment = assign_clients(sizes, 2)
    loads = [sum(sizes[k] for k in clients) for clients in assignment]
    assert sorted(sum(assignment, [])) == list(range(6))
    assert abs(loads[0] - loads[1]) <= 1
