"""Epoch batching: every row once per epoch, seeded order, optional length grouping."""

import torch

from fedmpi.client import epoch_batches


def test_epoch_batches_cover_every_row_once_and_group_by_length():
    lengths = torch.randint(1, 64, (1000,))
    for grouped in (False, True):
        batches = epoch_batches(lengths, 16, grouped, torch.Generator().manual_seed(0))
        rows = torch.cat(batches)
        assert sorted(rows.tolist()) == list(range(1000))
        again = epoch_batches(lengths, 16, grouped, torch.Generator().manual_seed(0))
        assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    padding = {}
    for grouped in (False, True):
        batches = epoch_batches(lengths, 16, grouped, torch.Generator().manual_seed(0))
        padding[grouped] = sum(
            int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches
        )
    assert padding[True] < padding[False] / 4
