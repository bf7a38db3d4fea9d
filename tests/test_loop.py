"""The loop's contract: the order of hooks, no host synchronisation per step, modes restored."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

import trainwell as tw
from trainwell import loop
from trainwell.callbacks import HOOKS

from conftest import blobs, make_mlp


class Recorder(tw.Callback):
    def __init__(self) -> None:
        self.events: list[str] = []

    def _record(self, name: str, run: tw.Run) -> None:
        self.events.append(f"{name}:{run.epoch}:{run.batches_done}")


for _hook in HOOKS:
    setattr(Recorder, _hook, lambda self, run, _name=_hook: self._record(_name, run))


def test_hook_order_matches_the_loop_docstring() -> None:
    x, y = blobs(samples=6)
    recorder = Recorder()
    tw.fit(make_mlp(), (x[:4], y[:4]), loss="cross_entropy", batch_size=2, epochs=2, val=(x[4:], y[4:]),
           callbacks=[recorder], progress=False)  # fmt: skip
    batch = ["on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end"]
    expected = ["on_fit_start:0:0"]
    for epoch in range(2):
        expected.append(f"on_epoch_start:{epoch}:0")
        for done in range(2):
            expected += [f"{name}:{epoch}:{done + (name == 'on_train_batch_end')}" for name in batch]
        expected += [f"on_eval_start:{epoch}:2", f"on_eval_batch_end:{epoch}:2", f"on_eval_end:{epoch}:2"]
        expected.append(f"on_epoch_end:{epoch}:2")
    expected.append("on_fit_end:1:0")
    assert recorder.events == expected


def test_on_fit_end_runs_after_an_exception_and_stop_training_ends_the_epoch() -> None:
    class Stop(tw.Callback):
        def on_train_batch_end(self, run: tw.Run) -> None:
            if run.batches_done == 3:
                run.stop_training = True

    recorder = Recorder()
    history = tw.fit(make_mlp(), blobs(), loss="cross_entropy", batch_size=10, epochs=5, callbacks=[Stop(), recorder],
                     progress=False)  # fmt: skip
    assert history.epochs == 1
    assert recorder.events.count("on_train_batch_end:0:3") == 1 and recorder.events[-1] == "on_fit_end:0:0"

    class Boom(tw.Callback):
        def on_train_batch_end(self, run: tw.Run) -> None:
            raise RuntimeError("boom")

    recorder = Recorder()
    with pytest.raises(RuntimeError, match="boom"):
        tw.fit(make_mlp(), blobs(), loss="cross_entropy", callbacks=[Boom(), recorder], progress=False)
    assert recorder.events[-1].startswith("on_fit_end")


@contextmanager
def count_host_syncs() -> Iterator[list[str]]:
    """Counts calls that copy a tensor's value to the host (on a GPU each would stall the step)."""
    calls: list[str] = []
    names = ["item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"]
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def spy(name: str) -> Any:
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return originals[name](self, *args, **kwargs)

        return wrapper

    for name in names:
        setattr(torch.Tensor, name, spy(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class SyncsPerStep(tw.Callback):
    """Counts each training step's host synchronisations (``count_host_syncs``), from its batch's
    start to its end: last in the callbacks, it counts the other callbacks' batch-end hooks too."""

    def __init__(self) -> None:
        self.per_step: list[int] = []

    def on_train_batch_start(self, run: tw.Run) -> None:
        self.context = count_host_syncs()
        self.calls = self.context.__enter__()

    def on_train_batch_end(self, run: tw.Run) -> None:
        self.context.__exit__(None, None, None)
        self.per_step.append(len(self.calls))


def test_training_steps_never_synchronise_with_the_device() -> None:
    # No GPU here: counting the calls that would synchronise stands in for
    # torch.cuda.set_sync_debug_mode("error"), which the GPU variant below uses.
    watch = SyncsPerStep()
    # terminate_on_nan="auto" reads each loss on the CPU only (free there; off on GPUs): switched off
    # here so that the step itself is measured.
    tw.fit(make_mlp(), blobs(), loss="cross_entropy", metrics=["accuracy", "top2_accuracy", "f1_macro", "iou"],
           batch_size=16, epochs=2, callbacks=[watch], progress=False, terminate_on_nan=False)  # fmt: skip
    assert len(watch.per_step) == 2 * 19
    assert watch.per_step == [0] * len(watch.per_step)


def test_a_quiet_fit_reads_the_device_once_per_pass() -> None:
    counts = []
    for epochs in (1, 3):
        with count_host_syncs() as calls:
            tw.fit(make_mlp(), blobs(), loss="cross_entropy", metrics=["accuracy", "f1_macro", "iou_per_class"],
                   batch_size=16, epochs=epochs, val_split=0.2, progress=False, seed=0, terminate_on_nan=False)  # fmt: skip
        counts.append(calls)
    # The pre-flight check reads a few values once; then each epoch reads its training sums
    # once and its validation sums once, whatever the number of steps (15 per epoch here).
    assert counts[1][:-6] == counts[0][:-2]
    assert counts[1][-6:] == ["tolist"] * 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU; the CPU test above counts the same calls")
def test_no_sync_on_gpu() -> None:
    x, y = blobs()
    model = make_mlp()

    class Strict(tw.Callback):
        def on_train_batch_start(self, run: tw.Run) -> None:
            torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, run: tw.Run) -> None:
            torch.cuda.set_sync_debug_mode("default")

    tw.fit(model, (x, y), loss="cross_entropy", metrics=["accuracy", "f1_macro", "iou"], callbacks=[Strict()],
           device="cuda", progress=False)  # fmt: skip


def test_train_step_is_the_public_default_step() -> None:
    seen: list[Any] = []

    class Grab(tw.Callback):
        def on_fit_start(self, run: tw.Run) -> None:
            seen.append(run.step)

    tw.fit(make_mlp(), blobs(), loss="cross_entropy", callbacks=[Grab()], progress=False)
    assert seen == [tw.train_step]


def test_evaluation_mode_restores_each_submodule() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
    model[1].eval()
    with loop.evaluation_mode(model):
        assert not any(module.training for module in model.modules())
        assert torch.is_inference_mode_enabled()
    assert [module.training for module in model.modules()] == [True, True, False]
