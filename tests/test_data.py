"""Loading corpora, label mapping, the HDF5 token cache and row reads."""

import h5py
import numpy as np
import pytest
from conftest import minilm_dir, toy_rows, write_csv
from transformers import AutoTokenizer

from fedmpi.config import Config
from fedmpi.data import build_cache, cache_path, load_text_splits, read_info, read_rows
from fedmpi.errors import UsageError


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_dir())


@pytest.mark.parametrize("name", ["rotten_tomatoes", "tweets", "bbc_news", "debates"])
def test_builtin_splits_are_clean_stratified_and_follow_the_data_seed(name):
    from fedmpi.splits import normalise

    splits = load_text_splits(Config(dataset=name))
    train = {normalise(t) for t in splits.train_texts}
    assert not train & {normalise(t) for t in splits.test_texts}  # no text on both sides
    assert len({normalise(t) for t in splits.test_texts}) == len(splits.test_texts)
    shares = [
        np.bincount(x, minlength=len(splits.label_names)) / len(x)
        for x in (splits.train_labels, splits.test_labels)
    ]
    tolerance = 0.03 if name == "rotten_tomatoes" else 0.005  # whole movies vs examples
    assert np.abs(shares[0] - shares[1]).max() < tolerance, shares
    assert "dropped" in splits.how_split and "data seed 0" in splits.how_split
    same = load_text_splits(Config(dataset=name, seed=7))
    assert same.test_texts == splits.test_texts  # --seed does not touch the data
    other = load_text_splits(Config(dataset=name, data_seed=1))
    assert other.test_texts != splits.test_texts  # --data-seed does


def test_rotten_tomatoes_keeps_each_movie_on_one_side():
    from fedmpi.data import BUILTIN_DATASETS
    from fedmpi.data import splits as split_fns

    corpus = BUILTIN_DATASETS["rotten_tomatoes"]()
    movie_of = {}  # deduplication keeps a text's first copy, hence its first movie
    for text, movie in zip(corpus.texts, corpus.columns["movie_name"], strict=True):
        movie_of.setdefault(split_fns.normalise(text), movie)
    splits = load_text_splits(Config(dataset="rotten_tomatoes"))
    train = {movie_of[split_fns.normalise(t)] for t in splits.train_texts}
    test = {movie_of[split_fns.normalise(t)] for t in splits.test_texts}
    assert len(test) > 50 and not train & test


def test_validation_split_is_the_test_set_when_test_is_unlabelled(tmp_path):
    write_csv(tmp_path / "train.csv", toy_rows(60, seed=0))
    write_csv(tmp_path / "validation.csv", toy_rows(20, seed=1))
    unlabelled = [(text, -1) for text, _ in toy_rows(30, seed=2)]
    write_csv(tmp_path / "test.csv", unlabelled)
    splits = load_text_splits(Config(dataset=str(tmp_path)))
    assert splits.test_texts == [text for text, _ in toy_rows(20, seed=1)]
    assert len(splits.train_texts) == 60 and "'validation'" in splits.how_split


@pytest.mark.parametrize("suffix", [".csv.gz", ".csv.bz2", ".jsonl.xz", ".json.bz2", ".csv.zst"])
def test_compressed_local_files_load(tmp_path, suffix):
    import bz2
    import gzip
    import json
    import lzma

    import zstandard

    rows = toy_rows(40, seed=3)
    if ".csv" in suffix:
        raw = write_csv(tmp_path / "plain.csv", rows).read_bytes()
    else:
        raw = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows).encode()
    compress = {
        ".gz": gzip.compress,
        ".bz2": bz2.compress,
        ".xz": lzma.compress,
        ".zst": zstandard.ZstdCompressor().compress,
    }["." + suffix.rsplit(".", 1)[1]]
    path = tmp_path / f"data{suffix}"
    path.write_bytes(compress(raw))
    splits = load_text_splits(Config(dataset=str(path)))
    assert len(splits.train_texts) + len(splits.test_texts) == len({t for t, _ in rows})


@pytest.mark.parametrize(
    "labels,message",
    [
        (["0.5", "1.25", "0.5", "2.0"], "is not a class"),
        (["1", "", "0", "1"], "is missing"),
    ],
)
def test_labels_that_are_not_classes_are_refused(tmp_path, labels, message):
    path = tmp_path / "data.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{y}\n" for i, y in enumerate(labels)))
    with pytest.raises(UsageError, match=message):
        load_text_splits(Config(dataset=str(path)))


