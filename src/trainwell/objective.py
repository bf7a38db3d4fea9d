"""What a batch is trained and scored on: the loss (one, one per output head, or the model's own),
where the prediction and each head's targets are in structured outputs and targets, where the
class dimension is, and which items count (positions labelled ``ignore_index`` do not).

Owns: building the ``Objective`` once from the user's options and a probe batch, and computing
a batch's losses and counted items from it. Must not run the model, iterate data or read values
back from the device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch.nn import functional

from trainwell.errors import ConfigError, config_error, data_error, describe
from trainwell.losses import LossFn, LossSpec, WeightedLossFn, binary_threshold, resolve_loss, sample_weighted
from trainwell.metrics import (
    AccuracyMode,
    ExternalMetric,
    FunctionMetric,
    Metric,
    MetricSlot,
    Ranking,
    Route,
    metric_name,
    resolve_metric,
    share_counts,
)
from trainwell.outputs import WHOLE, OutputChoice, Selector, find_entry, outline, own_loss, resolve_output

LossArg = str | LossFn
HeadKey = str | int


class Structured:
    """A loss or metric function that receives the model's whole outputs and the whole targets
    (a tuple, a dict, a ``ModelOutput``) instead of the prediction; see ``trainwell.structured``."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        if not callable(fn):
            raise config_error("structured() wraps a function.", describe(fn), "pass structured(my_loss).")
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, outputs: Any, targets: Any) -> Any:
        return self.fn(outputs, targets)


def structured(fn: Callable[..., Any]) -> Structured:
    """Mark a loss or metric function to receive the model's whole outputs and targets.

    Named losses and metrics, and plain functions, receive the prediction (a ``ModelOutput``'s
    ``logits``, a tuple's first element) and the targets; a ``structured`` one receives
    everything the model returned, e.g. to add an auxiliary output's loss.

    Example:
        >>> import torch, trainwell
        >>> def with_aux(outputs, targets):
        ...     logits, aux = outputs
        ...     return torch.nn.functional.cross_entropy(logits, targets) + 0.1 * aux.square().mean()
        >>> loss = trainwell.structured(with_aux)
    """
    return Structured(fn)


@dataclass(frozen=True)
class HeadOptions:
    """One output head as the user asked for it, before the outputs are seen.

    Attributes:
        name: The head's name in log keys (``loss_<name>``, ``<name>_accuracy``); "" for the
            single prediction of a one-output model.
        key: Where the head is in the outputs and targets (a key or a position); None for the
            single prediction.
        spec: Its loss, or None (a head with metrics only, or the model's own loss).
        weight: The factor of its loss in the total.
        is_structured: The loss receives the whole outputs and targets.
    """

    name: str
    key: HeadKey | None
    spec: LossSpec | None
    weight: float = 1.0
    is_structured: bool = False


@dataclass(frozen=True)
class LossOptions:
    """``loss``, ``loss_weights``, ``output`` and the head names of ``metrics``, checked together
    (``resolve_loss_options``) before any data is read."""

    heads: tuple[HeadOptions, ...]
    output: OutputChoice = None
    own_loss: bool = False  # no loss given: the model's outputs carry it

    @property
    def has_heads(self) -> bool:
        """Losses or metrics are given per output head."""
        return any(head.key is not None for head in self.heads)

    @property
    def loss_keys(self) -> list[str]:
        """The loss log keys: ``loss``, then ``loss_<head>`` per named head with a loss."""
        return ["loss"] + [f"loss_{head.name}" for head in self.heads if head.name and head.spec is not None]


def head_name(key: HeadKey) -> str:
    """A head's name in log keys: its key, or ``output_<i>`` for a position."""
    return key if isinstance(key, str) else f"output_{key}"


