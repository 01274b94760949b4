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
