"""The results file (``OUTPUT/results.h5``), written by rank 0 only.

Layout: root attributes ``config`` (the run's Config as JSON), ``label_names``,
``num_clients`` and ``world_size``; datasets
``clients/sizes`` and ``clients/rank``; one value per round in ``metrics/*`` and
``timing/*`` (``round`` holds the round numbers). Rows are appended and flushed every
round, so a killed job keeps the rounds it finished.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from fedmpi.config import Config

RESULTS_NAME = "results.h5"


class ResultsWriter:
    def __init__(
        self,
        path: Path,
        cfg: Config,
        label_names: list[str],
        client_sizes: list[int],
        client_ranks: list[int],
    ):
        self.file = h5py.File(path, "w")
        self.file.attrs["config"] = cfg.to_json()
        self.file.attrs["label_names"] = json.dumps(label_names)
        self.file.create_dataset("clients/sizes", data=np.asarray(client_sizes, dtype=np.int64))
        self.file.create_dataset("clients/rank", data=np.asarray(client_ranks, dtype=np.int64))
        self.file.flush()

    def append(self, values: dict[str, float | np.ndarray]) -> None:
        """Append one round: keys are dataset paths such as ``metrics/test_accuracy``.

        Array values (one entry per rank, say) become rows of a 2-D dataset.
        """
        for key, value in values.items():
            row = np.asarray(value)
            if key not in self.file:
                self.file.create_dataset(
                    key,
                    shape=(0, *row.shape),
                    maxshape=(None, *row.shape),
                    dtype=row.dtype,
                    chunks=True,
                )
            dataset = self.file[key]
            dataset.resize(dataset.shape[0] + 1, axis=0)
            dataset[-1] = row
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_results(path: str | Path) -> dict[str, np.ndarray | dict]:
    """Every dataset of a results file as numpy arrays, plus ``config`` as a dict."""
    out: dict[str, np.ndarray | dict] = {}
    with h5py.File(path, "r") as f:
        out["config"] = json.loads(f.attrs["config"])
        out["label_names"] = json.loads(f.attrs["label_names"])
        out["attrs"] = {k: v for k, v in f.attrs.items() if k not in ("config", "label_names")}
        f.visititems(
            lambda name, obj: (
                out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return out
