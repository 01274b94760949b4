"""DP-FedAvg and per-client evaluation under real MPI: clipping, noise added once and the
same on every rank, the accountant's epsilon across a resume, the no-privacy limit equal
to FedAvg bit for bit, held-out clients never training."""

import numpy as np
import pytest
import torch
from conftest import run_mpi
from safetensors.torch import load_file
from test_train_mpi import fedmpi_args

from fedmpi.results import read_results


def dp_run(tiny_bert, toy_dataset, out, *extra, np_=2):
    args = fedmpi_args(
        tiny_bert,
        toy_dataset,
        out,
        out.parent / "cache",
        "--threads",
        1,
        "--weighting",
        "uniform",
        *extra,
    )
    result = run_mpi(np_, args)
    assert result.returncode == 0, result.output
    return result


def opacus_epsilons(noise: float, rate: float, rounds: int, delta: float) -> list[float]:
    """The accountant's own answer, stepped once per round as a DP-SGD loop would."""
    from opacus.accountants import RDPAccountant

    accountant, epsilons = RDPAccountant(), []
    for _ in range(rounds):
        accountant.step(noise_multiplier=noise, sample_rate=rate)
        epsilons.append(accountant.get_epsilon(delta=delta))
    return epsilons


def test_clipping_accounting_and_client_evaluation(tiny_bert, toy_dataset, tmp_path):
    out = tmp_path / "out"
    common = (
        "--clients",
        8,
        "--clients-per-round",
        0.5,
        "--dp-clip",
        0.5,
        "--dp-noise",
        1.0,
        "--lr",
        "1e-2",
        "--holdout-clients",
        0.25,
        "--eval-clients",
        "--verify-sync",
        "--checkpoint-every",
        1,
    )
    dp_run(tiny_bert, toy_dataset, out, *common, "--rounds", 2)
    resumed = dp_run(tiny_bert, toy_dataset, out, *common, "--rounds", 3)
    assert "resuming from" in resumed.output
    r = read_results(out / "results.h5")

    # Six clients train (two held out); each joins with probability 0.5.
    holdout = r["clients/holdout"].astype(bool)
    assert holdout.sum() == 2 and not r["clients/cohort"][:, holdout].any()
    participants = 6
    delta = 1 / participants**1.1
    assert r["attrs"]["dp_delta"] == pytest.approx(delta)
    np.testing.assert_allclose(
        r["privacy/epsilon"], opacus_epsilons(1.0, 0.5, 3, delta), rtol=1e-9
    )  # round 3 after the resume continues the count: the accountant's state survived

    # Clipping: every update that entered the sum has norm <= C; some needed it.
    clipped, raw = r["privacy/clipped_update_norm"], r["diagnostics/client_update_norm"]
    present = ~np.isnan(clipped)
    assert np.all(clipped[present] <= 0.5 * (1 + 1e-5))
    assert np.any(raw[present] > 0.5)
    assert np.all(r["sync/param_crc32"] == r["sync/param_crc32"][:, :1])  # same noise everywhere

    # Per-client accuracy, weighted by each client's test size, is the pooled accuracy.
    sizes, accuracy = r["clients/eval_sizes"], r["clients/test_accuracy"]
    for members, pooled in ((~holdout, "client_test"), (holdout, "holdout")):
        weighted = (accuracy[:, members] * sizes[members]).sum(axis=1) / sizes[members].sum()
        np.testing.assert_allclose(weighted, r[f"metrics/{pooled}_accuracy"], rtol=1e-12)
    assert np.all(sizes[holdout] == r["clients/sizes"][holdout])  # unseen clients: all data


def test_the_noise_is_z_c_over_the_denominator_added_once(tiny_bert, toy_dataset, tmp_path):
    """lr 1e-12: the clients barely move, so the new global model minus the old one is the
    noise. 8 clients at rate 0.5: denominator 4, so std = 2 * 1 / 4 = 0.5 on every
    coordinate; noise added on each of the 2 ranks before the sum would give 0.5 * sqrt(2)."""
    out = tmp_path / "out"
    dp_run(
        tiny_bert,
        toy_dataset,
        out,
        "--clients",
        8,
        "--clients-per-round",
        0.5,
        "--dp-clip",
        1.0,
        "--dp-noise",
        2.0,
        "--lr",
        "1e-12",
        "--optimizer",
        "sgd",
        "--rounds",
        1,
        "--save-model",
        "--verify-sync",
    )
    before = load_file(tiny_bert / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    noise = torch.cat(
        [(after[k] - before[k]).reshape(-1) for k in before if k in after and "classifier" not in k]
    )
    assert noise.numel() > 500_000
    assert float(noise.std()) == pytest.approx(0.5, rel=0.01)
    assert abs(float(noise.mean())) < 0.005


def test_no_clipping_and_no_noise_is_uniform_fedavg_bit_for_bit(tiny_bert, toy_dataset, tmp_path):
    common = ("--clients", 4, "--rounds", 2, "--lr", "2e-3", "--save-model")
    dp_run(tiny_bert, toy_dataset, tmp_path / "plain", *common)
    dp_run(tiny_bert, toy_dataset, tmp_path / "dp", *common, "--dp-clip", "inf", "--dp-noise", 0)
    plain = load_file(tmp_path / "plain" / "model" / "model.safetensors")
    private = load_file(tmp_path / "dp" / "model" / "model.safetensors")
    assert plain.keys() == private.keys()
    for name, value in plain.items():
        assert torch.equal(value, private[name]), name
    assert (
        read_results(tmp_path / "dp" / "results.h5")["privacy/epsilon"].tolist()
        == [float("inf")] * 2
    )
