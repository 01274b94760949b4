"""Under mpiexec: the host-staged Allreduce path (used on GPUs without CUDA-aware MPI)
gives bit-identical sums to the direct path, exercised here on CPU tensors."""

import numpy as np
import torch

from fedmpi.comm import World, abort_on_error
from fedmpi.fedavg import WeightedAllreduce


def main() -> None:
    world = World.from_comm()
    with abort_on_error(world):
        params = torch.from_numpy(
            np.random.default_rng(world.rank).standard_normal(1000).astype(np.float32)
        )
        results = []
        for staged in (False, True):
            reducer = WeightedAllreduce(world, params.numel(), "cpu", n_metrics=2, staged=staged)
            assert (reducer.host is not None) == staged
            for _ in range(2):  # reused across rounds: nothing stale survives a reset
                reducer.reset()
                reducer.add(params, 3.0 + world.rank, [1.0, float(world.rank)])
                summed, weight, metrics = reducer.allreduce()
            results.append((summed.clone(), weight, metrics.copy()))
        (direct, w1, m1), (staged_sum, w2, m2) = results
        assert torch.equal(direct, staged_sum)
        assert w1 == w2 == sum(3.0 + r for r in range(world.size))
        assert np.array_equal(m1, m2) and m1[1] == sum(range(world.size))
        if world.rank == 0:
            print("STAGING OK", flush=True)


if __name__ == "__main__":
    main()
