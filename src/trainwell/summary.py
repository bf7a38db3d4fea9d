"""``summary``: a model's layers, output shapes and parameter counts, from one forward pass.

Owns: inspecting a model. Leaves the model's weights, modes and the random state as they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainwell.errors import data_error, describe
from trainwell.models import call_model, probing


@dataclass(frozen=True)
class LayerRow:
    """One leaf module: its dotted name, class, output shape and own parameter counts."""

    name: str
    kind: str
    output_shape: str
    parameters: int
    trainable: int


@dataclass(frozen=True)
class ModelSummary:
    """The table ``summary`` returns; ``print(summary)`` shows it.

    Attributes:
        rows: One per leaf module, in call order.
        total / trainable / frozen: Parameter counts of the whole model.
        output_shape: The shape of the model's output.
    """

    rows: list[LayerRow]
    total: int
    trainable: int
    frozen: int
    output_shape: str

    def __str__(self) -> str:
        header = ("layer", "type", "output shape", "parameters")
        lines = [
            (
                row.name,
                row.kind,
                row.output_shape,
                f"{row.parameters:,}" + ("" if row.trainable == row.parameters else " (frozen)"),
            )
            for row in self.rows
        ]
        widths = [max(len(line[column]) for line in [header, *lines]) for column in range(4)]
        rule = "-" * (sum(widths) + 6)
        table = [rule, "  ".join(text.ljust(width) for text, width in zip(header, widths, strict=True)), rule]
        table += ["  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)) for line in lines]
        table += [
            rule,
            f"parameters: {self.total:,} (trainable {self.trainable:,}, frozen {self.frozen:,})",
            f"output shape: {self.output_shape}",
        ]
        return "\n".join(table)


def summary(model: nn.Module, example_input: Any) -> ModelSummary:
    """Run ``model`` once on ``example_input`` and list its layers.

    Args:
        model: Any module.
        example_input: A batch of inputs as the model takes them: a tensor, a tuple
            (``model(*inputs)``) or a dict (``model(**inputs)``).

    Returns:
        A ``ModelSummary``; ``print`` it for the table.

    Raises:
        DataError: The model fails on the example input (the message names its shapes).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> result = summary(model, torch.zeros(1, 4))
        >>> [(row.name, row.output_shape, row.parameters) for row in result.rows]
        [('0', '(1, 8)', 40), ('1', '(1, 8)', 0), ('2', '(1, 2)', 18)]
        >>> result.total, result.trainable
        (58, 58)
    """
    rows: list[LayerRow] = []
    leaves = [(name, module) for name, module in model.named_modules() if not any(module.children())]

    def recorder(name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            own = list(module.parameters(recurse=False))
            count = sum(parameter.numel() for parameter in own)
            trainable = sum(parameter.numel() for parameter in own if parameter.requires_grad)
            rows.append(
                LayerRow(name or type(module).__name__, type(module).__name__, _shape(output), count, trainable)
            )

        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in leaves]
    try:
        device = next(model.parameters(), torch.empty(0)).device
        with probing(model, device):
            output = call_model(model, example_input)
    except RuntimeError as error:
        raise data_error(
            f"The model failed on the example input: {error}",
            describe(example_input),
            "pass a batch shaped like the training inputs, e.g. x[:1].",
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    parameters = list(model.parameters())
    total = sum(parameter.numel() for parameter in parameters)
    trainable = sum(parameter.numel() for parameter in parameters if parameter.requires_grad)
    return ModelSummary(rows, total, trainable, total - trainable, _shape(output))


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "(" + ", ".join(map(str, value.shape)) + ")"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_shape(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_shape(item)}" for key, item in value.items()) + "}"
    return type(value).__name__
