"""Metrics as small device-side accumulators, and the ``Tally`` that sums loss and metrics.

Owns: METRICS, resolving metric names/callables/objects, and per-epoch running sums. Sums stay
on the device; only ``Tally.read`` copies them to the host, in one transfer. Must not print.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from trainwell.errors import config_error, describe, unknown_name_error

MetricFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AccuracyMode = Literal["auto", "multiclass", "binary"]


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 sums where the device has it (exact epoch averages), float32 on MPS."""
    return torch.float32 if device.type == "mps" else torch.float64


class Metric:
    """Base of the built-in metrics: a device-side sum and a host-side count.

    Subclasses implement ``batch_sum``; the epoch value is ``total / count`` unless
    ``finalize`` says otherwise. ``update`` never synchronises with the device.

    Attributes:
        name: The log key (``"accuracy"``; ``"val_accuracy"`` for validation).
        is_fraction: Shown as a percentage by the display.
    """

    name: str = "metric"
    is_fraction: bool = False
    counts: bool = False  # batch sums are integer counts: summed exactly in int64, without casts

    def __init__(self) -> None:
        self.total = torch.zeros((), dtype=torch.float64)
        self.count = 0

    def reset(self, device: torch.device) -> None:
        """Zero the sums on ``device``."""
        dtype = torch.int64 if self.counts else accumulator_dtype(device)
        self.total = torch.zeros((), dtype=dtype, device=device)
        self.count = 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch (detached outputs) to the running sums."""
        value, count = self.batch_sum(outputs, targets)
        self.total.add_(value)
        self.count += count

    def batch_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Return the batch's sum (a device tensor) and how many items it covers (a host int)."""
        raise NotImplementedError

    def finalize(self, total: float, count: float) -> float:
        """Turn reduced sums into the reported value."""
        return total / count if count else math.nan


class Accuracy(Metric):
    """Share of correct predictions.

    Multi-class when outputs are (N, C, ...) with C > 1: the arg-max against class indices, or
    against the arg-max of one-hot/probability targets. Binary otherwise: outputs above
    ``threshold`` (0 for logits, 0.5 for probabilities) against targets above 0.5.

    Args:
        threshold: Decision threshold for binary outputs.
        mode: ``"binary"`` for element-wise (multi-label) accuracy with BCE losses,
            ``"multiclass"`` for arg-max accuracy, ``"auto"`` to decide from the shapes.
    """

    name = "accuracy"
    is_fraction = True
    counts = True

    def __init__(self, threshold: float = 0.5, mode: AccuracyMode = "auto") -> None:
        super().__init__()
        self.threshold = threshold
        self.mode = mode

    def batch_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        multiclass = self.mode == "multiclass" or (self.mode == "auto" and outputs.dim() >= 2 and outputs.shape[1] > 1)
        if multiclass:
            predicted = outputs.argmax(1)
            if targets.shape == outputs.shape:
                targets = targets.argmax(1)
            elif targets.shape != predicted.shape:
                targets = targets.view(predicted.shape)
            return (predicted == targets).sum(), predicted.numel()
        predicted = outputs.reshape(-1) > self.threshold
        return (predicted == (targets.reshape(-1) > 0.5)).sum(), predicted.numel()


class TopKAccuracy(Metric):
    """Share of samples whose class is among the ``k`` highest outputs."""

    is_fraction = True
    counts = True

    def __init__(self, k: int = 5) -> None:
        super().__init__()
        if k < 1:
            raise config_error("top-k accuracy needs k >= 1.", f"k={k}", "use e.g. 'top5_accuracy'.")
        self.k = k
        self.name = f"top{k}_accuracy"

    def batch_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        if targets.shape == outputs.shape:
            targets = targets.argmax(1)
        top = outputs.topk(min(self.k, outputs.shape[1]), dim=1).indices
        hits = (top == targets.view(-1, 1)).any(dim=1)
        return hits.sum(), hits.numel()


class MeanAbsoluteError(Metric):
    """Mean absolute difference over all elements."""

    name = "mae"

    def batch_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        return (outputs - targets).abs().sum(), outputs.numel()


class MeanSquaredError(Metric):
    """Mean squared difference over all elements."""

    name = "mse"

    def batch_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        return (outputs - targets).square().sum(), outputs.numel()


class RootMeanSquaredError(MeanSquaredError):
    """Square root of the epoch's mean squared error (not a mean of per-batch roots)."""

    name = "rmse"

    def finalize(self, total: float, count: float) -> float:
        return math.sqrt(total / count) if count else math.nan


class FunctionMetric(Metric):
    """A ``callable(outputs, targets) -> scalar`` averaged over samples, weighted by batch size."""

    def __init__(self, fn: MetricFn, name: str) -> None:
        super().__init__()
        self.fn = fn
        self.name = name

    def batch_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        size = targets.shape[0] if targets.dim() else 1
        return self.fn(outputs, targets).detach() * size, size


@runtime_checkable
class ExternalMetric(Protocol):
    """Anything with torchmetrics' ``update`` / ``compute`` / ``reset`` (it syncs itself)."""

    def update(self, *args: Any, **kwargs: Any) -> Any: ...
    def compute(self) -> Any: ...
    def reset(self) -> Any: ...


METRICS: dict[str, Callable[[], Metric]] = {
    "accuracy": Accuracy,
    "mae": MeanAbsoluteError,
    "mse": MeanSquaredError,
    "rmse": RootMeanSquaredError,
}
_TOP_K = re.compile(r"top_?(\d+)_accuracy")


