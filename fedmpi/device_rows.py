"""Pre-tokenized rows on the device, cut into dynamically padded batches.

Rows are stored padded to the maximum length; each batch is trimmed to its longest row, so
short texts cost short sequences. No tokenization happens after the cache is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmpi.data import TokenizedRows


@dataclass
class DeviceRows:
    """One client's (or one rank's evaluation) rows, resident on the training device."""

    input_ids: torch.Tensor  # (N, L) int32
    lengths: torch.Tensor  # (N,) int64
    labels: torch.Tensor  # (N,) int64

    @classmethod
    def from_rows(cls, rows: TokenizedRows, device: str | torch.device) -> DeviceRows:
        return cls(
            input_ids=torch.from_numpy(rows.input_ids).to(device),
            lengths=torch.from_numpy(rows.lengths).long().to(device),
            labels=torch.from_numpy(rows.labels).to(device),
        )

    def __len__(self) -> int:
        return self.labels.numel()

    def batch(self, index: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Model inputs (input_ids, attention_mask) padded to the batch's longest row."""
        lengths = self.lengths[index]
        width = int(lengths.max())
        input_ids = self.input_ids[index, :width].long()
        positions = torch.arange(width, device=input_ids.device)
        attention_mask = (positions[None, :] < lengths[:, None]).long()
        return {"input_ids": input_ids, "attention_mask": attention_mask}, self.labels[index]
