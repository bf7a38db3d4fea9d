"""Callbacks: the ``Callback`` base class with its hooks, the dispatcher that calls them, the
shared monitor of a logged value, and the callbacks that steer training (EarlyStopping,
TerminateOnNaN, LambdaCallback).

Owns: the hook list and which callbacks listen to each hook. A hook that no callback
overrides costs one dictionary lookup and an empty loop. Schedules and loggers live in
``schedules`` and ``loggers``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch

from trainwell.errors import check_count, config_error, describe
from trainwell.history import TIME_KEYS
from trainwell.metrics import higher_is_better
from trainwell.run import Hook, Run

HOOKS: tuple[Hook, ...] = get_args(Hook)


class Callback:
    """Base class for code that runs at fixed points of ``fit``, ``evaluate`` and ``predict``.

    Override only the hooks you need; each takes the ``Run`` and returns None. Read and steer
    training through the run: ``run.logs`` at ``on_epoch_end``, ``run.loss`` (a device tensor)
    per batch, ``run.stop_training = True`` to stop. ``evaluate`` and ``predict`` fire only the
    three evaluation hooks (``run.phase`` is ``"eval"`` or ``"predict"``); setting
    ``run.stop_training`` there ends the pass after the batch. Callbacks run on every process; ones that
    write files check ``run.is_main_process``. Order: the user's callbacks in list order, then
    trainwell's display.

    Example:
        >>> class PrintEpoch(Callback):
        ...     def on_epoch_end(self, run):
        ...         print(run.epoch + 1, round(run.logs["loss"], 2))
    """

    def on_fit_start(self, run: Run) -> None:
        """Before the first epoch of ``fit``."""

    def on_epoch_start(self, run: Run) -> None:
        """Before the first batch of each epoch."""

    def on_train_batch_start(self, run: Run) -> None:
        """Before each training step; ``run.batch`` is the batch."""

    def on_before_optimizer_step(self, run: Run) -> None:
        """After the backward pass (gradients unscaled), before the optimizer step."""

    def on_train_batch_end(self, run: Run) -> None:
        """After each training step; ``run.loss`` and ``run.outputs`` are the step's."""

    def on_eval_start(self, run: Run) -> None:
        """Before validation, ``evaluate`` or ``predict`` iterate their data (``run.eval_batches``)."""

    def on_eval_batch_end(self, run: Run) -> None:
        """After each evaluation or prediction batch; ``run.outputs`` are its outputs,
        ``run.eval_batches_done`` counts the batches so far."""

    def on_eval_end(self, run: Run) -> None:
        """After an evaluation or prediction pass; ``run.eval_logs`` holds an evaluation's results
        (nothing for ``predict``)."""

    def on_epoch_end(self, run: Run) -> None:
        """After each epoch and its validation; ``run.logs`` holds the epoch's final values."""

    def on_fit_end(self, run: Run) -> None:
        """When ``fit`` ends, normally or by an exception."""


