"""The input doctor: checks data, model outputs and loss together before the first step.

Owns: the pre-flight examination (one forward pass on a few samples, in eval mode, under
no_grad, with the random state and every buffer restored), the repairs whose intent is
unambiguous (reported with a note each; the caller applies them to the data), and errors that
say what is wrong, what was received and the fix. Runs once per ``fit``/``evaluate``; nothing
here runs per step except the repairs the caller installs on streamed data.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trainwell.batches import Batches
from trainwell.data import TARGET_KEY, Batch, InMemory, Repair
from trainwell.errors import data_error, describe
from trainwell.losses import LossSpec, check_loss_inputs
from trainwell.metrics import Accuracy, MetricSlot, TopKAccuracy, check_metric
from trainwell.models import call_model, float_dtype, keyword_names, probing
from trainwell.objective import (
    LossOptions,
    Metrics,
    Objective,
    build_objective,
    resolve_metrics,
    with_sample_weights,
)
from trainwell.outputs import outline, resolve_output
from trainwell.structures import map_tensors, named_tensors, tensors_of

SAMPLE_SIZE = 8
_DTYPE_ERROR = re.compile(r"dtype|scalar type|Float|Double|Half|BFloat16|Long|Int")


@dataclass
class Diagnosis:
    """What the examination found.

    Attributes:
        notes: Repairs made and choices taken, one sentence each (``fit`` shows them as warnings).
        repairs: The repairs, in order, for the caller to apply to every batch of the data.
        has_weights: The data carries per-sample weights.
        objective: The losses and views resolved against the probe (None when the model was
            not run, or no loss or metric is computed).
    """

    notes: list[str] = field(default_factory=list)
    repairs: list[Repair] = field(default_factory=list)
    has_weights: bool = False
    objective: Objective | None = None


def examine(
    model: nn.Module,
    options: LossOptions | None,
    batches: Batches,
    *,
    role: str,
    needs_targets: bool,
    device: torch.device,
    metrics: Metrics = (),
    scan_values: bool = True,
    run_model: bool = True,
    objective: Objective | None = None,
    target_key: str | None = TARGET_KEY,
    needs_loss: bool = True,
) -> Diagnosis:
    """Check ``batches`` against ``model``, the losses and the metrics; resolve the objective; find
    the repairs that are unambiguous.

    Args:
        model: The model, already on ``device``.
        options: The checked loss options (None when a custom step computes the loss).
        batches: The data (not changed: the repairs come back in the diagnosis).
        role: ``"training data"``, ``"validation data"``, ... (for messages).
        needs_targets: Whether the data must have targets.
        device: The model's device.
        metrics: The metrics that will be computed: each runs once on the probe batch.
        scan_values: Look for NaN/inf in in-memory data now (one pass over it). Training must,
            before any step; ``evaluate`` passes False and calls ``explain_non_finite`` only
            when its results are not finite.
        run_model: Run the model on a probe batch (a custom step decides itself how to call it).
        objective: The objective resolved on the training data, reused for validation data.
        target_key: The key of a Mapping batch's targets (``labels``).
        needs_loss: A loss must be computed (``evaluate`` without ``loss=`` reports the model's
            own loss only when its outputs carry one).

    Returns:
        The diagnosis (notes to show, repairs to apply, sample weights, the objective).

    Raises:
        DataError / ConfigError: A mistake with no unambiguous repair.
    """
    diagnosis = Diagnosis()
    memory = batches.in_memory()
    if scan_values and memory is not None:
        _check_finite(memory, role)
    if not run_model:
        return diagnosis
    with probing(model, device):
        sample = batches.sample(SAMPLE_SIZE)
        diagnosis.has_weights = sample.weights is not None
        if needs_targets and sample.targets is None:
            raise data_error(
                f"The {role} has no targets.",
                f"inputs only: {describe(sample.inputs)}",
                "pass (inputs, targets), e.g. fit(model, (x, y), ...), a Dataset whose items are (input, target), "
                f"or batches that are dicts holding {target_key!r}.",
            )
        sample = _check_keywords(model, sample, target_key, role, diagnosis)
        outputs, sample = _forward(model, sample, batches, role, diagnosis)
        _check_outputs(outputs, role)
        if options is None:
            return diagnosis
        sample = _repair_single_target(options, outputs, sample, memory, diagnosis)
        all_targets = None if memory is None else memory.targets
        for repair in diagnosis.repairs if all_targets is not None else []:  # as training will see them
            all_targets = repair(Batch(None, all_targets, 0)).targets
        if objective is not None and diagnosis.has_weights and not objective.weighs_samples:
            objective = with_sample_weights(objective)  # validation data may carry weights that training has not
        if objective is None:
            objective = build_objective(
                options, outputs, sample.targets, all_targets=all_targets, has_weights=diagnosis.has_weights,
                needs_loss=needs_loss,
            )  # fmt: skip
            diagnosis.notes += objective.notes
        diagnosis.objective = objective
        if sample.targets is not None:
            _check_heads(objective, model, outputs, sample, all_targets, role, diagnosis)
            _check_metrics(resolve_metrics(metrics, objective, options), objective, outputs, sample.targets)
    return diagnosis


def _check_keywords(model: nn.Module, sample: Batch, target_key: str | None, role: str, diagnosis: Diagnosis) -> Batch:
    """A Mapping batch goes to ``model(**batch)``: keys ``forward`` does not take are an error,
    except the targets' key, which a model that does not compute its own loss never gets."""
    if not isinstance(sample.inputs, Mapping):
        return sample
    accepted = keyword_names(model)
    if accepted is None:
        return sample
    unknown = [key for key in sample.inputs if key not in accepted]
    if target_key in unknown:
        key = target_key

        def without_targets(batch: Batch) -> Batch:
            if not isinstance(batch.inputs, Mapping):  # the targets alone, repaired as training will see them
                return batch
            return batch._replace(inputs={name: value for name, value in batch.inputs.items() if name != key})

        diagnosis.repairs.append(without_targets)
        unknown.remove(key)
        sample = without_targets(sample)
    if unknown:
        raise data_error(
            f"The {role} batches hold keys that the model's forward does not take.",
            f"keys {', '.join(map(repr, unknown))}; forward takes {', '.join(sorted(accepted))}",
            "remove those keys from the batches (e.g. in the collate function), or rename them to forward's "
            "parameters.",
        )
    return sample


