"""The training algorithm: the only module that iterates over batches.

Order of events in ``fit_loop`` (a test asserts it):
  0. (before ``fit_loop``: a resumed run's model, optimizer, counters, History, running sums and
     random states are restored, so everything below sees the continued run)
  1. ``on_fit_start``; then a resumed run's callback states are loaded into the callbacks
     (each callback sets itself up afresh in ``on_fit_start``, and the saved state continues it)
  2. for each epoch from ``run.start_epoch`` to ``run.epochs - 1``:
     1. ``on_epoch_start``
     2. for each training batch: ``on_train_batch_start``; the step (forward and loss under
        autocast, backward weighted by the batch's samples or counted items for accumulation
        and sharding; when the batch ends an accumulation window: unscale, divide by the
        window's samples or items, clip, ``on_before_optimizer_step``, optimizer
        step, zero_grad); the loop's accounting (``run.loss``, device-side sums, counters);
        ``on_train_batch_end``; leave the epoch if ``run.stop_training``
     3. the optimizer step of a window left open (training stopped inside it, or data of
        unknown length)
     4. the epoch's training sums are read once (and reduced across processes)
     5. with validation data: ``on_eval_start``, ``on_eval_batch_end`` per batch,
        ``on_eval_end``
     6. ``run.logs`` is set (training and validation values, plus ``run.extra_logs`` that
        callbacks added during the epoch, such as ``lr``, then the epoch's ``time`` and
        ``samples_per_second`` from the host clock, read after the reductions of steps 4 and 5,
        which wait for the device anyway) and appended to the History; ``on_epoch_end``
     7. stop if ``run.stop_training``
  3. ``on_fit_end``, always (also after an exception, which is then in ``run.error``), of every
     callback even when one raises: the fit's own error, else the first hook's, is raised once
     all have run, with a note naming each further error (so the display closes and signal
     handlers are restored)

Nothing here reads a device value per step: losses and metrics go into device-side sums.

``eval_epoch`` (validation, ``evaluate``) and ``predict_loop`` (``predict``) fire
``on_eval_start``, ``on_eval_batch_end`` per batch and ``on_eval_end``; ``run.phase`` tells them
apart (``"eval"`` or ``"predict"``). ``evaluate`` and ``predict`` end their pass after the batch in
which a callback sets ``run.stop_training``; fit's validation always runs to its end, so that an
epoch's values cover the whole validation set.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from trainwell import distributed
from trainwell.batches import Batches
from trainwell.data import Batch
from trainwell.errors import config_error
from trainwell.history import epoch_timing
from trainwell.metrics import Tally
from trainwell.models import call_model, preserved_modes
from trainwell.objective import Objective
from trainwell.outputs import for_predict
from trainwell.run import Run, StepResult, as_step_result


def fit_loop(run: Run) -> None:
    """Train ``run.model`` from ``run.start_epoch`` until ``run.epochs`` or ``run.stop_training``."""
    try:
        run.callbacks.fire("on_fit_start", run)
        if run.callback_states is not None:
            run.callbacks.load_state_dict(run.callback_states)
            run.callback_states = None
        for epoch in range(run.start_epoch, run.epochs):
            run.epoch = epoch
            started = time.perf_counter()
            samples = train_epoch(run)
            logs = run.train_tally.read(run.reduce)  # waits for the device: the steps are done
            trained = time.perf_counter() - started
            if run.val_batches is not None:
                logs |= eval_epoch(run, run.val_batches, run.val_tally)
            run.phase = "train"
            run.logs = logs | run.extra_logs | epoch_timing(time.perf_counter() - started, samples, trained)
            run.history.append(run.logs)
            run.callbacks.fire("on_epoch_end", run)
            run.batches_done = 0
            if run.stop_training:
                break
    except BaseException as error:
        run.error = error  # what on_fit_end reports (trackers' status), not the caller's handled one
        _attach(error, run.callbacks.fire_all("on_fit_end", run))
        raise
    failures = run.callbacks.fire_all("on_fit_end", run)
    if failures:
        raise _attach(failures[0], failures[1:])


def _attach(error: BaseException, others: list[BaseException]) -> BaseException:
    """``error``, with a note naming each of ``others`` (what later ``on_fit_end`` hooks raised)."""
    for other in others:
        error.add_note(f"An on_fit_end hook also raised {type(other).__name__}: {other}")
    return error


def train_epoch(run: Run) -> int:
    """One pass over the training batches of ``run.epoch``, after ``run.batches_done`` of them.

    Returns:
        The samples (over all processes) of the batches this call trained on.
    """
    assert run.train_batches is not None and run.step is not None
    run.phase = "train"
    if run.batches_done == 0:  # otherwise a resumed epoch: its sums and logs were restored
        run.train_tally.reset(run.device)
        run.extra_logs = {}
    run.callbacks.fire("on_epoch_start", run)
    last = run.train_batches.num_batches
    samples = 0
    for batch in run.train_batches.for_epoch(run.epoch, skip=run.batches_done):
        run.batch = batch
        samples += batch.global_size
        run.callbacks.fire("on_train_batch_start", run)
        run.window_batches += 1
        run.window_samples += batch.global_size
        run.ends_window = run.window_batches == run.grad_accum_steps or run.batches_done + 1 == last
        run.loss = None  # set by the step once the batch's loss is known
        result = run.step(run, batch)
        _account(run, batch, result if type(result) is StepResult else as_step_result(result))
        run.batches_done += 1
        if run.ends_window:
            _close_window(run)
        run.callbacks.fire("on_train_batch_end", run)
        if run.stop_training:
            break
    if run.window_batches:
        if run.world_size > 1:  # its last backward ran without DDP's all-reduce
            distributed.average_gradients(run.parameters)
        optimizer_step(run)
        _close_window(run)
    return samples


def _account(run: Run, batch: Batch, result: StepResult) -> None:
    if run.loss is None and result.loss is not None:  # train_step has set it already
        run.loss = result.loss.detach()
    run.outputs = result.outputs
    if result.outputs is None and run.train_tally.slots and batch.targets is not None:
        raise config_error(
            "The training step returned no outputs, so the metrics cannot be computed.",
            f"metrics {', '.join(slot.name for slot in run.train_tally.slots)} with a custom step",
            "return trainwell.StepResult(loss, outputs) from the step, or drop the metrics.",
        )
    if batch.size:  # a process's placeholder in a ragged last step counts for nothing
        tally = run.train_tally
        if tally.has_loss or run.loss is None:
            tally.update(run.loss, result.outputs, batch.targets, batch.size, result.logs, result.items)
        else:  # a custom step without fit's loss: its own loss is logged by name
            tally.update(None, result.outputs, batch.targets, batch.size, {"loss": run.loss, **result.logs})


def _close_window(run: Run) -> None:
    run.window_batches = run.window_samples = 0
    run.global_step += 1


def train_step(run: Run, batch: Batch) -> StepResult:
    """The default ``run.step``: forward, loss, backward and, when the batch ends an accumulation
    window (``run.ends_window``), the optimizer step.

    Forward and loss run under the run's autocast. The one gradient normalisation: each batch's
    mean loss is weighted by its share of the window's samples over all processes, so that,
    after DistributedDataParallel averages over the N processes and the window's batches are
    summed, the update equals that of one batch holding every sample of the window (a ragged
    batch counts by its size; a window that is not full is corrected in ``optimizer_step``).
    When the objective counts items (tokens with ignored positions), a batch is weighted by its
    counted items instead, and ``optimizer_step`` divides by the window's items over all
    processes (a device count: one small all-reduce per optimizer step under torchrun, nothing
    read back to the host with NCCL).
    Batches that do not end a window skip DDP's all-reduce. Never reads a device value.

    A custom step (``fit(step=...)``) gets the same ``(run, batch)`` and does the whole update
    itself; it may call ``compute_loss`` and ``optimizer_step``.

    Args:
        run: The run; uses its model, objective, optimizer and precision.
        batch: The batch, already on the device.

    Returns:
        The loss, the outputs, each head's loss and the counted items; the loop adds them to the
        epoch's sums.
    """
    assert run.objective is not None
    with run.precision.autocast():
        outputs = call_model(run.model, batch.inputs)
        parts = run.objective.losses(outputs, batch.targets, batch.weights)
    loss = parts.loss
    run.loss = loss.detach()  # what TerminateOnNaN checks before the optimizer step
    items = parts.items
    if items is not None and not batch.size:  # a placeholder in a ragged last step counts for nothing
        items = torch.zeros_like(items)
    weight = _loss_weight(run, batch, items)
    scaled = run.precision.scaler.scale(loss if isinstance(weight, float) and weight == 1 else loss * weight)
    if run.ends_window:
        scaled.backward()  # type: ignore[no-untyped-call]
        optimizer_step(run)
    else:
        with distributed.deferred_sync(run.model):
            scaled.backward()  # type: ignore[no-untyped-call]
    return StepResult(loss, outputs, parts.named, items)


def _loss_weight(run: Run, batch: Batch, items: torch.Tensor | None) -> float | torch.Tensor:
    """The factor of a batch's mean loss in the window's gradient (see ``train_step``)."""
    if items is not None and (run.grad_accum_steps > 1 or run.world_size > 1):
        assert run.objective is not None
        samples = run.window_size if run.grad_accum_steps > 1 else batch.global_size
        # Any constant works (optimizer_step divides it out); the expected items keep the scaled
        # loss near the batch mean, inside fp16's range.
        run.item_reference = max(samples * run.objective.items_per_sample, 1.0)
        run.window_items = items if run.window_items is None else run.window_items + items
        return items * (run.world_size / run.item_reference)
    return batch.size * run.world_size / (batch.global_size if run.grad_accum_steps == 1 else run.window_size or 1)


def compute_loss(run: Run, outputs: Any, batch: Batch) -> torch.Tensor:
    """The batch's loss as ``fit`` trains on it: the loss (or the heads' weighted sum, or the
    model's own), over counted items or samples, weighted per sample when the batch carries weights."""
    assert run.objective is not None
    return run.objective.losses(outputs, batch.targets, batch.weights).loss


