"""The training algorithm: the only module that iterates over batches.

Order of events in ``fit_loop`` (a test asserts it):
  1. ``on_fit_start``
  2. for each epoch from ``run.start_epoch`` to ``run.epochs - 1``:
     1. ``on_epoch_start``
     2. for each training batch: ``on_train_batch_start``; the step (forward and loss under
        autocast, scaled backward, unscale, ``on_before_optimizer_step``, optimizer step,
        zero_grad, device-side sums); ``on_train_batch_end``; leave the epoch if
        ``run.stop_training``
     3. the epoch's training sums are read once (and reduced across processes)
     4. with validation data: ``on_eval_start``, ``on_eval_batch_end`` per batch,
        ``on_eval_end``
     5. ``run.logs`` is set and appended to the History; ``on_epoch_end``
     6. stop if ``run.stop_training``
  3. ``on_fit_end``, always (also after an exception)

Nothing here reads a device value per step: losses and metrics go into device-side sums.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from trainwell.data import Batch, Batches
from trainwell.metrics import Tally
from trainwell.run import Run


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on a batch's inputs: ``model(*inputs)`` for a tuple, ``model(**inputs)``
    for a dict, ``model(inputs)`` otherwise."""
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def fit_loop(run: Run) -> None:
    """Train ``run.model`` from ``run.start_epoch`` until ``run.epochs`` or ``run.stop_training``."""
    run.callbacks.fire("on_fit_start", run)
    try:
        for epoch in range(run.start_epoch, run.epochs):
            run.epoch = epoch
            train_epoch(run)
            logs = run.train_tally.read(run.reduce)
            if run.val_batches is not None:
                logs |= eval_epoch(run, run.val_batches, run.val_tally)
            run.phase = "train"
            run.logs = logs
            run.history.append(logs)
            run.callbacks.fire("on_epoch_end", run)
            run.batches_done = 0
            if run.stop_training:
                break
    finally:
        run.callbacks.fire("on_fit_end", run)


def train_epoch(run: Run) -> None:
    """One pass over the training batches of ``run.epoch``, after ``run.batches_done`` of them."""
    assert run.train_batches is not None and run.step is not None
    run.phase = "train"
    run.train_tally.reset(run.device)
    run.callbacks.fire("on_epoch_start", run)
    for batch in run.train_batches.for_epoch(run.epoch, skip=run.batches_done):
        run.batch = batch
        run.callbacks.fire("on_train_batch_start", run)
        run.step(run, batch)
        run.batches_done += 1
        run.callbacks.fire("on_train_batch_end", run)
        if run.stop_training:
            break


def train_step(run: Run, batch: Batch) -> None:
    """One optimizer step on ``batch``: the default ``run.step``.

    Forward and loss under the run's autocast, scaled backward, unscale,
    ``on_before_optimizer_step``, optimizer step, ``zero_grad(set_to_none=True)``; then
    ``run.loss``/``run.outputs`` are set, the running sums updated and ``run.global_step``
    advanced. A custom step must do the same (it may call this function). Never reads a
    device value.

    Args:
        run: The run; uses its model, loss_fn, optimizer, precision and train_tally.
        batch: The batch, already on the device.
    """
    assert run.optimizer is not None and run.loss_fn is not None
    scaler = run.precision.scaler
    with run.precision.autocast():
        outputs = call_model(run.model, batch.inputs)
        loss = run.loss_fn(outputs, batch.targets)
    scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
    scaler.unscale_(run.optimizer)
    run.callbacks.fire("on_before_optimizer_step", run)
    scaler.step(run.optimizer)
    scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.loss = loss.detach()
    run.outputs = outputs
    run.global_step += 1
    run.train_tally.update(run.loss, outputs, batch.targets, batch.size)


def eval_epoch(run: Run, batches: Batches, tally: Tally) -> dict[str, float]:
    """Evaluate ``run.model`` on ``batches`` in eval mode under inference mode.

    The train/eval mode of every submodule is restored exactly afterwards.

    Returns:
        The tally's averages (with its prefix, e.g. ``val_loss``), also left in ``run.eval_logs``.
    """
    run.phase = "eval"
    tally.reset(run.device)
    run.callbacks.fire("on_eval_start", run)
    with evaluation_mode(run.model), run.precision.autocast():
        for batch in batches.for_epoch(0):
            outputs = call_model(run.model, batch.inputs)
            loss = None
            if run.loss_fn is not None and batch.targets is not None:
                loss = run.loss_fn(outputs, batch.targets)
            tally.update(loss, outputs, batch.targets, batch.size)
            run.batch, run.outputs, run.loss = batch, outputs, loss
            run.callbacks.fire("on_eval_batch_end", run)
    run.eval_logs = tally.read(run.reduce)
    run.callbacks.fire("on_eval_end", run)
    return run.eval_logs


def predict_loop(run: Run, batches: Batches) -> list[Any]:
    """Run the model over ``batches`` in eval and inference mode; the per-batch outputs, in order."""
    run.phase = "predict"
    collected: list[Any] = []
    run.callbacks.fire("on_eval_start", run)
    with evaluation_mode(run.model), run.precision.autocast():
        for batch in batches.for_epoch(0):
            run.batch = batch
            run.outputs = call_model(run.model, batch.inputs)
            collected.append(run.outputs)
            run.callbacks.fire("on_eval_batch_end", run)
    run.callbacks.fire("on_eval_end", run)
    return collected


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` under ``torch.inference_mode()``; restores each submodule's mode on exit."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for module, training in modes:
            module.training = training