def explain_non_finite(batches: Batches, role: str, results: dict[str, float]) -> None:
    """After a pass whose ``results`` hold NaN or inf: when the in-memory data holds them,
    raise the error that names the first bad row (as ``examine`` does before training)."""
    memory = batches.in_memory()
    if memory is not None and not all(map(math.isfinite, results.values())):
        _check_finite(memory, role)


def _check_finite(memory: InMemory, role: str) -> None:
    """NaN or inf in in-memory data: name the first bad row and column."""
    parts = named_tensors(memory.inputs, "inputs") + named_tensors(memory.targets, "targets")
    for name, tensor in parts:
        # One pass, no copy: NaN and inf make the sum non-finite (a sum that overflows only
        # costs the exact search below, which then finds nothing).
        if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
            continue
        bad = ~torch.isfinite(tensor)
        if not bool(bad.any()):
            continue
        position = [int(index) for index in bad.nonzero()[0]]
        where = f"row {position[0]}" + (f", column {position[1]}" if len(position) > 1 else "")
        value = float(tensor[tuple(position)])
        raise data_error(
            f"The {role} {name} hold {int(bad.sum())} non-finite value(s) (NaN or inf); the first is at {where}.",
            f"{name}[{', '.join(map(str, position))}] = {value}",
            "drop or fill those rows before training (e.g. x = torch.nan_to_num(x) or remove them).",
        )


