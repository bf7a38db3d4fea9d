"""Callbacks: the ``Callback`` base class with its hooks, and the dispatcher that calls them.

Owns: the hook list and which callbacks listen to each hook. A hook that no callback
overrides costs one dictionary lookup and an empty loop. Must not know concrete callbacks.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Literal, get_args

import torch

from trainwell.errors import check_count, config_error, describe, unknown_name_error
from trainwell.run import Hook, Run

HOOKS: tuple[Hook, ...] = get_args(Hook)


class Callback:
    """Base class for code that runs at fixed points of ``fit``, ``evaluate`` and ``predict``.

    Override only the hooks you need; each takes the ``Run`` and returns None. Read and steer
    training through the run: ``run.logs`` at ``on_epoch_end``, ``run.loss`` (a device tensor)
    per batch, ``run.stop_training = True`` to stop. Callbacks run on every process; ones that
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
        """Before validation, ``evaluate`` or ``predict`` iterate their data."""

    def on_eval_batch_end(self, run: Run) -> None:
        """After each evaluation or prediction batch."""

    def on_eval_end(self, run: Run) -> None:
        """After an evaluation pass; ``run.eval_logs`` holds its results."""

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


def _overrides(callback: Callback, hook: Hook) -> bool:
    return getattr(type(callback), hook) is not getattr(Callback, hook) or hook in vars(callback)


Mode = Literal["auto", "min", "max"]


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
        if min_delta < 0:
            raise config_error("min_delta must be >= 0.", f"min_delta={min_delta}", "pass a non-negative number.")
        self.monitor = monitor
        self.mode: Mode = mode if mode != "auto" else ("max" if _higher_is_better(monitor) else "min")
        self.min_delta = min_delta
        self.best = math.inf if self.mode == "min" else -math.inf

    def improved(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta``; if so it becomes the best."""
        better = value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        if better and math.isfinite(value):
            self.best = value
            return True
        return False

    def value(self, run: Run) -> float:
        """The monitored value in ``run.logs`` (the names that exist are checked before fit starts)."""
        return run.logs[self.monitor]

    def state_dict(self) -> dict[str, Any]:
        """The best value so far."""
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``."""
        self.best = float(state["best"])


def _higher_is_better(key: str) -> bool:
    name = key.removeprefix("val_")
    return "accuracy" in name or name in ("f1", "precision", "recall", "auc", "r2")


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

    def on_before_optimizer_step(self, run: Run) -> None:
        assert run.optimizer is not None and run.loss is not None
        if run.grad_accum_steps == 1:
            finite = math.isfinite(run.loss.item())  # the batch mean: one value
        else:
            gradients = [parameter.grad for parameter in run.parameters if parameter.grad is not None]
            finite = bool(torch.stack([gradient.isfinite().all() for gradient in gradients]).all())
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


SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
Interval = Literal["epoch", "step"]


class LRScheduler(Callback):
    """Steps a torch learning-rate scheduler every epoch or every optimizer step.

    The learning rate at the start of each epoch is logged as ``lr`` (in the History too).

    Args:
        scheduler: A torch scheduler, or a function ``optimizer -> scheduler`` (use this with a
            named optimizer, which ``fit`` builds).
        interval: ``"epoch"`` or ``"step"`` (per optimizer step).
        monitor: For ``ReduceLROnPlateau``: the log key it watches (``"val_loss"`` by default).

    Example:
        >>> from torch.optim.lr_scheduler import StepLR
        >>> callback = LRScheduler(lambda optimizer: StepLR(optimizer, step_size=5), interval="epoch")
    """

    def __init__(self, scheduler: Any, interval: Interval = "epoch", monitor: str | None = None) -> None:
        if interval not in ("epoch", "step"):
            raise config_error(
                "interval must be 'epoch' or 'step'.", f"interval={interval!r}", "pass 'epoch' or 'step'."
            )
        self.factory: SchedulerFactory | None = None if hasattr(scheduler, "step") else scheduler
        self.scheduler: Any = scheduler if self.factory is None else None
        self.plateau = False
        self.adds_logs = ("lr",)
        self.interval = interval
        self.monitor = monitor
        self.last_step = 0
        if interval == "step":  # only step schedulers listen to every batch
            self.on_train_batch_end = self._after_batch  # type: ignore[method-assign]

    def on_fit_start(self, run: Run) -> None:
        assert run.optimizer is not None
        if self.factory is not None:
            self.scheduler = self.factory(run.optimizer)
        if getattr(self.scheduler, "optimizer", None) is not run.optimizer:
            raise config_error(
                "The scheduler drives another optimizer than the one fit uses.",
                f"{type(self.scheduler).__name__} over {type(getattr(self.scheduler, 'optimizer', None)).__name__}",
                "pass a function: LRScheduler(lambda optimizer: StepLR(optimizer, 5)), or build the scheduler "
                "on the optimizer you pass to fit.",
            )
        self.plateau = isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if self.plateau and self.monitor is None:
            self.monitor = "val_loss" if run.val_batches is not None else "loss"
        self.last_step = run.global_step

    def on_epoch_start(self, run: Run) -> None:
        assert run.optimizer is not None
        run.extra_logs.setdefault("lr", float(run.optimizer.param_groups[0]["lr"]))  # kept when resumed mid-epoch

    def _after_batch(self, run: Run) -> None:
        if run.global_step != self.last_step:
            self.last_step = run.global_step
            self.scheduler.step()

    def on_epoch_end(self, run: Run) -> None:
        if self.interval == "epoch":
            if self.plateau:
                assert self.monitor is not None
                self.scheduler.step(run.logs[self.monitor])
            else:
                self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state."""
        return {"scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict`` (call after ``on_fit_start`` built the scheduler)."""
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])


