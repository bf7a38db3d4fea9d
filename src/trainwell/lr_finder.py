"""``find_lr``: the learning-rate range test, run through ``fit`` and undone afterwards.

Owns: the exponential learning-rate sweep, smoothing, the divergence stop and the suggestion.
A client of ``fit`` (so it has no loop of its own); the model's weights are restored.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from trainwell.api import fit
from trainwell.callbacks import Callback
from trainwell.errors import config_error
from trainwell.losses import LossFn
from trainwell.plots import plot_lr_finder
from trainwell.run import Run
from trainwell.schedules import LRScheduler

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class LRFinderResult:
    """The range test's curve and its suggestion.

    Attributes:
        lrs: Learning rate of each step.
        losses: Smoothed loss of each step (exponential moving average, bias-corrected).
        suggestion: The suggested learning rate.
        reason: Why that value.
    """

    lrs: list[float]
    losses: list[float]
    suggestion: float
    reason: str

    def plot(self, path: str | Path | None = None) -> Figure:
        """Loss against learning rate (log scale) with the suggestion marked; needs matplotlib."""
        return plot_lr_finder(self.lrs, self.losses, self.suggestion, path)


class _Sweep(Callback):
    """Records each step's loss and stops when the smoothed loss diverges."""

    def __init__(self, steps: int, smoothing: float, diverge: float) -> None:
        self.steps, self.smoothing, self.diverge = steps, smoothing, diverge
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.average = 0.0
        self.best = math.inf

    def on_train_batch_end(self, run: Run) -> None:
        assert run.loss is not None and run.optimizer is not None
        loss = run.loss.item()  # the range test reads every loss: that is its purpose
        self.average = self.smoothing * self.average + (1 - self.smoothing) * loss
        smoothed = self.average / (1 - self.smoothing ** (len(self.losses) + 1))
        self.lrs.append(float(run.optimizer.param_groups[0]["lr"]))
        self.losses.append(smoothed)
        self.best = min(self.best, smoothed)
        if not math.isfinite(smoothed) or smoothed > self.diverge * self.best or len(self.losses) >= self.steps:
            run.stop_training = True


def find_lr(
    model: nn.Module,
    data: Any,
    *,
    loss: str | LossFn,
    optimizer: str = "sgd",
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    batch_size: int = 32,
    smoothing: float = 0.98,
    diverge: float = 4.0,
    device: str | torch.device = "auto",
    seed: int | None = None,
    **optimizer_options: Any,
) -> LRFinderResult:
    """Sweep the learning rate exponentially from ``start_lr`` to ``end_lr`` over ``steps``
    optimizer steps, and suggest where the loss falls fastest.

    The model's weights (and its train/eval mode) are restored afterwards.

    Args:
        model: The model.
        data: Training data, as for ``fit``.
        loss: The loss, as for ``fit``.
        optimizer: A named optimizer (``sgd``, ``adam``, ...); options go through the keywords.
        start_lr / end_lr: The sweep's range.
        steps: Optimizer steps of the sweep (it repeats the data when needed).
        batch_size: As for ``fit``.
        smoothing: Weight of the moving average of the loss (0: none).
        diverge: Stop once the smoothed loss exceeds this many times its minimum.
        device / seed: As for ``fit``.

    Returns:
        The curve, the suggested learning rate and the reason.

    Raises:
        ConfigError: A bad range, or too few steps to suggest anything.
    """
    if not 0 < start_lr < end_lr or steps < 10 or not 0 <= smoothing < 1 or diverge <= 1:
        raise config_error(
            "find_lr needs 0 < start_lr < end_lr, steps >= 10, 0 <= smoothing < 1 and diverge > 1.",
            f"start_lr={start_lr}, end_lr={end_lr}, steps={steps}, smoothing={smoothing}, diverge={diverge}",
            "use the defaults: start_lr=1e-7, end_lr=10, steps=100.",
        )
    saved = copy.deepcopy(model.state_dict())
    growth = (end_lr / start_lr) ** (1 / (steps - 1))
    sweep = _Sweep(steps, smoothing, diverge)
    schedule = LRScheduler(
        lambda built: torch.optim.lr_scheduler.LambdaLR(built, lambda step: growth**step), interval="step"
    )
    try:
        fit(model, data, loss=loss, optimizer=optimizer, lr=start_lr, epochs=steps, batch_size=batch_size,
            callbacks=[sweep, schedule], terminate_on_nan=False, progress=False, device=device, seed=seed,
            **optimizer_options)  # fmt: skip
    finally:
        model.load_state_dict(saved)
    return _suggest(sweep.lrs, sweep.losses)


def _suggest(lrs: list[float], losses: list[float]) -> LRFinderResult:
    finite = [index for index, value in enumerate(losses) if math.isfinite(value)]
    if len(finite) < 5:
        raise config_error(
            "The loss diverged almost at once: the range test recorded too few steps.",
            f"{len(finite)} finite losses",
            "lower start_lr, or check the data and loss.",
        )
    # Skip the first tenth (the moving average is still settling) and the divergence at the end.
    start, stop = len(finite) // 10, max(len(finite) // 10 + 2, finite[-1] - 2)
    log_lrs = np.log10(np.asarray(lrs[start:stop]))
    slopes = np.gradient(np.asarray(losses[start:stop]), log_lrs)
    steepest = start + int(np.argmin(slopes))
    lowest = int(np.argmin([losses[index] for index in finite]))
    reason = (
        f"the smoothed loss falls fastest there ({slopes.min():.3g} per tenfold lr); it is lowest at "
        f"lr={lrs[lowest]:.2e}, and the sweep stopped at lr={lrs[finite[-1]]:.2e}"
    )
    return LRFinderResult(lrs, losses, lrs[steepest], reason)
