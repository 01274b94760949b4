"""The flat parameter buffer: every trainable float parameter is a view into one tensor.

Aggregation then touches one contiguous fp32 buffer (one Allreduce, one scale, one copy)
instead of hundreds of tensors, and nothing is concatenated or unpacked per round.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def flat_zeros(numel: int, device: torch.device | str) -> torch.Tensor:
    """A model-sized fp32 buffer of zeros (the flat parameters, the payload, the round's start).

    On the CPU numpy allocates it, because numpy asks Linux for transparent huge pages
    (``madvise``) on large arrays and torch's allocator does not: every pass over these
    buffers (the scale, MPICH's shared-memory Allreduce copies, the update norms) streams
    hundreds of MB, and with 4 KiB pages it is bound by TLB misses. Measured here, the
    sliced Allreduce of BERT-base's 438 MB runs 1.6-2.2x faster on huge pages
    (``bench/aggregation.py``, docs/benchmarks.md).
    """
    if torch.device(device).type == "cpu":
        return torch.from_numpy(np.zeros(numel, dtype=np.float32))
    return torch.zeros(numel, dtype=torch.float32, device=device)


class FlatParameters:
    """Re-points a model's trainable parameters into one contiguous fp32 buffer.

    Move the model to its device *before* flattening: ``model.to()`` afterwards would
    replace the views with fresh tensors. Frozen parameters and integer buffers (position
    ids) stay outside the buffer: they never change, so they are never averaged.
    """

    def __init__(self, model: nn.Module, tail: int = 0) -> None:
        """``tail`` extra elements after the parameters (``storage`` holds both): room for
        the Allreduce's weight and metric slots, so the parameters can be reduced in place."""
        params = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
        if not params:
            raise ValueError("the model has no trainable floating-point parameters")
        names = {id(p): name for name, p in model.named_parameters()}
        self.names = [names[id(p)] for p in params]
        self.offsets = []
        total = sum(p.numel() for p in params)
        self.storage = flat_zeros(total + tail, params[0].device)
        self.buffer = self.storage[:total]
        offset = 0
        for p in params:
            n = p.numel()
            view = self.buffer[offset : offset + n].view_as(p)
            view.copy_(p.data)
            p.data = view
            self.offsets.append(offset)
            offset += n
        self.params = params

    @property
    def numel(self) -> int:
        return self.buffer.numel()

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Views of another flat buffer shaped like the parameters (e.g. the global model)."""
        return [
            buffer[off : off + p.numel()].view_as(p)
            for p, off in zip(self.params, self.offsets, strict=True)
        ]

    def is_intact(self) -> bool:
        """True while every parameter still aliases the buffer (nothing re-allocated them)."""
        base = self.buffer.data_ptr()
        item = self.buffer.element_size()
        return all(
            p.data_ptr() == base + off * item
            for p, off in zip(self.params, self.offsets, strict=True)
        )
