"""The results file (``OUTPUT/results.h5``), written by rank 0 only.

Layout: root attributes ``config`` (the run's Config as JSON), ``label_names``,
``num_clients``, ``world_size`` and ``layer_groups``; per-client datasets ``clients/sizes``,
``clients/rank`` and ``clients/label_histogram``; one row per round in ``metrics/*``,
``timing/*``, ``diagnostics/*`` and ``clients/cohort`` (``round`` holds the round
numbers). Rows are appended and flushed every round, so a killed job keeps the rounds
it finished.
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
        static: dict[str, np.ndarray],
        attrs: dict[str, int | str],
    ):
        """``static``: datasets written once (e.g. ``clients/sizes``); ``attrs``: root
        attributes besides the config and label names."""
        self.file = h5py.File(path, "w")
        self.file.attrs["config"] = cfg.to_json()
        self.file.attrs["label_names"] = json.dumps(label_names)
        for key, value in attrs.items():
            self.file.attrs[key] = value
        for key, value in static.items():
            self.file.create_dataset(key, data=np.asarray(value))
        self.file.flush()

    @classmethod
    def reopen(cls, path: Path, rounds_done: int) -> ResultsWriter:
        """Continue a resumed run's file: per-round rows past ``rounds_done`` (written after
        the checkpoint) are dropped, so every round appears exactly once."""
        writer = cls.__new__(cls)
        writer.file = h5py.File(path, "a")

        def truncate(name: str, obj: h5py.HLObject) -> None:
            if isinstance(obj, h5py.Dataset) and obj.attrs.get("per_round"):
                obj.resize(min(rounds_done, obj.shape[0]), axis=0)

        writer.file.visititems(truncate)
        writer.file.flush()
        return writer

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
                ).attrs["per_round"] = 1
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