def _forward(model: nn.Module, sample: Batch, batches: Batches, role: str, diagnosis: Diagnosis) -> tuple[Any, Batch]:
    """Run the model on the sample; cast inputs to the model's dtype when that is what it needs."""
    try:
        return call_model(model, sample.inputs), sample
    except RuntimeError as error:
        dtype = float_dtype(model)
        leaves = tensors_of(sample.inputs)
        castable = any(leaf.dtype not in (dtype, torch.bool) for leaf in leaves)
        if castable and _DTYPE_ERROR.search(str(error)):
            fix = _cast_inputs(dtype)
            try:
                outputs = call_model(model, fix(sample).inputs)
            except RuntimeError:
                outputs = None
            if outputs is not None:
                diagnosis.repairs.append(fix)
                received = ", ".join(sorted({_name(leaf.dtype) for leaf in leaves}))
                diagnosis.notes.append(f"The {role} inputs ({received}) were cast to the model's {_name(dtype)}.")
                return outputs, fix(sample)
        raise _forward_error(model, sample, role, error) from error


def _forward_error(model: nn.Module, sample: Batch, role: str, error: RuntimeError) -> Exception:
    first = next((module for module in model.modules() if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))), None)
    leaves = tensors_of(sample.inputs)
    if isinstance(first, nn.Linear) and len(leaves) == 1 and leaves[0].shape[-1] != first.in_features:
        return data_error(
            f"The model's first layer expects {first.in_features} features per sample; the {role} has "
            f"{leaves[0].shape[-1]}.",
            f"inputs {describe(sample.inputs)}; first layer {first}",
            f"give the first layer in_features={leaves[0].shape[-1]}, or select the {first.in_features} feature "
            "columns the model was built for.",
        )
    return data_error(
        f"The model failed on a sample of the {role}: {error}",
        f"inputs {describe(sample.inputs)}; model {type(model).__name__}",
        "make the inputs match what the model's first layer expects (number of features, dtype).",
    )


def _check_outputs(outputs: Any, role: str) -> None:
    """Outputs that hold no tensor at all (None from a forward without ``return``, numbers,
    strings, empty tuples): no loss, metric or ``output=`` can read them. Other objects are left
    to ``output=`` (a function of the outputs may read their attributes)."""
    if outputs is not None and not isinstance(outputs, (tuple, list, Mapping, str, int, float)):
        return
    if tensors_of(outputs):
        return
    hint = " (a forward that ends without `return` returns None)" if outputs is None else ""
    raise data_error(
        f"The model's forward returned no tensor on a sample of the {role}{hint}.",
        f"forward returned {describe(outputs)}",
        "return the prediction as a tensor, or a tuple or dict holding tensors (e.g. return self.head(x)).",
    )


def _cast_inputs(dtype: torch.dtype) -> Callable[[Batch], Batch]:
    def cast(batch: Batch) -> Batch:
        return batch._replace(inputs=map_tensors(batch.inputs, lambda tensor: tensor.to(dtype)))

    return cast


TargetFix = tuple[Callable[[torch.Tensor], torch.Tensor], str]


def _repair_targets(
    spec: LossSpec, outputs: torch.Tensor, sample: Batch, memory: InMemory | None, diagnosis: Diagnosis
) -> Batch:
    """Squeeze, reshape and cast targets when there is only one sensible reading."""
    targets = sample.targets
    assert targets is not None
    fixes: list[TargetFix] = []
    if spec.targets == "classes" and outputs.dim() >= 2:
        fixes = _class_target_fixes(outputs, targets)
    elif spec.targets == "same_shape":
        fixes = _value_target_fixes(outputs, targets)
        if spec.task == "binary":
            _check_binary_targets(targets if memory is None or memory.targets is None else memory.targets)
    if not fixes:
        return sample

    def repair(batch: Batch) -> Batch:
        fixed = batch.targets
        assert fixed is not None
        for fix, _ in fixes:
            fixed = fix(fixed)
        return batch._replace(targets=fixed)

    diagnosis.repairs.append(repair)
    reasons = " and ".join(why for _, why in fixes)
    diagnosis.notes.append(f"The {spec.name} targets were {reasons}.")
    return repair(sample)


