"""A client's "fresh" local optimizer is one AdamW reused with its state zeroed in place:
bit for bit what a new AdamW computes, client after client, without new state."""

from __future__ import annotations

import weakref

import torch
from conftest import random_bert

from fedmpi.client import LocalOptimizers, make_optimizer, reset_state
from fedmpi.config import Config
from fedmpi.flat import FlatParameters


def train_clients(optimizer_for, clients: int = 3, steps: int = 2) -> list[torch.Tensor]:
    """Each client: from the same start, ``steps`` AdamW steps on its own batches; the
    model after each client (a sparse gradient for the embeddings' unused rows too)."""
    model = random_bert(vocab=50, width=16, layers=1)
    flat = FlatParameters(model)
    start = flat.buffer.clone()
    after = []
    for client in range(clients):
        flat.buffer.copy_(start)
        optimizer = optimizer_for(client, flat.params)
        generator = torch.Generator().manual_seed(client)
        for _ in range(steps):
            ids = torch.randint(0, 50, (4, 6), generator=generator)
            labels = torch.randint(0, 2, (4,), generator=generator)
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        after.append(flat.buffer.clone())
    return after


def test_a_reused_adamw_is_bit_for_bit_a_fresh_one():
    cfg = Config(optimizer="adamw", lr=0.01, weight_decay=0.1)
    fresh = train_clients(lambda client, params: make_optimizer(cfg, params))
    holder: dict[str, LocalOptimizers] = {}
    given = []

    def reused(client, params):
        optimizers = holder.setdefault("it", LocalOptimizers(cfg, params))
        given.append(optimizers.for_client(client))
        return given[-1]

    for got, expected in zip(train_clients(reused), fresh, strict=True):
        assert torch.equal(got, expected)
    assert all(optimizer is given[0] for optimizer in given)  # one optimizer, no new state
    assert not torch.equal(fresh[0], fresh[1])  # the clients did differ


def test_reset_state_zeroes_every_state_tensor_and_leaves_others_alone():
    param = torch.nn.Parameter(torch.ones(3))
    adamw = torch.optim.AdamW([param], lr=0.1, fused=True)
    param.grad = torch.ones(3)
    adamw.step()
    assert reset_state(adamw)
    assert all(not t.any() for t in adamw.state[param].values())
    momentum = torch.optim.SGD([param], lr=0.1, momentum=0.9)  # its buffer starts at a grad
    momentum.step()
    assert not reset_state(momentum)


def test_sgd_and_kept_optimizers_are_not_shared():
    params = [torch.nn.Parameter(torch.ones(2))]
    sgd = LocalOptimizers(Config(optimizer="sgd"), params)
    assert sgd.for_client(0) is not sgd.for_client(1)
    kept = LocalOptimizers(Config(optimizer="adamw", keep_local_opt=True), params)
    assert kept.for_client(0) is not kept.for_client(1)
    assert kept.for_client(0) is kept.for_client(0)


def test_release_frees_the_shared_state():
    """After the round's training the shared AdamW's state is freed at once (not held
    through the Allreduce and the evaluation), even while the optimizer itself lives on:
    the first torch optimizer of a process stays referenced until the garbage collector
    runs. The next client gets a new optimizer."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizers = LocalOptimizers(Config(optimizer="adamw"), [param])
    first = optimizers.for_client(0)  # still held here, as a reference cycle would
    param.grad = torch.ones(3)
    first.step()
    moment = weakref.ref(first.state[param]["exp_avg"])
    optimizers.release()
    assert moment() is None
    assert optimizers.for_client(1) is not first
