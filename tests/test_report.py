"""``python -m fedmpi.report`` on synthetic results files written with fedmpi's own
``ResultsWriter``: grouping over seeds, the interval arithmetic (against numbers worked
out by hand), the collapse rule, the tables and figures, and one-line errors with exit
code 2 for bad input."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from fedmpi.config import Config
from fedmpi.report import main
from fedmpi.report_runs import Run, load_run
from fedmpi.results import RESULTS_NAME, ResultsWriter

NAN = math.nan
LABELS = ["a", "b", "c", "d"]
MAJORITY = 0.40  # of a 400-example test set: two standard errors are 2 * 0.0245 = 0.049
T_975_DF2 = 4.302652729911275  # Student t quantile, 95 % two-sided, 2 degrees of freedom
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_results(
    path: Path,
    model: str,
    clients: int,
    accuracy: list[float],
    seed: int = 1,
    macro_f1: list[float] | None = None,
    diagnostics: bool = False,
    lr: float = 5e-5,
    test_sha256: str = "same-test-set",
    rounds: int | None = None,
    **settings,
) -> Path:
    """A results file as fedmpi writes it, through ``ResultsWriter`` itself."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = Config(
        model=model, dataset="toy", clients=clients, rounds=rounds or len(accuracy), seed=seed,
        lr=lr, **settings,
    )  # fmt: skip
    attrs = {
        "config": cfg.to_json(),
        "label_names": json.dumps(LABELS),
        "majority_rate": MAJORITY,
        "majority_macro_f1": 2 * MAJORITY / (1 + MAJORITY) / len(LABELS),
        "test_examples": 400,
        "test_sha256": test_sha256,
    }
    writer = ResultsWriter(
        path / RESULTS_NAME, attrs, {"clients/sizes": np.full(clients, 100)}, {"seed": seed}
    )
    rng = np.random.default_rng(clients * 10 + seed)
    f1 = accuracy if macro_f1 is None else macro_f1
    for i, (acc, score) in enumerate(zip(accuracy, f1, strict=True)):
        row = {
            "round": i + 1,
            "clients/cohort": np.ones(clients, dtype=np.int8),
            "metrics/test_accuracy": acc,
            "metrics/test_macro_f1": score,
            "metrics/train_loss": 1.0 / (i + 1),
            "metrics/test_confusion": confusion_for(acc),
            "comm/payload_bytes": 1000,
            "timing/round_s": 2.0,
        }
        if diagnostics:
            cosine = rng.uniform(0.2, 0.9, size=clients)
            if clients > 1 and i == 0:
                cosine[0] = NAN  # client 0 not sampled in round 1
            row["diagnostics/client_update_cosine"] = cosine
            row["diagnostics/global_update_norm"] = rng.uniform(0.1, 1.0)
        writer.append(row)
    return path


def confusion_for(accuracy: float, n: int = 400) -> np.ndarray:
    """A 4-class confusion matrix of ``n`` examples, majority class 0 at MAJORITY, with
    ``accuracy`` right: the right ones spread over the classes, the rest predicted as the
    next class."""
    support = np.array([MAJORITY, 0.2, 0.2, 0.2]) * n
    right = np.floor(support * accuracy).astype(int)
    right[0] += round(accuracy * n) - right.sum()
    confusion = np.diag(right)
    for c in range(4):
        confusion[c, (c + 1) % 4] = support[c] - right[c]
    return confusion.astype(np.int64)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def row_of(rows, model, clients, setting=""):
    (row,) = [
        r
        for r in rows
        if (r["model"], int(r["clients"]), r["setting"]) == (model, clients, setting)
    ]
    return row


# (clients) -> per seed, accuracy per round. The 1-client runs' best: 0.90, 0.86, 0.88
# (mean 0.88; 90 % of it is 0.792).
CURVES = {
    1: [[0.60, 0.85, 0.90], [0.55, 0.86, 0.84], [0.70, 0.88, 0.87]],
    4: [[0.45, 0.70, 0.80], [0.40, 0.60, 0.84], [0.50, 0.75, 0.86]],
}