def _class_target_fixes(outputs: torch.Tensor, targets: torch.Tensor) -> list[TargetFix]:
    """(N, 1) labels -> (N,); integral floats and small integer types -> int64; integer one-hot -> float."""
    fixes: list[TargetFix] = []
    if targets.dim() == 2 and targets.shape[1] == 1 and outputs.dim() == 2 and outputs.shape[1] > 1:
        fixes.append((lambda t: t.squeeze(1), "squeezed from (N, 1) to (N,)"))
        targets = targets.squeeze(1)
    elif targets.shape == outputs.shape and targets.dtype != outputs.dtype:
        dtype = outputs.dtype
        how = "read as one-hot and cast" if not targets.is_floating_point() else "cast"
        return [(lambda t: t.to(dtype), f"{how} from {_name(targets.dtype)} to {_name(dtype)}")]
    is_labels = tuple(targets.shape) == (len(targets), *outputs.shape[2:]) and targets.dtype not in (
        torch.long,
        torch.bool,
    )
    if is_labels and (not targets.is_floating_point() or bool((targets == targets.round()).all())):
        fixes.append((lambda t: t.long(), f"cast from {_name(targets.dtype)} to int64 class indices"))
    return fixes


def _value_target_fixes(outputs: torch.Tensor, targets: torch.Tensor) -> list[TargetFix]:
    """(N,) against (N, 1) outputs, or the reverse -> the outputs' shape; integers -> floats."""
    fixes: list[TargetFix] = []
    if targets.dim() == 1 and tuple(outputs.shape[1:]) == (1,):
        fixes.append((lambda t: t.unsqueeze(1), "reshaped from (N,) to (N, 1) like the outputs"))
    elif targets.dim() == 2 and targets.shape[1] == 1 and outputs.dim() == 1:
        fixes.append((lambda t: t.squeeze(1), "reshaped from (N, 1) to (N,) like the outputs"))
    if targets.dtype != outputs.dtype and outputs.is_floating_point():
        dtype = outputs.dtype
        fixes.append((lambda t: t.to(dtype), f"cast from {_name(targets.dtype)} to {_name(dtype)}"))
    return fixes


def _check_binary_targets(targets: torch.Tensor) -> None:
    outside = (targets < 0) | (targets > 1)
    if bool(outside.any()):
        index = [int(position) for position in outside.nonzero()[0]]
        raise data_error(
            "Binary cross-entropy needs targets in [0, 1] (0/1 labels or probabilities).",
            f"targets[{', '.join(map(str, index))}] = {float(targets[tuple(index)])}",
            "map the two classes to 0 and 1 (e.g. y = (y == positive_label).float()); for more classes use "
            "loss='cross_entropy'.",
        )


def _repair_single_target(
    options: LossOptions, outputs: Any, sample: Batch, memory: InMemory | None, diagnosis: Diagnosis
) -> Batch:
    """The target repairs of a one-output model whose loss is known (several heads get none)."""
    head = options.heads[0]
    if options.has_heads or head.spec is None or head.is_structured or not isinstance(sample.targets, torch.Tensor):
        return sample
    prediction = resolve_output(outputs, options.output)(outputs)
    return _repair_targets(head.spec, prediction, sample, memory, diagnosis)


def _check_heads(
    objective: Objective,
    model: nn.Module,
    outputs: Any,
    sample: Batch,
    all_targets: Any,
    role: str,
    diagnosis: Diagnosis,
) -> None:
    """Each head's outputs and targets against its loss; the total loss on the probe batch."""
    for head in objective.heads:
        if head.spec is None or head.is_structured:
            continue
        prediction, targets = head.view(outputs, sample.targets)
        if isinstance(prediction, torch.Tensor) and isinstance(targets, torch.Tensor):
            whole = None if all_targets is None else head.target(all_targets)
            check_loss_inputs(head.spec, prediction, targets, all_targets=whole)
            if len(objective.heads) == 1:
                _warn_about_activations(model, head.spec, prediction, diagnosis)
    if objective.has_loss:
        _check_loss_value(objective, outputs, sample, role)


def _check_loss_value(objective: Objective, outputs: Any, sample: Batch, role: str) -> None:
    names = ", ".join(head.spec.name for head in objective.heads if head.spec is not None)
    names = f"The loss {names}" if names else "The model's own loss"
    try:
        value = objective.losses(outputs, sample.targets, sample.weights).loss
    except (RuntimeError, ValueError, IndexError, TypeError, KeyError, AttributeError) as error:
        raise data_error(
            f"{names} failed on a sample of the {role}: {error}",
            f"outputs {outline(outputs)}, targets {describe(sample.targets)}",
            "make the targets match what the loss expects (see the loss's documentation).",
        ) from error
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        raise data_error(
            f"{names} must return a scalar tensor (the batch mean).",
            describe(value),
            "reduce it with .mean(), or use reduction='mean' for torch loss modules.",
        )