def optimizer_step(run: Run) -> None:
    """Unscale, bring accumulated gradients to the mean over the window's samples or counted
    items (a window that is not full, or of unknown size), clip, ``on_before_optimizer_step``,
    step, zero the gradients."""
    assert run.optimizer is not None
    scaler = run.precision.scaler
    scaler.unscale_(run.optimizer)
    reference = run.window_size or 1  # what train_step divided each batch's weight by
    if run.window_items is not None:
        items = run.window_items.reshape(1).to(torch.float64)
        if run.reduce is not None:
            items = run.reduce(items)
        factor = torch.where(items > 0, run.item_reference / items, 0).to(torch.float32).reshape(())
        torch._foreach_mul_(_gradients(run), factor)
        run.window_items = None
    elif run.grad_accum_steps > 1 and run.window_samples and run.window_samples != reference:
        torch._foreach_mul_(_gradients(run), reference / run.window_samples)
    if run.clip_grad_value is not None:
        nn.utils.clip_grad_value_(run.parameters, run.clip_grad_value, foreach=True)
    if run.clip_grad_norm is not None:
        nn.utils.clip_grad_norm_(run.parameters, run.clip_grad_norm, foreach=True)
    run.callbacks.fire("on_before_optimizer_step", run)
    scaler.step(run.optimizer)
    scaler.update()
    run.optimizer.zero_grad(set_to_none=True)