def resolve_loss_options(
    loss: LossArg | Mapping[HeadKey, LossArg] | Sequence[LossArg] | None,
    *,
    loss_weights: Mapping[HeadKey, float] | Sequence[float] | None = None,
    metric_heads: Sequence[HeadKey] = (),
    output: OutputChoice = None,
    custom_step: bool = False,
) -> LossOptions | None:
    """Check ``loss`` (a name or function; a dict by output name or a sequence by position, one
    per head), ``loss_weights`` and the heads ``metrics`` name, before anything is run.

    Returns:
        The options, or None when a custom step computes the loss and no loss is given.

    Raises:
        ConfigError: Unknown loss names, weights that name no head, weights without heads.
    """
    _check_output(output)
    if isinstance(loss, (Mapping, list, tuple)):
        items = list(loss.items()) if isinstance(loss, Mapping) else list(enumerate(loss))
        if not items:
            raise config_error("loss has no head.", f"loss={loss!r}", "pass e.g. loss={'label': 'cross_entropy'}.")
        keys = [key for key, _ in items]
        weights = _weights(loss_weights, keys)
        heads = [_head(key, value, weights.get(key, 1.0)) for key, value in items]
        heads += [HeadOptions(head_name(key), key, None) for key in metric_heads if key not in keys]
        if output is not None:
            raise config_error(
                "output= names the prediction of a single loss; with a loss per head each head is its own output.",
                f"output={output!r}, loss by head {keys}",
                "drop output=, or pass one loss.",
            )
        return LossOptions(tuple(heads), None)
    if loss_weights is not None:
        raise config_error(
            "loss_weights weigh the losses of several output heads; this run has one loss.",
            f"loss_weights={loss_weights!r}, loss={describe(loss)}",
            "pass loss as a dict by output name, e.g. loss={'label': 'cross_entropy', 'box': 'mse'}, or drop "
            "loss_weights.",
        )
    metric_only = tuple(HeadOptions(head_name(key), key, None) for key in metric_heads)
    if loss is None:
        if custom_step:
            return None if not metric_only else LossOptions(metric_only, output)
        return LossOptions((HeadOptions("", None, None), *metric_only), output, own_loss=True)
    single = _head(None, loss, 1.0)  # type: ignore[arg-type]  # a str or callable: the others returned above
    return LossOptions((single, *metric_only), output)


def _check_output(output: OutputChoice) -> None:
    if output is not None and (isinstance(output, bool) or not (isinstance(output, (str, int)) or callable(output))):
        raise config_error(
            "output must name one of the model's outputs: a key, a position, or a function of the outputs.",
            f"output={output!r}",
            "pass e.g. output='logits', output=0 or output=lambda outputs: outputs.start_logits.",
        )


def _head(key: HeadKey | None, loss: LossArg, weight: float) -> HeadOptions:
    name = "" if key is None else head_name(key)
    if isinstance(loss, Structured):
        return HeadOptions(name, key, resolve_loss(loss.fn), weight, is_structured=True)
    return HeadOptions(name, key, resolve_loss(loss), weight)


def _weights(loss_weights: Mapping[HeadKey, float] | Sequence[float] | None, keys: list[HeadKey]) -> dict[Any, float]:
    if loss_weights is None:
        return {}
    given = dict(loss_weights) if isinstance(loss_weights, Mapping) else dict(enumerate(loss_weights))
    unknown = [key for key in given if key not in keys]
    bad = [key for key, value in given.items() if isinstance(value, bool) or not isinstance(value, (int, float))]
    if unknown or bad or (not isinstance(loss_weights, Mapping) and len(given) != len(keys)):
        raise config_error(
            "loss_weights must give a number for heads that have a loss.",
            f"loss_weights={loss_weights!r}; heads with a loss: {keys}",
            "pass e.g. loss_weights={'label': 1.0, 'box': 0.5}.",
        )
    return {key: float(value) for key, value in given.items()}


class LossParts(NamedTuple):
    """A batch's losses.

    Attributes:
        loss: The total (the batch mean; over counted items when the objective counts items).
        named: Each head's own loss (``loss_<head>``) when there are several.
        items: How many items counted in the batch (a device tensor), when the objective counts
            items (labels with ignored positions); None when each sample counts once.
    """

    loss: torch.Tensor
    named: dict[str, torch.Tensor]
    items: torch.Tensor | None


