"""``Run``: the one mutable state object a training, evaluation or prediction pass works on.

Owns: the fields the loop and callbacks share. Holds state only; must not train or print.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

import torch
from torch import nn

from trainwell.batches import Batches
from trainwell.data import Batch
from trainwell.errors import config_error, describe
from trainwell.history import History
from trainwell.metrics import Tally
from trainwell.objective import Objective
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


class StepResult(NamedTuple):
    """What a training step did; the loop does the accounting (sums, ``run.loss``, counters).

    Attributes:
        loss: The batch's mean loss (a device tensor), or None.
        outputs: The model's outputs, for the metrics (None when the step has none).
        logs: Further named values of the batch (a GAN's ``loss_d``, ``loss_g``; each head's
            loss), averaged over the epoch's samples and logged like the loss.
        items: The items the loss counted (a device tensor), when it is a mean over items
            (tokens, pixels) rather than samples; None otherwise.
    """

    loss: torch.Tensor | None
    outputs: Any = None
    logs: Mapping[str, torch.Tensor] = {}
    items: torch.Tensor | None = None


StepFn = Callable[["Run", Batch], "StepResult | torch.Tensor | Mapping[str, torch.Tensor] | None"]


def as_step_result(value: Any) -> StepResult:
    """Read what a step returned: a ``StepResult``, a loss tensor, a dict of named losses (its
    ``"loss"`` entry, when present, is the loss), or None.

    Raises:
        ConfigError: Anything else.

    Example:
        >>> sorted(as_step_result({"loss_d": torch.ones(()), "loss_g": torch.ones(())}).logs)
        ['loss_d', 'loss_g']
    """
    if isinstance(value, StepResult):
        return value
    if value is None or isinstance(value, torch.Tensor):
        return StepResult(_scalar(value))
    if isinstance(value, Mapping) and all(isinstance(item, torch.Tensor) for item in value.values()):
        named = {str(key): item for key, item in value.items() if key != "loss"}
        return StepResult(_scalar(value.get("loss")), None, named)
    raise config_error(
        "A training step must return its loss, a dict of named losses, a trainwell.StepResult or None.",
        describe(value),
        "return e.g. {'loss_d': loss_d.detach(), 'loss_g': loss_g.detach()}, or StepResult(loss, outputs) for metrics.",
    )


def _scalar(loss: torch.Tensor | None) -> torch.Tensor | None:
    if loss is None or loss.dim() == 0:
        return loss
    if loss.numel() != 1:
        raise config_error(
            "A training step's loss must be one number (the batch mean).",
            describe(loss),
            "return loss.mean(), or a dict of named scalar losses.",
        )
    return loss.reshape(())


class Dispatcher(Protocol):
    """Calls the callbacks that listen to a hook (implemented in ``callbacks``); ``callbacks``
    lists them in order."""

    callbacks: list[Any]

    def fire(self, hook: Hook, run: Run) -> None: ...
    def fire_all(self, hook: Hook, run: Run) -> list[BaseException]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NoCallbacks:
    """A dispatcher with no listeners, for evaluate/predict without a display."""

    def __init__(self) -> None:
        self.callbacks: list[Any] = []

    def fire(self, hook: Hook, run: Run) -> None:
        """Do nothing."""

    def fire_all(self, hook: Hook, run: Run) -> list[BaseException]:
        """Nothing to call, nothing raised."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """No state."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


@dataclass(eq=False)
class Run:
    """Everything a pass over data shares between the loop and the callbacks.

    Attributes:
        model: The model the loop calls (DDP-wrapped when distributed).
        module: The user's own model, unwrapped: what is saved and handed back.
        optimizer: The optimizer (None for evaluate/predict).
        objective: The losses and where they read the outputs and targets (None when no loss
            is computed, or a custom step computes it).
        train_tally: Running sums of the training loss and metrics in this epoch.
        val_tally: Running sums for validation (or for ``evaluate``).
        precision: Autocast context and grad scaler.
        device: Where the model and batches live.
        callbacks: The dispatcher of hooks.
        history: Per-epoch logs.
        step: The training step, ``step(run, batch)``; ``loop.train_step`` unless replaced.
        train_batches: Training data; val_batches: validation data (or None).
        eval_batches: The data of the current (or last) validation, ``evaluate`` or ``predict``
            pass; eval_batches_done: its batches finished so far.
        epochs: Total epochs; epoch: the current one (0-based); start_epoch: the first of this run.
        batches_done: Batches finished in the current epoch; global_step: optimizer steps so far.
        phase: What the loop is doing now.
        batch: The current batch; outputs: the model's outputs for it; loss: its loss (a device
            tensor, never read by the loop).
        logs: The epoch's final values, set before ``on_epoch_end``; eval_logs: the last evaluation's.
        extra_logs: Values callbacks add during an epoch (e.g. ``lr``); merged into ``logs``.
        stop_training: Set by a callback to end ``fit`` after the current batch (``evaluate``
            and ``predict`` too: they return what they computed up to it).
        seed: Seeds the data order of every epoch.
        parameters: The trainable parameters (for clipping and accumulation).
        grad_accum_steps: Batches per optimizer step; window_batches / window_samples: the
            batches and the samples (over all processes) accumulated in the current window;
            ends_window: whether the current batch completes its window (then the step updates
            the weights); window_size: the samples of a full window over all processes
            (0 when the batch size is unknown): the loss of each batch is scaled by it, so that
            accumulated gradients stay at the magnitude of one batch's mean (fp16's range).
        window_items / item_reference: When the objective counts items: the window's counted
            items so far on this process (a device tensor; None between windows), and the
            constant the step divided each batch's weight by.
        callback_states: Saved callback states of a resumed run, given to the callbacks right
            after ``on_fit_start`` (None otherwise).
        clip_grad_norm / clip_grad_value: Gradient clipping before each optimizer step.
        is_main_process: True on the process that prints and writes files.
        rank / world_size: This process's rank and the number of processes (0 and 1 outside torchrun).
        reduce: Sums a 1-D tensor across processes; None in a single process.
        config: ``fit``'s options as resolved (the optimizer and the lr it uses, the device, the
            seed, the batch size, the model's class and parameter count, the number of training
            samples, ...): what trackers log as the run's parameters. Empty outside ``fit``.
        error: What ended ``fit`` with an exception (Ctrl-C's ``TrainingInterrupted`` included),
            set before ``on_fit_end``; None when it ran to its end. ``sys.exc_info()`` would not
            tell: inside the caller's own ``except`` block it names the caller's exception.
    """

    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer | None
    objective: Objective | None
    train_tally: Tally
    val_tally: Tally
    precision: Precision
    device: torch.device
    callbacks: Dispatcher = field(default_factory=NoCallbacks)
    history: History = field(default_factory=History)
    step: StepFn | None = None
    train_batches: Batches | None = None
    val_batches: Batches | None = None
    eval_batches: Batches | None = None
    eval_batches_done: int = 0
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
    parameters: list[torch.Tensor] = field(default_factory=list)
    grad_accum_steps: int = 1
    window_batches: int = 0
    window_samples: int = 0
    window_size: int = 0
    window_items: torch.Tensor | None = None
    item_reference: float = 1.0
    ends_window: bool = True
    callback_states: dict[str, Any] | None = None
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    is_main_process: bool = True
    rank: int = 0
    world_size: int = 1
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None

    def running_logs(self) -> dict[str, float]:
        """The current pass's averages so far (one device-to-host copy; the display calls it
        at most ~10 times a second, the loop never does)."""
        tally = self.train_tally if self.phase == "train" else self.val_tally
        return tally.read(running=True)
