"""The per-client update check at each --diagnostics level, against numpy by hand."""

import math

import numpy as np
import pytest
import torch

from fedmpi.diagnostics import UpdateDiagnostics
from fedmpi.flat import FlatParameters


def flat_model() -> FlatParameters:
    torch.manual_seed(0)
    return FlatParameters(torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3)))


@pytest.mark.parametrize("level", ["off", "norms", "full"])
def test_update_norm_and_the_nonfinite_check(level):
    flat = flat_model()
    start = flat.buffer.clone()
    diagnostics = UpdateDiagnostics(flat, n_clients=2, level=level)
    diagnostics.start_round()
    flat.buffer.add_(torch.linspace(-1, 1, flat.numel))
    want = math.sqrt(np.sum((flat.buffer.double().numpy() - start.double().numpy()) ** 2))
    norm = diagnostics.record_client(0, 1.0, flat.buffer, start)
    if level == "off":
        assert math.isnan(norm)  # not computed, but the update was checked
    else:
        assert norm == pytest.approx(want, rel=1e-6)  # fp32 differences, float64 sum
    for bad in (float("nan"), float("inf")):
        flat.buffer[3] = bad
        assert diagnostics.record_client(1, 1.0, flat.buffer, start) is None
        assert diagnostics.skipped[1] == 1.0


def test_dp_clips_an_update_whose_norm_the_diagnostics_did_not_measure():
    """--dp-clip with --diagnostics off: the norm arrives as NaN and must be measured, not
    propagated (NaN would make every client's model NaN)."""
    from fedmpi.config import Config
    from fedmpi.privacy import ClientLevelDP

    dp = ClientLevelDP(Config(dp_clip=0.5, weighting="uniform", clients=4), 4)
    flat = flat_model()
    start = flat.buffer.clone()
    update = torch.linspace(-1, 1, flat.numel)
    flat.buffer.add_(update)
    clipped = dp.clip(flat.buffer, start, math.nan)
    assert clipped == pytest.approx(0.5, rel=1e-5)
    # The direction is kept: start + 0.5 * update / |update|, by hand.
    want = start.double() + 0.5 * update.double() / update.double().norm()
    torch.testing.assert_close(flat.buffer.double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("budget", [None, 40])
def test_leave_one_out_cosines_against_numpy(budget, monkeypatch):
    """Four clients on one rank: each client's cosine to the weighted mean update of the
    *other* three, overall and per layer group, on the strided sample, by hand. With a
    federation budget of 40 coordinates (10 a client) the sample is strided (stride 6 of 58)."""
    from mpi4py import MPI

    from fedmpi import diagnostics as diag
    from fedmpi.comm import World

    if budget is not None:
        monkeypatch.setattr(diag, "FEDERATION_SAMPLES", budget)
    flat = flat_model()
    n = 4
    diagnostics = UpdateDiagnostics(flat, n_clients=n, level="full")
    stride = diagnostics.stride
    assert stride == (1 if budget is None else math.ceil(flat.numel / (budget // n)))
    start = flat.buffer.clone()
    rng = np.random.default_rng(0)
    updates = rng.normal(size=(n, flat.numel)) + 0.5  # correlated: a shared mean
    weights = np.array([1.0, 2.0, 3.0, 5.0])
    diagnostics.start_round()
    for k in range(n):
        params = start + torch.tensor(updates[k], dtype=torch.float32)
        diagnostics.record_client(k, float(weights[k]), params, start)
    total = weights.sum()
    mean = (weights[:, None] * updates).sum(0) / total
    average = start + torch.tensor(mean, dtype=torch.float32)
    diagnostics.observe_average(average, float(total), start)
    row = diagnostics.finish_round(World.from_comm(MPI.COMM_WORLD), np.arange(n), average, start)

    # By hand: the sampled coordinates, their layer group ("0" or "1": Sequential's index).
    sizes = [p.numel() for p in flat.params]
    group = np.repeat([0, 0, 1, 1], sizes)[::stride]
    cosine = lambda a, b: a @ b / np.sqrt((a @ a) * (b @ b))  # noqa: E731
    for k in range(n):
        others = np.delete(np.arange(n), k)
        other_mean = (weights[others, None] * updates[others]).sum(0) / weights[others].sum()
        u, o = updates[k, ::stride], other_mean[::stride]
        want = cosine(u, o)
        assert row["diagnostics/client_update_cosine"][k] == pytest.approx(want, abs=1e-5)
        assert row["diagnostics/client_update_cosine_no_embeddings"][k] == pytest.approx(
            want, abs=1e-5
        )
        by_group = row["diagnostics/client_update_cosine_by_group"][k]
        for g in (0, 1):
            want_g = cosine(u[group == g], o[group == g])
            assert by_group[g] == pytest.approx(want_g, abs=1e-5)


def test_the_samples_of_many_clients_fit_the_federation_budget():
    """200 clients of a MiniLM-sized model keep at most FEDERATION_SAMPLES coordinates in
    all, 16 clients keep the full 2**20 each, and the stride does not depend on -np."""
    from fedmpi.diagnostics import FEDERATION_SAMPLES, SAMPLE_SIZE, sample_stride

    numel = 22_713_602
    for clients in (1, 4, 16):
        assert math.ceil(numel / sample_stride(numel, clients)) <= SAMPLE_SIZE
        assert sample_stride(numel, clients) == math.ceil(numel / SAMPLE_SIZE)
    for clients in (17, 200, 1000, 10**6):
        kept = math.ceil(numel / sample_stride(numel, clients))
        assert kept * clients <= FEDERATION_SAMPLES or kept == 1
    assert sample_stride(100, 10**9) == 100  # one coordinate each at least
