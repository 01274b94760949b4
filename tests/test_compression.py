"""Compressed client updates, in this process (``fedmpi.compression``): each format's
round-trip error bound, the unbiasedness of stochastic rounding and random-k (against a
biased variant that the same check must catch), top-k's selection, the error-feedback
invariant, the hook's bytes and per-client state, the refusals of bad settings and the
report's bytes. Whole runs (``-np`` independence, resume, DP) are in
``test_compression_mpi.py``."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mpi4py import MPI

from fedmpi import checkpoint, compression
from fedmpi.checkpointer import Checkpointer
from fedmpi.comm import World
from fedmpi.compression import (
    BLOCK,
    CompressionSpec,
    Compressor,
    Largest,
    UpdateCompression,
    stream_seed,
)
from fedmpi.config import Config
from fedmpi.errors import UsageError
from fedmpi.report import main
from fedmpi.report_runs import load_run
from fedmpi.results import RESULTS_NAME, ResultsWriter


def compressor(text: str, numel: int, error_feedback: bool = False) -> Compressor:
    return Compressor(CompressionSpec.parse(text), numel, error_feedback)


def update(numel: int, seed: int = 0, scale: float = 1e-3) -> torch.Tensor:
    """A heavy-tailed update (Student t): blocks with outliers, values of many sizes."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy((rng.standard_t(3, numel) * scale).astype(np.float32))


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4 blocks, so that small vectors cross many chunk boundaries."""
    monkeypatch.setattr(compression, "CHUNK", 4 * BLOCK)


# ---------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "text,message",
    [
        ("int3", "--compress: 'int3' is not an update format: expected none, bf16, fp16"),
        ("topk", "--compress: topk needs its fraction: topk:F"),
        ("topk:0", "--compress: topk:F needs a fraction F in (0, 1], got '0'"),
        ("randk:1.5", "--compress: randk:F needs a fraction F in (0, 1], got '1.5'"),
        ("randk:x", "--compress: randk:F needs a fraction F in (0, 1], got 'x'"),
        ("int8:0.5", "--compress: 'int8:0.5' is not an update format"),
    ],
)
def test_a_bad_format_is_refused_in_one_line(text, message):
    with pytest.raises(UsageError) as refused:
        Config(compress=text).validate(1)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_error_feedback_needs_compression():
    with pytest.raises(UsageError, match="--error-feedback needs --compress"):
        Config(error_feedback=True).validate(1)
    Config(compress="topk:0.01", error_feedback=True).validate(1)


def test_upload_bytes_count_values_scales_and_indices():
    n = 1000  # 4 blocks of 256 (the last one partial)
    expected = {
        "none": 4000,
        "bf16": 2000,
        "fp16": 2000,
        "int8": 1000 + 4 * 4,
        "int4": 500 + 4 * 4,
        "topk:0.1": 100 * 4 + 125,  # 100 values; a bitmap of 1000 bits beats 100 indices
        "topk:0.01": 10 * 4 + 10 * 4,  # 10 values and their 32-bit indices
        "randk:0.1": 100 * 4,  # the positions follow from (seed, client, round)
    }
    for text, nbytes in expected.items():
        assert CompressionSpec.parse(text).upload_bytes(n) == nbytes, text
    assert CompressionSpec.parse("topk:0.0001").kept(n) == 1  # never nothing
    assert CompressionSpec.parse("int4").upload_bytes(1001) == 501 + 16  # half bytes round up


# ---------------------------------------------------------------------------- round trips


def test_bf16_and_fp16_round_to_nearest_within_their_precision(small_chunks):
    x = update(3000)
    bf16 = compressor("bf16", x.numel()).roundtrip(x, 0)
    assert torch.equal(bf16, x.to(torch.bfloat16).float())
    assert torch.all((bf16 - x).abs() <= 2.0**-8 * x.abs())
    fp16 = compressor("fp16", x.numel()).roundtrip(x, 0)
    assert torch.all((fp16 - x).abs() <= 2.0**-11 * x.abs() + 2.0**-25)  # subnormals: 2^-24 apart
    big = torch.tensor([1e6, -1e6, 70000.0, 3.0])
    assert compressor("fp16", 4).roundtrip(big, 0).tolist() == [65504.0, -65504.0, 65504.0, 3.0]


@pytest.mark.parametrize("kind,levels", [("int8", 127), ("int4", 7)])
def test_int_formats_err_by_at_most_one_step_of_their_block(kind, levels, small_chunks):
    n = 10 * BLOCK + 37  # a partial last block, and chunks of 4 blocks

    def blocks(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([v, torch.zeros(11 * BLOCK - n)]).view(-1, BLOCK)

    x = update(n, seed=1)
    x[3 * BLOCK : 4 * BLOCK] = 0.0  # a block of zeros stays zeros
    out = compressor(kind, n).roundtrip(x, stream_seed(1, 2, 3))
    step = blocks(x).abs().amax(dim=1, keepdim=True) / levels  # one step of each block
    assert torch.all((blocks(out) - blocks(x)).abs() <= step * (1 + 1e-5))
    assert torch.all(out[3 * BLOCK : 4 * BLOCK] == 0)
    grid = blocks(out) / torch.where(step > 0, step, 1)
    assert torch.allclose(grid, grid.round(), atol=1e-3)  # every value is on its block's grid
    assert grid.round().abs().max() == levels
    # Each block's largest magnitude is exact (its fraction is 0).
    biggest = blocks(x).abs().argmax(dim=1)
    rows = torch.arange(len(biggest))
    torch.testing.assert_close(blocks(out)[rows, biggest], blocks(x)[rows, biggest])


def test_top_k_keeps_the_largest_magnitudes_exactly(small_chunks):
    n = 5000
    x = update(n, seed=2)
    out = compressor("topk:0.03", n).roundtrip(x, 0)
    k = CompressionSpec.parse("topk:0.03").kept(n)
    kept = out != 0
    assert int(kept.sum()) == k == 150
    assert torch.equal(out[kept], x[kept])  # the kept values travel as they are
    assert x[kept].abs().min() >= x[~kept].abs().max()
    reference = torch.zeros(n)
    order = torch.argsort(x.abs(), descending=True, stable=True)[:k]
    reference[order] = x[order]
    assert torch.equal(out, reference)


def test_top_k_breaks_ties_by_the_lowest_position_across_chunks():
    """Many equal magnitudes over many chunks: the k kept are the first k positions, as
    if all n had been sorted at once (a stable sort), whatever the chunking."""
    keys = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 1.0, 3.0, 3.0, 0.5, 3.0] * 30)
    for k in (1, 5, 37, 150, 299, 300):
        reference = torch.sort(torch.argsort(keys, descending=True, stable=True)[:k]).values
        for chunk in (1, 3, 7, 64, 300):
            largest = Largest(k)
            for lo in range(0, len(keys), chunk):
                largest.feed(keys[lo : lo + chunk], lo)
            assert torch.equal(largest.positions(), reference), (k, chunk)


def test_random_k_keeps_k_random_positions_rescaled(small_chunks):
    n, text = 4000, "randk:0.05"
    x = update(n, seed=3)
    c = compressor(text, n)
    first, again, other = (c.roundtrip(x, s) for s in (7, 7, 8))
    kept = first != 0
    assert int(kept.sum()) == 200
    torch.testing.assert_close(first[kept], x[kept] * (n / 200))
    assert torch.equal(first, again)  # the seed fixes the positions
    assert not torch.equal(kept, other != 0)
    spread = np.bincount(np.flatnonzero(kept.numpy()) * 10 // n, minlength=10)
    assert spread.min() > 0  # positions from the whole buffer, not one chunk


# ---------------------------------------------------------------------------- unbiasedness


def max_z(mean: np.ndarray, x: np.ndarray, sd: np.ndarray, draws: int) -> float:
    """The largest |mean - x| over the coordinates, in standard errors of the mean, after
    float32's rounding (1e-6 of the largest value) is forgiven."""
    off = np.maximum(np.abs(mean - x) - 1e-6 * np.abs(x).max(), 0.0)
    return float(np.max(off / (sd / math.sqrt(draws) + 1e-30)))


