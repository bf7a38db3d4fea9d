"""Metrics as small device-side accumulators, and the ``Tally`` that sums loss and metrics.

Owns: METRICS, resolving metric names/callables/objects, and per-epoch running sums. Sums stay
on the device; only ``Tally.read`` copies them to the host, in one transfer. Must not print.
"""

from __future__ import annotations

import copy
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

from trainwell.errors import config_error, describe, unknown_name_error
from trainwell.structures import sample_count, tensors_of

MetricFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Count = int | torch.Tensor  # a host count, or a device count (positions that are not ignored)
Route = Callable[[Any, Any], tuple[Any, Any]]
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
        self.count: Count = 0

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

    def batch_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Count]:
        """Return the batch's sum (a device tensor) and how many items it covers (a host int, or
        a device tensor when some positions do not count)."""
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
        ignore_index: A class label whose positions count neither as right nor as wrong
            (padding, void pixels); None to count every position.
    """

    name = "accuracy"
    is_fraction = True
    counts = True

    def __init__(self, threshold: float = 0.5, mode: AccuracyMode = "auto", ignore_index: int | None = None) -> None:
        super().__init__()
        self.threshold = threshold
        self.mode = mode
        self.ignore_index = ignore_index

    def batch_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Count]:
        multiclass = self.mode == "multiclass" or (self.mode == "auto" and outputs.dim() >= 2 and outputs.shape[1] > 1)
        if multiclass:
            predicted = outputs.argmax(1)
            if targets.shape == outputs.shape:
                targets = targets.argmax(1)
            elif targets.shape != predicted.shape:
                targets = targets.view(predicted.shape)
            return _hits(predicted == targets, targets, self.ignore_index)
        predicted = outputs.reshape(-1) > self.threshold
        return (predicted == (targets.reshape(-1) > 0.5)).sum(), predicted.numel()


def _hits(correct: torch.Tensor, targets: torch.Tensor, ignore_index: int | None) -> tuple[torch.Tensor, Any]:
    """The correct positions and the positions counted (a device tensor when some are ignored)."""
    if ignore_index is None:
        return correct.sum(), correct.numel()
    counted = targets != ignore_index
    return (correct & counted).sum(), counted.sum()


class TopKAccuracy(Metric):
    """Share of samples (or positions, for outputs (N, C, ...)) whose class is among the ``k``
    highest outputs; positions labelled ``ignore_index`` do not count."""

    is_fraction = True
    counts = True

    def __init__(self, k: int = 5, ignore_index: int | None = None) -> None:
        super().__init__()
        if k < 1:
            raise config_error("top-k accuracy needs k >= 1.", f"k={k}", "use e.g. 'top5_accuracy'.")
        self.k = k
        self.name = f"top{k}_accuracy"
        self.ignore_index = ignore_index

    def batch_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Count]:
        if targets.shape == outputs.shape:
            targets = targets.argmax(1)
        top = outputs.topk(min(self.k, outputs.shape[1]), dim=1).indices
        hits = (top == targets.reshape((*top.shape[:1], 1, *top.shape[2:]))).any(dim=1)
        return _hits(hits, targets, self.ignore_index)


class MeanAbsoluteError(Metric):
    """Mean absolute difference over all elements."""

    name = "mae"

    def batch_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Count]:
        return (outputs - targets).abs().sum(), outputs.numel()


class MeanSquaredError(Metric):
    """Mean squared difference over all elements."""

    name = "mse"

    def batch_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Count]:
        return (outputs - targets).square().sum(), outputs.numel()


class RootMeanSquaredError(MeanSquaredError):
    """Square root of the epoch's mean squared error (not a mean of per-batch roots)."""

    name = "rmse"

    def finalize(self, total: float, count: float) -> float:
        return math.sqrt(total / count) if count else math.nan


METRIC_FIX = "return a scalar tensor, e.g. (outputs.argmax(1) == targets).float().mean()"


def scalar_tensor(value: Any, device: torch.device) -> torch.Tensor | None:
    """A metric's result as a 0-d tensor on ``device``, or None when it is not one number.

    Accepts a tensor of one element (any shape), a Python or numpy number, or a one-element numpy
    array. A tensor is only reshaped and moved, never read, so a result on the device costs no
    host synchronisation.

    Example:
        >>> scalar_tensor(torch.tensor([[0.5]]), torch.device("cpu"))
        tensor(0.5000)
        >>> scalar_tensor(3, torch.device("cpu"))
        tensor(3., dtype=torch.float64)
        >>> scalar_tensor(torch.ones(2), torch.device("cpu")) is None
        True
    """
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()).to(device) if value.numel() == 1 else None
    is_number = isinstance(value, numbers.Real) or (isinstance(value, (np.generic, np.ndarray)) and value.size == 1)
    if is_number:
        try:
            return torch.as_tensor(value, dtype=accumulator_dtype(device), device=device).reshape(())
        except (TypeError, ValueError, RuntimeError):  # e.g. a numpy string or object scalar
            return None
    return None