def _gradients(run: Run) -> list[torch.Tensor]:
    return [parameter.grad for parameter in run.parameters if parameter.grad is not None]


def eval_epoch(run: Run, batches: Batches, tally: Tally, stoppable: bool = False) -> dict[str, float]:
    """Evaluate ``run.model`` on ``batches`` in eval mode under inference mode.

    The train/eval mode of every submodule is restored exactly afterwards.

    Args:
        run: The run; ``run.eval_batches`` and ``run.eval_batches_done`` follow the pass.
        batches: The data.
        tally: The sums to fill.
        stoppable: End the pass after the batch in which a callback sets ``run.stop_training``
            (``evaluate``); fit's validation (False) always covers the whole set.

    Returns:
        The tally's averages (with its prefix, e.g. ``val_loss``), also left in ``run.eval_logs``:
        over the batches evaluated before a stop.
    """
    run.phase = "eval"
    tally.reset(run.device)
    run.eval_batches, run.eval_batches_done = batches, 0
    run.callbacks.fire("on_eval_start", run)
    model = distributed.unwrap(run.model)  # no DDP collectives: the ranks' batch counts differ
    objective = run.objective
    with evaluation_mode(model, _loss_modules(objective)), run.precision.autocast():
        for batch in batches.for_epoch(0):
            outputs = call_model(model, batch.inputs)
            loss, named, items = None, None, None
            if objective is not None and objective.has_loss and batch.targets is not None:
                loss, named, items = objective.losses(outputs, batch.targets, batch.weights)
            tally.update(loss, outputs, batch.targets, batch.size, named, items)
            run.batch, run.outputs, run.loss = batch, outputs, loss
            run.eval_batches_done += 1
            run.callbacks.fire("on_eval_batch_end", run)
            if stoppable and run.stop_training:
                break
    run.eval_logs = tally.read(run.reduce)
    run.callbacks.fire("on_eval_end", run)
    return run.eval_logs


def predict_loop(run: Run, batches: Batches, keep: Callable[[Any], Any] = for_predict) -> list[Any]:
    """Run the model over ``batches`` in eval and inference mode; the per-batch outputs, in order,
    each trimmed by ``keep`` (by default its loss and what is not tensors left out).

    Fires the evaluation hooks with ``run.phase == "predict"`` (``run.outputs`` is the batch's
    outputs; there are no values, so ``run.eval_logs`` stays empty). A callback that sets
    ``run.stop_training`` ends the pass after that batch: the outputs so far are returned."""
    run.phase = "predict"
    collected: list[Any] = []
    run.eval_batches, run.eval_batches_done = batches, 0
    run.callbacks.fire("on_eval_start", run)
    with evaluation_mode(run.model), run.precision.autocast():
        for batch in batches.for_epoch(0):
            run.batch = batch
            run.outputs = call_model(run.model, batch.inputs)
            collected.append(keep(run.outputs))
            run.eval_batches_done += 1
            run.callbacks.fire("on_eval_batch_end", run)
            if run.stop_training:
                break
    run.callbacks.fire("on_eval_end", run)
    return collected


def _loss_modules(objective: Objective | None) -> list[nn.Module]:
    if objective is None:
        return []
    return [head.spec.fn for head in objective.heads if head.spec is not None and isinstance(head.spec.fn, nn.Module)]


@contextlib.contextmanager
def evaluation_mode(model: nn.Module, losses: Sequence[nn.Module] = ()) -> Iterator[None]:
    """``model.eval()`` (and losses that are modules) under ``torch.inference_mode()``; restores
    each submodule's mode on exit."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(preserved_modes(model, training=False))
        for loss in losses:
            stack.enter_context(preserved_modes(loss, training=False))
        stack.enter_context(torch.inference_mode())
        yield
