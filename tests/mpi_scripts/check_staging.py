"""Under mpiexec: the host-staged Allreduce path (used on GPUs without CUDA-aware MPI)
gives bit-identical sums to the direct path, exercised here on CPU tensors."""

import numpy as np
import torch

from fedmpi.allreduce import WeightedAllreduce
from fedmpi.comm import World, abort_on_error


def main() -> None:
    world = World.from_comm()
    with abort_on_error(world):
        params = torch.from_numpy(
            np.random.default_rng(world.rank).standard_normal(1000).astype(np.float32)
        )
        results = []
        for staged in (False, True):
            reducer = WeightedAllreduce(world, params.numel(), "cpu", staged=staged)
            assert (reducer.host is not None) == staged
            total = sum(3.0 + r for r in range(world.size))
            for _ in range(2):  # reused across rounds: nothing stale survives a new round
                reducer.begin_round(denominator=total)
                reducer.add(params, 3.0 + world.rank, 1.0, float(world.rank))
                totals = reducer.allreduce()
            results.append((totals.average.clone(), totals.weight, totals.examples))
        (direct, w1, e1), (staged_sum, w2, e2) = results
        assert torch.equal(direct, staged_sum)
        assert w1 == w2 == total
        assert e1 == e2 == sum(range(world.size))
        if world.rank == 0:
            print("STAGING OK", flush=True)


if __name__ == "__main__":
    main()
