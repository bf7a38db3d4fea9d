"""Metrics as small device-side accumulators, and the ``Tally`` that sums loss and metrics.

Owns: METRICS, resolving metric names/callables/objects, and per-epoch running sums. Sums stay
on the device; only ``Tally.read`` copies them to the host, in one transfer. Must not print.
"""

from __future__ import annotations

import copy
import math
import numbers
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol, cast, runtime_checkable

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

    def finalize(self, total: Any, count: float) -> float | dict[str, float]:
        """Turn reduced sums into the reported value (``total`` is a list for a vector sum; a
        dict result logs one key per entry)."""
        return float(total / count) if count else math.nan


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

    def finalize(self, total: Any, count: float) -> float:
        return math.sqrt(total / count) if count else math.nan


Average = Literal["binary", "micro", "macro", "weighted", "per_class"]
COUNTING_NAMES = (
    "precision",
    "recall",
    "f1",
    "f1_macro",
    "f1_micro",
    "f1_weighted",
    "f1_per_class",
    "balanced_accuracy",
    "iou",
    "dice",
)  # fmt: skip  (the names an unknown one is compared with)
COUNTING_NAME = re.compile(
    r"(?P<kind>precision|recall|f1|iou|dice)(?:_(?P<average>micro|macro|weighted|per_class))?|balanced_accuracy"
)


