"""Callbacks: the ``Callback`` base class with its hooks, and the dispatcher that calls them.

Owns: the hook list and which callbacks listen to each hook. A hook that no callback
overrides costs one dictionary lookup and an empty loop. Must not know concrete callbacks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import get_args

from trainwell.errors import config_error, describe
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
