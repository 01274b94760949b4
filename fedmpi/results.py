"""The results file (``OUTPUT/results.h5``), written by rank 0 only.

Layout: root attributes ``config`` (the latest launch's Config as JSON), ``label_names``,
``launches`` (JSON: one entry per launch of the run, with its first round, configuration,
code revision and ranks) and the run's provenance (``code_revision``, ``data_sha256``,
``test_sha256``, ``majority_rate``, ...); datasets written once (``clients/sizes``, ...);
and one row per round in ``round``, ``launch``, ``metrics/*``, ``timing/*``, ``comm/*``,
``diagnostics/*``, ``clients/*``. Every per-round dataset has exactly one row per round
(NaN, or -1 for integers, where a round did not measure it), so row i is ``round[i]``.
Every key, its kind and its meaning are named in ``fedmpi.results_keys``; the writer
refuses any other.

The file is small and rewritten whole after every round, to a temporary file that is then
renamed over it: a failure (a full disk, a kill) leaves the last complete version.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from fedmpi import atomic
from fedmpi import results_keys as rk

RESULTS_NAME = "results.h5"


class ResultsWriter:
    def __init__(
        self,
        path: Path,
        attrs: dict[str, int | float | str],
        static: dict[str, np.ndarray],
        launch: dict,
    ):
        """``attrs``: root attributes (``config`` and ``label_names`` among them);
        ``static``: datasets written once; ``launch``: this launch's entry (JSON-able).
        Every key must be named in ``fedmpi.results_keys``, as its kind."""
        _check(attrs, static)
        self.path = path
        self.attrs = dict(attrs)
        self.static = {k: np.asarray(v) for k, v in static.items()}
        self.rows: dict[str, list[np.ndarray]] = {}
        self.launches = [{**launch, "first_round": 1}]
        self._write()

    @classmethod
    def reopen(
        cls,
        path: Path,
        rounds_done: int,
        attrs: dict[str, int | float | str],
        static: dict[str, np.ndarray],
        launch: dict,
    ) -> ResultsWriter:
        """Continue a resumed run's file: rows of rounds after ``rounds_done`` (written after
        the checkpoint) are dropped, so every round appears exactly once; ``attrs`` and
        ``static`` (this launch's configuration and client-to-rank map) replace the old
        ones, and the launch is recorded."""
        _check(attrs, static)
        writer = cls.__new__(cls)
        writer.path = path
        old = read_results(path)
        writer.launches = json.loads(old["attrs"].get(rk.LAUNCHES, "[]"))
        writer.attrs = {**old["attrs"], **attrs}
        keep = np.asarray(old.get(rk.ROUND, []), dtype=np.int64) <= rounds_done
        writer.static, writer.rows = {}, {}
        for key in old["per_round"]:
            writer.rows[key] = list(np.asarray(old[key])[keep])
        for key in old["static"]:
            writer.static[key] = np.asarray(old[key])
        writer.static.update({k: np.asarray(v) for k, v in static.items()})
        writer.launches = [x for x in writer.launches if x["first_round"] <= rounds_done]
        writer.launches.append({**launch, "first_round": rounds_done + 1})
        writer._write()
        return writer

    @property
    def rounds_written(self) -> int:
        return len(self.rows.get(rk.ROUND, []))

    def append(self, values: dict[str, float | np.ndarray]) -> None:
        """Append one round: keys are per-round keys of ``fedmpi.results_keys`` such as
        ``metrics/test_accuracy``."""
        rk.check(rk.PER_ROUND, values)
        n = self.rounds_written
        values = {**values, rk.LAUNCH: len(self.launches) - 1}
        for key, value in values.items():
            row = np.asarray(value)
            if key not in self.rows:  # new this round: earlier rounds did not measure it
                self.rows[key] = [_missing_like(row) for _ in range(n)]
            self.rows[key].append(row)
        for key, rows in self.rows.items():
            if key not in values:
                rows.append(_missing_like(rows[-1]))
        self._write()

    def _write(self) -> None:
        with atomic.replacing(self.path) as tmp, h5py.File(tmp, "w") as f:
            for key, value in {**self.attrs, rk.LAUNCHES: json.dumps(self.launches)}.items():
                f.attrs[key] = value
            for key, value in self.static.items():
                f.create_dataset(key, data=value)
            for key, rows in self.rows.items():
                f.create_dataset(key, data=np.stack(rows)).attrs["per_round"] = 1


def _check(attrs: dict, static: dict) -> None:
    """A key this module's writer does not know is a bug of the code that passed it."""
    rk.check(rk.ATTRIBUTE, attrs)
    rk.check(rk.STATIC, static)


def _missing_like(row: np.ndarray) -> np.ndarray:
    """A row meaning 'not measured this round': NaN, or -1 for integers."""
    fill = -1 if np.issubdtype(row.dtype, np.integer) else np.nan
    dtype = row.dtype if np.issubdtype(row.dtype, np.integer) else np.float64
    return np.full(row.shape, fill, dtype=dtype)


def read_results(path: str | Path) -> dict:
    """Every dataset of a results file as numpy arrays, plus ``config`` as a dict,
    ``attrs`` (the other root attributes) and the names of the ``per_round`` and
    ``static`` datasets."""
    out: dict = {"per_round": [], "static": []}
    with h5py.File(path, "r") as f:
        out["config"] = json.loads(f.attrs[rk.CONFIG])
        out["label_names"] = json.loads(f.attrs[rk.LABEL_NAMES])
        out["attrs"] = {k: _plain(v) for k, v in f.attrs.items()}

        def visit(name: str, obj: h5py.HLObject) -> None:
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
                out["per_round" if obj.attrs.get("per_round") else "static"].append(name)

        f.visititems(visit)
    return out


def _plain(value):
    """h5py attribute values as plain Python (numpy scalars to int/float/bool)."""
    return value.item() if isinstance(value, np.generic) else value
