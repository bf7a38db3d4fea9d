"""The Callback base and the dispatcher that skips hooks nobody overrides."""

from __future__ import annotations

import inspect
import signal
from pathlib import Path

import pytest
import torch

import trainwell as tw
from trainwell.callbacks import HOOKS, CallbackList
from trainwell.history import History
from trainwell.metrics import Tally
from trainwell.precision import build_precision

from conftest import blobs, make_mlp


def test_the_base_class_public_methods_are_exactly_the_hooks() -> None:
    public = [name for name, _ in inspect.getmembers(tw.Callback, inspect.isfunction) if not name.startswith("_")]
    assert sorted(public) == sorted(HOOKS)
    assert len(HOOKS) == 10


def _run() -> tw.Run:
    model = torch.nn.Linear(1, 1)
    tally = Tally([])
    return tw.Run(model, model, None, None, tally, tally, build_precision("fp32", torch.device("cpu")),
                  torch.device("cpu"), history=History())  # fmt: skip


def test_dispatcher_lists_only_overriding_callbacks_in_order() -> None:
    calls: list[str] = []

    class First(tw.Callback):
        def on_epoch_end(self, run: tw.Run) -> None:
            calls.append("first")

    class Second(First):
        def on_fit_start(self, run: tw.Run) -> None:
            calls.append("second start")

    dispatcher = CallbackList([First(), Second()])
    assert [len(dispatcher.listeners[hook]) for hook in HOOKS].count(0) == 8
    assert len(dispatcher.listeners["on_epoch_end"]) == 2  # inherited overrides count
    dispatcher.fire("on_epoch_end", _run())
    dispatcher.fire("on_fit_start", _run())
    dispatcher.fire("on_train_batch_end", _run())
    assert calls == ["first", "first", "second start"]


def test_non_callbacks_are_rejected() -> None:
    with pytest.raises(tw.ConfigError, match=r"must be a trainwell\.Callback"):
        CallbackList([lambda run: None])  # type: ignore[list-item]


class FailsAtEnd(tw.Callback):
    def __init__(self, name: str, ended: list[str]) -> None:
        self.name, self.ended = name, ended

    def on_fit_end(self, run: tw.Run) -> None:
        self.ended.append(self.name)
        raise RuntimeError(f"{self.name} failed")


class RecordsEnd(tw.Callback):
    def __init__(self, ended: list[str]) -> None:
        self.ended = ended

    def on_fit_end(self, run: tw.Run) -> None:
        self.ended.append("records")


def test_every_on_fit_end_runs_when_one_raises_and_ctrl_c_works_afterwards(tmp_path: Path) -> None:
    # checkpoint_dir adds the Checkpointer, which installs SIGINT/SIGTERM handlers in on_fit_start
    # and restores them in its on_fit_end, after the user's callbacks.
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    ended: list[str] = []
    callbacks = [FailsAtEnd("first", ended), RecordsEnd(ended), FailsAtEnd("second", ended)]
    with pytest.raises(RuntimeError, match="first failed") as caught:
        tw.fit(make_mlp(), blobs(), loss="cross_entropy", progress=False, checkpoint_dir=tmp_path / "ck",
               callbacks=callbacks)  # fmt: skip
    assert ended == ["first", "records", "second"]
    assert caught.value.__notes__ == ["An on_fit_end hook also raised RuntimeError: second failed"]
    assert {number: signal.getsignal(number) for number in handlers} == handlers
    with pytest.raises(KeyboardInterrupt):  # a real Ctrl-C is not swallowed by a stale handler
        signal.raise_signal(signal.SIGINT)


def test_the_fits_own_error_comes_first_with_the_teardown_errors_attached() -> None:
    class Breaks(tw.Callback):
        def on_epoch_end(self, run: tw.Run) -> None:
            raise ValueError("epoch failed")

    ended: list[str] = []
    with pytest.raises(ValueError, match="epoch failed") as caught:
        tw.fit(make_mlp(), blobs(), loss="cross_entropy", progress=False,
               callbacks=[Breaks(), FailsAtEnd("end", ended), RecordsEnd(ended)])  # fmt: skip
    assert ended == ["end", "records"]
    assert caught.value.__notes__ == ["An on_fit_end hook also raised RuntimeError: end failed"]
