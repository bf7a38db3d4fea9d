"""Choosing "the prediction" inside what a model returns: the tensor itself; a Mapping's or
``ModelOutput``'s ``logits``; a tuple's first element; or what the user names with ``output=``.

Owns: resolving the choice once, on the probe's outputs, into a ``Selector``; reading a model's
own ``loss``; trimming outputs for ``predict``. Must not compute losses or metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from trainwell.errors import config_error, describe

OutputChoice = str | int | Callable[[Any], Any] | None
_SKIPPED = "loss"  # what a model's own loss is called (Hugging Face, and most code written like it)


@dataclass(frozen=True)
class Selector:
    """Picks one part of a model's outputs: ``key`` of a Mapping (or attribute of an object),
    position ``key`` of a tuple, ``fn(outputs)``, or the outputs themselves (``key`` None).

    Attributes:
        description: How the part is named in messages (``outputs['logits']``).
    """

    key: str | int | None = None
    fn: Callable[[Any], Any] | None = None
    description: str = "outputs"

    def __call__(self, outputs: Any) -> Any:
        """The chosen part of ``outputs``."""
        if self.fn is not None:
            return self.fn(outputs)
        if self.key is None:
            return outputs
        if isinstance(self.key, str) and not isinstance(outputs, Mapping):
            return getattr(outputs, self.key)
        return outputs[self.key]


WHOLE = Selector()


def entries(outputs: Any) -> dict[str, Any]:
    """The named entries of a Mapping, or of an object that keeps its outputs as attributes
    (a dataclass); empty for anything else."""
    if isinstance(outputs, Mapping):
        return {str(key): value for key, value in outputs.items()}
    fields = getattr(outputs, "__dataclass_fields__", None)
    return {name: getattr(outputs, name) for name in fields} if fields else {}


def resolve_output(outputs: Any, choice: OutputChoice) -> Selector:
    """The ``Selector`` of the prediction in ``outputs`` (a probe batch's), by ``choice``.

    Args:
        outputs: What the model returned for a probe batch.
        choice: None for the rule (the tensor; ``logits``; the first element), a key, a
            position, or a function of the outputs.

    Returns:
        A selector whose result on ``outputs`` is a tensor.

    Raises:
        ConfigError: The choice names nothing in the outputs, or the rule finds no single tensor;
            the message lists what the outputs hold.

    Example:
        >>> resolve_output({"loss": torch.ones(()), "logits": torch.ones(2, 3)}, None).description
        "outputs['logits']"
        >>> resolve_output((torch.ones(2, 3), torch.ones(2)), None).description
        'outputs[0]'
    """
    selector = _by_choice(outputs, choice) if choice is not None else _by_rule(outputs)
    chosen = selector(outputs)
    if not isinstance(chosen, torch.Tensor):
        raise config_error(
            "The chosen model output must be a tensor (the prediction the loss and metrics read).",
            f"{selector.description} is {describe(chosen)}; the model returns {outline(outputs)}",
            "pass output= naming a tensor entry: a key, a position, or a function of the outputs.",
        )
    return selector


def _by_choice(outputs: Any, choice: str | int | Callable[[Any], Any]) -> Selector:
    if callable(choice):
        name = getattr(choice, "__name__", type(choice).__name__)
        return Selector(fn=choice, description=f"{name}(outputs)")
    if isinstance(choice, bool) or not isinstance(choice, (str, int)):
        raise config_error(
            "output must name one of the model's outputs: a key, a position, or a function of the outputs.",
            f"output={choice!r}",
            "pass e.g. output='logits', output=0 or output=lambda outputs: outputs.start_logits.",
        )
    found = find_entry(outputs, choice)
    if found is not None:
        return found
    raise config_error(
        f"output={choice!r} names nothing in the model's outputs.",
        f"the model returns {outline(outputs)}",
        "pass one of its keys or positions, or a function of the outputs.",
    )


def find_entry(structure: Any, key: str | int, role: str = "outputs") -> Selector | None:
    """The selector of entry ``key`` (a key of a Mapping or dataclass, a position of a tuple) of
    ``structure``; None when it has no such entry.

    Example:
        >>> find_entry({"box": torch.ones(1)}, "box", "targets").description
        "targets['box']"
        >>> find_entry((torch.ones(1),), 1) is None
        True
    """
    if isinstance(key, str) and key in entries(structure):
        return Selector(key, description=f"{role}[{key!r}]")
    if isinstance(key, int) and isinstance(structure, (tuple, list)) and -len(structure) <= key < len(structure):
        return Selector(key, description=f"{role}[{key}]")
    return None


def _by_rule(outputs: Any) -> Selector:
    if isinstance(outputs, torch.Tensor):
        return WHOLE
    if isinstance(outputs, (tuple, list)) and outputs:
        first = 1 if _leading_loss(outputs) is not None else 0
        return Selector(first, description=f"outputs[{first}]")
    named = entries(outputs)
    if isinstance(named.get("logits"), torch.Tensor):
        return Selector("logits", description="outputs['logits']")
    tensors = [key for key, value in named.items() if key != _SKIPPED and isinstance(value, torch.Tensor)]
    if len(tensors) == 1:
        return Selector(tensors[0], description=f"outputs[{tensors[0]!r}]")
    raise config_error(
        "trainwell cannot tell which of the model's outputs is the prediction.",
        f"the model returns {outline(outputs)}",
        "name it with output=: a key, a position, or a function of the outputs (e.g. output='start_logits').",
    )


def own_loss(outputs: Any) -> torch.Tensor | None:
    """The loss a model computed itself, or None: its outputs' ``loss`` entry, or the first
    element of a tuple that starts with one number, ``(loss, logits, ...)``, as Hugging Face
    models return it with ``return_dict=False``.

    Example:
        >>> own_loss({"loss": torch.tensor(0.5), "logits": torch.ones(1)}).item()
        0.5
        >>> own_loss((torch.tensor(0.5), torch.ones(4, 2))).item()
        0.5
        >>> own_loss(torch.ones(1)) is None
        True
    """
    if isinstance(outputs, (tuple, list)):
        return _leading_loss(outputs)
    value = entries(outputs).get(_SKIPPED)
    return value if isinstance(value, torch.Tensor) else None


def _leading_loss(outputs: tuple[Any, ...] | list[Any]) -> torch.Tensor | None:
    """A tuple's first element when it is one number followed by batched tensors: ``(loss, logits)``."""
    first = outputs[0]
    if not isinstance(first, torch.Tensor) or first.dim() != 0 or len(outputs) < 2:
        return None
    return first if isinstance(outputs[1], torch.Tensor) and outputs[1].dim() > 0 else None


def for_predict(outputs: Any) -> Any:
    """What ``predict`` keeps of one batch's outputs: a Mapping (or ``ModelOutput``) without its
    ``loss`` and without entries that are not tensors or tensor structures (None, caches); that
    one value when a single one is left. Tensors and tuples are kept as they are.

    Example:
        >>> for_predict({"loss": torch.ones(()), "logits": torch.ones(2, 3), "hidden": None}).shape
        torch.Size([2, 3])
    """
    named = entries(outputs)
    if not named:
        return outputs
    kept = {key: value for key, value in named.items() if key != _SKIPPED and _holds_tensors(value)}
    return next(iter(kept.values())) if len(kept) == 1 else kept


def _holds_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_holds_tensors(item) for item in value)
    return isinstance(value, Mapping) and bool(value) and all(_holds_tensors(item) for item in value.values())


def outline(outputs: Any) -> str:
    """A short description of a structure of outputs, naming keys and shapes.

    Example:
        >>> outline({"loss": torch.ones(()), "logits": torch.ones(2, 3)})
        'dict with loss (), logits (2, 3)'
    """
    named = entries(outputs)
    if named:
        parts = [f"{key} {_shape(value)}" for key, value in named.items()]
        return f"{type(outputs).__name__} with {', '.join(parts)}"
    if isinstance(outputs, (tuple, list)):
        return f"{type(outputs).__name__} of {', '.join(_shape(value) for value in outputs)}"
    return _shape(outputs)


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    return "None" if value is None else type(value).__name__