@dataclass(frozen=True)
class Head:
    """One head, resolved against the probe's outputs and targets.

    Attributes:
        name: As in ``HeadOptions``.
        output: Picks the head's outputs (the prediction for a one-output model).
        target: Picks its targets (the whole targets for a one-output model).
        spec: Its loss (None: metrics only, or the model's own loss).
        weight: Its factor in the total loss.
        class_last: Outputs (N, ..., C) against targets (N, ...): both are flattened to (M, C)
            and (M,) for a named classification loss and the metrics.
        is_structured: The loss gets the whole outputs and targets (``trainwell.structured``).
        weighted_fn: The loss with per-sample weights, for data that carries them.
        shift: The model's own loss scores position t against label t + 1 (a causal language
            model shifts its labels itself): metrics and counted items do the same.
        width: Outputs per sample of its view on the probe batch (classes, or yes/no labels;
            1 for one value per sample): counting metrics size their sums with it.
    """

    name: str
    output: Selector
    target: Selector
    spec: LossSpec | None
    weight: float = 1.0
    class_last: bool = False
    is_structured: bool = False
    weighted_fn: WeightedLossFn | None = None
    shift: bool = False
    width: int | None = None

    def view(self, outputs: Any, targets: Any) -> tuple[Any, Any]:
        """The head's outputs and targets as its named loss and its metrics read them."""
        prediction, selected = self.output(outputs), None if targets is None else self.target(targets)
        if self.shift:
            prediction, selected = prediction[:, :-1], None if selected is None else selected[:, 1:]
        if self.class_last:
            prediction = prediction.flatten(0, -2)
            selected = None if selected is None else selected.flatten()
        return prediction, selected

    def loss(self, outputs: Any, targets: Any, weights: torch.Tensor | None) -> torch.Tensor:
        """The head's batch loss."""
        assert self.spec is not None
        if self.is_structured:
            prediction, selected = outputs, targets
        elif self.spec.targets == "classes":
            prediction, selected = self.view(outputs, targets)
        else:  # a function of the user's gets the prediction as the model gives it
            prediction, selected = self.output(outputs), None if targets is None else self.target(targets)
        if weights is None:
            value: torch.Tensor = self.spec.fn(prediction, selected)
            return value
        assert self.weighted_fn is not None
        return self.weighted_fn(prediction, selected, weights)