SCHEDULERS = ("step", "cosine", "onecycle", "reduce_on_plateau")


def build_scheduler(name: str, *, epochs: int, steps_per_epoch: int | None, has_val: bool) -> LRScheduler:
    """A named schedule with defaults that suit most runs.

    - ``step``: the learning rate times 0.1 every ``epochs // 3`` epochs.
    - ``cosine``: linear warm-up over the first 5% of optimizer steps, then cosine decay to 0.
    - ``onecycle``: ``torch.optim.lr_scheduler.OneCycleLR`` peaking at the given ``lr``.
    - ``reduce_on_plateau``: times 0.1 when ``val_loss`` (or ``loss``) has not improved for 2 epochs.

    Raises:
        ConfigError: An unknown name, or a per-step schedule over data of unknown length.
    """
    schedulers = torch.optim.lr_scheduler
    if name not in SCHEDULERS:
        raise unknown_name_error("scheduler", name, SCHEDULERS)
    if name == "step":
        return LRScheduler(lambda optimizer: schedulers.StepLR(optimizer, step_size=max(1, epochs // 3), gamma=0.1))
    if name == "reduce_on_plateau":
        monitor = "val_loss" if has_val else "loss"
        return LRScheduler(
            lambda optimizer: schedulers.ReduceLROnPlateau(optimizer, factor=0.1, patience=2), monitor=monitor
        )
    if steps_per_epoch is None:
        raise config_error(
            f"The {name} schedule needs the number of steps, but the data has no length.",
            f"scheduler={name!r}",
            "pass a Dataset, DataLoader or list of batches, or use scheduler='step'.",
        )
    total = epochs * steps_per_epoch
    if name == "onecycle":
        return LRScheduler(
            lambda optimizer: schedulers.OneCycleLR(
                optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=total
            ),
            interval="step",
        )
    warmup = max(1, round(0.05 * total))

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return LRScheduler(lambda optimizer: schedulers.LambdaLR(optimizer, cosine), interval="step")


class CSVLogger(Callback):
    """Writes one row per epoch (``epoch`` 1-based, then every log key) to a CSV file.

    Rows are flushed each epoch, so the file is useful while training runs. Only the main
    process writes.

    Args:
        path: The CSV file.
        append: Add to an existing file (its header is kept) instead of replacing it.
    """

    def __init__(self, path: str | Path, append: bool = False) -> None:
        self.path = Path(path)
        self.append = append
        self.file: IO[str] | None = None
        self.writer: Any = None
        self.columns: list[str] = []

    def on_fit_start(self, run: Run) -> None:
        if not run.is_main_process:
            return
        exists = self.append and self.path.is_file() and self.path.stat().st_size > 0
        if exists:
            with self.path.open(newline="") as file:
                self.columns = next(csv.reader(file))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("a" if exists else "w", newline="")
        self.writer = csv.writer(self.file)

    def on_epoch_end(self, run: Run) -> None:
        if self.file is None:
            return
        if not self.columns:
            self.columns = ["epoch", *run.logs]
            self.writer.writerow(self.columns)
        values = {"epoch": run.epoch + 1, **run.logs}
        self.writer.writerow([repr(values[column]) if column in values else "" for column in self.columns])
        self.file.flush()

    def on_fit_end(self, run: Run) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class TensorBoard(Callback):
    """Writes every epoch value (and, when asked, the loss every N steps) as TensorBoard scalars.

    Needs the ``tensorboard`` package (``pip install 'trainwell[tensorboard]'``).

    Args:
        log_dir: The event-file folder.
        every_n_steps: Also log the batch loss as ``batch/loss`` every N optimizer steps; each
            such read is one host synchronisation.
    """

    def __init__(self, log_dir: str | Path, every_n_steps: int | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.every_n_steps = every_n_steps
        self.writer: Any = None
        if every_n_steps is not None:
            self.on_train_batch_end = self._log_step  # type: ignore[method-assign]

    def on_fit_start(self, run: Run) -> None:
        if not run.is_main_process:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise config_error(
                "The TensorBoard callback needs the tensorboard package.",
                "import tensorboard failed",
                "pip install 'trainwell[tensorboard]' (or pip install tensorboard).",
            ) from None
        self.writer = SummaryWriter(str(self.log_dir))

    def _log_step(self, run: Run) -> None:
        assert self.every_n_steps is not None
        at_step = run.window_batches == 0  # with gradient accumulation, only once a window is stepped
        if self.writer is not None and run.loss is not None and at_step and run.global_step % self.every_n_steps == 0:
            self.writer.add_scalar("batch/loss", run.loss.item(), run.global_step)

    def on_epoch_end(self, run: Run) -> None:
        if self.writer is not None:
            for key, value in run.logs.items():
                self.writer.add_scalar(key, value, run.epoch + 1)
            self.writer.flush()

    def on_fit_end(self, run: Run) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
