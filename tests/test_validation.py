"""--val-samples: a validation set cut from the training side like the test set, never
trained on; and the confusion matrices every evaluation records."""

import numpy as np
import pytest
from conftest import minilm_dir, run_mpi
from transformers import AutoTokenizer

from fedmpi.config import Config
from fedmpi.data import build_cache, cache_path, read_info, read_split_groups
from fedmpi.errors import UsageError
from fedmpi.evaluate import metrics_from_counts
from fedmpi.splits import validation_split


def _groups_and_labels(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """600 examples in 120 groups of 1-9, labels skewed 70/30 with group-level bias."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 10, size=120)
    groups = np.repeat(np.arange(120), sizes)
    bias = rng.random(120) < 0.7
    labels = (rng.random(len(groups)) < np.where(bias[groups], 0.9, 0.2)).astype(np.int64)
    return groups, labels


@pytest.mark.parametrize("n_val", [1, 37, 150])
def test_validation_split_keeps_groups_whole_and_the_label_mix(n_val):
    groups, labels = _groups_and_labels(seed=n_val)
    rest, val = validation_split(labels, groups, n_val, seed=3)
    assert len(val) == n_val
    assert not set(groups[rest]) & set(groups[val])  # no group on both sides
    assert len(np.intersect1d(rest, val)) == 0
    assert np.all(np.diff(rest) > 0) and np.all(np.diff(val) > 0)
    if n_val >= 37:  # stratified: the label share follows the whole's
        assert abs(labels[val].mean() - labels.mean()) < 0.08
    again = validation_split(labels, groups, n_val, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(again, (rest, val), strict=True))
    other = validation_split(labels, groups, n_val, seed=4)[1]
    assert n_val == 1 or not np.array_equal(other, val)


def test_no_validation_leaves_every_row_to_train_and_too_much_is_refused():
    groups, labels = _groups_and_labels(seed=0)
    rest, val = validation_split(labels, groups, 0, seed=0)
    assert np.array_equal(rest, np.arange(len(labels))) and len(val) == 0
    with pytest.raises(ValueError, match="leave none"):
        validation_split(labels, groups, len(labels), seed=0)


def test_the_cache_keeps_the_split_by_groups_of_the_train_side(tmp_path):
    """Rotten Tomatoes is split by movie: the cache keeps each training row's movie, so
    the validation set can leave whole movies out of training."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    cfg = Config(dataset="rotten_tomatoes", cache_dir=str(tmp_path), max_seq_len=8)
    path = cache_path(cfg, tokenizer)
    build_cache(cfg, tokenizer, path, progress=lambda message: None)
    groups = read_split_groups(path)
    assert groups is not None and len(groups) == read_info(path).n_train
    assert 100 < len(np.unique(groups)) < len(groups) / 10  # movies, many reviews each


def test_metrics_come_from_the_confusion_matrix():
    confusion = np.array([[5, 1, 0], [2, 3, 0], [0, 4, 1]])
    result = metrics_from_counts(np.append(confusion.ravel().astype(float), 8.0), 3)
    assert np.array_equal(result.confusion, confusion)
    assert result.accuracy == pytest.approx(9 / 16)
    f1 = [2 * 5 / (6 + 7), 2 * 3 / (5 + 8), 2 * 1 / (5 + 1)]  # 2TP / (support + predicted)
    assert result.macro_f1 == pytest.approx(np.mean(f1))
    assert result.loss == pytest.approx(0.5)


def test_negative_val_samples_is_refused():
    with pytest.raises(UsageError, match="--val-samples must be >= 0"):
        Config(val_samples=-1).validate(1)


@pytest.mark.mpi
def test_a_job_scores_validation_rows_no_client_trains_on(tmp_path, tiny_bert):
    """Two ranks, four clients: the validation rows are disjoint, by movie, from every
    client's shard; each evaluation's confusion matrix sums to the set's size and gives
    its accuracy; validation is scored exactly when the test set is."""
    from fedmpi.results import read_results

    out = tmp_path / "run"
    done = run_mpi(
        2,
        [
            "-m", "fedmpi", "--model", str(tiny_bert), "--clients", "4", "--rounds", "3",
            "--eval-every", "2", "--train-samples", "64", "--test-samples", "50",
            "--val-samples", "40", "--max-seq-len", "16", "--batch-size", "16",
            "--diagnostics", "off", "--cache-dir", str(tmp_path / "cache"),
            "--output", str(out),
        ],
    )  # fmt: skip
    assert done.returncode == 0, done.output
    assert "40 validation examples" in done.output
    results = read_results(out / "results.h5")
    for split, n in (("test", 50), ("val", 40)):
        confusion = results[f"metrics/{split}_confusion"]
        assert confusion.shape == (3, 2, 2) and confusion.dtype.kind == "i"
        assert (confusion[0] == -1).all()  # round 1 was not evaluated
        for i in (1, 2):
            assert confusion[i].sum() == n
            accuracy = np.trace(confusion[i]) / n
            assert results[f"metrics/{split}_accuracy"][i] == pytest.approx(accuracy)
    assert results["attrs"]["val_examples"] == 40 and len(results["attrs"]["val_sha256"]) == 64

    # Recompute the plan by hand: the job scored these validation rows (same hash), its
    # clients trained on these shards (same label histograms), and they share no movie.
    from fedmpi.data import read_column, read_rows
    from fedmpi.partition import PartitionSpec, make_shards, subsample
    from fedmpi.provenance import rows_sha256

    cache = next((tmp_path / "cache").glob("*.h5"))
    groups, labels = read_split_groups(cache), read_column(cache, "train", "labels")
    rest, val = validation_split(labels, groups, 40, seed=[0, 1])
    assert rows_sha256(read_rows(cache, "train", val)) == results["attrs"]["val_sha256"]
    rows = rest[subsample(len(rest), 64, 0)]
    shards = make_shards(PartitionSpec.parse("iid"), rows, labels[rows], None, 4, 42)
    histogram = [np.bincount(labels[s], minlength=2) for s in shards]
    assert np.array_equal(results["clients/label_histogram"], histogram)
    assert not set(groups[val]) & set(groups[rows])
