"""Under mpiexec on a simulated cluster: report where every rank landed, then keep doing
what a round does between ranks (sleeping barrier, Allreduce) until the job is ended.

The topology line lets the test check node-local ranks and the GPU each rank would pick
(``select_device`` with a stand-in torch that reports 3 GPUs per node: with 2 ranks per
node, mapping by global rank would give ranks 2 and 3 cuda:2 and cuda:0, by node-local
rank cuda:0 and cuda:1). The loop is the victim of the node-failure test.
"""

import json
import socket
import sys
import time
import types

import numpy as np
from mpi4py import MPI

from fedmpi.comm import World, abort_on_error, log, node_layout, select_device, wait_for_all

FAKE_GPUS = 3
MAX_LOOP_S = 300  # never outlive a forgotten test


def fake_torch() -> None:
    """A torch whose CUDA reports FAKE_GPUS devices: select_device imports it lazily."""
    cuda = types.SimpleNamespace(
        is_available=lambda: True, device_count=lambda: FAKE_GPUS, set_device=lambda d: None
    )
    sys.modules["torch"] = types.SimpleNamespace(cuda=cuda)


def main() -> None:
    world = World.from_comm()
    with abort_on_error(world):
        fake_torch()
        mine = {
            "rank": world.rank,
            "local_rank": world.local_rank,
            "local_size": world.local_size,
            "hostname": socket.gethostname(),
            "processor": MPI.Get_processor_name(),
            "device": select_device(world, "cuda"),
        }
        every = world.comm.gather(mine, root=0)
        log(world, "TOPOLOGY " + json.dumps(every))
        log(world, f"nodes: {node_layout(world)}")  # as fedmpi logs it at start-up
        payload = np.ones(2**18, dtype=np.float32)  # 1 MiB over the links
        start, round_ = time.monotonic(), 0
        while time.monotonic() - start < MAX_LOOP_S:
            round_ += 1
            wait_for_all(world)
            world.comm.Allreduce(MPI.IN_PLACE, payload, op=MPI.SUM)
            payload.fill(1.0)
            log(world, f"ROUND {round_}")
            time.sleep(0.05)


if __name__ == "__main__":
    main()
