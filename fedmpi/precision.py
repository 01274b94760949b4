"""Mixed precision for local training and evaluation (``--precision``).

The master weights stay fp32 (they are the flat buffer that is averaged); only the
forward/backward compute runs in bf16 or fp16 under autocast. fp16 needs loss scaling
and is offered on CUDA only; bf16 needs none and runs on CPU and GPU.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from fedmpi.errors import UsageError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check(precision: str, device: str) -> None:
    if precision == "fp16" and not device.startswith("cuda"):
        raise UsageError("--precision fp16 needs a CUDA device (use bf16 on CPU)")


def autocast(precision: str, device: str) -> AbstractContextManager:
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 (whose small gradients would underflow), else None."""
    return torch.amp.GradScaler(torch.device(device).type) if precision == "fp16" else None
