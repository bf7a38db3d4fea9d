"""The training algorithm: the only module that iterates over batches.

Order of events in ``fit_loop`` (a test asserts it):
  1. ``on_fit_start``
  2. for each epoch from ``run.start_epoch`` to ``run.epochs - 1``:
     1. ``on_epoch_start``
     2. for each training batch: ``on_train_batch_start``; the step (forward and loss under
        autocast, scaled backward; when a gradient-accumulation window is complete: unscale,
        average, clip, ``on_before_optimizer_step``, optimizer step, zero_grad; device-side
        sums); ``on_train_batch_end``; leave the epoch if ``run.stop_training``
     3. the optimizer step of a partial last accumulation window
     4. the epoch's training sums are read once (and reduced across processes)
     5. with validation data: ``on_eval_start``, ``on_eval_batch_end`` per batch,
        ``on_eval_end``
     6. ``run.logs`` is set (training and validation values, plus ``run.extra_logs`` that
        callbacks added during the epoch, such as ``lr``) and appended to the History;
        ``on_epoch_end``
     7. stop if ``run.stop_training``
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
from trainwell.models import call_model, preserved_modes
from trainwell.run import Run


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
            run.logs = logs | run.extra_logs
            run.history.append(run.logs)
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
    if run.batches_done == 0:  # otherwise a resumed epoch: its sums and logs were restored
        run.train_tally.reset(run.device)
        run.extra_logs = {}
    run.callbacks.fire("on_epoch_start", run)
    for batch in run.train_batches.for_epoch(run.epoch, skip=run.batches_done):
        run.batch = batch
        run.callbacks.fire("on_train_batch_start", run)
        run.step(run, batch)
        run.batches_done += 1
        run.callbacks.fire("on_train_batch_end", run)
        if run.stop_training:
            break
    if run.window_samples:
        optimizer_step(run)  # the last, partial window of gradient accumulation


def train_step(run: Run, batch: Batch) -> None:
    """The default ``run.step``: forward, loss, backward and, when a window is complete, the
    optimizer step.

    Forward and loss run under the run's autocast. With ``grad_accum_steps == 1`` every batch
    is one optimizer step. With k > 1, gradients of k batches are summed (each batch's loss
    weighted by its size) and divided by the window's sample count before the step, so the
    update equals that of one batch of all those samples; a partial last window is stepped at
    the end of the epoch. Then ``run.loss``/``run.outputs`` are set and the running sums
    updated. Never reads a device value.

    A custom step (``fit(step=...)``) gets the same ``(run, batch)`` and may call this function
    or ``compute_loss`` and ``optimizer_step``.

    Args:
        run: The run; uses its model, loss, optimizer, precision and train_tally.
        batch: The batch, already on the device.
    """
    with run.precision.autocast():
        outputs = call_model(run.model, batch.inputs)
        loss = compute_loss(run, outputs, batch)
    run.loss = loss.detach()
    run.outputs = outputs
    scaler = run.precision.scaler
    if run.grad_accum_steps == 1:
        scaler.scale(loss if batch.share == 1.0 else loss * batch.share).backward()  # type: ignore[no-untyped-call]
        optimizer_step(run)
    else:
        scaler.scale(loss * batch.size).backward()  # type: ignore[no-untyped-call]
        run.window_samples += batch.size
        run.window_batches += 1
        if run.window_batches == run.grad_accum_steps:
            optimizer_step(run)
    if batch.size:  # a rank's padding in a ragged last step of a torchrun job counts for nothing
        run.train_tally.update(run.loss, outputs, batch.targets, batch.size)


def compute_loss(run: Run, outputs: Any, batch: Batch) -> torch.Tensor:
    """The batch's mean loss, weighted per sample when the batch carries weights."""
    assert run.loss_fn is not None
    if batch.weights is None:
        return run.loss_fn(outputs, batch.targets)
    assert run.weighted_loss_fn is not None and batch.targets is not None
    return run.weighted_loss_fn(outputs, batch.targets, batch.weights)


def optimizer_step(run: Run) -> None:
    """Unscale, average accumulated gradients, clip, ``on_before_optimizer_step``, step, zero."""
    assert run.optimizer is not None
    scaler = run.precision.scaler
    scaler.unscale_(run.optimizer)
    if run.window_samples:
        gradients = [parameter.grad for parameter in run.parameters if parameter.grad is not None]
        torch._foreach_div_(gradients, run.window_samples)
        run.window_samples = run.window_batches = 0
    if run.clip_grad_value is not None:
        nn.utils.clip_grad_value_(run.parameters, run.clip_grad_value, foreach=True)
    if run.clip_grad_norm is not None:
        nn.utils.clip_grad_norm_(run.parameters, run.clip_grad_norm, foreach=True)
    run.callbacks.fire("on_before_optimizer_step", run)
    scaler.step(run.optimizer)
    scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.global_step += 1


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
                loss = compute_loss(run, outputs, batch)
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
    with preserved_modes(model, training=False), torch.inference_mode():
        yield
