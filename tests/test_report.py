"""``python -m fedmpi.report`` on synthetic results files: the table's numbers, the figures,
and one-line errors with exit code 2 for bad input.

The files are written with h5py in the layout of ``fedmpi.results`` (root attributes
``config`` and ``label_names``, per-round ``round`` and ``metrics/*``), some with the
``diagnostics/*`` datasets and some without, as the report must read both.
"""

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
from fedmpi.report import Run, load_run, main
from fedmpi.results import RESULTS_NAME

NAN = math.nan
LABELS = ["a", "b", "c", "d"]  # 4 classes: chance 0.25

# (model, clients) -> test accuracy per round (NaN: round not evaluated).
CURVES = {
    ("alpha", 1): [0.50, 0.70, 0.80, 0.85, 0.90],
    ("alpha", 2): [0.40, 0.60, 0.75, 0.82, 0.80],
    ("alpha", 4): [NAN, 0.50, NAN, 0.70, 0.78],
    ("beta", 1): [0.60, 0.80, 0.90, 0.92, 0.95],
    ("beta", 2): [0.50, 0.70, 0.86, 0.90, 0.88],
    ("beta", 4): [0.40, 0.30, 0.26, 0.25, 0.27],  # collapses: 0.27 is 2 points from chance
}

# (model, clients) -> (final, best, best_round, rounds_to_90pct, collapsed).
# 90% targets: alpha 0.9 * 0.90 = 0.81, beta 0.9 * 0.95 = 0.855.
EXPECTED = {
    ("alpha", 1): (0.90, 0.90, 5, 4, False),
    ("alpha", 2): (0.80, 0.82, 4, 4, False),
    ("alpha", 4): (0.78, 0.78, 5, None, False),
    ("beta", 1): (0.95, 0.95, 5, 3, False),
    ("beta", 2): (0.88, 0.90, 4, 3, False),
    ("beta", 4): (0.27, 0.40, 1, None, True),
}

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_results(
    path: Path,
    model: str,
    clients: int,
    accuracy: list[float],
    diagnostics: bool = False,
    dataset: str = "toy",
) -> Path:
    """A results file as ``fedmpi.results.ResultsWriter`` lays it out."""
    path.mkdir(parents=True, exist_ok=True)
    n = len(accuracy)
    cfg = Config(model=model, dataset=dataset, clients=clients, rounds=n)
    rng = np.random.default_rng(clients)
    with h5py.File(path / RESULTS_NAME, "w") as f:
        f.attrs["config"] = cfg.to_json()
        f.attrs["label_names"] = json.dumps(LABELS)
        f.attrs["num_clients"] = clients
        f.attrs["world_size"] = min(clients, 2)
        f["clients/sizes"] = np.full(clients, 100, dtype=np.int64)
        f["clients/rank"] = np.arange(clients) % 2
        f["round"] = np.arange(1, n + 1)
        f["metrics/test_accuracy"] = np.asarray(accuracy)
        f["metrics/test_loss"] = np.where(np.isnan(accuracy), np.nan, 1.0)
        f["metrics/test_macro_f1"] = np.asarray(accuracy)
        f["metrics/train_loss"] = np.linspace(1.0, 0.5, n)
        f["timing/round_s"] = np.ones(n)
        if diagnostics:
            cosine = rng.uniform(0.2, 0.9, size=(n, clients))
            norm = rng.uniform(0.1, 1.0, size=(n, clients))
            if clients > 1:
                cosine[0, 0] = norm[0, 0] = np.nan  # client 0 not sampled in round 1
            f["diagnostics/client_update_cosine"] = cosine
            f["diagnostics/client_update_norm"] = norm
            f["diagnostics/global_update_norm"] = rng.uniform(0.1, 1.0, size=n)
            f["diagnostics/layer_drift"] = rng.uniform(0, 0.01, size=(n, 3))
            f.attrs["layer_groups"] = json.dumps(["embeddings", "encoder", "classifier"])
    return path


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    """runs/<model>-toy-<K>c for 2 models x clients {1, 2, 4}; beta has diagnostics."""
    root = tmp_path / "runs"
    for (model, clients), curve in CURVES.items():
        write_results(
            root / f"{model}-toy-{clients}c", model, clients, curve, diagnostics=model == "beta"
        )
    return root


def read_csv(path: Path) -> dict[tuple[str, int], dict[str, str]]:
    with open(path, newline="") as handle:
        return {(r["model"], int(r["clients"])): r for r in csv.DictReader(handle)}


