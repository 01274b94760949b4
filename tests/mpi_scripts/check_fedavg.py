"""Under mpiexec: fedmpi's aggregation equals a serial numpy weighted average.

Five clients with uneven shard sizes are spread over however many ranks run this; each
client's parameters are a seeded perturbation of one tiny BERT. Every rank checks the
global model against float64 numpy arithmetic done independently of fedmpi. Then one
client per rank, reduced in the parameters' own storage (what train.py does with one client
a rank), with slice sizes that put the tail in a slice of its own, across two slices, or
among many: the same bits as a separate payload, and the same reference. Last, the sparse
wire (fedmpi.sparse_wire) with sparse client updates, against the same reference and the
dense payload, with a fixed denominator too (DP's), and the bytes it says it sent.
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest
from conftest import random_bert  # noqa: E402

from fedmpi import allreduce  # noqa: E402
from fedmpi.allreduce import TAIL, WeightedAllreduce
from fedmpi.comm import World, abort_on_error  # noqa: E402
from fedmpi.flat import FlatParameters
from fedmpi.partition import assign_clients
from fedmpi.server import ServerHyper, ServerOptimizer
from fedmpi.sparse_wire import SparseAllgather

SIZES = [3, 10, 1, 7, 4]  # uneven shards: weights must follow them


def client_params(base: np.ndarray, client: int) -> np.ndarray:
    return base + np.random.default_rng(client).standard_normal(base.shape).astype(np.float32)


def reference(base: np.ndarray, arrived: list[int]) -> np.ndarray:
    """The weighted average of the clients that arrived, in float64."""
    total = sum(SIZES[k] for k in arrived)
    return sum(SIZES[k] * client_params(base, k).astype(np.float64) for k in arrived) / total


def check_in_place(world: World, model: torch.nn.Module) -> None:
    """One client per rank (client = rank), reduced in place, against a separate payload."""
    flat = FlatParameters(model, tail=len(TAIL))
    base = flat.buffer.numpy().copy()
    clients = range(min(world.size, len(SIZES)))
    in_place = WeightedAllreduce(world, flat.numel, "cpu", in_place=flat.storage)
    separate = WeightedAllreduce(world, flat.numel, "cpu")
    for step in (flat.numel, flat.numel + 1, 1000):  # tail alone, straddling, many slices
        allreduce.CHUNK_BYTES = step * 4
        # Every client; then client 0 absent (its rank sends zeros); then client 1 expected
        # but dropped (skipped), so the average is of the others, rescaled.
        for cohort, dropped in ((clients, ()), (clients[1:], ()), (clients, (1,))):
            arrived = [k for k in cohort if k not in dropped]
            if not arrived:
                continue
            results = []
            for aggregator in (separate, in_place):
                flat.buffer.copy_(torch.from_numpy(client_params(base, world.rank)))
                aggregator.begin_round(denominator=sum(SIZES[k] for k in cohort))
                if world.rank in arrived:
                    aggregator.add(flat.buffer, SIZES[world.rank], 1.0, SIZES[world.rank])
                totals = aggregator.allreduce()
                assert totals.weight == totals.examples == sum(SIZES[k] for k in arrived)
                results.append(totals.average.clone())
            assert torch.equal(results[0], results[1]), "in place differs from a payload"
            assert np.allclose(flat.buffer.numpy(), reference(base, arrived), rtol=1e-6, atol=1e-6)
            assert flat.is_intact()


def sparse_params(base: np.ndarray, client: int) -> np.ndarray:
    """The base with about 5 % of its coordinates moved, a different draw per client."""
    rng = np.random.default_rng(100 + client)
    moved = rng.random(base.shape) < 0.05
    return base + np.where(moved, rng.standard_normal(base.shape), 0).astype(np.float32)


def check_sparse(world: World, model: torch.nn.Module) -> None:
    """The sparse wire against the float64 reference and the dense payload: every client,
    a cohort of two, a client dropped; then DP's fixed denominator (no rescale)."""
    flat = FlatParameters(model)
    base = flat.buffer.numpy().copy()
    start = torch.from_numpy(base.copy())
    sparse = SparseAllgather(world, start)
    dense = WeightedAllreduce(world, flat.numel, "cpu")
    mine = assign_clients(SIZES, world.size)[world.rank]
    everyone = range(len(SIZES))
    cases = ((everyone, (), True), ((1, 3), (), True), (everyone, (2,), True))
    cases += ((everyone, (2,), False),)  # a fixed denominator: the missing weight stays out
    for cohort, dropped, rescale in cases:
        denominator = sum(SIZES[k] for k in cohort)
        results = []
        for aggregator in (sparse, dense):
            aggregator.begin_round(denominator, rescale=rescale)
            sent = 0
            for client in (k for k in mine if k in cohort and k not in dropped):
                flat.buffer.copy_(torch.from_numpy(sparse_params(base, client)))
                aggregator.add(flat.buffer, SIZES[client], 100.0 + client, SIZES[client])
                sent |= sparse_params(base, client) != base
            totals = aggregator.allreduce()
            results.append(totals.average.clone().numpy().astype(np.float64))
        arrived = [k for k in cohort if k not in dropped]
        weight = sum(SIZES[k] for k in arrived)
        assert totals.weight == weight and totals.loss_sum == sum(100.0 + k for k in arrived)
        total = weight if rescale else denominator
        expected = (
            sum(SIZES[k] * sparse_params(base, k).astype(np.float64) for k in arrived) / total
        )
        assert np.allclose(results[0], expected, rtol=1e-6, atol=1e-6), "sparse != reference"
        assert np.allclose(results[0], results[1], rtol=1e-6, atol=1e-6), "sparse != dense"
        moved = int(np.count_nonzero(sent)) if mine else 0
        assert sparse.nbytes == 8 * moved + 8 * len(TAIL), (sparse.nbytes, moved)


