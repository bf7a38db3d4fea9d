"""Classification reports: the overall values, a per-class table, the confusion matrix and, for
yes/no problems, the ROC and precision-recall curves of a model on data.

Owns: ``classification_report`` and ``Report`` (printed as a table, as a dict or JSON, and
plotted). A client of the public API; the counting follows the metrics' rules exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trainwell.api import evaluate
from trainwell.data import TARGET_KEY
from trainwell.errors import config_error, data_error, describe
from trainwell.files import atomic_write
from trainwell.losses import binary_threshold, resolve_loss
from trainwell.metrics import class_count_value
from trainwell.plots import confusion_matrix, plot_curve, plot_matrix

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Curve:
    """A ROC or precision-recall curve: points from the highest threshold to the lowest.

    Attributes:
        x, y: False positive rate and true positive rate (ROC), or recall and precision.
        thresholds: The score at which each point starts (the first ROC point is "nothing
            predicted positive": infinity).
        area: AUROC, or average precision (the step-wise area scikit-learn computes).
    """

    x: list[float]
    y: list[float]
    thresholds: list[float]
    area: float


@dataclass(frozen=True)
class Report:
    """What a classifier gets right and wrong, per class and overall.

    Attributes:
        class_names: One name per class index.
        confusion_matrix: Counts, rows the true classes and columns the predicted ones.
        overall: ``accuracy``, ``balanced_accuracy``, ``precision``/``recall``/``f1`` as
            ``_macro`` and ``_weighted`` averages (and, for yes/no problems, ``auroc`` and
            ``average_precision``), with ``loss`` when one was computed.
        per_class: For each class name: ``precision``, ``recall``, ``f1`` and ``support`` (its
            true count).
        roc, precision_recall: The curves of a yes/no problem (None otherwise).
    """

    class_names: list[str]
    confusion_matrix: list[list[int]]
    overall: dict[str, float]
    per_class: dict[str, dict[str, float]]
    roc: Curve | None = None
    precision_recall: Curve | None = None

    @classmethod
    def from_predictions(
        cls,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        class_names: Sequence[str] | None = None,
        threshold: float = 0.0,
        ignore_index: int | None = None,
        loss: float | None = None,
    ) -> Report:
        """The report of outputs against targets.

        Args:
            outputs: Class scores (N, C) or (N, C, ...) (classes in dimension 1, or last when
                the targets have the outputs' shape without it), or one score per sample
                (N,) / (N, 1) for a yes/no problem.
            targets: Class indices (or 0/1 for a yes/no problem).
            class_names: A name per class index (default: the indices).
            threshold: The yes/no decision threshold (0 for logits, 0.5 for probabilities).
            ignore_index: A target label whose positions are left out (padding, void pixels).
            loss: The loss, when computed, shown with the overall values.

        Raises:
            DataError: Outputs and targets that do not match.
        """
        scores, truth = _flatten(outputs.detach().cpu(), targets.detach().cpu())
        if ignore_index is not None:
            kept = truth != ignore_index
            scores, truth = scores[kept], truth[kept]
        binary = scores.dim() == 1
        classes = 2 if binary else scores.shape[1]
        names = [str(index) for index in range(classes)] if class_names is None else [str(name) for name in class_names]
        if len(names) != classes:
            raise data_error(
                "class_names must name every class of the outputs.",
                f"{len(names)} names for {classes} classes",
                f"pass {classes} names, in class-index order.",
            )
        predicted = (scores > threshold).long() if binary else scores.argmax(1)
        truth = (truth > 0.5).long() if binary else truth.long()
        matrix = confusion_matrix(truth, predicted, classes).numpy()
        overall = _overall(matrix) | ({} if loss is None else {"loss": loss})
        roc = precision_recall = None
        if binary:
            roc, precision_recall = _curves(scores.double().numpy(), truth.numpy())
            overall |= {"auroc": roc.area, "average_precision": precision_recall.area}
        per_class = {
            name: {kind: float(class_count_value(matrix, kind, "per_class")[str(index)])  # type: ignore[index]
                   for kind in ("precision", "recall", "f1")} | {"support": float(matrix[index].sum())}
            for index, name in enumerate(names)
        }  # fmt: skip
        return cls(names, matrix.tolist(), overall, per_class, roc, precision_recall)

    def __str__(self) -> str:
        width = max(len("balanced accuracy"), *(len(name) for name in self.class_names)) + 2
        lines = [f"{'':{width}}{'precision':>10}{'recall':>10}{'f1-score':>10}{'support':>10}"]
        for name, row in self.per_class.items():
            values = "".join(f"{row[kind]:>10.3f}" for kind in ("precision", "recall", "f1"))
            lines.append(f"{name:<{width}}{values}{int(row['support']):>10d}")
        total, overall = int(np.sum(self.confusion_matrix)), self.overall
        lines += ["", f"{'accuracy':<{width}}{'':>20}{overall['accuracy']:>10.3f}{total:>10d}"]
        for label, suffix in (("macro avg", "macro"), ("weighted avg", "weighted")):
            values = "".join(f"{overall[f'{kind}_{suffix}']:>10.3f}" for kind in ("precision", "recall", "f1"))
            lines.append(f"{label:<{width}}{values}{total:>10d}")
        extra = [key for key in ("balanced_accuracy", "auroc", "average_precision", "loss") if key in overall]
        lines += [f"{key.replace('_', ' '):<{width}}{'':>20}{overall[key]:>10.3f}" for key in extra]
        columns = max(8, *(len(name) + 2 for name in self.class_names))
        lines += ["", "Confusion matrix (rows: true class, columns: predicted)"]
        lines.append(f"{'':{width}}" + "".join(f"{name:>{columns}}" for name in self.class_names))
        for name, counts in zip(self.class_names, self.confusion_matrix, strict=True):
            lines.append(f"{name:<{width}}" + "".join(f"{count:>{columns}d}" for count in counts))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain lists, dicts and numbers."""
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as JSON text, also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            atomic_write(text.encode(), path)
        return text

    def plot_confusion_matrix(self, path: str | Path | None = None) -> Figure:
        """Draw the confusion matrix (saved to ``path`` when given)."""
        return plot_matrix(torch.tensor(self.confusion_matrix), self.class_names, path)

    def plot_roc(self, path: str | Path | None = None) -> Figure:
        """Draw the ROC curve of a yes/no problem (saved to ``path`` when given)."""
        curve = self._curve(self.roc, "plot_roc")
        return plot_curve(curve.x, curve.y, ("false positive rate", "true positive rate"),
                          f"ROC (AUROC {curve.area:.3f})", path)  # fmt: skip

    def plot_precision_recall(self, path: str | Path | None = None) -> Figure:
        """Draw the precision-recall curve of a yes/no problem (saved to ``path`` when given)."""
        curve = self._curve(self.precision_recall, "plot_precision_recall")
        return plot_curve(curve.x, curve.y, ("recall", "precision"),
                          f"Precision-recall (average precision {curve.area:.3f})", path)  # fmt: skip

    def _curve(self, curve: Curve | None, method: str) -> Curve:
        if curve is None:
            raise config_error(
                f"{method} draws the curve of a yes/no problem (one score per sample).",
                f"a report of {len(self.class_names)} classes",
                "use plot_confusion_matrix, or the per-class table.",
            )
        return curve


def classification_report(
    model: torch.nn.Module,
    data: Any,
    *,
    loss: Any = None,
    class_names: Sequence[str] | None = None,
    batch_size: int | None = None,
    output: Any = None,
    target_key: str | None = TARGET_KEY,
    device: str | torch.device = "auto",
) -> Report:
    """Evaluate a classifier on ``data`` and report per class and overall.

    Takes the data, model outputs and losses ``evaluate`` takes; the report reads the same
    prediction the metrics read (``output=`` names another) and leaves out positions the loss
    ignores (``ignore_index``).

    Args:
        model: The classifier.
        data: As for ``evaluate``.
        loss: As for ``evaluate``; it also sets the yes/no threshold (0 for logits, 0.5 for
            probabilities) and the ignored label. None: the model's own loss, when it returns one.
        class_names: A name per class index.
        batch_size, output, target_key, device: As for ``evaluate``.

    Returns:
        The ``Report``; ``print(report)`` shows the tables.

    Example:
        >>> import torch, trainwell
        >>> x, y = torch.randn(40, 3), torch.arange(40) % 2
        >>> report = trainwell.classification_report(torch.nn.Linear(3, 2), (x, y), loss="cross_entropy")
        >>> sorted(report.per_class), report.overall["accuracy"] <= 1
        (['0', '1'], True)
    """
    evaluation = evaluate(model, data, loss=loss, batch_size=batch_size, output=output, target_key=target_key,
                          device=device, return_outputs=True)  # fmt: skip
    if evaluation.outputs is None:  # a process other than rank 0 of a job
        raise config_error("The report is made on rank 0.", "rank > 0", "use the report rank 0 returns.")
    if not isinstance(evaluation.outputs, torch.Tensor) or not isinstance(evaluation.targets, torch.Tensor):
        raise data_error(
            "A classification report needs one tensor of class scores and one of targets.",
            f"outputs {describe(evaluation.outputs)}, targets {describe(evaluation.targets)}",
            "pass output= to name the class scores among the model's outputs.",
        )
    # The loss says how to read the scores: logits or probabilities, and the label it ignores
    # (a model's own loss, as Hugging Face's: logits, and -100).
    spec = resolve_loss(loss) if isinstance(loss, str) or callable(loss) else None
    return Report.from_predictions(
        evaluation.outputs,
        evaluation.targets,
        class_names=class_names,
        threshold=0.0 if spec is None else binary_threshold(spec),
        ignore_index=-100 if spec is None else spec.ignore_index,
        loss=evaluation.values.get("loss"),
    )


def _flatten(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (M, C) or (M,) and targets (M,), one row per sample or position."""
    if outputs.dim() == 1 or (outputs.dim() == 2 and outputs.shape[1] == 1):
        return outputs.reshape(-1), targets.reshape(-1)
    if (
        outputs.dim() >= 2
        and targets.shape == outputs.shape[:-1]
        and targets.shape != outputs.shape[:1] + outputs.shape[2:]
    ):
        return outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1)  # classes last: (N, T, C)
    if outputs.dim() >= 2 and targets.numel() * outputs.shape[1] == outputs.numel():
        return outputs.movedim(1, -1).reshape(-1, outputs.shape[1]), targets.reshape(-1)
    raise data_error(
        "A classification report needs class scores (N, C, ...) with class indices (N, ...), or one score per "
        "sample with 0/1 targets.",
        f"outputs {describe(outputs)}, targets {describe(targets)}",
        "pass output= to name the class scores, or build a report of several yes/no labels one label at a time.",
    )


def _overall(matrix: np.ndarray) -> dict[str, float]:
    values = {"accuracy": float(np.trace(matrix) / matrix.sum()) if matrix.sum() else 0.0,
              "balanced_accuracy": float(class_count_value(matrix, "balanced_accuracy", None))}  # type: ignore[arg-type]  # fmt: skip
    for kind in ("precision", "recall", "f1"):
        for average in ("macro", "weighted"):
            values[f"{kind}_{average}"] = float(class_count_value(matrix, kind, average))  # type: ignore[arg-type]
    return values


def _curves(scores: np.ndarray, truth: np.ndarray) -> tuple[Curve, Curve]:
    """The ROC and precision-recall curves (scikit-learn's ``roc_curve`` without dropping points,
    ``precision_recall_curve`` and ``average_precision_score``)."""
    order = np.argsort(-scores, kind="stable")
    scores, truth = scores[order], truth[order]
    ends = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # the last sample at each distinct score
    true_positives, false_positives = np.cumsum(truth)[ends], (ends + 1) - np.cumsum(truth)[ends]
    positives, negatives = truth.sum(), len(truth) - truth.sum()
    true_rate = np.r_[0.0, true_positives / positives] if positives else np.r_[0.0, np.zeros(len(ends))]
    false_rate = np.r_[0.0, false_positives / negatives] if negatives else np.r_[0.0, np.zeros(len(ends))]
    thresholds = [float("inf"), *scores[ends].tolist()]
    area = float(np.sum(np.diff(false_rate) * (true_rate[1:] + true_rate[:-1]) / 2))  # the trapezoidal rule
    roc = Curve(false_rate.tolist(), true_rate.tolist(), thresholds, area)
    precision = true_positives / (true_positives + false_positives)
    recall = true_positives / positives if positives else np.zeros(len(ends))
    average = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return roc, Curve(recall.tolist(), precision.tolist(), scores[ends].tolist(), average)