def _warn_about_activations(model: nn.Module, spec: LossSpec, outputs: torch.Tensor, diagnosis: Diagnosis) -> None:
    last = [module for module in model.modules() if not any(module.children())][-1:]
    if (
        spec.outputs == "logits"
        and spec.task == "multiclass"
        and last
        and isinstance(last[0], (nn.Softmax, nn.LogSoftmax))
    ):
        diagnosis.notes.append(
            f"The model ends with {type(last[0]).__name__}, but cross_entropy expects raw logits (it applies "
            "log-softmax itself): remove the last layer, or use loss='nll' after LogSoftmax."
        )
    if spec.outputs == "log_probabilities" and outputs.dim() >= 2 and outputs.shape[1] > 1:
        total = outputs.float().exp().sum(1)
        if bool((outputs > 1e-4).any()) or not torch.allclose(total, torch.ones_like(total), atol=1e-3):
            diagnosis.notes.append(
                "nll expects log-probabilities (end the model with nn.LogSoftmax(dim=1)), but the outputs are "
                "not: use loss='cross_entropy' for raw logits."
            )


def _check_metrics(slots: list[MetricSlot], objective: Objective, outputs: Any, targets: Any) -> None:
    """Every metric, once, on the probe batch: one that cannot work fails here, named."""
    for slot in slots:
        predicted, expected = (outputs, targets) if slot.route is None else slot.route(outputs, targets)
        if isinstance(slot.metric, (Accuracy, TopKAccuracy)):
            _check_accuracy(slot.name, slot.metric, predicted, expected)
        check_metric(slot.metric, predicted, expected, slot.name)


def _check_accuracy(name: str, metric: Accuracy | TopKAccuracy, outputs: Any, targets: Any) -> None:
    if not isinstance(outputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        return
    continuous = targets.is_floating_point() and not bool((targets == targets.round()).all())
    if continuous and getattr(metric, "mode", "auto") != "binary":
        raise data_error(
            f"{name} needs class targets, but the targets are continuous values (a regression task).",
            f"targets {describe(targets)}, e.g. {float(targets.flatten()[0]):.4g}",
            "use metrics=['mae'], ['mse'] or ['rmse'] for regression (with several heads, give the metrics per "
            "head: metrics={'label': ['accuracy'], 'box': ['mae']}).",
        )
    if isinstance(metric, TopKAccuracy) and (outputs.dim() < 2 or outputs.shape[1] < 2):
        raise data_error(
            f"{name} needs one output per class.",
            f"outputs {describe(outputs)}",
            "use 'accuracy' for a single output column.",
        )


def check_plan(batches: Batches, min_batch: int, world_size: int) -> None:
    """Refuse a batch plan the model cannot train on: batches smaller than BatchNorm needs, or
    no batch at all once the data is shared between the processes.

    Raises:
        DataError: With the sizes and the fix.
    """
    size = batches.batch_size
    if size is not None and size < min_batch:
        raise data_error(
            "The model has BatchNorm, which cannot train on batches of one sample.",
            f"batch_size={size}" + (" per process" if world_size > 1 else ""),
            "use batch_size=2 or more.",
        )
    if batches.num_batches == 0:
        raise data_error(
            "The training data gives no batch to train on.",
            f"{batches.num_samples} samples, batch_size={size} on each of {world_size} process(es)"
            + (", BatchNorm needs 2 per process" if min_batch > 1 else ""),
            "use a smaller batch_size, fewer processes, drop_last=False, or more data.",
        )


def left_out_note(batches: Batches) -> list[str]:
    """The note for samples the batch plan leaves out because BatchNorm cannot train on so few."""
    if not batches.left_out:
        return []
    return [
        f"The model has BatchNorm, which cannot train on a batch of one sample: the last {batches.left_out} "
        f"sample(s) of each epoch's order are left out ({batches.num_batches} batches per epoch)."
    ]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