def test_string_labels_map_to_sorted_ids(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("review,stars\nnice,pos\nmeh,neg\nfine,pos\nugh,neg\nok,mid\n")
    splits = load_text_splits(
        Config(dataset=str(path), text_column="review", label_column="stars", test_fraction=0.4)
    )
    assert splits.label_names == ["mid", "neg", "pos"]
    names = np.array(splits.label_names)
    texts = splits.train_texts + splits.test_texts
    labels = names[np.concatenate([splits.train_labels, splits.test_labels])]
    assert dict(zip(texts, labels, strict=True)) == {
        "nice": "pos",
        "meh": "neg",
        "fine": "pos",
        "ugh": "neg",
        "ok": "mid",
    }


@pytest.mark.parametrize(
    "content,extra,message",
    [
        ("", {}, "is empty"),
        ("text,label\na,1\n", {"split_by": "movie"}, "--split-by movie: dataset .* no column"),
        ("words,label\na,1\nb,0\n", {}, "no text column found among \\['words', 'label'\\]"),
        ("text,label\na,1\nb,0\n", {"label_column": "stars"}, "label column 'stars' not found"),
        ("text,label\na,1\nb,1\n", {}, "has 1 label value"),
    ],
)
def test_bad_data_files_are_usage_errors(tmp_path, content, extra, message):
    path = tmp_path / "data.csv"
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        load_text_splits(Config(dataset=str(path), **extra))


def test_cache_holds_token_ids_and_reads_rows_in_any_order(tmp_path, tokenizer):
    data = write_csv(tmp_path / "train.csv", toy_rows(50, seed=0))
    cfg = Config(dataset=str(data), max_seq_len=16, cache_dir=str(tmp_path / "cache"))
    path = cache_path(cfg, tokenizer)
    build_cache(cfg, tokenizer, path, progress=lambda message: None)
    info = read_info(path)
    assert info.n_train + info.n_test == 50 and info.label_names == ["0", "1"]
    with h5py.File(path) as f:
        ids, lengths = f["train/input_ids"][()], f["train/lengths"][()]
    assert ids.dtype == np.int32 and ids.shape == (info.n_train, 16)
    assert np.all(ids[np.arange(16)[None, :] >= lengths[:, None]] == tokenizer.pad_token_id)
    splits = load_text_splits(cfg)
    expected = tokenizer(splits.train_texts[3], truncation=True, max_length=16)["input_ids"]
    assert list(ids[3, : lengths[3]]) == expected

    rows = np.array([7, 0, 39, 3, 3, 20])
    got = read_rows(path, "train", rows, block=8)  # several blocks, repeats, any order
    assert np.array_equal(got.input_ids, ids[rows]) and np.array_equal(got.lengths, lengths[rows])


def test_cache_key_changes_with_max_length_and_tokenizer(tmp_path, tokenizer):
    base = Config(dataset="rotten_tomatoes", cache_dir=str(tmp_path))
    other = Config(dataset="rotten_tomatoes", cache_dir=str(tmp_path), max_seq_len=128)
    assert cache_path(base, tokenizer) != cache_path(other, tokenizer)
    assert cache_path(base, tokenizer) == cache_path(
        Config(dataset="rotten_tomatoes", cache_dir=str(tmp_path), seed=9), tokenizer
    )


def test_group_column_is_cached_for_partition_by_column(tmp_path, tokenizer):
    from fedmpi.data import read_groups

    cfg = Config(dataset="debates", partition="by:debate", cache_dir=str(tmp_path), max_seq_len=16)
    path = cache_path(cfg, tokenizer)
    assert path != cache_path(
        Config(dataset="debates", cache_dir=str(tmp_path), max_seq_len=16), tokenizer
    )
    build_cache(cfg, tokenizer, path, progress=lambda message: None)
    groups = read_groups(path, "debate")
    assert len(groups) == read_info(path).n_train
    assert len(np.unique(groups)) == 4  # three presidential debates and the VP debate
    with pytest.raises(UsageError, match="has no column 'venue'"):
        load_text_splits(Config(dataset="debates", partition="by:venue"))
    with pytest.raises(UsageError, match="no column 'movie'"):
        read_groups(path, "movie")


@pytest.mark.parametrize("damage", ["truncate", "empty", "unfinished"])
def test_an_incomplete_cache_is_named_and_rebuilt(tmp_path, tokenizer, damage):
    from fedmpi.comm import World
    from fedmpi.data import IncompleteCache
    from fedmpi.prepare import _prepare_cache

    data = write_csv(tmp_path / "train.csv", toy_rows(50, seed=0))
    cfg = Config(
        dataset=str(data),
        model=str(minilm_dir()),
        max_seq_len=16,
        cache_dir=str(tmp_path / "cache"),
    )
    path = cache_path(cfg, tokenizer)
    build_cache(cfg, tokenizer, path, progress=lambda message: None)
    good = read_info(path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        with h5py.File(path, "r+") as f:
            del f.attrs["complete"]
    with pytest.raises(IncompleteCache, match=str(path)):
        read_info(path)
    assert _prepare_cache(cfg, World.from_comm()) == str(path)
    assert read_info(path) == good  # rebuilt, the same data