class ClassCounts(Metric):
    """Precision, recall, F1, IoU, Dice or balanced accuracy, from one confusion matrix summed on
    the device (exact over the epoch and across processes, unlike a mean of batch scores).

    The task follows the outputs: arg-max classes for (N, C, ...) outputs with C > 1 (a C x C
    matrix), thresholded yes/no for one output per sample (2 x 2), one yes/no per label for
    several outputs with a binary loss (L x 2 x 2). Positions labelled ``ignore_index`` count
    neither way. Values match scikit-learn's (``zero_division=0``): a class that is neither in
    the targets nor predicted is left out of the averages; balanced accuracy averages the recall
    of the classes present in the targets.

    Args:
        kind: ``"precision"``, ``"recall"``, ``"f1"``, ``"iou"`` (Jaccard), ``"dice"`` (F1 of a
            class) or ``"balanced_accuracy"``.
        average: ``"binary"`` (the positive class), ``"micro"``, ``"macro"``, ``"weighted"``
            (by support), ``"per_class"`` (one value per class); None: ``"binary"`` for one
            output, ``"macro"`` otherwise.
        width: Outputs per sample (classes, or labels), when known before the first batch (then
            every process sums the same shape, even one that sees no batch).
        mode, threshold, ignore_index: As for ``Accuracy``.
    """

    counts = True

    def __init__(
        self,
        kind: str,
        average: Average | None = None,
        *,
        width: int | None = None,
        mode: AccuracyMode = "auto",
        threshold: float = 0.5,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        self.kind, self.average, self.width = kind, average, width
        self.mode, self.threshold, self.ignore_index = mode, threshold, ignore_index
        self.name = kind if average is None else f"{kind}_{average}"
        self.is_fraction = kind == "accuracy"
        self.units = torch.ones(0, dtype=torch.int64)  # the weight of each counted position, reused
        self.source: ClassCounts | None = None  # another's matrix this one reads (see share_counts)

    def _is_multiclass(self, width: int) -> bool:
        return self.mode == "multiclass" or (self.mode == "auto" and width > 1)

    def _allocate(self, width: int, device: torch.device) -> None:
        self.width = width
        shape = (width, width) if self._is_multiclass(width) else (width, 2, 2) if width > 1 else (2, 2)
        self.total = torch.zeros(shape, dtype=torch.int64, device=device)

    def reset(self, device: torch.device) -> None:
        if self.source is not None:  # reads the source's matrix: sums nothing itself
            self.total, self.count = torch.zeros(0, dtype=torch.int64, device=device), 1
            return
        if self.width:
            self._allocate(self.width, device)
        else:  # sized by the first batch
            self.total = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 1
        self.units = torch.ones(0, dtype=torch.int64, device=device)

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        # As few kernels and Python steps as possible (this runs every step): each position's
        # cell is truth * cells + prediction (+ 4 l for label l), counted by one index_add_.
        if self.source is not None:
            return
        width = outputs.shape[1] if outputs.dim() >= 2 else 1
        if self.total.dim() == 0:
            self._allocate(width, outputs.device)
        multiclass = self._is_multiclass(width)
        if multiclass:
            if targets.shape == outputs.shape:  # one-hot or class probabilities
                targets = targets.argmax(1)
            predicted, truth, cells = outputs.argmax(1).reshape(-1), targets.reshape(-1), width
        else:  # yes/no per output
            predicted, truth, cells = (outputs > self.threshold).reshape(-1).long(), targets.reshape(-1), 2
            if self.total.dim() == 3:  # label l's own 2 x 2 cells start at 4 l
                labels = torch.arange(width, device=outputs.device).view(1, -1, *[1] * (outputs.dim() - 2))
                predicted = predicted + 4 * labels.expand(outputs.shape).reshape(-1)
        counted = None if self.ignore_index is None else truth != self.ignore_index
        if not multiclass:
            truth = (truth > 0.5).long()
        elif counted is not None:
            truth = truth * counted  # an ignored position's cell gets a weight of 0 below
        index = torch.add(predicted, truth, alpha=cells)
        if counted is not None:
            self.total.view(-1).index_add_(0, index, counted.long())
            return
        if len(self.units) < len(index):
            self.units = torch.ones(len(index), dtype=torch.int64, device=index.device)
        self.total.view(-1).index_add_(0, index, self.units[: len(index)])

    def finalize(self, total: Any, count: float) -> float | dict[str, float]:
        owner = self.source or self
        matrix = np.asarray(total, dtype=np.float64).reshape(owner.total.shape)
        yes_no = matrix.ndim == 2 and not owner._is_multiclass(owner.width or 1)  # one output per sample
        return class_count_value(matrix, self.kind, self.average or ("binary" if yes_no else "macro"))


def share_counts(metrics: Sequence[Metric | ExternalMetric], groups: Sequence[Any]) -> None:
    """Let the counting metrics of one head (``groups`` holds each metric's head) read one
    confusion matrix: ``f1``, ``precision``, ``recall`` and the rest cost one update per step
    together, and so does plain ``accuracy`` beside them (read from the same matrix, where the
    two count the same positions). Replaces such an ``Accuracy`` in ``metrics`` in place."""
    sources: dict[Any, ClassCounts] = {}
    for metric, group in zip(metrics, groups, strict=True):
        if type(metric) is ClassCounts:
            source = sources.setdefault(
                (group, metric.width, metric.mode, metric.threshold, metric.ignore_index), metric
            )
            metric.source = None if source is metric else source
    for index, (metric, group) in enumerate(zip(metrics, groups, strict=True)):
        shared = next((counts for key, counts in sources.items() if key[0] == group), None)
        if type(metric) is not Accuracy or shared is None:
            continue
        # The same positions, read the same way: the mode and threshold, and the ignored label
        # (which Accuracy applies to class indices only).
        same = (shared.mode, shared.threshold) == (metric.mode, metric.threshold)
        ignored_alike = metric.ignore_index == shared.ignore_index and (
            metric.ignore_index is None or shared._is_multiclass(shared.width or 1)
        )
        if same and ignored_alike:
            reader = ClassCounts("accuracy", width=shared.width, mode=shared.mode, threshold=shared.threshold,
                                 ignore_index=shared.ignore_index)  # fmt: skip
            reader.source = shared
            cast(list[Metric | ExternalMetric], metrics)[index] = reader


def class_count_value(matrix: np.ndarray, kind: str, average: Average | None) -> float | dict[str, float]:
    """A counting metric from a confusion matrix: (C, C) with rows the truth and columns the
    prediction, or (L, 2, 2) for L yes/no labels.

    Example:
        >>> matrix = np.array([[5, 1], [2, 2]])  # 2 of the 4 positives found, 1 false alarm
        >>> class_count_value(matrix, "recall", None), class_count_value(matrix, "precision", "macro")
        (0.5, 0.6904761904761905)
    """
    labels = matrix.ndim == 3
    if labels:  # each label's positive class: tp, fp, fn from its own 2 x 2 matrix
        tp, fp, fn = matrix[:, 1, 1], matrix[:, 0, 1], matrix[:, 1, 0]
        support, present = tp + fn, np.ones(len(matrix), dtype=bool)
    else:
        tp = np.diag(matrix)
        support, predicted = matrix.sum(1), matrix.sum(0)
        fp, fn, present = predicted - tp, support - tp, (support + predicted) > 0
    if kind == "accuracy":  # every correct position over every position (each label's, for labels)
        correct = np.trace(matrix, axis1=-2, axis2=-1).sum()
        return float(correct / matrix.sum()) if matrix.sum() else math.nan
    if kind == "balanced_accuracy":
        if labels:
            raise config_error(
                "balanced_accuracy is for one class per sample, not several yes/no labels.",
                f"{len(matrix)} labels",
                "use recall_macro (the mean recall over labels).",
            )
        recalls = _ratio(tp, support)[support > 0]
        return float(recalls.mean()) if len(recalls) else 0.0
    average = average or ("binary" if not labels and len(matrix) == 2 else "macro")
    numerator, denominator = {
        "precision": (tp, tp + fp),
        "recall": (tp, tp + fn),
        "f1": (2 * tp, 2 * tp + fp + fn),
        "dice": (2 * tp, 2 * tp + fp + fn),
        "iou": (tp, tp + fp + fn),
    }[kind]
    if average == "micro":
        return float(_ratio(numerator[present].sum(), denominator[present].sum()))
    values = _ratio(numerator, denominator)
    if average == "binary":
        if labels:
            raise config_error(
                f"{kind}_binary needs one yes/no output per sample.",
                f"{len(matrix)} labels",
                f"use {kind}_macro, {kind}_micro or {kind}_per_class.",
            )
        return float(values[-1])
    if average == "per_class":
        return {str(index): float(value) for index, value in enumerate(values)}
    if average == "weighted":
        weights = support * present
        return float((values * weights).sum() / weights.sum()) if weights.sum() else 0.0
    return float(values[present].mean()) if present.any() else 0.0


def _ratio(numerator: Any, denominator: Any) -> Any:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, np.divide(numerator, denominator), 0.0)


