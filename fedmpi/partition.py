"""How training examples are split among clients, and clients among ranks.

Every function here is pure and seeded, and runs identically on every rank: no rank
needs to be told its shard, so nothing is sent.
"""

from __future__ import annotations

import numpy as np


def subsample(n: int, cap: int | None, seed: int) -> np.ndarray:
    """Rows 0..n-1, or a seeded random subset of ``cap`` of them (sorted)."""
    if cap is None or cap >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, n, cap]).choice(n, size=cap, replace=False))


def iid_shards(rows: np.ndarray, n_clients: int, seed: int) -> list[np.ndarray]:
    """Equal-size IID shards (sizes differ by at most one): the paper's protocol."""
    if len(rows) < n_clients:
        raise ValueError(f"{len(rows)} examples cannot be split among {n_clients} clients")
    shuffled = np.random.default_rng([seed, len(rows)]).permutation(rows)
    return np.array_split(shuffled, n_clients)


def assign_clients(sizes: list[int], n_ranks: int) -> list[list[int]]:
    """Balance clients over ranks by work: greedy, largest shard first, to the least-loaded
    rank (ties to the lowest rank). Deterministic, so every rank computes the same map."""
    loads = [0] * n_ranks
    assignment: list[list[int]] = [[] for _ in range(n_ranks)]
    for client in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
        rank = min(range(n_ranks), key=lambda r: (loads[r], r))
        assignment[rank].append(client)
        loads[rank] += sizes[client]
    return [sorted(clients) for clients in assignment]
