"""Pictures: training curves and confusion matrices, drawn headless with matplotlib.

Owns: every use of matplotlib, imported only when a picture is drawn (it is an optional
extra). Builds ``Figure`` objects directly, never pyplot's global state, so it works with
no display and in threads; in a notebook each picture shows itself inline (``notebook``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainwell.errors import config_error, data_error, describe
from trainwell.files import atomic_write
from trainwell.notebook import show_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _saved(figure: Figure, path: str | Path | None) -> Figure:
    """``figure``, written to ``path`` when given (its suffix picks the format), atomically; in a
    notebook, shown inline when no path is given, and whenever it is a cell's value."""
    if path is not None:
        picture = io.BytesIO()
        figure.savefig(picture, format=Path(path).suffix.lstrip(".") or "png", dpi=110)
        atomic_write(picture.getvalue(), path)
    show_figure(figure, now=path is None)
    return figure


def _new_figure(**options: Any) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise config_error(
            "Plotting needs matplotlib, which is not installed.",
            "import matplotlib failed",
            "pip install 'trainwell[plot]' (or pip install matplotlib).",
        ) from None
    return Figure(**options)


def plot_history(logs: Mapping[str, Sequence[float]], path: str | Path | None = None) -> Figure:
    """Draw one panel per quantity (loss, each metric), training and validation per epoch.

    Args:
        logs: ``{"loss": [...], "val_loss": [...], "accuracy": [...], ...}``, e.g. a History.
        path: Where to save the picture (PNG, SVG, PDF by suffix); not saved when None.

    Returns:
        The matplotlib Figure.
    """
    names = quantities(logs)
    if not names:
        raise data_error("There is nothing to plot.", "an empty history", "train for at least one epoch first.")
    columns = min(len(names), 3)
    rows = math.ceil(len(names) / columns)
    figure = _new_figure(figsize=(4.2 * columns, 3.2 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, name in zip(axes, names, strict=False):
        for key, label, style in ((name, "train", "-o"), (f"val_{name}", "validation", "-s")):
            values = logs.get(key)
            if values:
                axis.plot(range(1, len(values) + 1), values, style, markersize=3, label=label)
        axis.set_title(name)
        axis.set_xlabel("epoch")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.grid(alpha=0.3)
        axis.legend()
    for axis in axes[len(names) :]:
        axis.set_visible(False)
    return _saved(figure, path)


def quantities(keys: Iterable[str]) -> list[str]:
    """The quantities of log ``keys``, one panel each: the training ones, then those only validated.

    Example:
        >>> quantities(["loss", "val_loss", "val_f1"])
        ['loss', 'f1']
    """
    keys = list(keys)
    names = [key for key in keys if not key.startswith("val_")]
    return names + [key[4:] for key in keys if key.startswith("val_") and key[4:] not in keys]


def plot_confusion_matrix(
    targets: Sequence[int] | torch.Tensor,
    predictions: Sequence[int] | torch.Tensor,
    class_names: Sequence[str] | None = None,
    path: str | Path | None = None,
) -> Figure:
    """Draw the confusion matrix: rows are true classes, columns predicted ones, with counts.

    Args:
        targets: True class indices.
        predictions: Predicted class indices (e.g. ``outputs.argmax(1)``).
        class_names: Label of each class index (defaults to the indices).
        path: Where to save the picture; not saved when None.

    Returns:
        The matplotlib Figure.
    """
    matrix = confusion_matrix(targets, predictions, len(class_names) if class_names else None)
    return plot_matrix(matrix, class_names, path)


def plot_matrix(
    matrix: torch.Tensor, class_names: Sequence[str] | None = None, path: str | Path | None = None
) -> Figure:
    """Draw a confusion matrix of counts (rows true classes, columns predicted ones)."""
    classes = matrix.shape[0]
    names = list(class_names) if class_names else [str(index) for index in range(classes)]
    size = min(3 + 0.45 * classes, 14)
    figure = _new_figure(figsize=(size + 1, size), layout="constrained")
    axis = figure.subplots()
    image = axis.imshow(matrix.numpy(), cmap="Blues")
    figure.colorbar(image, ax=axis, shrink=0.8)
    axis.set_xticks(range(classes), names, rotation=45 if max(map(len, names)) > 3 else 0, ha="right")
    axis.set_yticks(range(classes), names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    accuracy = matrix.diagonal().sum().item() / max(matrix.sum().item(), 1)
    axis.set_title(f"Confusion matrix (accuracy {accuracy:.1%})")
    if classes <= 30:
        threshold = matrix.max().item() / 2
        for row in range(classes):
            for column in range(classes):
                count = int(matrix[row, column])
                color = "white" if count > threshold else "black"
                axis.text(column, row, str(count), ha="center", va="center", color=color, fontsize=8)
    return _saved(figure, path)


def confusion_matrix(
    targets: Sequence[int] | torch.Tensor, predictions: Sequence[int] | torch.Tensor, classes: int | None = None
) -> torch.Tensor:
    """Counts of (true, predicted) class pairs as a (C, C) int64 tensor.

    Example:
        >>> confusion_matrix([0, 1, 1], [0, 1, 0]).tolist()
        [[1, 0], [1, 1]]
    """
    true = torch.as_tensor(targets).reshape(-1).long()
    predicted = torch.as_tensor(predictions).reshape(-1).long()
    if true.shape != predicted.shape:
        raise data_error(
            "targets and predictions must have the same length.",
            f"targets {describe(true)}, predictions {describe(predicted)}",
            "pass one prediction per target.",
        )
    classes = classes or int(max(true.max().item(), predicted.max().item())) + 1
    return torch.bincount(true * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def plot_curve(
    x: Sequence[float], y: Sequence[float], labels: tuple[str, str], title: str, path: str | Path | None = None
) -> Figure:
    """A curve on the unit square (ROC, precision-recall): ``labels`` name the x and y axes."""
    figure = _new_figure(figsize=(4.5, 4.2), layout="constrained")
    axis = figure.subplots()
    axis.plot(x, y, drawstyle="steps-pre" if labels[0] == "recall" else "default")
    if labels[0] == "false positive rate":
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.set_xlim(-0.02, 1.02)
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel(labels[0])
    axis.set_ylabel(labels[1])
    axis.set_title(title)
    axis.grid(alpha=0.3)
    return _saved(figure, path)


def plot_lr_finder(
    lrs: Sequence[float], losses: Sequence[float], suggestion: float, path: str | Path | None = None
) -> Figure:
    """The range test: smoothed loss against learning rate (log scale), suggestion marked."""
    figure = _new_figure(figsize=(6, 4), layout="constrained")
    axis = figure.subplots()
    axis.plot(lrs, losses)
    axis.set_xscale("log")
    axis.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggested lr {suggestion:.2e}")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("loss (smoothed)")
    axis.grid(alpha=0.3, which="both")
    axis.legend()
    return _saved(figure, path)