def unusable_result_error(name: str, value: Any) -> Exception:
    """The ``ConfigError`` for a metric whose result is not one number."""
    return config_error(
        f"Metric {name!r} must give one number per batch, but its result is not a single value.",
        f"{name} returned {describe(value)}",
        METRIC_FIX + " (torchmetrics: use average='macro' or 'micro' rather than per-class values).",
    )


class FunctionMetric(Metric):
    """A ``callable(outputs, targets) -> scalar`` averaged over samples, weighted by batch size.

    The scalar may be a tensor of one element, a Python number or a numpy number.
    """

    def __init__(self, fn: MetricFn, name: str) -> None:
        super().__init__()
        self.fn = fn
        self.name = name

    def batch_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Count]:
        size = sample_count(targets) or 1
        result = self.fn(outputs, targets)
        device = outputs.device if isinstance(outputs, torch.Tensor) else tensors_of(outputs)[0].device
        value = scalar_tensor(result, device)
        if value is None:
            raise unusable_result_error(self.name, result)
        return value * size, size


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
    metric: str | MetricFn | Metric | ExternalMetric,
    *,
    threshold: float,
    mode: AccuracyMode,
    ignore_index: int | None = None,
) -> Metric | ExternalMetric:
    """Turn one entry of ``metrics=[...]`` into a fresh accumulator.

    Args:
        metric: A name (``"accuracy"``, ``"top5_accuracy"``, ``"mae"``, ...), a ``Metric``, a
            torchmetrics-style object, or a ``callable(outputs, targets) -> scalar tensor``.
        threshold: Binary decision threshold for accuracy (chosen by the caller from the loss).
        mode: Accuracy mode (chosen by the caller from the loss).
        ignore_index: The label of positions accuracy does not count (from the loss).

    Raises:
        ConfigError: Unknown name or unsupported object.

    Example:
        >>> resolve_metric("top3_accuracy", threshold=0.0, mode="auto").name
        'top3_accuracy'
    """
    if isinstance(metric, str):
        top_k = _TOP_K.fullmatch(metric)
        if top_k:
            return TopKAccuracy(int(top_k.group(1)), ignore_index)
        if metric == "accuracy":
            return Accuracy(threshold, mode, ignore_index)
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


# torchmetrics names classes by task (BinaryAUROC, MulticlassF1Score); the task is not part of the key.
_TASK_PREFIX = re.compile(r"^(?:Binary|Multiclass|Multilabel)(?=[A-Z])")
# A word starts at a capital after a lower-case letter or digit ("F1|Score"), or at the last capital
# of an acronym before a lower-case letter ("AUROC|Score"), so acronyms stay one word.
_WORD_START = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def metric_name(metric: Metric | ExternalMetric) -> str:
    """The log key of a metric: its ``name``, or for a torchmetrics-style object its class name in
    snake case without the task prefix (``Binary``, ``Multiclass``, ``Multilabel``).

    Example:
        >>> class MulticlassF1Score:
        ...     def update(self, outputs, targets): ...
        ...     def compute(self): ...
        ...     def reset(self): ...
        >>> metric_name(MulticlassF1Score())
        'f1_score'
        >>> metric_name(Accuracy())
        'accuracy'
    """
    if isinstance(metric, Metric):
        return metric.name
    class_name = _TASK_PREFIX.sub("", type(metric).__name__)
    return _WORD_START.sub("_", class_name).lower()


_LOWER_IS_BETTER = ("loss", "error")
_HIGHER_IS_BETTER_WORDS = frozenset(
    {"f1", "precision", "recall", "auroc", "auc", "iou", "miou", "dice", "r2", "jaccard", "specificity", "map"}
)


def higher_is_better(key: str) -> bool:
    """Whether a larger value of the log key ``key`` is better (for monitors with ``mode="auto"``).

    True for accuracy, f1, precision, recall, AUROC/AUC, average precision, IoU, Dice, R2,
    Jaccard, specificity and mAP in any of their usual spellings (``f1_macro``, ``val_auroc``);
    False for losses and errors (``loss``, ``mae``, ``mse``, ``rmse``, ``mean_squared_error``)
    and for unknown keys, which are treated as losses.

    Args:
        key: A log key, with or without the ``val_`` prefix.

    Returns:
        True when larger is better.

    Example:
        >>> higher_is_better("val_f1_score"), higher_is_better("val_loss"), higher_is_better("mae")
        (True, False, False)
    """
    name = key.removeprefix("val_").lower()
    if any(word in name for word in _LOWER_IS_BETTER):
        return False
    words = set(name.split("_"))
    return "accuracy" in name or "average_precision" in name or bool(words & _HIGHER_IS_BETTER_WORDS)