def main() -> None:
    world = World.from_comm()
    with abort_on_error(world):
        model = random_bert(vocab=100, width=16, layers=1, labels=3)
        if "lora" in sys.argv[1:]:  # the payload is then the adapters and the head only
            from peft import LoraConfig, TaskType, get_peft_model

            model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4))
        flat = FlatParameters(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert flat.numel == trainable <= sum(p.numel() for p in model.parameters())
        base = flat.buffer.numpy().copy()

        aggregator = WeightedAllreduce(world, flat.numel, "cpu")
        server = ServerOptimizer("fedavg", ServerHyper(), flat.buffer)
        mine = assign_clients(SIZES, world.size)[world.rank]
        # Round 1: every client. Round 2: a cohort of two, so some ranks contribute zeros.
        # Round 3: every client is expected, but client 2 drops out (skipped as non-finite):
        # the average must be of the others, rescaled.
        for cohort, dropped in ((range(len(SIZES)), ()), ((1, 3), ()), (range(len(SIZES)), (2,))):
            aggregator.begin_round(denominator=sum(SIZES[k] for k in cohort))
            for client in (k for k in mine if k in cohort and k not in dropped):
                flat.buffer.copy_(torch.from_numpy(client_params(base, client)))
                aggregator.add(flat.buffer, SIZES[client], 100.0 + client, SIZES[client])
            totals = aggregator.allreduce()
            server.step(flat.buffer, flat.buffer.clone(), totals.average)

            arrived = [k for k in cohort if k not in dropped]
            expected = reference(base, arrived)
            got = flat.buffer.numpy().astype(np.float64)
            error = np.max(np.abs(got - expected))
            assert totals.weight == sum(SIZES[k] for k in arrived), totals.weight
            assert totals.loss_sum == sum(100.0 + k for k in arrived), totals.loss_sum
            assert totals.examples == totals.weight
            assert np.allclose(got, expected, rtol=1e-6, atol=1e-6), f"max abs error {error}"
            # The model sees the result: its parameters are views into the flat buffer.
            first = next(p for p in model.parameters() if p.requires_grad).detach().numpy().ravel()
            assert np.array_equal(first, got[: first.size].astype(np.float32))
            assert flat.is_intact()
        check_in_place(world, model)
        check_sparse(world, model)
        if world.rank == 0:
            print(f"FEDAVG OK np={world.size} params={flat.numel} max_abs_error={error:.3g}")


if __name__ == "__main__":
    main()
    sys.exit(0)