RANKING_NAME = re.compile(r"(?P<kind>auroc|average_precision)(?:_(?P<average>micro|macro|weighted|per_class))?")


class Ranking:
    """AUROC or average precision, computed by torchmetrics (the ``metrics`` extra) over every
    score of the pass: binary for one output per sample, one-vs-rest over classes for (N, C, ...)
    outputs, per label for several yes/no outputs. Logits or probabilities; positions labelled
    ``ignore_index`` do not count. torchmetrics gathers the scores across processes itself.

    Args:
        kind: ``"auroc"`` or ``"average_precision"``.
        average: ``"macro"`` (default), ``"weighted"``, ``"micro"`` (labels only) or
            ``"per_class"``; one output per sample has no average.
        width, mode, ignore_index: As for ``ClassCounts``.
        logits: The outputs are logits (the loss says so): they become probabilities here, so
            that every batch is on one scale (torchmetrics would decide per batch).
    """

    def __init__(
        self,
        kind: str,
        average: Average | None = None,
        *,
        width: int | None = None,
        mode: AccuracyMode = "auto",
        ignore_index: int | None = None,
        logits: bool = False,
    ) -> None:
        try:
            import torchmetrics  # noqa: F401  (imported here: an optional extra)
        except ImportError:
            raise config_error(
                f"The {kind} metric is computed by torchmetrics, which is not installed.",
                f"metrics=[{kind!r}]",
                "pip install 'trainwell[metrics]' (or pip install torchmetrics).",
            ) from None
        self.kind, self.average, self.width, self.mode, self.ignore_index = kind, average, width, mode, ignore_index
        self.logits = logits
        self.name = kind if average is None else f"{kind}_{average}"
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def _build(self, width: int) -> Any:
        from torchmetrics import classification

        stem = "AUROC" if self.kind == "auroc" else "AveragePrecision"
        average = None if self.average == "per_class" else (self.average or "macro")
        if self._multiclass(width):
            return getattr(classification, f"Multiclass{stem}")(
                num_classes=width, average=average, ignore_index=self.ignore_index
            )
        if width > 1:
            return getattr(classification, f"Multilabel{stem}")(
                num_labels=width, average=average, ignore_index=self.ignore_index
            )
        return getattr(classification, f"Binary{stem}")(ignore_index=self.ignore_index)

    def _multiclass(self, width: int) -> bool:
        return self.mode == "multiclass" or (self.mode == "auto" and width > 1)

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Keep the batch's scores and targets, on the device. torchmetrics sees them only at
        ``compute``: its own update reads values back every batch (a host synchronisation)."""
        width = outputs.shape[1] if outputs.dim() >= 2 else 1
        self.width = self.width or width
        multiclass = self._multiclass(width)
        if multiclass and targets.shape == outputs.shape and targets.is_floating_point():
            targets = targets.argmax(1)  # one-hot or class probabilities
        if self.logits:
            outputs = outputs.softmax(1) if multiclass else outputs.sigmoid()
        if width == 1 and not multiclass:
            outputs, targets = outputs.reshape(-1), targets.reshape(-1)
        self.scores.append(outputs.detach())
        self.labels.append(targets.detach().long())

    def compute(self) -> Any:
        """The value over every score seen (gathered from every process under torchrun: every
        process computes, one that saw no batch with no scores)."""
        if not self.scores and self.width is None:
            return torch.tensor(math.nan)
        width = self.width or 1
        metric = self._build(width)
        if self.scores:
            metric = metric.to(self.scores[0].device)
            metric.update(torch.cat(self.scores), torch.cat(self.labels))
        else:  # no batch here: empty scores, so that this process still joins the gathering
            multiclass, binary = self._multiclass(width), width == 1 and not self._multiclass(width)
            scores, labels = (0,) if binary else (0, width), (0,) if multiclass or binary else (0, width)
            metric.update(torch.zeros(scores), torch.zeros(labels, dtype=torch.long))
        return metric.compute()

    def reset(self) -> None:
        """Forget the scores."""
        self.scores, self.labels = [], []

    def to(self, device: torch.device) -> Ranking:
        """The scores stay where the batches are."""
        return self


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
        METRIC_FIX + " (or a dict of such numbers; a torchmetrics object may give one number per class).",
    )


class FunctionMetric(Metric):
    """A ``callable(outputs, targets) -> scalar`` averaged over samples, weighted by batch size.

    The scalar may be a tensor of one element, a Python number or a numpy number. A dict of
    such scalars gives several values, each averaged and logged under its own key (with the
    head's and ``val_`` prefixes); every batch must give the same keys. Under torchrun every
    process must see at least one batch of such a metric (its keys are learnt from a batch).
    """

    def __init__(self, fn: MetricFn, name: str) -> None:
        super().__init__()
        self.fn = fn
        self.name = name
        self.parts: tuple[str, ...] | None = None  # the keys of a dict result, once seen

    def reset(self, device: torch.device) -> None:
        super().reset(device)
        if self.parts is not None:
            self.total = torch.zeros(len(self.parts), dtype=self.total.dtype, device=device)

    def batch_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Count]:
        size = sample_count(targets) or 1
        result = self.fn(outputs, targets)
        device = outputs.device if isinstance(outputs, torch.Tensor) else tensors_of(outputs)[0].device
        if isinstance(result, Mapping):
            return self._parts_sum(result, device) * size, size
        value = scalar_tensor(result, device)
        if value is None:
            raise unusable_result_error(self.name, result)
        return value * size, size

    def _parts_sum(self, result: Mapping[Any, Any], device: torch.device) -> torch.Tensor:
        parts = tuple(str(key) for key in result)
        values = [scalar_tensor(value, device) for value in result.values()]
        if self.parts is None:
            self.parts = parts
            if self.total.dim() == 0:  # a resumed epoch's sums are already there: kept
                self.total = torch.zeros(len(parts), dtype=self.total.dtype, device=device)
        if parts != self.parts or not parts or any(value is None for value in values):
            raise config_error(
                f"Metric {self.name!r} must give the same named numbers for every batch.",
                f"{self.name} returned {describe(dict(result))} (keys {list(parts)}, first batch {list(self.parts)})",
                "return a dict of scalar tensors with fixed keys, e.g. {'precision': p, 'recall': r}.",
            )
        return torch.stack([value.to(self.total.dtype) for value in values if value is not None])

    def finalize(self, total: Any, count: float) -> float | dict[str, float]:
        if self.parts is None:
            return super().finalize(total, count)
        return {part: value / count if count else math.nan for part, value in zip(self.parts, total, strict=True)}


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
    width: int | None = None,
) -> Metric | ExternalMetric:
    """Turn one entry of ``metrics=[...]`` into a fresh accumulator.

    Args:
        metric: A name (``"accuracy"``, ``"top5_accuracy"``, ``"mae"``, ...), a ``Metric``, a
            torchmetrics-style object, or a ``callable(outputs, targets) -> scalar tensor``.
        threshold: Binary decision threshold for accuracy (chosen by the caller from the loss).
        mode: Accuracy mode (chosen by the caller from the loss).
        ignore_index: The label of positions accuracy does not count (from the loss).
        width: Outputs per sample (classes or labels) on the probe batch, for counting metrics.

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
        counting = COUNTING_NAME.fullmatch(metric)
        if counting:
            average = cast(Average | None, counting.group("average"))
            kind = counting.group("kind") or metric
            return ClassCounts(kind, average, width=width, mode=mode, threshold=threshold, ignore_index=ignore_index)
        ranking = RANKING_NAME.fullmatch(metric)
        if ranking:
            average = cast(Average | None, ranking.group("average"))
            logits = threshold == 0.0  # the loss's logits (its binary threshold is 0)
            return Ranking(ranking.group("kind"), average, width=width, mode=mode, ignore_index=ignore_index,
                           logits=logits)  # fmt: skip
        if metric not in METRICS:
            raise unknown_name_error(
                "metric", metric, [*METRICS, *COUNTING_NAMES, "auroc", "average_precision", "top5_accuracy (any k)"]
            )
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
    if isinstance(metric, (Metric, Ranking)):
        return metric.name
    class_name = _TASK_PREFIX.sub("", type(metric).__name__)
    return _WORD_START.sub("_", class_name).lower()


_LOWER_IS_BETTER = ("loss", "error")
_LOWER_IS_BETTER_WORDS = frozenset({"mae", "mse", "rmse", "msle", "mape", "perplexity", "ppl", "wer", "cer"})
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
    return known_direction(key) == "max"


def known_direction(key: str) -> Literal["max", "min"] | None:
    """``"max"`` for a log key where larger is better, ``"min"`` where smaller is (losses, errors,
    ``mae``, ``mse``, ``rmse``, perplexity), None when the name does not tell.

    Example:
        >>> known_direction("val_accuracy"), known_direction("rmse"), known_direction("psnr")
        ('max', 'min', None)
    """
    name = key.removeprefix("val_").lower()
    words = set(name.split("_"))
    if any(word in name for word in _LOWER_IS_BETTER) or words & _LOWER_IS_BETTER_WORDS:
        return "min"
    if "accuracy" in name or "average_precision" in name or words & _HIGHER_IS_BETTER_WORDS:
        return "max"
    return None


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
    if isinstance(probe, ClassCounts) and probe.source is not None:
        probe = probe.source  # (a copy of) the matrix it reads: what the check must run
    device = next(iter(tensors_of(outputs)), torch.zeros(())).device
    try:
        if isinstance(probe, FunctionMetric):
            # The function's own result, so the message shows what it returned.
            result: Any = probe.fn(outputs, targets)
        elif isinstance(probe, Metric):
            probe.reset(device)
            probe.update(outputs, targets)
            result = probe.finalize(probe.total.tolist(), 1.0)
        else:
            _reset_external(probe, device)
            probe.update(outputs, targets)
            with warnings.catch_warnings():  # a few probe samples: "no positive samples" is expected
                warnings.simplefilter("ignore")
                result = probe.compute()
    except Exception as error:
        raise config_error(
            f"Metric {name!r} raised {type(error).__name__} on a probe batch: {error}",
            f"outputs {describe(outputs)}, targets {describe(targets)}",
            METRIC_FIX + ", computed from (outputs, targets).",
        ) from error
    if isinstance(probe, FunctionMetric) and isinstance(result, Mapping):
        probe.parts = None
        probe.reset(device)
        probe.update(outputs, targets)  # several named numbers: each must be one number
        return
    if isinstance(result, dict) and isinstance(probe, Metric):
        return  # a built-in metric with one number per class: logged as one key each
    if isinstance(probe, ExternalMetric) and isinstance(result, torch.Tensor) and result.dim() == 1:
        return  # a torchmetrics vector (per class): logged as one key each
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
        # A counting metric that reads another's matrix is never updated itself: skipped per step.
        self.updated = [slot for slot in self.slots if getattr(slot.metric, "source", None) is None]
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
        if targets is None or not self.updated:
            return
        for slot in self.updated:
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

    def read(
        self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, running: bool = False
    ) -> dict[str, float]:
        """The pass's averages so far, keyed by log name.

        Args:
            reduce: Sums a 1-D tensor across processes (distributed runs); None in one process.
            running: A read while the pass runs (the display's, on rank 0 only): torchmetrics
                objects are left out, since computing one gathers from every process (which
                would wait forever for the others) and goes over every score seen so far.

        Returns:
            ``{"loss": ..., "<metric>": ...}`` with the prefix applied; NaN when nothing was seen.
        """
        device, dtype = self.loss_total.device, self.loss_total.dtype
        builtin = [metric for _, metric in self.builtin]
        counts = _stack([self.loss_count, self.samples, *[metric.count for metric in builtin]], dtype, device)
        named = list(self.named.values())
        sums = torch.cat(
            [tensor.to(dtype).reshape(-1) for tensor in (self.loss_total, *(m.total for m in builtin), *named)]
        )
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
        results: dict[str, Any] = {}
        pieces: dict[int, Any] = {}
        start = 1
        for _, metric in self.builtin:  # each metric's sums, in order
            size = metric.total.numel()
            piece = totals[start : start + size]
            pieces[id(metric)] = piece[0] if metric.total.dim() == 0 else piece
            start += size
        for (name, metric), count in zip(self.builtin, counted, strict=True):
            source = getattr(metric, "source", None)  # a counting metric reading another's matrix
            results[name] = metric.finalize(pieces[id(source or metric)], count)
        for name, external in [] if running else self.external:
            results[name] = external_value(external.compute())
        for slot in self.slots:
            if slot.name not in results:
                continue
            expanded = expand(slot, results[slot.name])
            clash = next((key for key in expanded if key in logs), None)
            if clash is not None:  # a function's dict key taking another value's name
                raise config_error(
                    f"Metric {slot.name!r} logs {clash!r}, which is already another value's name.",
                    f"{slot.name} gives {', '.join(expanded)}; the run logs {', '.join(logs)}",
                    "rename that key of the dict the metric function returns.",
                )
            logs.update(expanded)
        return {self.prefix + key: value for key, value in logs.items()}


def external_value(value: Any) -> float | dict[str, float]:
    """A torchmetrics-style result: one number, or one per class (a vector)."""
    if isinstance(value, torch.Tensor) and value.numel() > 1:
        return {str(index): float(item) for index, item in enumerate(value.reshape(-1).tolist())}
    return float(value)


def several_values_prefix(slot: MetricSlot) -> str | None:
    """The start of the keys a metric with several values logs (``f1_`` for ``f1_per_class``;
    a function's head prefix, as its dict keys are its own), None for a metric of one value."""
    if isinstance(slot.metric, FunctionMetric):
        return slot.name.removesuffix(slot.metric.name)
    if slot.name.endswith("_per_class"):
        return slot.name.removesuffix("per_class")
    if not isinstance(slot.metric, (Metric, Ranking)):  # a torchmetrics object may give one value per class
        return slot.name + "_"
    return None


def expand(slot: MetricSlot, value: float | dict[str, float]) -> dict[str, float]:
    """A metric's log entries: ``{name: value}``, or one key per part of a result with several:
    a function's dict keeps its own keys (after the head's prefix), per-class values are
    numbered (``f1_per_class`` gives ``f1_0``, ``f1_1``, ...)."""
    if not isinstance(value, dict):
        return {slot.name: value}
    if isinstance(slot.metric, FunctionMetric):
        prefix = slot.name.removesuffix(slot.metric.name)
        return {f"{prefix}{part}": float(item) for part, item in value.items()}
    base = slot.name.removesuffix("_per_class")
    return {f"{base}_{part}": float(item) for part, item in value.items()}


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