@dataclass(frozen=True)
class Objective:
    """The resolved losses and views of a run (built by ``build_objective``).

    Attributes:
        heads: The heads; one (named "") for a one-output model.
        own_loss: Train on the loss the model returns in its outputs.
        ignore_index: The label of positions that do not count, when items are counted.
        counts_items: Averages (the epoch's loss and metrics, accumulated and sharded gradients)
            count items (tokens, pixels) rather than samples: the targets have positions or
            carry ignored labels.
        items_per_sample: Counted items per sample in the probe batch (sizes the gradient scale).
        notes: What was chosen, when it is not obvious (shown once).
        metric_names: The keys of a ``metrics`` dict name the metrics, not output heads: the
            model returns one tensor, which has no entries to name.
    """

    heads: tuple[Head, ...]
    own_loss: bool = False
    ignore_index: int | None = None
    counts_items: bool = False
    items_per_sample: float = 1.0
    notes: list[str] = field(default_factory=list)
    metric_names: bool = False
    _direct: LossFn | None = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The common case, once per step: one loss on the outputs and targets as they are.
        head = self.heads[0]
        plain = len(self.heads) == 1 and not (self.own_loss or self.counts_items or head.class_last)
        if plain and head.spec is not None and head.output is WHOLE:
            object.__setattr__(self, "_direct", head.spec.fn)

    @property
    def has_loss(self) -> bool:
        """A loss is computed (from a loss function or the model's own)."""
        return self.own_loss or any(head.spec is not None for head in self.heads)

    @property
    def weighs_samples(self) -> bool:
        """The losses take per-sample weights."""
        return any(head.weighted_fn is not None for head in self.heads)

    def losses(self, outputs: Any, targets: Any, weights: torch.Tensor | None = None) -> LossParts:
        """The batch's total loss, each head's loss, and its counted items.

        Raises:
            DataError: The model was to return its own loss and did not.
        """
        if self._direct is not None and weights is None:
            return LossParts(self._direct(outputs, targets), {}, None)
        if self.counts_items:  # a batch with no counted position has a NaN mean: it counts as 0
            parts = self._losses(outputs, targets, weights)
            items = self.items(targets)
            return LossParts(torch.where(items > 0, parts.loss, 0), parts.named, items)
        return self._losses(outputs, targets, weights)

    def _losses(self, outputs: Any, targets: Any, weights: torch.Tensor | None) -> LossParts:
        items = None
        if self.own_loss:
            value = own_loss(outputs)
            if value is None:
                raise data_error(
                    "The model returned no loss for this batch, and no loss= was given.",
                    f"the model returns {outline(outputs)}",
                    "give every batch its labels (the model computes its loss from them), or pass loss=.",
                )
            return LossParts(value.reshape(()) if value.dim() else value, {}, items)
        trained = [head for head in self.heads if head.spec is not None]
        if len(trained) == 1 and not trained[0].name:
            return LossParts(trained[0].loss(outputs, targets, weights), {}, items)
        named = {f"loss_{head.name}": head.loss(outputs, targets, weights) for head in trained}
        total = trained[0].weight * named[f"loss_{trained[0].name}"]
        for head in trained[1:]:
            total = total + head.weight * named[f"loss_{head.name}"]
        return LossParts(total, {key: value.detach() for key, value in named.items()}, items)

    def items(self, targets: Any) -> torch.Tensor:
        """Counted items of a batch (a device tensor): the labels that are not ``ignore_index``,
        each by its class's weight when the loss has class weights (a weighted mean divides by them)."""
        head = self.heads[0]
        labels: torch.Tensor = head.target(targets)
        if head.shift:
            labels = labels[:, 1:]
        assert self.ignore_index is not None
        counted = labels.ne(self.ignore_index)
        spec = self.heads[0].spec
        if spec is None or spec.class_weight is None:
            return counted.sum()
        return (spec.class_weight[torch.where(counted, labels, 0)] * counted).sum()

    def route(self, head: Head) -> Route | None:
        """How a metric of ``head`` gets its outputs and targets (None: as they are)."""
        trivial = head.output is WHOLE and head.target is WHOLE and not head.class_last
        return None if trivial else head.view


def build_objective(
    options: LossOptions,
    outputs: Any,
    targets: Any,
    *,
    all_targets: Any = None,
    has_weights: bool = False,
    needs_loss: bool = True,
) -> Objective:
    """Resolve ``options`` against one probe batch's outputs and targets.

    Args:
        options: The checked loss options.
        outputs: The model's outputs on the probe batch.
        targets: The probe batch's targets (None for data without targets).
        all_targets: Every target when the data is in memory (ignored labels beyond the probe).
        has_weights: The data carries sample weights.
        needs_loss: Without a loss, the model's own is required (``fit``) rather than taken
            when the outputs carry one (``evaluate``).

    Raises:
        ConfigError / DataError: Heads that are not in the outputs or targets (both sides listed),
            a missing own loss, sample weights with per-item averaging.
    """
    notes: list[str] = []
    # A model that returns one tensor has no entries for a metrics dict's keys to name: they
    # name the metrics (metrics={"my_f1": MulticlassF1Score(3)}).
    metric_names = isinstance(outputs, torch.Tensor) and any(
        option.key is not None and option.spec is None for option in options.heads
    )
    if metric_names:
        options = replace(options, heads=tuple(head for head in options.heads if head.key is None or head.spec))
    heads = tuple(
        _single_head(options, outputs, targets, notes) if option.key is None else _keyed_head(option, outputs, targets)
        for option in options.heads
    )
    has_own = options.own_loss and own_loss(outputs) is not None
    objective = Objective(heads, own_loss=has_own, notes=notes)
    if options.own_loss and not has_own and needs_loss:
        raise config_error(
            "A loss is needed: none was given, and the model's outputs carry none.",
            f"loss=None; the model returns {outline(outputs)}",
            "pass e.g. loss='cross_entropy'; a Hugging Face model computes its own loss when its batches hold "
            "'labels'.",
        )
    if has_own and _shifts_labels(heads[0], outputs, targets):
        heads = (replace(heads[0], shift=True), *heads[1:])
        objective = Objective(heads, own_loss=has_own, notes=notes)
    counted = _counted_items(objective, heads[0], outputs, targets, all_targets)
    if counted is not None:
        ignore_index, per_sample = counted
        objective = Objective(heads, has_own, ignore_index, True, max(per_sample, 1e-6), notes)
    widths = tuple(replace(head, width=_width(head, outputs, targets)) for head in heads)
    objective = replace(objective, heads=widths, metric_names=metric_names)
    return with_sample_weights(objective) if has_weights else objective