def resolve_metric(
    metric: str | MetricFn | Metric | ExternalMetric, *, threshold: float, mode: AccuracyMode
) -> Metric | ExternalMetric:
    """Turn one entry of ``metrics=[...]`` into a fresh accumulator.

    Args:
        metric: A name (``"accuracy"``, ``"top5_accuracy"``, ``"mae"``, ...), a ``Metric``, a
            torchmetrics-style object, or a ``callable(outputs, targets) -> scalar tensor``.
        threshold: Binary decision threshold for accuracy (chosen by the caller from the loss).
        mode: Accuracy mode (chosen by the caller from the loss).

    Raises:
        ConfigError: Unknown name or unsupported object.

    Example:
        >>> resolve_metric("top3_accuracy", threshold=0.0, mode="auto").name
        'top3_accuracy'
    """
    if isinstance(metric, str):
        top_k = _TOP_K.fullmatch(metric)
        if top_k:
            return TopKAccuracy(int(top_k.group(1)))
        if metric == "accuracy":
            return Accuracy(threshold, mode)
        if metric not in METRICS:
            raise unknown_name_error("metric", metric, [*METRICS, "top5_accuracy (any k)"])
        return METRICS[metric]()
    if isinstance(metric, (Metric, ExternalMetric)):
        return copy.deepcopy(metric)
    if callable(metric):
        return FunctionMetric(metric, getattr(metric, "__name__", type(metric).__name__))
    raise config_error(
        "A metric must be a name, a callable(outputs, targets) or a torchmetrics-style object.",
        f"metrics entry {describe(metric)}",
        f"use one of {', '.join(METRICS)}, 'top5_accuracy', a function, or a torchmetrics.Metric.",
    )


def metric_name(metric: Metric | ExternalMetric) -> str:
    """The log key of a metric (torchmetrics objects: the class name in snake case)."""
    if isinstance(metric, Metric):
        return metric.name
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(metric).__name__).lower()


class Tally:
    """Running sums of the loss and metrics over one pass (an epoch or an evaluation).

    ``update`` costs a few device kernels and no host synchronisation; ``read`` copies every
    sum to the host in one transfer, optionally reducing them across processes first.

    Args:
        metrics: Fresh accumulators, owned by this tally.
        has_loss: Whether a loss is summed too (``evaluate`` without a loss has none).
        prefix: Prefix of the log keys (``"val_"`` for validation).
    """

    def __init__(self, metrics: Sequence[Metric | ExternalMetric], *, has_loss: bool = True, prefix: str = "") -> None:
        self.metrics = list(metrics)
        self.builtin = [metric for metric in self.metrics if isinstance(metric, Metric)]
        self.external = [metric for metric in self.metrics if not isinstance(metric, Metric)]
        self.has_loss = has_loss
        self.prefix = prefix
        self.loss_total = torch.zeros((), dtype=torch.float64)
        self.samples = 0

    @property
    def keys(self) -> list[str]:
        """The log keys this tally produces, in display order."""
        names = ["loss"] if self.has_loss else []
        return [self.prefix + name for name in names + [metric_name(metric) for metric in self.metrics]]

    @property
    def fraction_keys(self) -> set[str]:
        """Keys shown as percentages."""
        return {self.prefix + metric.name for metric in self.builtin if metric.is_fraction}

    def reset(self, device: torch.device) -> None:
        """Start a new pass on ``device``."""
        self.loss_total = torch.zeros((), dtype=accumulator_dtype(device), device=device)
        self.samples = 0
        for metric in self.builtin:
            metric.reset(device)
        for external in self.external:
            external.reset()
            to = getattr(external, "to", None)
            if to is not None:
                to(device)

    def update(self, loss: torch.Tensor | None, outputs: Any, targets: torch.Tensor | None, size: int) -> None:
        """Add one batch. ``loss`` is the batch mean; it is weighted by ``size`` samples."""
        self.samples += size
        if loss is not None:
            self.loss_total.add_(loss.detach(), alpha=size)
        if targets is None or not self.metrics:
            return
        outputs = outputs.detach()
        for metric in self.metrics:
            metric.update(outputs, targets)

    def state_dict(self) -> dict[str, Any]:
        """The running sums (for a mid-epoch checkpoint); torchmetrics objects are not included."""
        return {
            "loss_total": self.loss_total.detach().cpu(),
            "samples": self.samples,
            "metrics": [(metric.total.detach().cpu(), metric.count) for metric in self.builtin],
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore ``state_dict`` onto ``device``."""
        self.loss_total = state["loss_total"].to(device)
        self.samples = int(state["samples"])
        for metric, (total, count) in zip(self.builtin, state["metrics"], strict=True):
            metric.total, metric.count = total.to(device), int(count)

    def read(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """The pass's averages so far, keyed by log name.

        Args:
            reduce: Sums a 1-D tensor across processes (distributed runs); None in one process.

        Returns:
            ``{"loss": ..., "<metric>": ...}`` with the prefix applied; NaN when nothing was seen.
        """
        device = self.loss_total.device
        counts = torch.tensor(
            [self.samples] + [metric.count for metric in self.builtin], dtype=self.loss_total.dtype, device=device
        )
        sums = torch.stack([self.loss_total] + [metric.total.to(self.loss_total.dtype) for metric in self.builtin])
        packed = torch.cat([sums, counts])
        if reduce is not None:
            packed = reduce(packed)
        values = packed.tolist()
        totals, numbers = values[: len(sums)], values[len(sums) :]
        logs: dict[str, float] = {}
        if self.has_loss:
            logs["loss"] = totals[0] / numbers[0] if numbers[0] else math.nan
        results = {
            metric.name: metric.finalize(total, count)
            for metric, total, count in zip(self.builtin, totals[1:], numbers[1:], strict=True)
        }
        for external in self.external:
            results[metric_name(external)] = float(external.compute())
        for metric in self.metrics:
            logs[metric_name(metric)] = results[metric_name(metric)]
        return {self.prefix + key: value for key, value in logs.items()}
