"""Server optimizers against a short independent numpy implementation (Reddi et al. 2021)."""

import numpy as np
import pytest
import torch

from fedmpi.server import ServerHyper, ServerOptimizer

HYPER = ServerHyper(lr=0.1, momentum=0.8, beta1=0.9, beta2=0.99, tau=1e-3)


def numpy_reference(name, x, averages):
    """x_{t+1} from x_t and the clients' average, written out plainly in float64."""
    x = x.astype(np.float64)
    m = np.zeros_like(x)
    v = np.full_like(x, HYPER.tau**2)
    for avg in averages:
        d = x - avg
        if name == "fedavg":
            x = avg.astype(np.float64)
            continue
        if name == "avgm":
            m = HYPER.momentum * m + d
            x = x - HYPER.lr * m
            continue
        m = HYPER.beta1 * m + (1 - HYPER.beta1) * d
        if name == "adagrad":
            v = v + d * d
        elif name == "adam":
            v = HYPER.beta2 * v + (1 - HYPER.beta2) * d * d
        elif name == "yogi":
            v = v - (1 - HYPER.beta2) * d * d * np.sign(v - d * d)
        x = x - HYPER.lr * m / (np.sqrt(v) + HYPER.tau)
    return x


@pytest.mark.parametrize("name", ["fedavg", "avgm", "adagrad", "adam", "yogi"])
def test_server_optimizer_matches_numpy(name):
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(1000).astype(np.float32)
    # Four rounds of a toy problem: the clients pull towards a moving target.
    averages = [
        (x0 * 0.5 + rng.standard_normal(1000) * 0.1 * r).astype(np.float32) for r in range(4)
    ]
    params = torch.from_numpy(x0.copy())
    server = ServerOptimizer(name, HYPER, params)
    total_weight = 7.0
    for avg in averages:
        weighted_sum = torch.from_numpy(avg * total_weight)
        server.step(params, params.clone(), weighted_sum, total_weight)
    expected = numpy_reference(name, x0, averages)
    np.testing.assert_allclose(params.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_fedavg_is_exactly_the_weighted_average():
    params = torch.randn(100)
    weighted_sum = torch.randn(100) * 3
    ServerOptimizer("fedavg", HYPER, params).step(params, params.clone(), weighted_sum, 3.0)
    assert torch.equal(params, weighted_sum / 3.0)
    assert ServerOptimizer("fedavg", HYPER, params).state() == {}


def test_a_round_without_clients_is_an_error():
    with pytest.raises(RuntimeError, match="no client contributed"):
        ServerOptimizer("fedavg", HYPER, torch.zeros(3)).step(
            torch.zeros(3), torch.zeros(3), torch.zeros(3), 0.0
        )