def _width(head: Head, outputs: Any, targets: Any) -> int | None:
    """Outputs per sample of the head's view (None when it is not one tensor)."""
    try:
        prediction = head.view(outputs, targets)[0]
    except Exception:  # a view the probe cannot take is reported by the checks that need it
        return None
    if not isinstance(prediction, torch.Tensor):
        return None
    return prediction.shape[1] if prediction.dim() >= 2 else 1


def _single_head(options: LossOptions, outputs: Any, targets: Any, notes: list[str]) -> Head:
    option = options.heads[0]
    try:
        selector = resolve_output(outputs, options.output)
    except ConfigError as error:
        if not options.own_loss or own_loss(outputs) is None:
            raise
        return Head("", Selector(fn=_raiser(error), description="the prediction"), WHOLE, None)  # metrics cannot
    prediction = selector(outputs)
    class_last = False
    spec = option.spec
    if isinstance(targets, torch.Tensor):
        class_last = _class_last(prediction, targets, notes)
    if option.is_structured:
        return Head("", selector, WHOLE, spec, class_last=class_last, is_structured=True)
    if selector is not WHOLE and options.output is None:
        if options.own_loss and own_loss(outputs) is not None:
            notes.append(
                f"The model returns {outline(outputs)}: training on its own loss ({_loss_entry(outputs)}); metrics "
                f"read {selector.description}."
            )
        elif spec is not None:
            ignored = " (its own loss is not used: loss= overrides it)" if own_loss(outputs) is not None else ""
            notes.append(
                f"The model returns {outline(outputs)}: the loss and metrics read {selector.description}{ignored}; "
                "name another output with output=."
            )
    return Head("", selector, WHOLE, spec, class_last=class_last)


def _raiser(error: ConfigError) -> Callable[[Any], Any]:
    def unresolvable(outputs: Any) -> Any:
        raise error

    return unresolvable


