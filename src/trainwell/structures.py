"""The one walker of the nested structures batches are made of: a tensor, or a tuple, list,
dict or other Mapping of tensors (model inputs for ``model(*inputs)`` / ``model(**inputs)``).

Owns: mapping a function over the tensors, listing them, and counting samples. Must not know
about models, losses or batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch


def map_tensors(structure: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``fn`` applied to each tensor of a tensor, tuple/list or Mapping (a Mapping becomes a dict,
    a list a tuple); other values are kept as they are.

    Example:
        >>> map_tensors({"a": torch.ones(2)}, lambda tensor: tensor * 2)["a"].tolist()
        [2.0, 2.0]
    """
    if isinstance(structure, torch.Tensor):
        return fn(structure)
    if isinstance(structure, Mapping):
        return {key: map_tensors(value, fn) for key, value in structure.items()}
    if isinstance(structure, (tuple, list)):
        return tuple(map_tensors(value, fn) for value in structure)
    return structure


def tensors_of(structure: Any) -> list[torch.Tensor]:
    """Every tensor in ``structure``, depth first, in order.

    Example:
        >>> len(tensors_of((torch.ones(1), {"b": torch.ones(2)}, "text")))
        2
    """
    if isinstance(structure, torch.Tensor):
        return [structure]
    if isinstance(structure, Mapping):
        return [tensor for value in structure.values() for tensor in tensors_of(value)]
    if isinstance(structure, (tuple, list)):
        return [tensor for value in structure for tensor in tensors_of(value)]
    return []


def named_tensors(structure: Any, name: str) -> list[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for each tensor, the path written as Python would index it.

    Example:
        >>> [path for path, _ in named_tensors({"a": (torch.ones(1), torch.ones(1))}, "inputs")]
        ["inputs['a'][0]", "inputs['a'][1]"]
    """
    if isinstance(structure, torch.Tensor):
        return [(name, structure)]
    if isinstance(structure, Mapping):
        items: Any = structure.items()
    elif isinstance(structure, (tuple, list)):
        items = enumerate(structure)
    else:
        return []
    return [pair for key, value in items for pair in named_tensors(value, f"{name}[{key!r}]")]


def sample_count(structure: Any) -> int | None:
    """The number of samples: the first dimension of the first tensor (None without tensors).

    Example:
        >>> sample_count((torch.ones(5, 2), torch.ones(5)))
        5
    """
    tensors = tensors_of(structure)
    if not tensors or tensors[0].dim() == 0:
        return None
    return int(tensors[0].shape[0])