def test_table_numbers_and_figures(grid, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "report"
    assert main([str(grid), "--out", str(out)]) == 0
    assert "6 runs" in capsys.readouterr().out

    rows = read_csv(out / "summary.csv")
    assert set(rows) == set(EXPECTED)
    for key, (final, best, best_round, to_90, collapsed) in EXPECTED.items():
        row = rows[key]
        assert row["dataset"] == "toy"
        assert row["rounds"] == "5"
        assert float(row["chance"]) == pytest.approx(0.25)
        assert float(row["final_accuracy"]) == pytest.approx(final), key
        assert float(row["best_accuracy"]) == pytest.approx(best), key
        assert row["best_round"] == str(best_round), key
        assert row["rounds_to_90pct"] == ("" if to_90 is None else str(to_90)), key
        assert row["collapsed"] == ("yes" if collapsed else "no"), key
        assert row["run"] == f"runs/{key[0]}-toy-{key[1]}c/{RESULTS_NAME}"

    markdown = (out / "summary.md").read_text()
    assert "| beta | toy | 4 | 5 | 4 | 0.2500 | 0.2700 | 0.4000 | 1 |  | **yes** |" in markdown

    expected_figures = {
        "accuracy_alpha_toy.png",
        "accuracy_beta_toy.png",
        "final_accuracy_toy.png",
        "diagnostics_beta_toy.png",  # only beta recorded diagnostics
    }
    assert {p.name for p in out.glob("*.png")} == expected_figures
    for name in expected_figures:
        assert f"]({name})" in markdown
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
        with __import__("PIL.Image").Image.open(out / name) as image:
            image.verify()  # a complete, decodable PNG, not just a header
            assert image.size[0] > 100 and image.size[1] > 100


def test_no_one_client_run_leaves_rounds_to_90_blank(tmp_path):
    for clients in (2, 4):
        write_results(tmp_path / f"r{clients}", "alpha", clients, CURVES[("alpha", clients)])
    out = tmp_path / "report"
    assert main([str(tmp_path / "r2"), str(tmp_path / "r4"), "--out", str(out)]) == 0
    rows = read_csv(out / "summary.csv")
    assert [rows[("alpha", k)]["rounds_to_90pct"] for k in (2, 4)] == ["", ""]


def test_mean_cosine_ignores_unsampled_clients(tmp_path):
    path = write_results(tmp_path / "run", "beta", 4, CURVES[("beta", 4)], diagnostics=True)
    run = load_run(path / RESULTS_NAME)
    with h5py.File(path / RESULTS_NAME) as f:
        cosine = f["diagnostics/client_update_cosine"][()]
        norm = f["diagnostics/global_update_norm"][()]
    assert run.mean_cosine[0] == pytest.approx(cosine[0, 1:].mean())  # client 0 is NaN there
    assert run.mean_cosine[1:] == pytest.approx(cosine[1:].mean(axis=1))
    assert run.global_norm == pytest.approx(norm)
    assert (
        load_run(write_results(tmp_path / "plain", "a", 2, [0.5, 0.6]) / RESULTS_NAME).mean_cosine
        is None
    )


@pytest.mark.parametrize(("final", "collapsed"), [(0.25, True), (0.2301, True), (0.2701, False)])
def test_collapse_threshold(final, collapsed):
    run = Run(Path("x"), "m", "d", 2, 4, np.array([1, 2]), np.array([0.5, final]))
    assert run.collapsed is collapsed


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


def test_skip_invalid_keeps_the_good_runs(grid, tmp_path, capsys):
    bad = grid / "broken" / RESULTS_NAME
    bad.parent.mkdir()
    bad.write_bytes(b"partial")
    out = tmp_path / "report"
    assert main([str(grid), "--out", str(out)]) == 2
    assert main([str(grid), "--out", str(out), "--skip-invalid"]) == 0
    assert "warning: skipped" in capsys.readouterr().err
    assert len(read_csv(out / "summary.csv")) == 6


def test_without_matplotlib_the_tables_are_still_written(grid, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.delitem(sys.modules, "fedmpi.report_plots", raising=False)
    monkeypatch.delattr("fedmpi.report_plots", raising=False)  # imported by an earlier test
    out = tmp_path / "report"
    assert main([str(grid), "--out", str(out)]) == 0
    assert "figures skipped" in capsys.readouterr().err
    assert len(read_csv(out / "summary.csv")) == 6
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