def _shifts_labels(head: Head, outputs: Any, targets: Any) -> bool:
    """Whether the model's own loss scores position t against label t + 1, as causal language
    models do: told by computing both on the probe batch and comparing with the model's."""
    value = own_loss(outputs)
    labels = head.target(targets) if targets is not None else None
    try:
        prediction = head.output(outputs)
    except ConfigError:
        return False
    if value is None or not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        return False
    if not isinstance(prediction, torch.Tensor) or prediction.dim() != 3 or prediction.shape[:2] != labels.shape:
        return False
    with torch.no_grad():
        scores = prediction.float()
        same = functional.cross_entropy(scores.flatten(0, 1), labels.flatten())
        shifted = functional.cross_entropy(scores[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    return bool((shifted - value).abs() < (same - value).abs())


def _loss_entry(outputs: Any) -> str:
    return "outputs[0]" if isinstance(outputs, (tuple, list)) else "outputs['loss']"


def _class_last(prediction: torch.Tensor, targets: torch.Tensor, notes: list[str]) -> bool:
    """Whether classes are the last dimension of the outputs, as language models and taggers
    give them: (N, ..., C) against targets (N, ...), instead of torch's (N, C, ...)."""
    if prediction.dim() < 3 or targets.is_floating_point():
        return False
    first = targets.shape == prediction.shape[:1] + prediction.shape[2:]
    last = targets.shape == prediction.shape[:-1]
    if first and last:
        notes.append(
            f"The outputs {tuple(prediction.shape)} against targets {tuple(targets.shape)} could hold the classes in "
            "dimension 1 (torch's layout) or in the last; trainwell reads dimension 1. If the classes are last, pass "
            "output=lambda outputs: outputs.movedim(-1, 1)."
        )
    return last and not first


def _keyed_head(option: HeadOptions, outputs: Any, targets: Any) -> Head:
    assert option.key is not None
    output = _find(outputs, option.key, "outputs")
    target = WHOLE if targets is None else _find(targets, option.key, "targets")
    if option.spec is not None or targets is not None:
        prediction = output(outputs)
        if not isinstance(prediction, torch.Tensor):
            raise data_error(
                f"The model's output {option.key!r} must be a tensor to have a loss and metrics.",
                f"outputs[{option.key!r}] is {describe(prediction)}",
                "return a tensor for each output head.",
            )
    return Head(option.name, output, target, option.spec, option.weight, is_structured=option.is_structured)


def _find(structure: Any, key: HeadKey, role: str) -> Selector:
    found = find_entry(structure, key, role)
    if found is not None:
        return found
    raise data_error(
        f"A loss or metric names the output head {key!r}, which the {role} do not have.",
        f"the {role} are {outline(structure)}",
        "name the losses and metrics by the outputs' keys (or positions), and give targets with the same keys, "
        "e.g. (x, {'label': y1, 'box': y2}).",
    )


def _counted_items(
    objective: Objective, head: Head, outputs: Any, targets: Any, all_targets: Any
) -> tuple[int, float] | None:
    """(ignore_index, items per sample) when averages must count items; None when samples do."""
    if len(objective.heads) != 1 or head.is_structured or targets is None:
        return None
    labels = head.target(targets)
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dim() == 0:
        return None
    if objective.own_loss:
        ignore_index: int | None = -100  # the convention of models that compute their own loss
        if labels.dim() < 2:
            return None
    elif head.spec is None:  # metrics only: torch's -100 marks what no loss would score
        ignore_index = -100
        whole = all_targets if isinstance(all_targets, torch.Tensor) else labels
        if not bool(whole.eq(ignore_index).any()):
            return None
    else:
        spec = head.spec
        if spec is None or spec.targets != "classes" or spec.ignore_index is None:
            return None
        if labels.shape == head.output(outputs).shape:  # class probabilities: one per sample
            return None
        ignore_index = spec.ignore_index
        whole = all_targets if isinstance(all_targets, torch.Tensor) else labels
        if labels.dim() < 2 and not bool(whole.eq(ignore_index).any()):
            return None
    assert ignore_index is not None
    labels = labels[:, 1:] if head.shift else labels
    counted = int(labels.ne(ignore_index).sum())
    return ignore_index, counted / max(len(labels), 1)


MetricArg = str | Callable[..., Any] | Metric | ExternalMetric
Metrics = MetricArg | Sequence[MetricArg] | Mapping[HeadKey, MetricArg | Sequence[MetricArg]]


def metric_heads(metrics: Metrics) -> list[HeadKey]:
    """The output heads ``metrics`` names (a dict by head), in order."""
    return list(metrics) if isinstance(metrics, Mapping) else []


def resolve_metrics(metrics: Metrics, objective: Objective | None, options: LossOptions | None) -> list[MetricSlot]:
    """Fresh accumulators for ``metrics``, each with its log key and its route to the outputs.

    A list applies to the prediction (to every head with a target when the loss is given per
    head); a dict applies each entry to its head, logged as ``<head>_<metric>``. Accuracy
    follows its head's loss (threshold, multi-class or binary, ignored label).

    Args:
        metrics: As ``fit`` takes them.
        objective: The resolved objective (None before the probe, or for a custom step: then
            metrics get the step's outputs and the targets as they are).
        options: The loss options (head names before the probe).

    Raises:
        ConfigError: An unknown metric, or two metrics with one log key.
    """
    placed = _placed(metrics, objective, options)
    slots = [_slot(prefix, metric, head, objective) for prefix, head, metric in placed]
    resolved = [slot.metric for slot in slots]
    share_counts(resolved, [head for _, head, _ in placed])  # one confusion matrix per head
    slots = [slot._replace(metric=metric) for slot, metric in zip(slots, resolved, strict=True)]
    names = [slot.name for slot in slots]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    losses = set(options.loss_keys if options is not None else ["loss"])
    if duplicates or losses & set(names):
        raise config_error(
            "Metric names must be unique and differ from the losses' names.",
            f"metrics named {', '.join(names)}; losses {', '.join(sorted(losses))}",
            "remove the duplicate, or give a function metric another __name__.",
        )
    return slots


def _placed(
    metrics: Metrics, objective: Objective | None, options: LossOptions | None
) -> list[tuple[str, str | None, MetricArg]]:
    """(key prefix, head name or None for the prediction, metric) for each metric; a prefix
    without a closing ``_`` is the metric's whole name (a metrics dict's key naming it)."""
    placed: list[tuple[str, str | None, MetricArg]] = []
    if isinstance(metrics, Mapping):
        names = objective is not None and objective.metric_names  # the keys name the metrics
        for key, entry in metrics.items():
            if names and len(_listed(entry)) == 1:
                placed.append((str(key), None, _listed(entry)[0]))  # the key is the whole name
                continue
            placed += [(f"{head_name(key)}_", None if names else head_name(key), metric) for metric in _listed(entry)]
        return placed
    listed = _listed(metrics)
    heads = [head.name for head in options.heads] if options is not None else [""]
    if "" in heads or not heads:
        return [("", None, metric) for metric in listed]
    return [(f"{name}_", name, metric) for name in heads for metric in listed]


def _listed(metrics: Any) -> list[MetricArg]:
    """One metric, or a sequence of them, as a list."""
    if isinstance(metrics, (str, Metric)) or callable(metrics) or isinstance(metrics, ExternalMetric):
        return [metrics]
    return list(metrics)


def _slot(prefix: str, metric: MetricArg, head_name_: str | None, objective: Objective | None) -> MetricSlot:
    head = None
    if objective is not None:
        wanted = head_name_ or ""
        head = next((candidate for candidate in objective.heads if candidate.name == wanted), None)
    spec = head.spec if head is not None else None
    threshold = binary_threshold(spec) if spec is not None else 0.5
    mode: AccuracyMode = "auto"
    if spec is not None and spec.task in ("multiclass", "binary"):
        mode = "binary" if spec.task == "binary" else "multiclass"
    ignore_index = objective.ignore_index if objective is not None and objective.counts_items else None
    named = bool(prefix) and not prefix.endswith("_")  # a metrics dict's key, naming the metric
    if isinstance(metric, Structured):
        name = prefix if named else prefix + metric.__name__
        return MetricSlot(name, FunctionMetric(metric.fn, name if named else metric.__name__), None)
    width = head.width if head is not None else None
    resolved = resolve_metric(metric, threshold=threshold, mode=mode, ignore_index=ignore_index, width=width)
    if named and isinstance(resolved, (Metric, Ranking)):
        resolved.name = prefix  # in its messages, and a function's dict keys are its own
    route = None if head is None or objective is None else objective.route(head)
    return MetricSlot(prefix if named else prefix + metric_name(resolved), resolved, route)


def plain_objective(options: LossOptions) -> Objective:
    """The objective of a custom step's ``compute_loss``, without a probe: each head reads its
    key of the outputs and targets; a single loss gets the outputs as they are."""
    chosen = options.output
    single = WHOLE if chosen is None else Selector(fn=chosen) if callable(chosen) else Selector(chosen)
    heads = tuple(
        Head(option.name, single if option.key is None else Selector(option.key), WHOLE if option.key is None
             else Selector(option.key), option.spec, option.weight, is_structured=option.is_structured)
        for option in options.heads
    )  # fmt: skip
    return Objective(heads, own_loss=options.own_loss)


def with_sample_weights(objective: Objective) -> Objective:
    """The objective for data that carries sample weights (validation data may, training not).

    Raises:
        ConfigError: A loss that cannot be evaluated per sample, or targets with positions.
    """
    if objective.counts_items:
        raise config_error(
            "Sample weights apply to whole samples; these targets have positions that count separately.",
            f"ignore_index={objective.ignore_index}",
            "drop the weights from the data, or weight positions in a custom loss.",
        )
    heads = tuple(
        replace(head, weighted_fn=sample_weighted(head.spec)) if head.spec is not None else head
        for head in objective.heads
    )
    return replace(objective, heads=heads)