class CallbackList:
    """Calls, for each hook, only the callbacks whose class overrides it, in list order.

    Raises:
        ConfigError: An entry that is not a ``Callback``.
    """

    def __init__(self, callbacks: Sequence[Callback]) -> None:
        for callback in callbacks:
            if not isinstance(callback, Callback):
                raise config_error(
                    "Every entry of callbacks must be a trainwell.Callback.",
                    describe(callback),
                    "subclass trainwell.Callback and override the hooks you need.",
                )
        self.callbacks = list(callbacks)
        self.listeners: dict[Hook, list[Callable[[Run], None]]] = {
            hook: [getattr(callback, hook) for callback in self.callbacks if _overrides(callback, hook)]
            for hook in HOOKS
        }

    def fire(self, hook: Hook, run: Run) -> None:
        """Call every listener of ``hook``."""
        for listener in self.listeners[hook]:
            listener(run)

    def fire_all(self, hook: Hook, run: Run) -> list[BaseException]:
        """Call every listener of ``hook`` even when one raises (teardown: each closes its files
        and restores what it changed); return what they raised, in order."""
        failures = []
        for listener in self.listeners[hook]:
            try:
                listener(run)
            except BaseException as error:  # raised by the caller once all have run
                failures.append(error)
        return failures

    def state_dict(self) -> dict[str, Any]:
        """The state of every callback that has one (``state_dict()``), keyed by position and class."""
        return {
            _key(index, callback): callback.state_dict()  # type: ignore[attr-defined]
            for index, callback in enumerate(self.callbacks)
            if callable(getattr(callback, "state_dict", None))
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Give each callback its saved state (callbacks that saved none keep their own)."""
        for index, callback in enumerate(self.callbacks):
            key = _key(index, callback)
            if key in state and callable(getattr(callback, "load_state_dict", None)):
                callback.load_state_dict(state[key])  # type: ignore[attr-defined]


def _key(index: int, callback: Callback) -> str:
    return f"{index}:{type(callback).__name__}"


def _overrides(callback: Callback, hook: Hook) -> bool:
    return getattr(type(callback), hook) is not getattr(Callback, hook) or hook in vars(callback)


Mode = Literal["auto", "min", "max"]


def check_monitorable(monitor: str) -> None:
    """Refuse a monitor of the History's timing columns (``time``, ``samples_per_second``): they
    measure the machine, so a monitor would stop or keep weights by how busy it was.

    Raises:
        ConfigError: ``monitor`` is a timing column.
    """
    if monitor in TIME_KEYS:
        raise config_error(
            f"{monitor!r} is the epoch's timing, not a measure of the model: it cannot be monitored.",
            f"monitor={monitor!r}",
            "monitor a loss or a metric (e.g. 'val_loss'); read run.logs['time'] in a callback to act on durations.",
        )


class Monitor:
    """Tracks the best value of one log key: the helper behind EarlyStopping and checkpoints.

    Args:
        monitor: The log key, e.g. ``"val_loss"``.
        mode: ``"min"``, ``"max"``, or ``"auto"`` (max for accuracy-like keys, min otherwise).
        min_delta: How much better a value must be to count as an improvement.

    Example:
        >>> monitor = Monitor("val_accuracy")
        >>> monitor.mode, monitor.improved(0.5), monitor.improved(0.4), monitor.best
        ('max', True, False, 0.5)
    """

    def __init__(self, monitor: str, mode: Mode = "auto", min_delta: float = 0.0) -> None:
        if mode not in ("auto", "min", "max"):
            raise config_error("mode must be 'auto', 'min' or 'max'.", f"mode={mode!r}", "pass mode='min' or 'max'.")
        check_monitorable(monitor)
        if min_delta < 0:
            raise config_error("min_delta must be >= 0.", f"min_delta={min_delta}", "pass a non-negative number.")
        self.monitor = monitor
        self.mode: Mode = mode if mode != "auto" else ("max" if higher_is_better(monitor) else "min")
        self.min_delta = min_delta
        self.reset()

    def reset(self) -> None:
        """Forget the best value (a new ``fit``)."""
        self.best = math.inf if self.mode == "min" else -math.inf

    def improved(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta``; if so it becomes the best."""
        better = value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        if better and math.isfinite(value):
            self.best = value
            return True
        return False

    def value(self, run: Run) -> float:
        """The monitored value in ``run.logs`` (checked before fit starts, except for the values
        only a custom step's first batch shows)."""
        if self.monitor not in run.logs:
            raise config_error(
                f"The monitored value {self.monitor!r} is not logged.",
                f"monitor={self.monitor!r}",
                f"monitor one of: {', '.join(run.logs)}.",
            )
        return run.logs[self.monitor]

    def state_dict(self) -> dict[str, Any]:
        """The best value so far."""
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``."""
        self.best = float(state["best"])


class EarlyStopping(Callback):
    """Stop when a monitored value stops improving, and keep the best weights.

    Args:
        monitor: The log key to watch (``"val_loss"`` by default).
        mode: ``"auto"``, ``"min"`` or ``"max"``.
        patience: Stop after this many epochs in a row without improvement.
        min_delta: Smallest change that counts as an improvement.
        restore_best_weights: At the end of fit (stopped early or not), load the weights of the
            best epoch into the model.

    Example:
        >>> stopper = EarlyStopping(monitor="val_loss", patience=3)
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: Mode = "auto",
        patience: int = 3,
        min_delta: float = 0.0,
        restore_best_weights: bool = True,
    ) -> None:
        check_count("patience", patience, minimum=0)
        self.monitor = monitor
        self.tracker = Monitor(monitor, mode, min_delta)
        self.patience = patience
        self.restore_best_weights = restore_best_weights
        self.wait = 0
        self.best_epoch = -1
        self.stopped_epoch: int | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None

    def on_fit_start(self, run: Run) -> None:
        # Each fit starts afresh: a reused stopper must not put back another run's weights
        # (a resumed run gets its saved state right after this).
        self.tracker.reset()
        self.wait, self.best_epoch, self.stopped_epoch, self.best_weights = 0, -1, None, None

    def on_epoch_end(self, run: Run) -> None:
        if self.tracker.improved(self.tracker.value(run)):
            self.wait = 0
            self.best_epoch = run.epoch
            if self.restore_best_weights:
                self.best_weights = {key: value.detach().clone() for key, value in run.module.state_dict().items()}
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = run.epoch
            run.stop_training = True

    def on_fit_end(self, run: Run) -> None:
        if self.restore_best_weights and self.best_weights is not None:
            run.module.load_state_dict(self.best_weights)

    def state_dict(self) -> dict[str, Any]:
        """Best value, epochs waited and best epoch (for resuming)."""
        return {
            "monitor": self.tracker.state_dict(),
            "wait": self.wait,
            "best_epoch": self.best_epoch,
            "best_weights": self.best_weights,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``."""
        self.tracker.load_state_dict(state["monitor"])
        self.wait, self.best_epoch = int(state["wait"]), int(state["best_epoch"])
        self.best_weights = state["best_weights"]


class TerminateOnNaN(Callback):
    """Stop before a non-finite loss changes the weights, keeping the last finite ones.

    Checks, before each optimizer step, the loss of the batch (or, with gradient accumulation,
    the gradients of the whole window); when it is not finite the gradients are dropped, so the
    step leaves weights and optimizer state as they were, and training stops. On the CPU the
    check costs nothing; on a GPU it is a host synchronisation per step, so ``fit`` adds this
    callback by default only on the CPU (``terminate_on_nan="auto"``); pass
    ``terminate_on_nan=True`` to check on GPUs too.

    Attributes:
        stopped_at: ``(epoch, batch)`` of the non-finite loss, 0-based, or None.
    """

    def __init__(self) -> None:
        self.stopped_at: tuple[int, int] | None = None

    def on_fit_start(self, run: Run) -> None:
        self.stopped_at = None

    def on_before_optimizer_step(self, run: Run) -> None:
        assert run.optimizer is not None
        if run.grad_accum_steps == 1 and run.loss is not None and run.world_size == 1:
            finite = math.isfinite(run.loss.item())  # the batch mean: one value
        else:  # a window, a custom step that set no loss, or one rank's part of a step: the
            # gradients tell (under DDP they are all-reduced, so every rank decides alike)
            gradients = [parameter.grad for parameter in run.parameters if parameter.grad is not None]
            finite = not gradients or bool(torch.stack([gradient.isfinite().all() for gradient in gradients]).all())
        if finite:
            return
        self.stopped_at = (run.epoch, run.batches_done)
        run.optimizer.zero_grad(set_to_none=True)  # optimizers skip parameters without gradients
        run.stop_training = True
        warnings.warn(
            f"Non-finite loss at epoch {run.epoch + 1}, batch {run.batches_done + 1}: training stopped before "
            "that step changed the weights. Lower the learning rate, check the data for NaN/inf, or clip "
            "gradients (clip_grad_norm=1.0).",
            RuntimeWarning,
            stacklevel=2,
        )


class LambdaCallback(Callback):
    """A callback from plain functions, one per hook: ``LambdaCallback(on_epoch_end=fn)``.

    Raises:
        ConfigError: A keyword that is not a hook name, or a value that is not callable.

    Example:
        >>> printer = LambdaCallback(on_epoch_end=lambda run: print(run.logs["loss"]))
    """

    def __init__(self, **hooks: Callable[[Run], None]) -> None:
        for name, function in hooks.items():
            if name not in HOOKS or not callable(function):
                raise config_error(
                    f"LambdaCallback takes hook names with functions of the run; {name!r} is not one.",
                    f"{name}={describe(function)}",
                    f"use any of: {', '.join(HOOKS)}.",
                )
            setattr(self, name, function)