def _reset_external(metric: ExternalMetric, device: torch.device) -> None:
    metric.reset()
    to = getattr(metric, "to", None)
    if to is not None:
        to(device)


def check_metric(metric: Metric | ExternalMetric, outputs: Any, targets: Any, name: str | None = None) -> None:
    """Run one update of ``metric`` on a probe batch, on a copy, and check its result is one number.

    The copy keeps the real accumulator untouched. A torchmetrics-style object is updated and
    then computed.

    Args:
        metric: A resolved metric (``Metric`` or torchmetrics-style object).
        outputs: The model's outputs on the probe batch (as the metric gets them).
        targets: The probe batch's targets.
        name: The metric's log key (its own name by default).

    Raises:
        ConfigError: The metric raised an exception, or gave something other than one number
            (a tensor of several elements, a string, None).

    Example:
        >>> check_metric(Accuracy(), torch.tensor([[2.0, 1.0]]), torch.tensor([0]))
        >>> def per_sample(outputs, targets):
        ...     return outputs.argmax(1) == targets
        >>> check_metric(FunctionMetric(per_sample, "per_sample"), torch.zeros(2, 2), torch.zeros(2))
        Traceback (most recent call last):
        ...
        trainwell.errors.ConfigError: Metric 'per_sample' must give one number per batch, ...
          received: per_sample returned tensor of shape (2,), dtype bool
          fix: return a scalar tensor, ...
    """
    name = name or metric_name(metric)
    probe = copy.deepcopy(metric)
    device = next(iter(tensors_of(outputs)), torch.zeros(())).device
    try:
        if isinstance(probe, FunctionMetric):
            # The function's own result, so the message shows what it returned.
            result: Any = probe.fn(outputs, targets)
        elif isinstance(probe, Metric):
            probe.reset(device)
            probe.update(outputs, targets)
            result = probe.total
        else:
            _reset_external(probe, device)
            probe.update(outputs, targets)
            result = probe.compute()
    except Exception as error:
        raise config_error(
            f"Metric {name!r} raised {type(error).__name__} on a probe batch: {error}",
            f"outputs {describe(outputs)}, targets {describe(targets)}",
            METRIC_FIX + ", computed from (outputs, targets).",
        ) from error
    if scalar_tensor(result, device) is None:
        raise unusable_result_error(name, result)


class MetricSlot(NamedTuple):
    """A metric in a ``Tally``: its log key, the accumulator, and how it gets its outputs and
    targets from the model's (``route(outputs, targets)``; None takes them as they are)."""

    name: str
    metric: Metric | ExternalMetric
    route: Route | None = None


