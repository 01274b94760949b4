"""Sharded evaluation of the global model: each rank scores its slice of the test set and
one small Allreduce of (confusion matrix, loss sum) gives every rank the same metrics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from fedmpi import precision
from fedmpi.comm import World, wait_for_all
from fedmpi.device_rows import DeviceRows


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    macro_f1: float
    examples: int
    confusion: np.ndarray  # (C, C) counts: rows the true class, columns the predicted one


def local_counts(
    model: nn.Module, data: DeviceRows, n_classes: int, batch_size: int, compute: str = "fp32"
) -> np.ndarray:
    """This rank's ``[confusion matrix (C*C, true-major) | loss sum]`` as float64."""
    confusion = torch.zeros(n_classes * n_classes, dtype=torch.int64, device=data.labels.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=data.labels.device)
    was_training = model.training
    model.eval()
    # Length-sorted batches waste little compute on padding.
    order = torch.argsort(data.lengths, stable=True)
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            inputs, labels = data.batch(order[start : start + batch_size])
            with precision.autocast(compute, str(data.labels.device)):
                logits = model(**inputs).logits.float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            predicted = logits.argmax(dim=-1)
            confusion += torch.bincount(labels * n_classes + predicted, minlength=n_classes**2)
    model.train(was_training)
    return np.concatenate([confusion.cpu().numpy().astype(np.float64), [float(loss_sum)]])


def metrics_from_counts(counts: np.ndarray, n_classes: int) -> EvalResult:
    confusion = counts[:-1].reshape(n_classes, n_classes)
    total = confusion.sum()
    true_pos = np.diag(confusion)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    denominator = support + predicted  # 2TP + FP + FN
    present = denominator > 0  # classes absent from both labels and predictions don't count
    f1 = 2 * true_pos[present] / denominator[present]
    return EvalResult(
        accuracy=float(true_pos.sum() / total) if total else float("nan"),
        loss=float(counts[-1] / total) if total else float("nan"),
        macro_f1=float(f1.mean()) if f1.size else float("nan"),
        examples=int(total),
        confusion=np.rint(confusion).astype(np.int64),
    )


def evaluate(
    model: nn.Module,
    data: DeviceRows,
    n_classes: int,
    batch_size: int,
    world: World,
    compute: str = "fp32",
) -> EvalResult:
    counts = local_counts(model, data, n_classes, batch_size, compute)
    wait_for_all(world)
    world.comm.Allreduce(MPI.IN_PLACE, counts, op=MPI.SUM)
    return metrics_from_counts(counts, n_classes)


def evaluate_clients(
    model: nn.Module,
    rows: dict[int, DeviceRows],
    n_clients: int,
    n_classes: int,
    batch_size: int,
    world: World,
    compute: str = "fp32",
) -> np.ndarray:
    """Every client's ``[confusion matrix | loss sum]`` on its own evaluation rows, as a
    (clients, C*C + 1) array on every rank: each rank scores the clients it hosts, one
    small Allreduce gathers them (zeros for clients without rows)."""
    counts = np.zeros((n_clients, n_classes * n_classes + 1))
    for client, data in rows.items():
        if len(data):
            counts[client] = local_counts(model, data, n_classes, batch_size, compute)
    wait_for_all(world)
    world.comm.Allreduce(MPI.IN_PLACE, counts, op=MPI.SUM)
    return counts
