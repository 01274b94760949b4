"""DP-FedAvg and per-client evaluation under real MPI: clipping, noise added once and the
same on every rank, the accountants' epsilons across a resume, the secret noise key (kept
in the checkpoint only, a resume bit-exact, ``--dp-noise-seed`` reproducible), privacy
inputs refused on every rank, the no-privacy limit equal to FedAvg bit for bit, held-out
clients never training."""

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from conftest import SCRIPTS, fedmpi_args, run_mpi
from safetensors.torch import load_file
from test_privacy_accounting import assert_in_bracket, reference_epsilon

from fedmpi.results import read_results

pytestmark = pytest.mark.mpi


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


def opacus_rdp_epsilons(noise: float, rate: float, rounds: int, delta: float) -> list[float]:
    """The RDP accountant's own answer, stepped once per round as a DP-SGD loop would."""
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
    assert r["attrs"]["dp_accountant"] == "prv" and r["attrs"]["dp_noise_seed_given"] is False
    # Round 3 after the resume continues the count: the accountant's state survived.
    np.testing.assert_allclose(
        r["privacy/epsilon_rdp"], opacus_rdp_epsilons(1.0, 0.5, 3, delta), rtol=1e-9
    )
    for rounds, epsilon in enumerate(r["privacy/epsilon"], start=1):
        assert_in_bracket(epsilon, reference_epsilon(1.0, 0.5, rounds, delta))
    assert np.all(r["privacy/epsilon"] < r["privacy/epsilon_rdp"])

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
    results = read_results(tmp_path / "dp" / "results.h5")
    for name in ("privacy/epsilon", "privacy/epsilon_rdp"):
        assert results[name].tolist() == [float("inf")] * 2


def secret_run(tiny_bert, toy_dataset, out, rounds, *extra):
    """Four clients, everyone every round, noise z = 1 on clip 0.5, parameters' CRC32 per
    round (--verify-sync), a checkpoint every round."""
    return dp_run(
        tiny_bert,
        toy_dataset,
        out,
        "--clients",
        4,
        "--dp-clip",
        0.5,
        "--dp-noise",
        1.0,
        "--lr",
        "1e-2",
        "--rounds",
        rounds,
        "--verify-sync",
        "--checkpoint-every",
        1,
        *extra,
    )


def round_crc(out, round_: int) -> int:
    return int(read_results(out / "results.h5")["sync/param_crc32"][round_ - 1, 0])


def test_the_noise_key_is_secret_checkpointed_and_never_written_elsewhere(
    tiny_bert, toy_dataset, tmp_path
):
    """Without --dp-noise-seed: two runs of one configuration add different noise; a run
    interrupted after round 1 and resumed twice from copies of its output ends bit for bit
    the same (the key came from the checkpoint, not a fresh draw); the key is in
    checkpoint.h5 and in no other file of the run, nor in its output."""
    first, other, copy = tmp_path / "first", tmp_path / "other", tmp_path / "copy"
    outputs = [secret_run(tiny_bert, toy_dataset, first, 1).output]
    outputs.append(secret_run(tiny_bert, toy_dataset, other, 1).output)
    assert round_crc(first, 1) != round_crc(other, 1)  # same --seed, another secret
    shutil.copytree(first, copy)
    for out in (first, copy):
        resumed = secret_run(tiny_bert, toy_dataset, out, 2, "--save-model")
        assert "resuming from" in resumed.output
        outputs.append(resumed.output)
    assert round_crc(first, 2) == round_crc(copy, 2)
    a, b = (load_file(out / "model" / "model.safetensors") for out in (first, copy))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with h5py.File(first / "checkpoint.h5") as f:
        key = f["privacy/noise_key"][()]
    assert key.dtype == np.uint64 and key.shape == (2,)
    whole = int(key[0]) | int(key[1]) << 64
    texts = {str(int(w)) for w in key} | {f"{int(w):x}" for w in key} | {str(whole)}
    leaks = [key.tobytes(), *(w.tobytes() for w in key), *(t.encode() for t in texts)]
    files = [p for p in first.rglob("*") if p.is_file() and p.name != "checkpoint.h5"]
    assert any(p.name == "results.h5" for p in files)
    for path in files:
        data = path.read_bytes()
        assert not any(leak in data for leak in leaks), path
    assert not any(text in "".join(outputs) for text in texts)
    results = read_results(first / "results.h5")
    assert results["attrs"]["dp_noise_seed_given"] is False
    assert results["config"]["dp_noise_seed"] is None
    assert "a secret key drawn by rank 0" in outputs[0]


def test_a_given_noise_seed_reproduces_the_run(tiny_bert, toy_dataset, tmp_path):
    """--dp-noise-seed: the same noise twice (and not the default's), and the results
    say the seed was given."""
    runs = [tmp_path / "a", tmp_path / "b", tmp_path / "seed-8"]
    for out, seed in zip(runs, (7, 7, 8), strict=True):
        secret_run(tiny_bert, toy_dataset, out, 1, "--dp-noise-seed", seed)
    assert round_crc(runs[0], 1) == round_crc(runs[1], 1) != round_crc(runs[2], 1)
    results = read_results(runs[0] / "results.h5")
    assert results["attrs"]["dp_noise_seed_given"] is True
    assert results["config"]["dp_noise_seed"] == 7


# (extra flags on 4 clients with DP at 2 ranks, the message)
REFUSED = [
    (["--dp-delta", "0.25"], "--dp-delta 0.25 is not below 1 / 4 (the clients that train)"),
    (["--clients-per-round", "0.2"], "expects 0.8 clients a round"),
    (["--dp-noise", "1e20", "--dp-clip", "1e19"], "overflows float32"),
    (["--dp-noise-seed=-1"], "--dp-noise-seed must be in [0, 2^32)"),
]


def test_privacy_inputs_are_refused_on_every_rank_before_training(tiny_bert, toy_dataset, tmp_path):
    """One line, printed once, exit 2 on both ranks, no traceback, nothing trained."""
    cases = []
    for i, (extra, _) in enumerate(REFUSED):
        base = fedmpi_args(tiny_bert, toy_dataset, tmp_path / f"out-{i}", tmp_path / "cache")
        flags = ["--clients", "4", "--weighting", "uniform", "--dp-clip", "1", *extra]
        cases.append([*base[2:], *flags])  # in-process: no "-m fedmpi"
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    result = run_mpi(
        2,
        [str(SCRIPTS / "check_bad_inputs.py"), str(tmp_path / "cases.json"), str(tmp_path / "o")],
    )
    assert result.returncode == 0, result.output[-3000:]
    outcomes = json.loads((tmp_path / "o").read_text())
    for (extra, message), outcome in zip(REFUSED, outcomes, strict=True):
        output = "".join(outcome["outputs"])
        assert outcome["codes"] == [2, 2], (extra, output)
        assert output.count("fedmpi: error:") == 1 and message in output, (extra, output)
        assert "Traceback" not in output and "round 1/" not in output