@pytest.fixture
def study(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for clients, curves in CURVES.items():
        for seed, curve in enumerate(curves, start=1):
            write_results(
                root / f"m-{clients}c-s{seed}", "m", clients, curve, seed, diagnostics=True
            )
    return root


def test_seeds_are_grouped_with_hand_computed_intervals(study, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(study), "--output", str(out)]) == 0
    assert "6 runs in 2 configurations" in capsys.readouterr().out
    rows = read_csv(out / "summary.csv")
    four = row_of(rows, "m", 4)
    # Final accuracies 0.80, 0.84, 0.86: mean 0.8333..., sample sd 0.030551.
    assert four["seeds"] == "3" and float(four["final_accuracy"]) == pytest.approx(2.5 / 3)
    sd = math.sqrt(((0.80 - 2.5 / 3) ** 2 + (0.84 - 2.5 / 3) ** 2 + (0.86 - 2.5 / 3) ** 2) / 2)
    assert float(four["final_accuracy_ci95"]) == pytest.approx(T_975_DF2 * sd / 3**0.5, abs=1e-6)
    assert float(four["best_accuracy"]) == pytest.approx((0.80 + 0.84 + 0.86) / 3)
    # Rounds to 90 % of the 1-client mean best (0.792): 3, 3, 3.
    assert float(four["rounds_to_reach"]) == 3.0 and four["reached"] == "3/3"
    one = row_of(rows, "m", 1)
    assert float(one["rounds_to_reach"]) == pytest.approx(2.0) and one["reached"] == "3/3"
    assert float(four["majority_rate"]) == MAJORITY and four["learned"] == "3/3"
    assert four["slow"] == four["collapsed"] == "0/3" and four["unfinished"] == "0"
    # Bytes: 1000 per client per round; 4 clients x 3 rounds.
    assert float(four["bytes_per_client_round"]) == 1000
    assert float(four["bytes_total"]) == 12000 and float(four["seconds_per_round"]) == 2.0
    assert four["runs"] == "m-4c-s1/results.h5;m-4c-s2/results.h5;m-4c-s3/results.h5"
    markdown = (out / "summary.md").read_text()
    assert "| m | toy | 4x16 lr 5e-05 | 3 | 0.400 | 0.833 ± 0.076 |" in markdown
    figures = {p.name for p in out.glob("*.png")}
    assert figures == {"accuracy_m_toy.png", "final_accuracy_toy.png", "diagnostics_m_toy.png"}
    for name in figures:
        assert f"]({name})" in markdown
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
        with __import__("PIL.Image").Image.open(out / name) as image:
            image.verify()


