"""The Callback base and the dispatcher that skips hooks nobody overrides."""

from __future__ import annotations

import inspect

import pytest
import torch

import trainwell as tw
from trainwell.callbacks import HOOKS, CallbackList
from trainwell.history import History
from trainwell.metrics import Tally
from trainwell.precision import build_precision


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