class Tally:
    """Running sums of the loss and metrics over one pass (an epoch or an evaluation).

    ``update`` costs a few device kernels and no host synchronisation; ``read`` copies every
    sum to the host in one transfer, optionally reducing them across processes first.

    Args:
        metrics: Fresh accumulators, owned by this tally (or ``MetricSlot`` s naming and routing them).
        has_loss: Whether a loss is summed too (``evaluate`` without a loss has none).
        prefix: Prefix of the log keys (``"val_"`` for validation).
        named_keys: Further values summed per sample, known in advance (each head's loss).
    """

    def __init__(
        self,
        metrics: Sequence[Metric | ExternalMetric | MetricSlot],
        *,
        has_loss: bool = True,
        prefix: str = "",
        named_keys: Sequence[str] = (),
    ) -> None:
        self.slots = [slot if isinstance(slot, MetricSlot) else MetricSlot(metric_name(slot), slot) for slot in metrics]
        self.builtin = [(slot.name, slot.metric) for slot in self.slots if isinstance(slot.metric, Metric)]
        self.external = [(slot.name, slot.metric) for slot in self.slots if not isinstance(slot.metric, Metric)]
        self.has_loss = has_loss
        self.prefix = prefix
        self.named_keys = list(named_keys)
        self.loss_total = torch.zeros((), dtype=torch.float64)
        self.loss_count: Count = 0  # samples, or counted items when the objective counts items
        self.samples = 0
        self.named: dict[str, torch.Tensor] = {}  # per-sample values by name: heads' losses, a custom step's

    @property
    def keys(self) -> list[str]:
        """The log keys this tally produces, in display order."""
        names = (["loss"] if self.has_loss else []) + self.named_keys
        return [self.prefix + name for name in names + [slot.name for slot in self.slots]]

    @property
    def fraction_keys(self) -> set[str]:
        """Keys shown as percentages."""
        return {self.prefix + name for name, metric in self.builtin if metric.is_fraction}

    def reset(self, device: torch.device) -> None:
        """Start a new pass on ``device``."""
        self.loss_total = torch.zeros((), dtype=accumulator_dtype(device), device=device)
        self.loss_count = 0
        self.samples = 0
        self.named = {name: torch.zeros_like(self.loss_total) for name in self.named_keys}
        for _, metric in self.builtin:
            metric.reset(device)
        for _, external in self.external:
            _reset_external(external, device)

    def update(
        self,
        loss: torch.Tensor | None,
        outputs: Any,
        targets: Any,
        size: int,
        named: Mapping[str, torch.Tensor] | None = None,
        items: torch.Tensor | None = None,
    ) -> None:
        """Add one batch. ``loss`` is the batch mean over its ``items`` (device count) when given,
        else over its ``size`` samples; the ``named`` values are batch means weighted by ``size``."""
        self.samples += size
        if loss is not None:
            if items is None:
                self.loss_total.add_(loss.detach(), alpha=size)
                self.loss_count += size
            else:
                self.loss_total.add_(loss.detach() * items)
                self.loss_count = self.loss_count + items
        for name, value in named.items() if named else ():
            if name not in self.named:
                self.named[name] = torch.zeros_like(self.loss_total)
            self.named[name].add_(value.detach().reshape(()), alpha=size)
        if targets is None or not self.slots:
            return
        for slot in self.slots:
            predicted, expected = (outputs, targets) if slot.route is None else slot.route(outputs, targets)
            if isinstance(predicted, torch.Tensor):
                slot.metric.update(predicted.detach(), expected)
            else:  # a structured metric gets the model's own output type, without a graph
                with torch.no_grad():
                    slot.metric.update(predicted, expected)

    def state_dict(self) -> dict[str, Any]:
        """The running sums (for a mid-epoch checkpoint); torchmetrics objects are not included."""
        return {
            "loss_total": self.loss_total.detach().cpu(),
            "loss_count": _saved(self.loss_count),
            "samples": self.samples,
            "metrics": [(metric.total.detach().cpu(), _saved(metric.count)) for _, metric in self.builtin],
            "named": {name: total.detach().cpu() for name, total in self.named.items()},
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore ``state_dict`` onto ``device``."""
        self.loss_total = state["loss_total"].to(device)
        self.samples = int(state["samples"])
        self.loss_count = _loaded(state.get("loss_count", self.samples), device)
        for (_, metric), (total, count) in zip(self.builtin, state["metrics"], strict=True):
            metric.total, metric.count = total.to(device), _loaded(count, device)
        self.named = {name: total.to(device) for name, total in state.get("named", {}).items()}
        for _, external in self.external:  # not saved: they restart with the resumed part of the epoch
            _reset_external(external, device)

    def read(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """The pass's averages so far, keyed by log name.

        Args:
            reduce: Sums a 1-D tensor across processes (distributed runs); None in one process.

        Returns:
            ``{"loss": ..., "<metric>": ...}`` with the prefix applied; NaN when nothing was seen.
        """
        device, dtype = self.loss_total.device, self.loss_total.dtype
        builtin = [metric for _, metric in self.builtin]
        counts = _stack([self.loss_count, self.samples, *[metric.count for metric in builtin]], dtype, device)
        named = list(self.named.values())
        sums = torch.stack([self.loss_total, *[metric.total.to(dtype) for metric in builtin], *named])
        packed = torch.cat([sums, counts])
        if reduce is not None:
            packed = reduce(packed)
        values = packed.tolist()
        totals, (loss_count, samples, *counted) = values[: len(sums)], values[len(sums) :]
        logs: dict[str, float] = {}
        if self.has_loss:
            logs["loss"] = totals[0] / loss_count if loss_count else math.nan
        for name, total in zip(self.named, totals[len(sums) - len(named) :], strict=True):
            logs[name] = total / samples if samples else math.nan
        results = {
            name: metric.finalize(total, count)
            for (name, metric), total, count in zip(self.builtin, totals[1 : 1 + len(builtin)], counted, strict=True)
        }
        for name, external in self.external:
            results[name] = float(external.compute())
        for slot in self.slots:
            logs[slot.name] = results[slot.name]
        return {self.prefix + key: value for key, value in logs.items()}


def _stack(counts: list[Count], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host and device counts as one tensor on ``device`` (one copy for the host ones)."""
    if all(isinstance(count, int) for count in counts):
        return torch.tensor(counts, dtype=dtype, device=device)
    return torch.stack(
        [
            count.to(dtype) if isinstance(count, torch.Tensor) else torch.tensor(count, dtype=dtype, device=device)
            for count in counts
        ]
    )


def _saved(count: Count) -> Any:
    return count.detach().cpu() if isinstance(count, torch.Tensor) else count


def _loaded(count: Any, device: torch.device) -> Count:
    return count.to(device) if isinstance(count, torch.Tensor) else int(count)
