"""Learning-rate schedules: the ``LRScheduler`` callback, the named schedules, and when a torch
scheduler steps (per epoch or per optimizer step).

Owns: building, stepping and saving schedulers. Must not touch the optimizer otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch

from trainwell.callbacks import Callback
from trainwell.errors import config_error, describe, unknown_name_error
from trainwell.run import Run

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
        """The scheduler's state, and the learning rates it set."""
        if self.scheduler is None:
            return {"scheduler": None, "lrs": []}
        groups = self.scheduler.optimizer.param_groups
        return {"scheduler": self.scheduler.state_dict(), "lrs": [group["lr"] for group in groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict`` (the loop calls it after ``on_fit_start`` built the scheduler,
        whose construction set the first epoch's rates: the saved rates replace them)."""
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
            for group, lr in zip(self.scheduler.optimizer.param_groups, state["lrs"], strict=True):
                group["lr"] = lr


SCHEDULERS = ("step", "cosine", "onecycle", "reduce_on_plateau")


def build_scheduler(name: str, *, epochs: int, steps_per_epoch: int | None, has_val: bool) -> LRScheduler:
    """A named schedule with defaults that suit most runs.

    - ``step``: the learning rate times 0.1 every ``epochs // 3`` epochs.
    - ``cosine``: linear warm-up over the first 5% of optimizer steps, then cosine decay to 0.
    - ``onecycle``: ``torch.optim.lr_scheduler.OneCycleLR`` peaking at the given ``lr``.
    - ``reduce_on_plateau``: times 0.1 after 2 epochs in a row without improvement of ``val_loss`` (or ``loss``).

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
            # torch lowers the rate once more than ``patience`` epochs did not improve: 1 means 2 epochs
            lambda optimizer: schedulers.ReduceLROnPlateau(optimizer, factor=0.1, patience=1),
            monitor=monitor,
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


# Schedulers torch documents as stepped after every batch.
_PER_STEP = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)


def scheduler_callback(scheduler: Any, *, epochs: int, steps_per_epoch: int | None, has_val: bool) -> LRScheduler:
    """The callback for ``fit(scheduler=...)``: a name, an ``LRScheduler``, or a torch scheduler.

    A torch scheduler steps per optimizer step when it is built for that (``OneCycleLR``,
    ``CyclicLR``, or a ``CosineAnnealingLR`` whose ``T_max`` is the run's number of optimizer
    steps), per epoch otherwise, as in torch's documentation.

    Raises:
        ConfigError: Anything else.
    """
    check_scheduler(scheduler)
    if isinstance(scheduler, str):
        return build_scheduler(scheduler, epochs=epochs, steps_per_epoch=steps_per_epoch, has_val=has_val)
    if isinstance(scheduler, LRScheduler):
        return scheduler
    total = None if steps_per_epoch is None else epochs * steps_per_epoch
    per_step = isinstance(scheduler, _PER_STEP) or (
        isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) and scheduler.T_max == total != epochs
    )
    return LRScheduler(scheduler, interval="step" if per_step else "epoch")


def check_scheduler(scheduler: Any) -> None:
    """Raise ``ConfigError`` unless ``scheduler`` is a schedule name, an ``LRScheduler`` or a torch scheduler."""
    if isinstance(scheduler, str):
        if scheduler not in SCHEDULERS:
            raise unknown_name_error("scheduler", scheduler, SCHEDULERS)
        return
    if isinstance(scheduler, LRScheduler) or (hasattr(scheduler, "step") and hasattr(scheduler, "optimizer")):
        return
    raise config_error(
        "scheduler must be a name, a trainwell.LRScheduler or a torch scheduler.",
        f"scheduler={describe(scheduler)}",
        f"use one of {', '.join(SCHEDULERS)}, or LRScheduler(lambda optimizer: StepLR(optimizer, 5)).",
    )
