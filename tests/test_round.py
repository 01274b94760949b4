"""The round object in this process, on one rank: its phases call the hooks where
``fedmpi.hooks`` says (in list order on the way in, reversed on the way out), a hook can
drop a client or fix the denominator, and FedProx's term runs at every local step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mpi4py import MPI

from fedmpi.comm import World
from fedmpi.config import Config
from fedmpi.hooks import RoundContext, RoundHook
from fedmpi.preemption import StopRequest
from fedmpi.prepare import prepare
from fedmpi.round import FederatedRound

CLIENTS = 3


@pytest.fixture(scope="module")
def job(tiny_bert_no_dropout, toy_dataset, tmp_path_factory):
    """A prepared one-rank job: 3 clients of 8 rows, full-batch SGD, no dropout."""
    root = tmp_path_factory.mktemp("round")
    cfg = Config(
        model=str(tiny_bert_no_dropout), dataset=str(toy_dataset), clients=CLIENTS,
        train_samples=24, test_samples=20, batch_size=8, optimizer="sgd", lr=0.5,
        rounds=2, max_seq_len=16, diagnostics="norms", on_nonfinite="skip", threads=1,
        output=str(root / "out"), cache_dir=str(root / "cache"),
    )  # fmt: skip
    threads = torch.get_num_threads()
    world = World.from_comm(MPI.COMM_WORLD)
    prepared = prepare(cfg, world)
    yield cfg, world, prepared
    torch.set_num_threads(threads)


class Recorder(RoundHook):
    """Logs every call; optionally drops a client or fixes the denominator."""

    def __init__(self, name: str, log: list, drop: int | None = None, fixed: float | None = None):
        self.name, self.log, self.drop, self.fixed_denominator = name, log, drop, fixed
        self.steps = 0

    def start(self, ctx: RoundContext) -> None:
        self.log.append((self.name, "start"))

    def adjust_gradients(self) -> None:
        self.steps += 1

    def client_update(self, ctx, client, weight, norm):
        self.log.append((self.name, "client", client))
        return None if client == self.drop else norm

    def after_allreduce(self, ctx, average, arrived) -> None:
        self.log.append((self.name, "after_allreduce", arrived))

    def after_server_step(self, ctx) -> None:
        self.log.append((self.name, "after_server_step"))

    def row(self, ctx) -> dict:
        return {f"test/{self.name}": ctx.round}


def test_hooks_wrap_the_round_in_order(job):
    cfg, world, prepared = job
    log: list = []
    first, second = Recorder("a", log), Recorder("b", log, drop=1)
    fed_round = FederatedRound(cfg, world, prepared, [first, second], StopRequest())
    row = fed_round.run(1)
    per_client = [(n, "client", k) for k in range(CLIENTS) for n in ("a", "b")]
    weight = 16.0  # clients 0 and 2 (8 rows each) arrived; b dropped client 1
    assert log == [
        ("a", "start"),
        ("b", "start"),
        *per_client,
        ("b", "after_allreduce", weight),  # the way out: reversed
        ("a", "after_allreduce", weight),
        ("a", "after_server_step"),
        ("b", "after_server_step"),
    ]
    assert row["test/a"] == row["test/b"] == 1 and row["round"] == 1
    assert first.steps == second.steps == 3  # one full-batch step per client (1 trained too)
    assert row["metrics/test_confusion"].sum() == 20


def test_the_average_is_of_the_clients_that_arrived_or_over_a_fixed_denominator(job):
    """One local step each from the same start: the global update is the weighted mean
    of the clients' updates, rescaled to those that came; a fixed denominator D instead
    gives sum_k w_k theta_k / D (plus the start's share, as DP-FedAvg then adds)."""
    cfg, world, prepared = job
    flat = prepared.flat
    start = flat.buffer.clone()

    def updates_alone() -> list[torch.Tensor]:
        """Each client's update from ``start``, trained alone (a round of one client)."""
        out = []
        for client in range(CLIENTS):
            flat.buffer.copy_(start)
            only = Recorder("only", [])
            only.cohort = lambda round_, c=client: np.array([c])  # type: ignore[method-assign]
            FederatedRound(cfg, world, prepared, [only], StopRequest()).run(1)
            out.append(flat.buffer - start)
        return out

    alone = updates_alone()
    flat.buffer.copy_(start)
    FederatedRound(cfg, world, prepared, [Recorder("x", [], drop=1)], StopRequest()).run(1)
    torch.testing.assert_close(flat.buffer - start, (alone[0] + alone[2]) / 2)

    flat.buffer.copy_(start)
    fixed = Recorder("fixed", [], fixed=48.0)  # 8 rows x 3 clients x 2
    FederatedRound(cfg, world, prepared, [fixed], StopRequest()).run(1)
    everyone = sum(8 * (start + u) for u in alone) / 48.0  # no rescaling to what came
    torch.testing.assert_close(flat.buffer, everyone, rtol=1e-5, atol=1e-6)
    flat.buffer.copy_(start)