def draw_mean(
    text: str, x: torch.Tensor, draws: int, error_feedback: bool = False, tiles: int = 1
) -> np.ndarray:
    """The mean of ``draws`` round trips of ``x``: ``draws / tiles`` seeds, each on
    ``tiles`` copies of ``x`` end to end (whole blocks each: independent draws)."""
    c = compressor(text, x.numel() * tiles, error_feedback)
    total = torch.zeros(x.numel(), dtype=torch.float64)
    for round_ in range(draws // tiles):
        out = c.roundtrip(x.repeat(tiles), stream_seed(0, 5, round_))
        total += out.view(tiles, -1).double().sum(dim=0)
    return (total / draws).numpy()


@pytest.mark.parametrize("kind,levels", [("int8", 127), ("int4", 7)])
def test_stochastic_rounding_is_unbiased(kind, levels):
    """Over many draws every coordinate's mean is its value, within 6 standard errors of
    its own rounding variance; rounding to nearest (what a cast would do) is many
    standard errors off, and fails the same check."""
    draws = 2000
    x = update(2 * BLOCK, seed=4)
    mean = draw_mean(kind, x, draws, tiles=100)
    values = x.double().numpy()
    scale = np.repeat(np.abs(values).reshape(-1, BLOCK).max(axis=1), BLOCK)
    step = scale / levels
    fraction = values / step - np.floor(values / step)
    sd = step * np.sqrt(fraction * (1 - fraction))
    assert max_z(mean, values, sd, draws) < 6
    nearest = np.round(values / step) * step
    assert max_z(nearest, values, sd, draws) > 6  # a biased quantizer fails this check


def test_random_k_is_unbiased_and_unscaled_random_k_is_not():
    draws, n = 3000, 64
    x = update(n, seed=5)
    values = x.double().numpy()
    sd = np.abs(values) * math.sqrt(n / 16 - 1)  # one draw: x n/k with probability k/n
    assert max_z(draw_mean("randk:0.25", x, draws), values, sd, draws) < 6
    # Without the n/k rescaling (what is sent under error feedback) the mean is x k/n.
    unscaled = draw_mean("randk:0.25", x, draws, error_feedback=True)
    assert max_z(unscaled, values, sd, draws) > 6
    np.testing.assert_allclose(unscaled, values / 4, atol=4 * float(np.abs(values).max()) / 30)


# ---------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("text", ["bf16", "fp16", "int8", "int4", "topk:0.02", "randk:0.05"])
def test_error_feedback_sends_the_sum_of_the_true_updates(text, small_chunks):
    """Whatever was sent over the rounds plus the final residual is the sum of the true
    updates, up to float rounding; without the residual, top-k and random-k lose most of
    it."""
    n, rounds = 3 * BLOCK * 4 + 5, 12
    c = compressor(text, n, error_feedback=True)
    residual = torch.zeros(n)
    start = torch.zeros(n)  # the sent update is then exactly the model
    sent_total = torch.zeros(n, dtype=torch.float64)
    true_total = torch.zeros(n, dtype=torch.float64)
    for round_ in range(rounds):
        true = update(n, seed=100 + round_)
        params = start + true
        c.apply(params, start, residual, stream_seed(0, 1, round_))
        sent_total += params.double()
        true_total += true.double()
    scale = float(true_total.abs().max())
    torch.testing.assert_close(
        sent_total + residual.double(), true_total, rtol=0, atol=1e-5 * scale
    )
    if text.startswith(("topk", "randk")):
        assert float((sent_total - true_total).abs().max()) > 0.1 * scale


def test_random_k_under_error_feedback_sends_kept_values_unscaled():
    n = 1000
    c = compressor("randk:0.1", n, error_feedback=True)
    x, residual = update(n, seed=6), torch.zeros(n)
    params = x.clone()
    c.apply(params, torch.zeros(n), residual, 3)
    kept = params != 0
    assert torch.equal(params[kept], x[kept]) and torch.all(residual[kept] == 0)
    assert torch.equal(residual[~kept], x[~kept])


# ---------------------------------------------------------------------------- the hook


def context(params: torch.Tensor, start: torch.Tensor, round_: int, cohort) -> SimpleNamespace:
    return SimpleNamespace(
        round=round_,
        cohort=np.asarray(cohort),
        start=start,
        params=params,
        world=World.from_comm(MPI.COMM_WORLD),
    )


def run_rounds(hook: UpdateCompression, rounds, n: int, clients=(0, 2)) -> list[torch.Tensor]:
    """Each round, each client sends a fresh update from a shared start; the models sent."""
    sent = []
    for round_ in rounds:
        start = update(n, seed=round_, scale=1.0)
        ctx = context(start.clone(), start, round_, clients)
        hook.start(ctx)
        for client in clients:
            ctx.params.copy_(start + update(n, seed=1000 * round_ + client))
            assert math.isnan(hook.client_update(ctx, client, 1.0, 0.5))
            sent.append(ctx.params.clone())
    return sent


def test_the_hook_records_each_clients_upload_and_nan_for_the_others():
    n = 700
    hook = UpdateCompression(CompressionSpec.parse("int4"), n, n_clients=4, seed=3)
    run_rounds(hook, [1], n, clients=(0, 2))
    row = hook.row(context(torch.zeros(n), torch.zeros(n), 1, [0, 2]))
    uploaded = row["comm/client_upload_bytes"]
    expected = CompressionSpec.parse("int4").upload_bytes(n)
    assert np.array_equal(uploaded, [expected, np.nan, expected, np.nan], equal_nan=True)


def test_the_residuals_survive_a_checkpoint_bit_for_bit(tmp_path):
    """Two rounds, the residuals saved in the clients' files as the Checkpointer writes
    them and read back into a new hook, a third round: bit for bit what one hook does
    over three rounds."""
    n, spec = 3000, CompressionSpec.parse("topk:0.05")
    straight = UpdateCompression(spec, n, n_clients=3, seed=9, error_feedback=True)
    expected = run_rounds(straight, [1, 2, 3], n)

    first = UpdateCompression(spec, n, n_clients=3, seed=9, error_feedback=True)
    run_rounds(first, [1, 2], n)
    cfg = Config(compress="topk:0.05", error_feedback=True)
    world = World.from_comm(MPI.COMM_WORLD)
    saving = Checkpointer(cfg, world, tmp_path, {}, [0, 1, 2], None, {}, {"ef": first})
    for client in (0, 1, 2):
        arrays = saving._client_arrays(client)
        if client == 1:
            assert arrays is None  # client 1 never trained: no state, no file
            continue
        assert list(arrays) == ["ef/residual"]
        checkpoint.save_client_state(tmp_path, client, 2, arrays)

    resumed = UpdateCompression(spec, n, n_clients=3, seed=9, error_feedback=True)
    loading = Checkpointer(cfg, world, tmp_path, {}, [0, 1, 2], None, {}, {"ef": resumed})
    for client in (0, 2):
        loading._load_client(client, checkpoint.load_client_state(tmp_path, client, 2))
        assert torch.equal(resumed.residuals[client], first.residuals[client])
    third = run_rounds(resumed, [3], n)
    assert all(torch.equal(a, b) for a, b in zip(third, expected[-2:], strict=True))
    # Without the residuals the third round differs (the check above can fail).
    fresh = UpdateCompression(spec, n, n_clients=3, seed=9, error_feedback=True)
    assert not torch.equal(run_rounds(fresh, [3], n)[0], expected[-2])


def test_the_hook_applies_to_whatever_the_flat_buffer_holds():
    """LoRA's flat buffer (adapters and head) is just a shorter buffer: nothing special;
    a buffer smaller than a block, or than k at any fraction, still works."""
    for n in (1, 5, BLOCK + 1):
        for text in ("int8", "int4", "topk:0.5", "randk:0.5", "bf16"):
            x = update(n, seed=n)
            out = compressor(text, n).roundtrip(x, 1)
            assert out.shape == x.shape and torch.isfinite(out).all(), (text, n)


# ---------------------------------------------------------------------------- the report


def test_the_report_counts_the_uploaded_bytes(tmp_path):
    """bytes_per_client_round and bytes_total come from comm/client_upload_bytes when a
    run records it (not from the fp32 Allreduce payload)."""
    path = tmp_path / "run"
    path.mkdir()
    cfg = Config(model="m", dataset="toy", clients=3, rounds=2, compress="int8")
    attrs = {"config": cfg.to_json(), "label_names": json.dumps(["a", "b"])}
    writer = ResultsWriter(path / RESULTS_NAME, attrs, {"clients/sizes": np.full(3, 10)}, {})
    for round_, uploads in ((1, [100.0, np.nan, 100.0]), (2, [100.0, 100.0, 100.0])):
        writer.append(
            {
                "round": round_,
                "clients/cohort": (~np.isnan(uploads)).astype(np.int8),
                "metrics/test_accuracy": 0.5,
                "comm/payload_bytes": 4000,
                "comm/client_upload_bytes": np.array(uploads),
            }
        )
    run = load_run(path / RESULTS_NAME)
    assert run.bytes_per_client_round == 100.0 and run.bytes_total == 500.0
    out = tmp_path / "report"
    assert main([str(path), "--out", str(out)]) == 0
    assert (out / "compression_m_toy.png").read_bytes().startswith(b"\x89PNG")
    with open(out / "summary.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert float(row["bytes_per_client_round"]) == 100.0


def test_the_wire_is_sparse_by_default_only_for_sparse_codecs_across_nodes():
    """auto: sparse for top-k/random-k between nodes while c F P < 1 (c clients a rank,
    fraction F, P ranks); FEDMPI_WIRE forces either."""
    from fedmpi.sparse_wire import wire_choice

    one_node = SimpleNamespace(size=4, local_size=4)
    two_nodes = SimpleNamespace(size=4, local_size=2)
    assert wire_choice("topk:0.01", two_nodes, 2, {}) == "sparse"  # 2 x 0.01 x 4 = 0.08
    assert wire_choice("randk:0.1", two_nodes, 2, {"FEDMPI_WIRE": "auto"}) == "sparse"  # 0.8
    assert wire_choice("randk:0.1", two_nodes, 3, {}) == "dense"  # 1.2: the Allreduce is less
    assert wire_choice("topk:0.01", one_node, 1, {}) == "dense"
    assert wire_choice("int8", two_nodes, 1, {}) == "dense"
    assert wire_choice("topk:0.01", two_nodes, 1, {"FEDMPI_WIRE": "dense"}) == "dense"
    assert wire_choice("topk:0.5", one_node, 9, {"FEDMPI_WIRE": "sparse"}) == "sparse"
    with pytest.raises(UsageError, match="needs --compress topk"):
        wire_choice("none", two_nodes, 1, {"FEDMPI_WIRE": "sparse"})
