"""History: per-epoch lists, plain-dict and CSV export, and the epochs' timing columns."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import trainwell as tw
from trainwell.history import TIME_KEYS, History

from conftest import blobs, make_mlp


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


def test_fit_times_each_epoch_and_its_training_speed_without_validation() -> None:
    class Slow(tw.Callback):  # training and validation take about as long: 10 x 20 ms, 3 x 67 ms
        def on_train_batch_end(self, run: tw.Run) -> None:
            time.sleep(0.02)

        def on_eval_batch_end(self, run: tw.Run) -> None:
            time.sleep(0.067)

    x, y = blobs(samples=300)
    tw.fit(make_mlp(), (x, y), loss="cross_entropy", progress=False)  # the first fit's one-time imports, not timed
    started = time.perf_counter()
    history = tw.fit(make_mlp(), (x[:240], y[:240]), val=(x[240:], y[240:]), loss="cross_entropy", batch_size=24,
                     epochs=3, callbacks=[Slow()], progress=False)  # fmt: skip
    wall = time.perf_counter() - started
    assert list(history)[-2:] == list(TIME_KEYS)
    assert all(seconds > 0.4 for seconds in history["time"])
    assert sum(history["time"]) <= wall and sum(history["time"]) == pytest.approx(wall, rel=0.1)
    for seconds, speed in zip(history["time"], history["samples_per_second"], strict=True):
        assert 1.6 < speed * seconds / 240 < 2.3  # the training pass's speed: half the epoch's time


def test_a_resumed_fit_keeps_the_earlier_epochs_durations(tmp_path: Path) -> None:
    options: dict[str, Any] = {"loss": "cross_entropy", "progress": False, "seed": 0, "checkpoint_dir": tmp_path}
    first = tw.fit(make_mlp(), blobs(), epochs=2, **options)
    resumed = tw.fit(make_mlp(), blobs(), epochs=4, resume=True, **options)
    assert resumed["time"][:2] == first["time"] and resumed["samples_per_second"][:2] == first["samples_per_second"]
    assert all(seconds > 0 for seconds in resumed["time"]) and len(resumed["time"]) == 4


def test_the_timing_columns_cannot_be_monitored_nor_taken_by_a_metric() -> None:
    for make in (lambda: tw.EarlyStopping(monitor="time"), lambda: tw.ModelCheckpoint("best.pt", monitor="time")):
        with pytest.raises(tw.ConfigError, match=r"(?s)'time' is the epoch's timing.*fix: monitor a loss"):
            make()

    class Watch(tw.Callback):  # any callback's monitor is checked, also with a custom step
        monitor = "samples_per_second"

    def step(run: tw.Run, batch: Any) -> torch.Tensor:
        return torch.zeros(())

    with pytest.raises(tw.ConfigError, match="'samples_per_second' is the epoch's timing"):
        tw.fit(make_mlp(), blobs(), loss="cross_entropy", step=step, callbacks=[Watch()], progress=False)

    def time(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # logged under its name
        return outputs.sum()

    with pytest.raises(tw.ConfigError, match=r"'time' is the History's own column"):
        tw.fit(make_mlp(), blobs(), loss="cross_entropy", metrics=[time], progress=False)


def test_the_plot_leaves_the_timing_columns_out(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    history = History({"loss": [1.0, 0.5], "val_loss": [1.1, 0.6], "time": [0.3, 0.2], "samples_per_second": [9, 8]})
    figure = history.plot(tmp_path / "curves.png")
    assert [axis.get_title() for axis in figure.axes if axis.get_visible()] == ["loss"]
    assert (tmp_path / "curves.png").stat().st_size > 0
