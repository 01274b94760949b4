"""How training examples are split among clients, and clients among ranks.

Every function here is pure and seeded, and runs identically on every rank: no rank
needs to be told its shard, so nothing is sent.

Partitions (``--partition``):

    iid            equal-size random shards (the paper's protocol)
    dirichlet:A    label skew: each class is spread over clients by Dirichlet(A) proportions
                   (small A: each client sees few classes)
    quantity:B     size skew: shard sizes follow Dirichlet(B) proportions, labels IID
    by:COLUMN      natural groups: all examples sharing COLUMN's value go to one client
    label-sorted   rows sorted by label, cut into contiguous shards (the paper code's non-IID)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("iid", "dirichlet", "quantity", "by", "label-sorted")
_MAX_DRAWS = 100  # Dirichlet redraws before giving up on a partition without empty shards


@dataclass(frozen=True)
class PartitionSpec:
    kind: str
    alpha: float | None = None  # dirichlet / quantity concentration
    column: str | None = None  # by:COLUMN

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        """``iid``, ``dirichlet:0.5``, ``quantity:1``, ``by:movie_name``, ``label-sorted``."""
        kind, _, arg = text.partition(":")
        if kind not in KINDS:
            raise ValueError(f"unknown partition {text!r} (use one of: {', '.join(KINDS)})")
        if kind in ("dirichlet", "quantity"):
            try:
                alpha = float(arg)
            except ValueError:
                raise ValueError(
                    f"partition {text!r} needs a positive number: {kind}:0.5"
                ) from None
            if not alpha > 0:
                raise ValueError(f"partition {text!r} needs a positive concentration")
            return cls(kind, alpha=alpha)
        if kind == "by":
            if not arg:
                raise ValueError("partition 'by' needs a column: by:COLUMN")
            return cls(kind, column=arg)
        if arg:
            raise ValueError(f"partition {kind!r} takes no argument")
        return cls(kind)


def subsample(n: int, cap: int | None, seed: int) -> np.ndarray:
    """Rows 0..n-1, or a seeded random subset of ``cap`` of them (sorted)."""
    if cap is None or cap >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, n, cap]).choice(n, size=cap, replace=False))


def make_shards(
    spec: PartitionSpec,
    rows: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray | None,
    n_clients: int,
    seed: int,
) -> list[np.ndarray]:
    """Split ``rows`` (with their ``labels`` and, for by:COLUMN, ``groups``) into shards.

    Raises ValueError when a client would get no example.
    """
    if len(rows) < n_clients:
        raise ValueError(f"{len(rows)} examples cannot be split among {n_clients} clients")
    rng = np.random.default_rng([seed, len(rows), n_clients])
    if spec.kind == "iid":
        shards = np.array_split(rng.permutation(rows), n_clients)
    elif spec.kind == "label-sorted":
        order = np.lexsort((rows, labels))
        shards = np.array_split(rows[order], n_clients)
    elif spec.kind == "quantity":
        shards = _quantity(rows, n_clients, spec.alpha, rng)
    elif spec.kind == "dirichlet":
        shards = _dirichlet(rows, labels, n_clients, spec.alpha, rng)
    else:
        if groups is None:
            raise ValueError("partition by:COLUMN needs the column's values")
        shards = _by_group(rows, groups, n_clients, rng)
    return [np.sort(shard) for shard in shards]


def _quantity(rows: np.ndarray, k: int, beta: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Each client gets at least one example; the rest by Dirichlet(beta) proportions."""
    sizes = 1 + rng.multinomial(len(rows) - k, rng.dirichlet(np.full(k, beta)))
    return np.split(rng.permutation(rows), np.cumsum(sizes)[:-1])


def _dirichlet(
    rows: np.ndarray, labels: np.ndarray, k: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per class, cut its shuffled rows by Dirichlet(alpha) proportions over clients."""
    for _ in range(_MAX_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for label in np.unique(labels):
            members = rng.permutation(rows[labels == label])
            cuts = (np.cumsum(rng.dirichlet(np.full(k, alpha))) * len(members)).astype(int)[:-1]
            for client, piece in enumerate(np.split(members, cuts)):
                parts[client].append(piece)
        shards = [np.concatenate(p) for p in parts]
        if min(len(s) for s in shards) > 0:
            return shards
    raise ValueError(
        f"dirichlet:{alpha} left a client without examples in {_MAX_DRAWS} draws: "
        "raise alpha, use fewer clients or more examples"
    )


def _by_group(
    rows: np.ndarray, groups: np.ndarray, k: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Whole groups to clients: largest group first, to the client with fewest examples."""
    names, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    if len(names) < k:
        raise ValueError(f"the column has {len(names)} distinct values: fewer than the {k} clients")
    order = rng.permutation(len(names))  # random tie-break among equal sizes
    order = order[np.argsort(-counts[order], kind="stable")]
    owner = np.empty(len(names), dtype=np.int64)
    loads = np.zeros(k, dtype=np.int64)
    for group in order:
        client = int(np.argmin(loads))
        owner[group] = client
        loads[client] += counts[group]
    return [rows[owner[inverse] == client] for client in range(k)]


def sample_cohort(n_clients: int, per_round: int | None, seed: int, round_: int) -> np.ndarray:
    """The round's participating clients (sorted): all, or ``per_round`` drawn from
    (seed, round) alone, so every rank draws the same cohort."""
    if per_round is None or per_round >= n_clients:
        return np.arange(n_clients)
    rng = np.random.default_rng([seed, round_, n_clients, per_round])
    return np.sort(rng.choice(n_clients, size=per_round, replace=False))


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


def holdout_clients(n_clients: int, fraction: float, seed: int) -> np.ndarray:
    """The clients that never train (``--holdout-clients``), drawn from the seed (sorted)."""
    count = int(round(fraction * n_clients))
    rng = np.random.default_rng([seed, n_clients, 0x40])
    return np.sort(rng.choice(n_clients, size=count, replace=False)) if count else np.arange(0)


def round_cohort(
    participants: np.ndarray, per_round: int | None, seed: int, round_: int
) -> np.ndarray:
    """The round's cohort among the clients that may train (``sample_cohort`` over them)."""
    return participants[sample_cohort(len(participants), per_round, seed, round_)]


def split_local_test(
    shard: np.ndarray, fraction: float, seed: int, client: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) rows of one client's shard for ``--eval-clients``: a seeded random
    ``fraction`` (at least one row, if the shard has two) is the client's own test set."""
    n_test = min(len(shard) - 1, max(1, int(round(fraction * len(shard))))) if len(shard) > 1 else 0
    order = np.random.default_rng([seed, client, 0x7E57]).permutation(len(shard))
    return np.sort(shard[order[n_test:]]), np.sort(shard[order[:n_test]])
