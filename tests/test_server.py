"""Server optimizers against Reddi et al. 2021 ("Adaptive Federated Optimization"),
Algorithm 2 (``conftest.Algorithm2``), written in the paper's own notation and float64,
independently of ``fedmpi.server``: the clients' average update is
``Delta_t = avg_t - x_t`` and the server *adds* ``eta * m_t / (sqrt(v_t) + tau)``. FedAvgM
follows Hsu et al. 2019 (server momentum on the same Delta)."""

import numpy as np
import pytest
import torch
from conftest import BETA1, BETA2, ETA, MOMENTUM, TAU, Algorithm2

from fedmpi.server import ServerHyper, ServerOptimizer

HYPER = ServerHyper(lr=ETA, momentum=MOMENTUM, beta1=BETA1, beta2=BETA2, tau=TAU)


def algorithm_2(name: str, x0: np.ndarray, averages: list[np.ndarray]) -> np.ndarray:
    """x_T after one server step per round."""
    server, x = Algorithm2(name, x0), x0
    for average in averages:
        x = server.step(x, average)
    return x


@pytest.mark.parametrize("name", ["fedavg", "avgm", "adagrad", "adam", "yogi"])
def test_server_optimizer_follows_algorithm_2(name):
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(1000).astype(np.float32)
    # Four rounds: the clients pull towards a moving target.
    averages = [
        (x0 * 0.5 + rng.standard_normal(1000) * 0.1 * r).astype(np.float32) for r in range(4)
    ]
    params = torch.from_numpy(x0.copy())
    server = ServerOptimizer(name, HYPER, params)
    for average in averages:
        server.step(params, params.clone(), torch.from_numpy(average.copy()))
    np.testing.assert_allclose(
        params.numpy(), algorithm_2(name, x0, averages), rtol=1e-4, atol=1e-5
    )


def test_fedavg_copies_the_average_or_leaves_it_in_place():
    params = torch.randn(100)
    average = torch.randn(100)
    ServerOptimizer("fedavg", HYPER, params).step(params, params.clone(), average)
    assert torch.equal(params, average)
    same = params.clone()
    ServerOptimizer("fedavg", HYPER, same).step(same, torch.zeros(100), same)  # in place
    assert torch.equal(same, average)
    assert ServerOptimizer("fedavg", HYPER, params).state() == {}
