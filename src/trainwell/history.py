"""``History``: the per-epoch values of one ``fit``, as lists keyed by log name.

Owns: storing epoch logs and exporting them (dict, CSV). Must not compute or print values.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainwell.files import atomic_write
from trainwell.plots import plot_history

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TIME_KEYS = ("time", "samples_per_second")
"""The History's timing columns (see ``epoch_timing``): they measure the machine, not the model,
so no monitor accepts them and the plot leaves them out."""


def epoch_timing(seconds: float, samples: int, train_seconds: float) -> dict[str, float]:
    """The timing columns of one epoch.

    ``time`` is the epoch's wall time in seconds, training and validation, as Poutyne's ``time``
    and skorch's ``dur`` (so the column sums to about the fit's duration); ``samples_per_second``
    is the training pass's speed, validation left out (so it does not change with the size of the
    validation set), as Hugging Face's ``train_samples_per_second`` without the prefix that no
    training key here carries. Whole words, as every log key (``samples_per_s`` would be the only
    abbreviation).

    Args:
        seconds: The epoch's duration.
        samples: The training samples (over all processes) of the training pass.
        train_seconds: The training pass's duration.

    Example:
        >>> epoch_timing(2.5, 1000, 2.0)
        {'time': 2.5, 'samples_per_second': 500.0}
    """
    return {"time": seconds, "samples_per_second": samples / train_seconds if train_seconds > 0 else math.nan}


class History(Mapping[str, list[float]]):
    """Per-epoch logs: ``history["loss"]`` is one float per completed epoch.

    Keys are ``loss``, each metric, and ``val_loss`` / ``val_<metric>`` with validation data,
    then ``time`` (the epoch's seconds) and ``samples_per_second`` (the training speed): see
    ``epoch_timing``. An epoch resumed from a mid-epoch checkpoint times the part run after the
    resume; the durations of the epochs before it come back with the History.

    Example:
        >>> history = History()
        >>> history.append({"loss": 0.5, "accuracy": 0.8})
        >>> history.append({"loss": 0.25, "accuracy": 0.9})
        >>> history["loss"], history.epochs
        ([0.5, 0.25], 2)
    """

    def __init__(self, logs: Mapping[str, list[float]] | None = None) -> None:
        self._logs: dict[str, list[float]] = {key: list(values) for key, values in (logs or {}).items()}

    def append(self, logs: Mapping[str, float]) -> None:
        """Record one epoch. A key first seen now is padded with NaN for earlier epochs."""
        epochs = self.epochs
        for key, value in logs.items():
            self._logs.setdefault(key, [math.nan] * epochs).append(float(value))
        for key, values in self._logs.items():
            if key not in logs:
                values.append(math.nan)

    @property
    def epochs(self) -> int:
        """Number of completed epochs recorded."""
        return max((len(values) for values in self._logs.values()), default=0)

    def __getitem__(self, key: str) -> list[float]:
        try:
            return self._logs[key]
        except KeyError:
            known = ", ".join(self._logs) or "none yet"
            raise KeyError(f"{key!r} is not in the history; recorded keys: {known}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._logs)

    def __len__(self) -> int:
        return len(self._logs)

    def __repr__(self) -> str:
        last = {key: round(values[-1], 4) for key, values in self._logs.items() if values}
        return f"History(epochs={self.epochs}, last={last})"

    def to_dict(self) -> dict[str, list[float]]:
        """A plain, JSON-serialisable copy."""
        return {key: list(values) for key, values in self._logs.items()}

    def to_csv(self, path: str | Path) -> Path:
        """Write one row per epoch (1-based ``epoch`` column first). Returns the path."""
        rows = io.StringIO()
        writer = csv.writer(rows)
        writer.writerow(["epoch", *self._logs])
        for epoch in range(self.epochs):
            writer.writerow([epoch + 1, *(_cell(values, epoch) for values in self._logs.values())])
        return atomic_write(rows.getvalue().encode(), path)

    def plot(self, path: str | Path | None = None) -> Figure:
        """Draw the curves: one panel per quantity, training and validation per epoch (the
        timing columns are not curves of the model and are left out).

        Needs matplotlib (``pip install 'trainwell[plot]'``); works without a display.

        Args:
            path: Where to save the picture (its suffix picks the format); not saved when None.

        Returns:
            The matplotlib Figure.
        """
        return plot_history({key: values for key, values in self._logs.items() if key not in TIME_KEYS}, path)

    def state_dict(self) -> dict[str, Any]:
        """The logs, for checkpoints."""
        return {"logs": self.to_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore logs saved by ``state_dict``."""
        self._logs = {key: list(values) for key, values in state["logs"].items()}


def _cell(values: list[float], epoch: int) -> str:
    return repr(values[epoch]) if epoch < len(values) else ""
