"""``Run``: the one mutable state object a training, evaluation or prediction pass works on.

Owns: the fields the loop and callbacks share. Holds state only; must not train or print.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from trainwell.data import Batch, Batches
from trainwell.history import History
from trainwell.losses import LossFn, WeightedLossFn
from trainwell.metrics import Tally
from trainwell.precision import Precision

Hook = Literal[
    "on_fit_start",
    "on_epoch_start",
    "on_train_batch_start",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_eval_start",
    "on_eval_batch_end",
    "on_eval_end",
    "on_epoch_end",
    "on_fit_end",
]
Phase = Literal["train", "eval", "predict"]
StepFn = Callable[["Run", Batch], None]


class Dispatcher(Protocol):
    """Calls the callbacks that listen to a hook (implemented in ``callbacks``)."""

    def fire(self, hook: Hook, run: Run) -> None: ...


class NoCallbacks:
    """A dispatcher with no listeners, for evaluate/predict without a display."""

    def fire(self, hook: Hook, run: Run) -> None:
        """Do nothing."""


@dataclass(eq=False)
class Run:
    """Everything a pass over data shares between the loop and the callbacks.

    Attributes:
        model: The model the loop calls (DDP-wrapped when distributed).
        module: The user's own model, unwrapped: what is saved and handed back.
        optimizer: The optimizer (None for evaluate/predict).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (None when no loss is computed).
        train_tally: Running sums of the training loss and metrics in this epoch.
        val_tally: Running sums for validation (or for ``evaluate``).
        precision: Autocast context and grad scaler.
        device: Where the model and batches live.
        callbacks: The dispatcher of hooks.
        history: Per-epoch logs.
        step: The training step, ``step(run, batch)``; ``loop.train_step`` unless replaced.
        train_batches: Training data; val_batches: validation data (or None).
        epochs: Total epochs; epoch: the current one (0-based); start_epoch: the first of this run.
        batches_done: Batches finished in the current epoch; global_step: optimizer steps so far.
        phase: What the loop is doing now.
        batch: The current batch; outputs: the model's outputs for it; loss: its loss (a device
            tensor, never read by the loop).
        logs: The epoch's final values, set before ``on_epoch_end``; eval_logs: the last evaluation's.
        extra_logs: Values callbacks add during an epoch (e.g. ``lr``); merged into ``logs``.
        stop_training: Set by a callback to end ``fit`` after the current batch.
        seed: Seeds the data order of every epoch.
        weighted_loss_fn: ``fn(outputs, targets, sample_weights)`` for batches with weights.
        parameters: The trainable parameters (for clipping and accumulation).
        grad_accum_steps: Batches per optimizer step; window_batches / window_samples: the
            batches and samples accumulated in the current window.
        clip_grad_norm / clip_grad_value: Gradient clipping before each optimizer step.
        is_main_process: True on the process that prints and writes files.
        rank / world_size: This process's rank and the number of processes (0 and 1 outside torchrun).
        reduce: Sums a 1-D tensor across processes; None in a single process.
    """

    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer | None
    loss_fn: LossFn | None
    train_tally: Tally
    val_tally: Tally
    precision: Precision
    device: torch.device
    callbacks: Dispatcher = field(default_factory=NoCallbacks)
    history: History = field(default_factory=History)
    step: StepFn | None = None
    train_batches: Batches | None = None
    val_batches: Batches | None = None
    epochs: int = 1
    epoch: int = 0
    start_epoch: int = 0
    batches_done: int = 0
    global_step: int = 0
    phase: Phase = "train"
    batch: Batch | None = None
    outputs: Any = None
    loss: torch.Tensor | None = None
    logs: dict[str, float] = field(default_factory=dict)
    eval_logs: dict[str, float] = field(default_factory=dict)
    extra_logs: dict[str, float] = field(default_factory=dict)
    stop_training: bool = False
    seed: int = 0
    weighted_loss_fn: WeightedLossFn | None = None
    parameters: list[torch.Tensor] = field(default_factory=list)
    grad_accum_steps: int = 1
    window_batches: int = 0
    window_samples: int = 0
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    is_main_process: bool = True
    rank: int = 0
    world_size: int = 1
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def running_logs(self) -> dict[str, float]:
        """The current pass's averages so far (one device-to-host copy; the display calls it
        at most ~10 times a second, the loop never does)."""
        tally = self.train_tally if self.phase == "train" else self.val_tally
        return tally.read()
