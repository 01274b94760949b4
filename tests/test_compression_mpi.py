"""Compressed updates in whole runs (real MPI): the result does not depend on ``-np``, a
resumed run with ``--error-feedback`` is bit for bit an uninterrupted one (the residuals
travel in the checkpoint), and under DP the clip bounds what is sent."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import job, run_mpi

from fedmpi.compression import CompressionSpec
from fedmpi.results import read_results

pytestmark = pytest.mark.mpi

# 4 clients, 3 of them a round (so a client may have no residual yet), stochastic
# rounding with error feedback, a checkpoint every round (the last one is kept).
COMPRESSED = (
    "--clients", 4, "--clients-per-round", 3, "--lr", "2e-3", "--compress", "int4",
    "--error-feedback", "--checkpoint-every", 1,
)  # fmt: skip


def launch(np_: int, out: Path, tiny_bert, toy_dataset, *extra) -> dict:
    result = run_mpi(np_, job(tiny_bert, toy_dataset, out, *COMPRESSED, *extra))
    assert result.returncode == 0, result.output[-3000:]
    return read_results(out / "results.h5")


def final_state(out: Path) -> dict[str, np.ndarray]:
    """The last checkpoint's parameters and every client's residual."""
    with h5py.File(out / "checkpoint.h5") as f:
        state = {"params": f["params"][()], "round": f.attrs["round"]}
    for path in sorted((out / "client-states").glob("*.h5")):
        with h5py.File(path) as f:
            state[path.name] = f["error_feedback/residual"][()]
    return state


@pytest.fixture(scope="module")
def straight(tiny_bert, toy_dataset, tmp_path_factory) -> Path:
    """Three rounds at -np 2."""
    out = tmp_path_factory.mktemp("straight") / "out"
    launch(2, out, tiny_bert, toy_dataset, "--rounds", 3)
    return out


def test_compressed_runs_do_not_depend_on_the_number_of_ranks(
    straight, tiny_bert, toy_dataset, tmp_path
):
    """Every random choice comes from (seed, client, round): at -np 1 the same clients
    send the same uploads. Only the Allreduce's summation order differs (rounding in
    the last bits); a draw that depended on the rank, or on the order of a rank's
    clients, would change about half of the values by a quantization step."""
    one = launch(1, tmp_path / "np1", tiny_bert, toy_dataset, "--rounds", 3)
    two = read_results(straight / "results.h5")
    expected = CompressionSpec.parse("int4").upload_bytes(final_state(straight)["params"].size)
    for results in (one, two):
        uploads = results["comm/client_upload_bytes"]
        cohort = results["clients/cohort"] == 1
        assert np.all(uploads[cohort] == expected) and np.all(np.isnan(uploads[~cohort]))
    assert np.array_equal(one["clients/cohort"], two["clients/cohort"])
    for key in ("metrics/test_loss", "metrics/train_loss"):
        np.testing.assert_allclose(one[key], two[key], rtol=1e-4, err_msg=key)
    a, b = final_state(tmp_path / "np1"), final_state(straight)
    assert a.keys() == b.keys() and len(a) == 2 + 4  # params, round, every client's residual
    for name in a:
        if name == "round":
            continue
        scale = float(np.abs(b[name]).max())
        moved = np.abs(a[name] - b[name]) > 1e-3 * scale
        assert moved.mean() < 1e-3, name  # a handful of values one rounding away, at most


def test_a_resumed_run_with_error_feedback_is_bit_for_bit_uninterrupted(
    straight, tiny_bert, toy_dataset, tmp_path
):
    """Two rounds, then the same command extended to three: the third round starts from
    the checkpointed residuals (a lost residual would change what every client sends)."""
    out = tmp_path / "resumed"
    launch(2, out, tiny_bert, toy_dataset, "--rounds", 2)
    resumed = launch(2, out, tiny_bert, toy_dataset, "--rounds", 3)
    want, got = final_state(straight), final_state(out)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert np.array_equal(got[name], value), name  # bit-identical
    uninterrupted = read_results(straight / "results.h5")
    assert list(resumed["round"]) == [1, 2, 3]
    for key in ("metrics/test_loss", "metrics/train_loss", "comm/client_upload_bytes"):
        assert np.array_equal(resumed[key], uninterrupted[key], equal_nan=True), key


def test_under_dp_the_clip_bounds_the_update_as_sent(tiny_bert, toy_dataset, tmp_path):
    """Compression comes before DP's clip: random-k's 1/F rescaling (here 10x) happens
    before the clip, so without noise the global update, the mean of what was sent, is
    within the bound C. Clipped first and rescaled after, each upload would be about
    sqrt(10) C and the mean of four sparse ones about 1.6 C."""
    clip = 0.01
    out = tmp_path / "dp"
    dp = (
        "--clients", 4, "--rounds", 1, "--lr", "2e-3", "--weighting", "uniform",
        "--dp-clip", clip, "--dp-noise-seed", 1, "--compress", "randk:0.1",
    )  # fmt: skip
    result = run_mpi(2, job(tiny_bert, toy_dataset, out, *dp))
    assert result.returncode == 0, result.output[-3000:]
    results = read_results(out / "results.h5")
    sent = results["comm/client_upload_bytes"][0]
    clipped = results["privacy/clipped_update_norm"][0]
    assert np.array_equal(np.isfinite(sent), np.isfinite(clipped))  # the same clients
    assert np.all(clipped[np.isfinite(clipped)] <= clip * (1 + 1e-5))
    assert results["diagnostics/client_update_norm"][0][np.isfinite(clipped)].min() > clip
    assert results["diagnostics/global_update_norm"][0] <= clip * (1 + 1e-5)


def test_the_sparse_wire_gives_the_dense_result_in_fewer_bytes(tiny_bert, toy_dataset, tmp_path):
    """top-k 10 % with error feedback at -np 2, over the sparse wire (FEDMPI_WIRE=sparse)
    and over the dense Allreduce: the same model up to fp32 rounding, the same uploads,
    and a wire of at most the rank's moved coordinates (8 bytes each) plus the tail."""
    flags = (
        "--clients", 4, "--lr", "2e-3", "--compress", "topk:0.1", "--error-feedback",
        "--rounds", 2, "--checkpoint-every", 1,
    )  # fmt: skip
    runs = {}
    for wire in ("dense", "sparse"):
        out = tmp_path / wire
        result = run_mpi(2, job(tiny_bert, toy_dataset, out, *flags), env={"FEDMPI_WIRE": wire})
        assert result.returncode == 0, result.output[-3000:]
        runs[wire] = (read_results(out / "results.h5"), final_state(out))
    (dense, dense_state), (sparse, sparse_state) = runs["dense"], runs["sparse"]
    np.testing.assert_allclose(sparse_state["params"], dense_state["params"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(
        sparse["comm/client_upload_bytes"], dense["comm/client_upload_bytes"]
    )
    for key in ("metrics/test_loss", "metrics/train_loss"):
        np.testing.assert_allclose(sparse[key], dense[key], rtol=1e-5, err_msg=key)
    numel = dense_state["params"].size
    # Two clients a rank, each sending 10 %: at most 20 % of the coordinates, 8 bytes each.
    assert np.all(sparse["comm/payload_bytes"] <= 8 * 0.2 * numel + 32 + 16)
    assert np.all(dense["comm/payload_bytes"] == 4 * (numel + 4))


@pytest.mark.parametrize(
    ("value", "compress", "message"),
    [
        ("fast", "topk:0.1", "FEDMPI_WIRE=fast: expected one of auto, dense, sparse"),
        ("sparse", "int8", "FEDMPI_WIRE=sparse needs --compress topk:F or randk:F"),
    ],
)
def test_a_bad_wire_is_one_line_and_exit_2(
    value, compress, message, tiny_bert, toy_dataset, tmp_path
):
    result = run_mpi(
        2,
        job(tiny_bert, toy_dataset, tmp_path / "out", "--compress", compress),
        env={"FEDMPI_WIRE": value},
        timeout=120,
    )
    assert result.returncode == 2, result.output[-2000:]
    errors = [line for line in result.output.splitlines() if "error" in line]
    assert errors == [f"fedmpi: error: {message}"], errors
