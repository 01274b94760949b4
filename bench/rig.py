"""A synthetic ``fedmpi.prepare.Job`` for the benchmarks that time the project's own round
(``fedmpi.round.FederatedRound``) on a model they built themselves, without a corpus.

One client per rank (client k on rank k), all of them participants, weights = shard
sizes (``--weighting examples``, the default), no held-out clients, no validation rows and
no evaluation data: a round over this job is scored only if the benchmark's ``Config``
makes it a scored round (set ``eval_every`` and ``rounds`` past the rounds it runs).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from fedmpi.comm import World
from fedmpi.data import CacheInfo
from fedmpi.device_rows import DeviceRows
from fedmpi.flat import FlatParameters
from fedmpi.prepare import FederationPlan, Job


def no_rows(device: str) -> DeviceRows:
    """Zero rows on ``device``: the evaluation data of a job that is never scored."""
    return DeviceRows(
        torch.zeros((0, 1), dtype=torch.int32, device=device),
        torch.zeros(0, dtype=torch.int64, device=device),
        torch.zeros(0, dtype=torch.int64, device=device),
    )


def one_client_per_rank(
    world: World,
    model: torch.nn.Module,
    flat: FlatParameters,
    device: str,
    rows: DeviceRows | None = None,
    examples: int | None = None,
    precision: str = "fp32",
    n_classes: int = 2,
) -> Job:
    """A job whose rank r holds client r. ``rows``: that client's training rows (for
    ``train_cohort``/``run``); without them the client has ``examples`` rows in the plan
    (its weight) and no data, for a benchmark that calls ``contribute`` itself instead of
    training. ``flat`` must be ``model``'s flat parameters (with the Allreduce's tail).
    Collective: the ranks exchange their shard sizes."""
    if (rows is None) == (examples is None):
        raise ValueError("give the client's rows or its number of examples, not both")
    size = len(rows) if rows is not None else int(examples)
    sizes = [int(s) for s in world.comm.allgather(size)]
    n = world.size
    plan = FederationPlan(
        n_clients=n,
        shards=[np.arange(s) for s in sizes],
        sizes=sizes,
        weights=[float(s) for s in sizes],
        label_histogram=np.zeros((n, n_classes), dtype=np.int64),
        client_rank=list(range(n)),
        my_clients=[world.rank],
        participants=np.arange(n),
        eval_rows={},
        val_rows=np.zeros(0, dtype=np.int64),
    )
    info = CacheInfo(
        n_train=sum(sizes),
        n_test=0,
        label_names=[f"label{i}" for i in range(n_classes)],
        how_split="synthetic rows of a benchmark",
        content_sha256="",
        pad_token_id=0,
    )
    return Job(
        device=device,
        out_dir=Path(tempfile.gettempdir()),  # the round writes nothing
        resuming=False,
        info=info,
        plan=plan,
        local_train={world.rank: rows} if rows is not None else {},
        local_test=no_rows(device),
        local_val=None,
        client_eval={},
        test_identity={},
        model=model,
        flat=flat,
        precision=precision,
    )
