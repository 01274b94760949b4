"""LoRA adapters as the federated payload (``--peft lora``), with Hugging Face ``peft``.

The frozen base is loaded once per rank and never communicated; what trains, and so what
the flat buffer holds and the Allreduce averages, is the adapters' A and B matrices and
the classification head (every module the checkpoint did not have: ``classifier``,
DistilBERT's ``pre_classifier``, Llama's ``score``), as fp32 master weights.

Averaging A and B separately (the default, as FlowerTune and FedIT do) is *not* the
average of the clients' low-rank updates: mean(B_k) mean(A_k) != mean(B_k A_k).
``--lora-freeze-a`` keeps every A at its shared initialisation (same seed on every rank)
and trains only B: then mean(B_k) A = mean(B_k A), and FedAvg is exact (FFA-LoRA, Sun et
al. 2024).
"""

from __future__ import annotations

import torch
from torch import nn

from fedmpi.config import Config
from fedmpi.errors import UsageError

# Architectures peft has no default target modules for, among fedmpi's built-ins and the
# paper's models: their attention projections, as peft names BERT's "query" and "value".
EXTRA_TARGETS = {
    "mpnet": ["q", "v"],
    "distilbert": ["q_lin", "v_lin"],
    "albert": ["query", "value"],
}


def head_modules(model: nn.Module, new_parameters: list[str]) -> list[str]:
    """The modules holding the parameters the checkpoint lacked (the new head), as the
    names peft's ``modules_to_save`` matches: ``classifier``, ``pre_classifier``, ``score``."""
    modules = set()
    for name in new_parameters:
        module = name.rsplit(".", 1)[0]
        # The top-level child that holds it: the head is one module, or a head with
        # sub-layers (MPNet's classifier.dense, classifier.out_proj) kept whole.
        base = model.base_model_prefix
        parts = module.split(".")
        modules.add(parts[1] if parts[0] == base and len(parts) > 1 else parts[0])
    return sorted(modules)


def apply_lora(model: nn.Module, cfg: Config, new_parameters: list[str]) -> nn.Module:
    """Wrap ``model`` with LoRA adapters; only adapters and the head stay trainable, in fp32.

    The targets and the rank are checked before peft allocates anything: peft silently
    skips a target name it does not find, and a rank in the millions would allocate
    adapters until the rank runs out of memory."""
    from peft import LoraConfig, TaskType, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = model.config.model_type
    heads = head_modules(model, new_parameters)
    modules = _adaptable(model, heads)
    if cfg.lora_targets is not None:
        targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
        _check_targets(model_type, modules, targets, heads)
    elif model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        targets = list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    elif model_type in EXTRA_TARGETS:
        targets = EXTRA_TARGETS[model_type]
    else:
        raise UsageError(
            f"--peft lora: no default adapter targets for a {model_type!r} model: name the "
            "modules with --lora-targets (e.g. the attention's query and value projections)"
        )
    _check_rank(modules, targets, cfg.lora_r)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        modules_to_save=heads,
    )
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as exc:
        raise UsageError(f"--peft lora: {str(exc).strip().splitlines()[0]}") from exc
    for name, param in wrapped.named_parameters():
        if cfg.lora_freeze_a and "lora_A" in name:
            param.requires_grad_(False)
        if param.requires_grad:
            param.data = param.data.float()  # fp32 master weights, whatever the base's dtype
    return wrapped


def _adaptable(model: nn.Module, heads: list[str]) -> dict[str, nn.Module]:
    """The modules peft may put adapters on, by name: all but the head's (which trains
    whole, and which peft never adapts)."""
    return {
        name: module
        for name, module in model.named_modules()
        if name and not any(part in heads for part in name.split("."))
    }


def _targeted(modules: dict[str, nn.Module], target: str) -> list[str]:
    """The modules a target name selects, matched as peft matches a list of names: the
    whole name, or its last dotted parts (``query``, ``attention.self.query``)."""
    return [name for name in modules if name == target or name.endswith(f".{target}")]


def _check_targets(
    model_type: str, modules: dict[str, nn.Module], targets: list[str], heads: list[str]
) -> None:
    """Every ``--lora-targets`` name must select a module: peft adapts the names it finds
    and silently skips the others, so a typo would train less than asked."""
    missing = [t for t in targets if not _targeted(modules, t)]
    if targets and not missing:
        return
    layers = sorted({name.rsplit(".", 1)[-1] for name, m in modules.items() if _is_matrix(m)})
    what = f"{', '.join(missing)}: no such module in" if missing else "names no module of"
    raise UsageError(
        f"--lora-targets {what} this {model_type} model; its layers outside the head "
        f"({', '.join(heads)}, which trains whole): {', '.join(layers)}"
    )


def _check_rank(modules: dict[str, nn.Module], targets: list[str], rank: int) -> None:
    """Refuse a rank above the narrowest adapted layer's width: B A has rank at most
    min(in, out), so more rank only adds parameters to average, never capacity."""
    widths = {
        name: min(modules[name].weight.shape)
        for target in targets
        for name in _targeted(modules, target)
        if _is_matrix(modules[name])
    }
    if not widths:
        return  # nothing LoRA can adapt: peft refuses the targets with its own message
    narrowest = min(widths, key=widths.get)
    if rank > widths[narrowest]:
        raise UsageError(
            f"--lora-r {rank} exceeds the width of the adapted layers ({narrowest}: "
            f"{widths[narrowest]}): use at most {widths[narrowest]}"
        )


def _is_matrix(module: nn.Module) -> bool:
    """A layer with one weight matrix that LoRA adapts: linear (GPT-2's Conv1D included)
    or embedding; its width, the smaller side of the matrix."""
    weight = getattr(module, "weight", None)
    return (isinstance(module, nn.Linear | nn.Embedding) or type(module).__name__ == "Conv1D") and (
        isinstance(weight, torch.Tensor) and weight.dim() == 2
    )


def describe(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def frozen_dtypes(model: nn.Module) -> list[torch.dtype]:
    return sorted({p.dtype for p in model.parameters() if not p.requires_grad}, key=str)
