"""The Callback base and the dispatcher that skips hooks nobody overrides."""

from __future__ import annotations

import inspect
import signal
from pathlib import Path
from typing import Any

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


class PassRecorder(tw.Callback):
    """Records the evaluation hooks as (hook, phase, batches done), stopping after ``stop_after``."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.events: list[tuple[str, str, int]] = []
        self.outputs: list[torch.Tensor] = []
        self.stop_after = stop_after

    def on_eval_start(self, run: tw.Run) -> None:
        self.events.append(("on_eval_start", run.phase, run.eval_batches_done))

    def on_eval_batch_end(self, run: tw.Run) -> None:
        self.events.append(("on_eval_batch_end", run.phase, run.eval_batches_done))
        self.outputs.append(run.outputs)
        if run.eval_batches_done == self.stop_after:
            run.stop_training = True

    def on_eval_end(self, run: tw.Run) -> None:
        self.events.append(("on_eval_end", run.phase, run.eval_batches_done))
        self.eval_logs = dict(run.eval_logs)


def test_evaluate_fires_the_eval_hooks_once_per_batch_and_a_callback_can_stop_it() -> None:
    x, y = blobs(samples=100)  # 7 batches of 16 (the last one of 4)
    model = make_mlp().train()
    recorder = PassRecorder()
    options: dict[str, Any] = {"loss": "cross_entropy", "metrics": ["accuracy"], "batch_size": 16, "progress": False}
    results = tw.evaluate(model, (x, y), callbacks=recorder, **options)  # one callback alone, as fit takes it
    assert recorder.events == [("on_eval_start", "eval", 0), *(("on_eval_batch_end", "eval", done) for done in
                               range(1, 8)), ("on_eval_end", "eval", 7)]  # fmt: skip
    assert recorder.eval_logs == results and [len(outputs) for outputs in recorder.outputs] == [16] * 6 + [4]

    stopper = PassRecorder(stop_after=3)
    stopped = tw.evaluate(model, (x, y), callbacks=[stopper], **options)
    assert [event[2] for event in stopper.events] == [0, 1, 2, 3, 3]  # ended after the third batch
    assert stopped == pytest.approx(tw.evaluate(model, (x[:48], y[:48]), **options))  # the values of those batches
    assert model.training  # the mode is restored after a stop too


def test_predict_fires_the_eval_hooks_in_its_phase_and_a_stop_returns_the_first_outputs() -> None:
    x = blobs(samples=100)[0]
    model = make_mlp()
    recorder = PassRecorder()
    outputs = tw.predict(model, x, batch_size=16, callbacks=[recorder], progress=False)
    assert recorder.events == [("on_eval_start", "predict", 0), *(("on_eval_batch_end", "predict", done) for done in
                               range(1, 8)), ("on_eval_end", "predict", 7)]  # fmt: skip
    assert recorder.eval_logs == {}  # predict computes no values
    assert torch.equal(torch.cat(recorder.outputs), outputs)  # run.outputs is each batch's
    stopped = tw.predict(model, x, batch_size=16, callbacks=[PassRecorder(stop_after=2)], progress=False)
    assert torch.equal(stopped, outputs[:32])


def test_evaluate_and_predict_refuse_a_non_callback_before_any_work() -> None:
    model = make_mlp()
    for call in (
        lambda: tw.evaluate(model, blobs(), loss="cross_entropy", callbacks=[print], device="meta"),  # type: ignore[list-item]
        lambda: tw.predict(model, blobs()[0], callbacks=42, device="meta"),  # type: ignore[arg-type]
    ):
        with pytest.raises(tw.ConfigError, match=r"must be a trainwell\.Callback"):
            call()
    assert next(model.parameters()).device.type == "cpu"