def test_the_summary_is_the_same_from_any_working_directory(study, tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main([str(study), "--out", str(first)]) == 0
    monkeypatch.chdir(study)
    assert main([".", "--out", str(second)]) == 0
    assert (first / "summary.csv").read_bytes() == (second / "summary.csv").read_bytes()
    assert (first / "summary.md").read_bytes() == (second / "summary.md").read_bytes()


def test_distinct_configurations_are_distinct_rows_and_nothing_is_dropped(tmp_path, capsys):
    write_results(tmp_path / "lr1", "m", 2, [0.5, 0.7], lr=5e-5)
    write_results(tmp_path / "lr2", "m", 2, [0.5, 0.6], lr=1e-4)
    write_results(tmp_path / "again", "m", 2, [0.5, 0.9], lr=1e-4)  # same config and seed
    write_results(tmp_path / "other-test", "m", 2, [0.5, 0.8], seed=2, lr=1e-4, test_sha256="x")
    out = tmp_path / "report"
    assert main([str(tmp_path), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "two runs of one configuration and seed 1" in err
    assert "different test sets" in err
    assert "different test sets" in (out / "summary.md").read_text()  # not only on stderr
    rows = read_csv(out / "summary.csv")
    assert sorted(r["lr"] for r in rows) == ["0.0001", "5e-05"]
    (fast,) = [r for r in rows if r["lr"] == "0.0001"]
    assert fast["seeds"] == "2" and fast["reached"] == ""  # no 1-client run to compare


def run_with(final_accuracy: float, predicted_share: float, loss_ratio: float) -> Run:
    """A two-round run whose final round scores ``final_accuracy`` with ``predicted_share``
    of its 400 predictions in class 0 and a training loss ``loss_ratio`` x round 1's."""
    final = np.zeros((4, 4))
    final[0, 0], final[1, 1] = 400 * predicted_share, 400 * (1 - predicted_share)
    return Run(
        Path("x"),
        {"model": "m", "dataset": "d", "clients": 2, "seed": 1, "rounds": 2},
        classes=4,
        rounds=np.array([1, 2]),
        accuracy=np.array([0.5, final_accuracy]),
        macro_f1=np.array([0.5, 0.5]),
        majority_rate=MAJORITY,
        test_examples=400,
        train_loss=np.array([1.2, 1.2 * loss_ratio]),
        test_confusion=np.stack([np.full((4, 4), -1.0), final]),
    )


@pytest.mark.parametrize(
    ("accuracy", "share", "loss_ratio", "outcome"),
    [
        (0.40, 1.00, 1.00, "collapsed"),  # one class predicted, loss did not fall
        (0.40, 0.95, 0.95, "collapsed"),  # both at their bounds
        (0.40, 1.00, 0.90, "slow"),  # one class, but the loss fell: still training
        (0.40, 0.90, 1.00, "slow"),  # loss flat, but predictions spread over classes
        (0.44, 0.60, 0.50, "slow"),  # better than majority, within two standard errors
        (0.46, 0.60, 0.50, "learned"),  # 0.46 > 0.40 + 2 sqrt(0.4 * 0.6 / 400) = 0.449
        (0.46, 0.96, 0.97, "collapsed"),  # collapse takes precedence
    ],
)
def test_outcome_rules(accuracy, share, loss_ratio, outcome):
    run = run_with(accuracy, share, loss_ratio)
    assert run.final_prediction_share == pytest.approx(share)
    assert run.outcome == outcome


def test_outcome_is_unknown_without_confusion_or_baselines():
    run = run_with(0.9, 0.5, 1.0)
    run.test_confusion = None  # an old file, and the loss did not fall: cannot tell
    assert run.outcome is None
    run = run_with(0.9, 0.5, 0.5)
    run.test_confusion = None  # the loss fell: not collapsed, whatever it predicts
    assert run.outcome == "learned"
    run = run_with(0.9, 0.5, 0.5)
    run.majority_rate = NAN
    assert run.outcome is None


def test_validation_selects_the_round_and_the_test_accuracy_there(tmp_path):
    path = write_results(tmp_path / "run", "m", 2, [0.5, 0.7, 0.6, 0.65])
    with h5py.File(path / RESULTS_NAME, "a") as f:
        f.create_dataset("metrics/val_accuracy", data=[0.55, 0.6, 0.62, 0.62])
        f["metrics/val_accuracy"].attrs["per_round"] = 1
    run = load_run(path / RESULTS_NAME)
    assert run.selected_round == 3  # the earliest of the tied best
    assert run.at_round(run.accuracy, run.selected_round) == 0.6


def test_an_unfinished_seed_is_kept_apart_and_said(tmp_path, capsys):
    write_results(tmp_path / "s1", "m", 2, [0.5, 0.7, 0.8], seed=1)
    write_results(tmp_path / "s2", "m", 2, [0.5, 0.9, 0.9], seed=2)
    write_results(tmp_path / "s3", "m", 2, [0.3], seed=3, rounds=3)  # died after round 1
    out = tmp_path / "report"
    assert main([str(tmp_path), "--out", str(out)]) == 0
    assert "stopped after round 1 of 3" in capsys.readouterr().err
    (row,) = read_csv(out / "summary.csv")
    assert row["seeds"] == "2" and row["unfinished"] == "1"
    assert float(row["final_accuracy"]) == pytest.approx(0.85)  # s3's 0.3 not averaged in
    assert "stopped after round 1 of 3" in (out / "summary.md").read_text()


def test_comparisons_are_exact_permutation_tests_holm_adjusted(tmp_path):
    """Against scipy's exact permutation test and Holm's procedure written out by hand."""
    from scipy.stats import permutation_test, ttest_ind

    finals = {1: [0.80, 0.82, 0.85, 0.81, 0.83], 4: [0.70, 0.74, 0.72, 0.69, 0.75],
              16: [0.60, 0.84, 0.58, 0.79, 0.62]}  # fmt: skip
    for clients, values in finals.items():
        for seed, final in enumerate(values, start=1):
            write_results(tmp_path / f"k{clients}-s{seed}", "m", clients, [0.5, final], seed)
    out = tmp_path / "report"
    assert main([str(tmp_path), "--out", str(out)]) == 0
    rows = read_csv(out / "comparisons.csv")
    assert [(r["a"], r["b"]) for r in rows] == [
        ("1x16 lr 5e-05", "4x16 lr 5e-05"),
        ("1x16 lr 5e-05", "16x16 lr 5e-05"),
        ("4x16 lr 5e-05", "16x16 lr 5e-05"),
    ]
    pairs = [(1, 4), (1, 16), (4, 16)]
    p = []
    for row, (a, b) in zip(rows, pairs, strict=True):
        x, y = finals[a], finals[b]
        exact = permutation_test(
            (x, y), lambda u, v: np.mean(u) - np.mean(v), permutation_type="independent",
            n_resamples=np.inf, alternative="two-sided",
        ).pvalue  # fmt: skip
        assert float(row["p"]) == pytest.approx(exact, abs=1e-6)
        assert float(row["difference"]) == pytest.approx(np.mean(x) - np.mean(y), abs=1e-6)
        welch = ttest_ind(x, y, equal_var=False).confidence_interval(0.95)
        assert float(row["low"]) == pytest.approx(welch.low, abs=1e-6)
        assert float(row["high"]) == pytest.approx(welch.high, abs=1e-6)
        p.append(exact)
    order = np.argsort(p)  # Holm: the k-th smallest times (m - k), kept monotone
    holm = np.empty(3)
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (3 - k) * p[i]))
        holm[i] = running
    assert [float(r["p_holm"]) for r in rows] == pytest.approx(holm, abs=1e-6)
    assert float(rows[0]["p"]) == pytest.approx(2 / 252, abs=1e-6)  # every 1 above every 4
    assert "## Comparisons" in (out / "summary.md").read_text()


def test_mean_cosine_ignores_unsampled_clients(tmp_path):
    path = write_results(tmp_path / "run", "m", 4, [0.5, 0.6, 0.7], diagnostics=True)
    run = load_run(path / RESULTS_NAME)
    with h5py.File(path / RESULTS_NAME) as f:
        cosine = f["diagnostics/client_update_cosine"][()]
        norm = f["diagnostics/global_update_norm"][()]
    assert run.mean_cosine[0] == pytest.approx(cosine[0, 1:].mean())  # client 0 is NaN there
    assert run.mean_cosine[1:] == pytest.approx(cosine[1:].mean(axis=1))
    assert run.global_norm == pytest.approx(norm)
    plain = write_results(tmp_path / "plain", "m", 2, [0.5, 0.6])
    assert load_run(plain / RESULTS_NAME).mean_cosine is None


def test_missing_path_exits_2_with_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("python -m fedmpi.report: error: ") and "nope" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content",
    [b"not an HDF5 file", b""],
    ids=["garbage", "empty"],
)
def test_invalid_file_exits_2_with_one_line(tmp_path, capsys, content):
    bad = tmp_path / "bad" / RESULTS_NAME
    bad.parent.mkdir()
    bad.write_bytes(content)
    assert main([str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a readable fedmpi results file" in err


def test_hdf5_without_fedmpi_layout_exits_2(tmp_path, capsys):
    with h5py.File(tmp_path / RESULTS_NAME, "w") as f:
        f["x"] = [1, 2]
    assert main([str(tmp_path / RESULTS_NAME)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_directory_without_results_and_no_arguments_exit_2(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no results.h5" in capsys.readouterr().err
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RUN_DIR" in err


def test_skip_invalid_keeps_the_good_runs(study, tmp_path, capsys):
    grid = study
    bad = grid / "broken" / RESULTS_NAME
    bad.parent.mkdir()
    bad.write_bytes(b"partial")
    out = tmp_path / "report"
    assert main([str(grid), "--out", str(out)]) == 2
    assert main([str(grid), "--out", str(out), "--skip-invalid"]) == 0
    assert "warning: skipped" in capsys.readouterr().err
    assert len(read_csv(out / "summary.csv")) == 2


def test_without_matplotlib_the_tables_are_still_written(study, tmp_path, monkeypatch, capsys):
    grid = study
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.delitem(sys.modules, "fedmpi.report_plots", raising=False)
    monkeypatch.delattr("fedmpi.report_plots", raising=False)  # imported by an earlier test
    out = tmp_path / "report"
    assert main([str(grid), "--out", str(out)]) == 0
    assert "figures skipped" in capsys.readouterr().err
    assert len(read_csv(out / "summary.csv")) == 2
    assert not list(out.glob("*.png"))
    assert "## Figures" not in (out / "summary.md").read_text()


def test_run_before_its_first_round_exits_2(tmp_path, capsys):
    """The writer creates results.h5 before round 1: such a file is not yet a result."""
    with h5py.File(tmp_path / RESULTS_NAME, "w") as f:
        f.attrs["config"] = Config(model="m", dataset="d", clients=2).to_json()
        f.attrs["label_names"] = json.dumps(LABELS)
        f["clients/sizes"] = [10, 10]
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no round finished" in err


def test_per_client_spread_epsilon_and_unseen_clients(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    cfg = Config(model="m", dataset="toy", clients=5, rounds=2)
    attrs = {
        "config": cfg.to_json(),
        "label_names": json.dumps(LABELS),
        "majority_rate": MAJORITY,
        "majority_macro_f1": 0.1,
        "test_examples": 400,
    }
    static = {"clients/sizes": np.full(5, 10), "clients/holdout": np.array([0, 0, 0, 0, 1])}
    writer = ResultsWriter(path / RESULTS_NAME, attrs, static, {})
    # Client 4 is held out: its 0.99 must not count among the clients that trained.
    for round_, accuracy in ((1, [0.1, 0.2, 0.3, 0.4, 0.99]), (2, [0.5, 0.7, 0.9, 0.6, 0.99])):
        writer.append(
            {
                "round": round_,
                "metrics/test_accuracy": 0.7,
                "clients/test_accuracy": np.array(accuracy),
                "metrics/holdout_accuracy": 0.99,
                "privacy/epsilon": 0.5 * round_,
            }
        )
    out = tmp_path / "report"
    assert main([str(path), "--out", str(out)]) == 0
    (row,) = read_csv(out / "summary.csv")
    last = [0.5, 0.7, 0.9, 0.6]  # round 2, the four clients that trained
    assert float(row["client_accuracy_mean"]) == pytest.approx(0.675)
    assert float(row["client_accuracy_worst"]) == 0.5
    assert float(row["client_accuracy_p10"]) == pytest.approx(0.53)  # 0.5 + 0.3 * (0.6 - 0.5)
    assert float(row["client_accuracy_std"]) == pytest.approx(np.std(last, ddof=1), abs=1e-6)
    assert float(row["holdout_accuracy"]) == 0.99 and float(row["epsilon"]) == 1.0
    assert "## Privacy and clients" in (out / "summary.md").read_text()
    assert (out / "privacy_m_toy.png").stat().st_size > 0  # accuracy against epsilon


def test_settings_outside_the_math_do_not_split_a_group(tmp_path):
    """Seeds run with another cache, output or tracker are one configuration; a setting
    that changes the math (the local epochs) is another."""
    write_results(tmp_path / "a", "m", 2, [0.5, 0.7], seed=1, node_local_cache=True)
    write_results(tmp_path / "b", "m", 2, [0.5, 0.8], seed=2, cache_dir="/x", wandb="p")
    write_results(tmp_path / "c", "m", 2, [0.5, 0.6], seed=3, dp_noise_seed=3)
    write_results(tmp_path / "d", "m", 2, [0.5, 0.6], seed=1, local_epochs=2)
    out = tmp_path / "report"
    assert main([str(tmp_path), "--out", str(out)]) == 0
    rows = read_csv(out / "summary.csv")
    assert sorted(r["seeds"] for r in rows) == ["1", "3"]
    assert {r["setting"] for r in rows} == {"local_epochs=1", "local_epochs=2"}
