"""What a results file must carry to be trusted later: the code that made it, the data it
trained on, and the baselines its test scores must beat."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np

from fedmpi import __version__
from fedmpi import results_keys as rk
from fedmpi.data import TokenizedRows


def code_revision() -> str:
    """``<git commit>`` of the fedmpi source that is running, ``+dirty`` when tracked files
    differ from it, or ``fedmpi <version>`` outside a git checkout."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"fedmpi {__version__}"
    return commit + ("+dirty" if dirty else "")


def rows_sha256(rows: TokenizedRows) -> str:
    """Identity of a set of tokenized examples (ids, lengths, labels, in order): two runs
    with the same hash were scored on the same test set."""
    sha = hashlib.sha256()
    for array in (rows.input_ids, rows.lengths, rows.labels):
        sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()


def baselines(labels: np.ndarray, n_classes: int) -> dict[str, float | int]:
    """What a model that learned nothing scores on these labels.

    A constant predictor of the majority class scores the majority rate p; its macro-F1
    (mean over the classes present, as ``fedmpi.evaluate`` computes it) is that class's
    F1, 2p / (1 + p), divided by the number of classes present.
    """
    counts = np.bincount(labels, minlength=n_classes)
    p = counts.max() / counts.sum()
    present = int((counts > 0).sum())
    return {
        rk.MAJORITY_CLASS: int(counts.argmax()),
        rk.MAJORITY_RATE: float(p),
        rk.MAJORITY_MACRO_F1: float(2 * p / (1 + p) / present),
        rk.CHANCE: 1.0 / n_classes,
        rk.TEST_EXAMPLES: int(counts.sum()),
    }
