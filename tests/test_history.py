"""History: per-epoch lists, plain-dict and CSV export."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from trainwell.history import History


def test_append_pads_keys_first_seen_later() -> None:
    history = History()
    history.append({"loss": 1.0})
    history.append({"loss": 0.5, "lr": 0.1})
    assert history["loss"] == [1.0, 0.5]
    assert math.isnan(history["lr"][0]) and history["lr"][1] == 0.1
    assert history.epochs == 2
    with pytest.raises(KeyError, match="recorded keys: loss, lr"):
        history["val_loss"]


def test_csv_has_one_row_per_epoch(tmp_path: Path) -> None:
    history = History({"loss": [1.0, 0.5], "accuracy": [0.5, 0.75]})
    rows = list(csv.reader(history.to_csv(tmp_path / "history.csv").open()))
    assert rows == [["epoch", "loss", "accuracy"], ["1", "1.0", "0.5"], ["2", "0.5", "0.75"]]


def test_state_round_trip() -> None:
    history = History({"loss": [1.0]})
    restored = History()
    restored.load_state_dict(history.state_dict())
    assert restored.to_dict() == {"loss": [1.0]}
