"""Loss registry and each loss's contract with the model's outputs and the targets.

Owns: LOSSES, resolving a name or callable to a ``LossSpec``, and checking one batch of
outputs/targets against the loss before training. Must not run models or iterate data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional

from trainwell.errors import config_error, data_error, describe, unknown_name_error

LossFn = Callable[..., torch.Tensor]
WeightedLossFn = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]
OutputKind = Literal["logits", "probabilities", "log_probabilities", "values", "unknown"]
TargetKind = Literal["classes", "same_shape", "unknown"]
Task = Literal["multiclass", "binary", "regression", "unknown"]


@dataclass(frozen=True)
class LossSpec:
    """A resolved loss: the callable plus what it expects, so checks and metrics can adapt.

    Attributes:
        name: Registry name, or the callable's name for a custom loss.
        fn: ``fn(outputs, targets) -> scalar tensor``, the mean over the batch.
        outputs: What the model's outputs must be (logits, probabilities, ...).
        targets: ``"classes"`` (class indices or per-class probabilities), ``"same_shape"``
            (targets shaped exactly like the outputs) or ``"unknown"`` for custom losses.
        task: What the loss trains: ``"multiclass"``, ``"binary"`` (one or more yes/no outputs),
            ``"regression"``, or ``"unknown"`` for custom losses. Metrics and checks follow it.
        ignore_index: The class label that marks positions the loss skips (padding, void
            pixels): torch's -100 for ``cross_entropy`` and ``nll``, a loss module's own
            ``ignore_index``; None for losses without one.
        class_weight: The per-class weights of ``cross_entropy`` or ``nll`` (torch's ``weight``),
            which make the loss a weighted mean: each position counts by its class's weight.
    """

    name: str
    fn: LossFn
    outputs: OutputKind
    targets: TargetKind
    task: Task
    ignore_index: int | None = None
    class_weight: torch.Tensor | None = None


LOSSES: dict[str, LossSpec] = {
    "mse": LossSpec("mse", functional.mse_loss, "values", "same_shape", "regression"),
    "l1": LossSpec("l1", functional.l1_loss, "values", "same_shape", "regression"),
    "huber": LossSpec("huber", functional.huber_loss, "values", "same_shape", "regression"),
    "cross_entropy": LossSpec("cross_entropy", functional.cross_entropy, "logits", "classes", "multiclass", -100),
    "nll": LossSpec("nll", functional.nll_loss, "log_probabilities", "classes", "multiclass", -100),
    "bce": LossSpec("bce", functional.binary_cross_entropy, "probabilities", "same_shape", "binary"),
    "bce_with_logits": LossSpec(
        "bce_with_logits", functional.binary_cross_entropy_with_logits, "logits", "same_shape", "binary"
    ),
}

# torch's loss modules map onto the registry so that an ``nn.MSELoss()`` gets the same checks.
_MODULE_NAMES: dict[type[nn.Module], str] = {
    nn.MSELoss: "mse",
    nn.L1Loss: "l1",
    nn.HuberLoss: "huber",
    nn.CrossEntropyLoss: "cross_entropy",
    nn.NLLLoss: "nll",
    nn.BCELoss: "bce",
    nn.BCEWithLogitsLoss: "bce_with_logits",
}


def resolve_loss(loss: str | LossFn) -> LossSpec:
    """Turn a loss name or callable into a ``LossSpec``.

    Args:
        loss: A name from ``LOSSES`` or any ``callable(outputs, targets) -> scalar tensor``.

    Returns:
        The spec; torch loss modules keep their own settings but get the registry's contract.

    Raises:
        ConfigError: Unknown name, or something that is not callable.

    Example:
        >>> resolve_loss("cross_entropy").outputs
        'logits'
    """
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise unknown_name_error("loss", loss, LOSSES)
        return LOSSES[loss]
    if not callable(loss):
        raise config_error(
            "loss must be a name or a callable(outputs, targets) -> scalar tensor.",
            f"loss={describe(loss)}",
            f"pass one of {', '.join(sorted(LOSSES))}, or e.g. torch.nn.MSELoss().",
        )
    known = _MODULE_NAMES.get(type(loss)) if isinstance(loss, nn.Module) else None
    if known is not None:
        base = LOSSES[known]
        if base.targets != "classes":
            return replace(base, fn=loss)
        return replace(
            base, fn=loss, ignore_index=getattr(loss, "ignore_index", None), class_weight=getattr(loss, "weight", None)
        )
    name = getattr(loss, "__name__", type(loss).__name__)
    return LossSpec(name, loss, "unknown", "unknown", "unknown")


def with_class_weight(spec: LossSpec, class_weight: torch.Tensor) -> LossSpec:
    """The loss with per-class weights, computed exactly as torch's weighted losses do.

    cross_entropy and nll get ``weight=class_weight`` (a weighted mean over samples); bce and
    bce_with_logits weight each element by the weight of its target class (0 or 1).

    Raises:
        ConfigError: A loss that has no classes.
    """
    if spec.task not in ("multiclass", "binary"):
        classifiers = [name for name, known in LOSSES.items() if known.task in ("multiclass", "binary")]
        raise config_error(
            "class_weight applies to classification losses.",
            f"loss={spec.name!r}",
            f"use one of {', '.join(classifiers)}, or weight samples with a third data element (x, y, w).",
        )
    base = spec.fn
    if spec.targets == "classes":

        def weighted(outputs: torch.Tensor, targets: torch.Tensor, **options: Any) -> torch.Tensor:
            return base(outputs, targets, weight=class_weight, **options)

        return replace(spec, fn=weighted, class_weight=class_weight)

    def per_element(outputs: torch.Tensor, targets: torch.Tensor, **options: Any) -> torch.Tensor:
        return base(outputs, targets, weight=class_weight[(targets > 0.5).long()], **options)

    return replace(spec, fn=per_element)


def sample_weighted(spec: LossSpec) -> WeightedLossFn:
    """``fn(outputs, targets, weights)``: the batch mean of each sample's loss times its weight.

    Raises:
        ConfigError: A custom loss, which cannot be evaluated per sample.
    """
    if spec.outputs == "unknown" or isinstance(spec.fn, nn.Module):
        raise config_error(
            "Sample weights need a named loss, which trainwell can evaluate per sample.",
            f"loss={spec.name!r} with (inputs, targets, weights) data",
            f"pass the loss by name ({', '.join(LOSSES)}), or drop the weights from the data.",
        )
    base = spec.fn

    def weighted(outputs: Any, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        losses = base(outputs, targets, reduction="none")
        per_sample = losses.reshape(len(losses), -1).mean(1)
        return (per_sample * weights.reshape(-1)).mean()

    return weighted


Decoded = Literal["outputs", "probabilities", "classes"]


def check_decodable(spec: LossSpec, returns: Decoded) -> None:
    """Refuse to read outputs as probabilities or classes through a loss that trains no classifier.

    Raises:
        ConfigError: Such a loss.
    """
    if returns != "outputs" and (
        spec.task not in ("multiclass", "binary")
        or spec.outputs not in ("logits", "probabilities", "log_probabilities")
    ):
        raise config_error(
            f"returns={returns!r} reads a classifier's outputs through its loss; {spec.name} trains no classifier.",
            f"loss={spec.name!r} ({spec.task})",
            "name the classification loss the model was trained with (cross_entropy, nll, bce, bce_with_logits), "
            "or leave returns='outputs'.",
        )


def decode(outputs: torch.Tensor, spec: LossSpec, returns: Decoded, class_dim: int = 1) -> torch.Tensor:
    """A classifier's outputs as the loss reads them: class probabilities (softmax over
    ``class_dim`` for cross-entropy's logits, exp of nll's log-probabilities, sigmoid for
    bce_with_logits; bce's outputs already are) or class indices (the arg-max over ``class_dim``,
    or 0/1 per output for binary losses at 0.5).

    Raises:
        ConfigError: A loss that does not train a classifier.

    Example:
        >>> decode(torch.tensor([[0.0, 2.0], [1.0, -1.0]]), LOSSES["cross_entropy"], "classes").tolist()
        [1, 0]
    """
    check_decodable(spec, returns)
    if returns == "outputs":
        return outputs
    if spec.task == "multiclass":
        if spec.outputs == "logits":
            probabilities = outputs.softmax(class_dim)
        else:
            probabilities = outputs.exp() if spec.outputs == "log_probabilities" else outputs
        return probabilities if returns == "probabilities" else outputs.argmax(class_dim)
    probabilities = outputs.sigmoid() if spec.outputs == "logits" else outputs
    return probabilities if returns == "probabilities" else (probabilities > 0.5).long()


def binary_threshold(spec: LossSpec) -> float:
    """Where binary accuracy splits single-column outputs: 0 for logits, 0.5 otherwise."""
    return 0.0 if spec.outputs == "logits" else 0.5


def check_loss_inputs(
    spec: LossSpec, outputs: object, targets: torch.Tensor, *, all_targets: torch.Tensor | None = None
) -> None:
    """Check one batch of model outputs and targets against the loss's contract.

    Catches what torch would reject with a cryptic message, and what it would silently
    broadcast (MSE of (N, 1) against (N,) gives an (N, N) loss).

    Args:
        spec: The resolved loss.
        outputs: The model's outputs for a sample batch.
        targets: The targets of the same samples.
        all_targets: Every target of the data when it is in memory, so that the class-range
            check covers all of them, not just the sample.

    Raises:
        DataError: The outputs and targets do not fit the loss, with the fix.
    """
    if spec.targets == "unknown" or not isinstance(outputs, torch.Tensor):
        return
    if spec.targets == "classes":
        _check_class_targets(spec, outputs, targets, all_targets)
    else:
        _check_same_shape_targets(spec, outputs, targets)


def _check_class_targets(
    spec: LossSpec, outputs: torch.Tensor, targets: torch.Tensor, all_targets: torch.Tensor | None
) -> None:
    if outputs.dim() < 2 or outputs.shape[1] < 2:
        raise data_error(
            f"{spec.name} needs outputs of shape (N, C) with C >= 2: one score per class.",
            f"outputs {describe(outputs)}",
            "end the model with nn.Linear(features, number_of_classes); for two classes with one "
            "output column use loss='bce_with_logits'.",
        )
    classes = outputs.shape[1]
    if targets.shape == outputs.shape[:1] + outputs.shape[2:]:
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise data_error(
                f"{spec.name} needs integer class indices as targets.",
                f"targets {describe(targets)}",
                "convert them with y.long() (labels 0 .. C-1).",
            )
        labels = targets if all_targets is None else all_targets
        if spec.ignore_index is not None:
            labels = labels[labels != spec.ignore_index]
        if labels.numel():
            _check_label_range(
                spec, labels, classes, outputs, scope="in the first samples" if all_targets is None else "in the data"
            )
        return
    if targets.shape == outputs.shape:
        if not targets.is_floating_point():
            raise data_error(
                f"{spec.name} with targets shaped like the outputs reads them as class probabilities (one-hot).",
                f"targets {describe(targets)}, outputs {describe(outputs)}",
                "convert one-hot targets with y.float(), or pass class indices of shape (N,).",
            )
        return
    raise data_error(
        f"{spec.name} targets must be class indices, (N,) for outputs (N, C) or (N, ...) for outputs (N, C, ...) "
        "or (N, ..., C), or probabilities shaped like the outputs.",
        f"outputs {describe(outputs)}, targets {describe(targets)}",
        "pass targets of shape (N,) holding labels 0 .. C-1 (squeeze an (N, 1) column with y.squeeze(1)).",
    )


def _check_label_range(spec: LossSpec, labels: torch.Tensor, classes: int, outputs: torch.Tensor, scope: str) -> None:
    low, high = int(labels.min()), int(labels.max())
    if low >= 0 and high < classes:
        return
    outside = torch.unique(labels[(labels < 0) | (labels >= classes)])
    skipped = f"ignore_index={spec.ignore_index}" if spec.ignore_index is not None else "no ignored label"
    if low >= 1 and high == classes:
        cause, fix = " Labels look 1-based: subtract 1.", f"make the labels 0 .. {classes - 1}."
    elif len(outside) == 1 and spec.task == "multiclass":
        value = int(outside[0])
        cause = f" If {value} marks positions to skip (padding, void pixels), tell the loss so."
        module = "CrossEntropyLoss" if spec.outputs == "logits" else "NLLLoss"
        fix = f"pass loss=torch.nn.{module}(ignore_index={value}), or give the model's last layer {high + 1} outputs."
    else:
        cause, fix = "", f"make the labels 0 .. {classes - 1}, or give the model's last layer {high + 1} outputs."
    raise data_error(
        f"Class labels must lie in [0, {classes - 1}] for a model with {classes} outputs.{cause}",
        f"labels from {low} to {high} {scope} ({skipped}); outputs {describe(outputs)}",
        fix,
    )


def _check_same_shape_targets(spec: LossSpec, outputs: torch.Tensor, targets: torch.Tensor) -> None:
    if targets.shape != outputs.shape:
        if outputs.dim() == 2 and outputs.shape[1] == 1 and targets.dim() == 1:
            fix = "reshape the targets to a column: y.reshape(-1, 1) (or y.unsqueeze(1))."
        elif targets.dim() == 2 and targets.shape[1] == 1 and outputs.dim() == 1:
            fix = "flatten the targets: y.reshape(-1) (or give the model outputs of shape (N, 1))."
        else:
            fix = "make the model's output layer produce one value per target column."
        raise data_error(
            f"{spec.name} needs targets shaped exactly like the outputs; torch would broadcast "
            "them and train on a wrong loss.",
            f"outputs {describe(outputs)}, targets {describe(targets)}",
            fix,
        )
    if not targets.is_floating_point():
        raise data_error(
            f"{spec.name} needs floating-point targets.",
            f"targets {describe(targets)}",
            "convert them with y.float().",
        )
    if spec.outputs == "probabilities" and outputs.numel() and (outputs.min() < 0 or outputs.max() > 1):
        raise data_error(
            "bce expects probabilities in [0, 1] from the model, but it outputs values outside that range.",
            f"outputs from {float(outputs.min()):.4g} to {float(outputs.max()):.4g}",
            "use loss='bce_with_logits' for raw scores, or end the model with nn.Sigmoid().",
        )
