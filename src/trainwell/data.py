"""Recognising and converting the data users pass: in-memory tensors and arrays, the ``Batch``
one step trains on, validation splits, and the shuffled order of each epoch.

Owns: what counts as inputs, targets and sample weights, array conversion, and the order, which
is a function of (seed, epoch) only. Must not batch over epochs (``batches``) or run the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Subset, TensorDataset

from trainwell.errors import config_error, data_error, describe
from trainwell.structures import map_tensors, sample_count, tensors_of

ACCEPTED = (
    "(inputs, targets) as tensors or numpy arrays, a torch Dataset, a DataLoader, "
    "or an iterable of (inputs, targets) batches"
)
TARGET_KEY = "labels"  # where a batch that is one Mapping keeps its targets (Hugging Face's convention)


class Batch(NamedTuple):
    """One batch on the training device.

    Attributes:
        inputs: A tensor, a tuple of tensors (``model(*inputs)``) or a dict (``model(**inputs)``).
        targets: The targets (a tensor, or a tuple or dict of them for several output heads), or
            None for data without targets. A batch that is one Mapping holding ``labels`` has
            them both among its inputs (the model computes its loss from them) and as targets.
        size: Number of samples that count, known on the host without a device synchronisation
            (0 for a process's placeholder in the ragged last step of a torchrun job).
        weights: Per-sample loss weights (from a third data element), or None.
        global_size: The samples of this step over all processes (``size`` in one process).
    """

    inputs: Any
    targets: Any
    size: int
    weights: torch.Tensor | None = None
    global_size: int = 0


Repair = Callable[[Batch], Batch]


@dataclass
class InMemory:
    """Data held as tensors: inputs (tensor, tuple or dict of tensors), optional targets (a
    tensor, or a tuple or dict of them) and optional per-sample weights."""

    inputs: Any
    targets: Any
    weights: torch.Tensor | None = None

    def __len__(self) -> int:
        return _length(self.inputs)

    @classmethod
    def of(cls, batch: Batch) -> InMemory:
        """The in-memory data of one (whole-data) batch."""
        return cls(batch.inputs, batch.targets, batch.weights)

    def take(self, index: torch.Tensor | slice, size: int | None = None, global_size: int | None = None) -> Batch:
        """Rows ``index`` as a batch (an index tensor gathers, a slice views); ``size`` and
        ``global_size`` default to the number of rows."""
        if isinstance(self.inputs, torch.Tensor):  # the common case, once per step: no generic walk
            inputs: Any = _rows(self.inputs, index)
            rows = inputs.shape[0]
        else:
            inputs = map_tensors(self.inputs, lambda tensor: _rows(tensor, index))
            rows = _length(inputs)
        if isinstance(self.targets, torch.Tensor):
            targets: Any = _rows(self.targets, index)
        else:
            targets = map_tensors(self.targets, lambda tensor: _rows(tensor, index))
        weights = None if self.weights is None else _rows(self.weights, index)
        size = rows if size is None else size
        return Batch(inputs, targets, size, weights, size if global_size is None else global_size)

    def nbytes(self) -> int:
        """The memory its tensors take."""
        tensors = [*tensors_of(self.inputs), *tensors_of(self.targets), self.weights]
        return sum(tensor.nbytes for tensor in tensors if isinstance(tensor, torch.Tensor))

    def to(self, device: torch.device) -> InMemory:
        """The same data on ``device``; a tensor held twice (a dict's ``labels``, which are also
        the targets) is moved once."""
        moved: dict[int, torch.Tensor] = {}

        def move(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in moved:
                moved[id(tensor)] = tensor.to(device)
            return moved[id(tensor)]

        weights = None if self.weights is None else move(self.weights)
        return InMemory(map_tensors(self.inputs, move), map_tensors(self.targets, move), weights)


def _rows(tensor: torch.Tensor, index: torch.Tensor | slice) -> torch.Tensor:
    if isinstance(index, slice):
        return tensor[index]
    if index.device != tensor.device:
        index = index.to(tensor.device, non_blocking=True)
    return tensor.index_select(0, index)


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled sample order of ``epoch``: the same for the same (seed, epoch), always.

    Example:
        >>> torch.equal(epoch_order(10, seed=1, epoch=3), epoch_order(10, seed=1, epoch=3))
        True
    """
    generator = torch.Generator().manual_seed(mix_seeds(seed, epoch))
    return torch.randperm(num_samples, generator=generator)


def mix_seeds(seed: int, value: int) -> int:
    """A 63-bit seed derived from two integers."""
    return (seed * 6364136223846793005 + value * 1442695040888963407 + 1) % (2**63)


def split_batch(raw: Any, target_key: str | None = TARGET_KEY) -> Batch:
    """Read one batch as yielded by a DataLoader or iterable: ``(inputs, targets)``,
    ``(inputs, targets, sample_weights)``, ``(inputs,)`` or bare inputs (a tensor or dict); a
    Mapping (a dict, a ``BatchEncoding``) holding ``target_key`` has its targets there.

    Raises:
        DataError: A batch of another shape.
    """
    if isinstance(raw, (tuple, list)):
        if len(raw) in (2, 3):
            weights = _as_tensor(raw[2], "sample weights") if len(raw) == 3 else None
            size = _length(raw[0])
            return Batch(raw[0], _as_targets(raw[1]), size, weights, size)
        if len(raw) == 1:
            size = _length(raw[0])
            return Batch(raw[0], None, size, None, size)
        raise data_error(
            "Each batch must be (inputs, targets), (inputs, targets, sample_weights) or (inputs,).",
            f"a batch of {len(raw)} elements: {describe(raw)}",
            "yield (inputs, targets); put several model inputs in a tuple or dict: ((x1, x2), y).",
        )
    if isinstance(raw, (torch.Tensor, Mapping)):
        size = _length(raw)
        targets = raw.get(target_key) if isinstance(raw, Mapping) and target_key is not None else None
        return Batch(raw, targets, size, None, size)
    raise data_error(
        "Each batch must be (inputs, targets) or (inputs,).", describe(raw), "yield (inputs, targets) tuples."
    )


def as_in_memory(data: Any, dtype: torch.dtype, target_key: str | None = TARGET_KEY) -> InMemory | None:
    """Recognise in-memory data, converting arrays; None when ``data`` is another kind. A dict
    holding ``target_key`` keeps its targets there (they stay among the model's inputs too)."""
    if isinstance(data, TensorDataset):
        tensors = data.tensors
        if len(tensors) not in (1, 2, 3):
            raise data_error(
                "A TensorDataset must hold (inputs,), (inputs, targets) or (inputs, targets, sample_weights).",
                f"{len(tensors)} tensors",
                "build it as TensorDataset(x, y).",
            )
        return _in_memory(*tensors, dtype=dtype) if len(tensors) > 1 else _in_memory(tensors[0], None, dtype=dtype)
    if _is_array(data) or (isinstance(data, Mapping) and _is_array_structure(data)):
        memory = _in_memory(data, None, dtype=dtype)
        if isinstance(data, Mapping) and target_key is not None and target_key in data:
            memory.targets = memory.inputs[target_key]
        return memory
    if isinstance(data, tuple) and len(data) == 1 and _is_array_structure(data[0]):
        return _in_memory(data[0], None, dtype=dtype)
    is_sequence = isinstance(data, (tuple, list)) and len(data) in (2, 3)
    is_targets = is_sequence and (_is_array(data[1]) or _is_head_targets(data))
    if is_targets and _is_array_structure(data[0]) and all(_is_array(part) for part in data[2:]):
        return _in_memory(*data, dtype=dtype)
    return None


def _in_memory(inputs: Any, targets: Any, weights: Any = None, *, dtype: torch.dtype) -> InMemory:
    inputs = _map_inputs(inputs, lambda part: _convert(part, "inputs", dtype))
    converted = None if targets is None else _map_inputs(targets, lambda part: _convert(part, "targets", dtype))
    sample_weights = None if weights is None else _convert(weights, "sample weights", dtype)
    lengths = {_length(part) for part in tensors_of(inputs)}
    lengths |= {_length(part) for part in [*tensors_of(converted), sample_weights] if part is not None}
    if len(lengths) > 1:
        raise data_error(
            "Inputs, targets and sample weights must have the same number of samples (first dimension).",
            f"inputs {describe(inputs)}; targets {describe(converted)}; weights {describe(sample_weights)}",
            "pass one target (and weight) per sample; check the data was not sliced differently.",
        )
    return InMemory(inputs, converted, sample_weights)


def _map_inputs(inputs: Any, fn: Callable[[Any], torch.Tensor]) -> Any:
    """``fn`` over a flat structure of arrays (numpy arrays are not tensors yet)."""
    if isinstance(inputs, Mapping):
        return {key: fn(value) for key, value in inputs.items()}
    return tuple(fn(value) for value in inputs) if isinstance(inputs, tuple) else fn(inputs)


def _convert(value: Any, role: str, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype == object or not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
            raise data_error(
                f"The {role} array must be numeric.",
                f"numpy array of dtype {value.dtype}",
                "convert it to numbers, e.g. np.asarray(values, dtype=np.float32), or encode labels as integers.",
            )
        value = torch.from_numpy(np.ascontiguousarray(value))
    tensor = _as_tensor(value, role)
    if tensor.layout != torch.strided:
        layout = str(tensor.layout).removeprefix("torch.")
        raise data_error(
            f"The {role} are a {layout} tensor: trainwell batches in-memory data by selecting rows, which "
            "sparse layouts do not support.",
            f"{describe(tensor)}, layout {layout}",
            "convert them with .to_dense() when they fit in memory, or pass a DataLoader whose collate_fn builds "
            "the sparse batches your model takes.",
        )
    if tensor.dim() == 0:
        raise data_error(f"The {role} must have a sample dimension.", describe(tensor), "pass one row per sample.")
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


def _as_targets(value: Any) -> Any:
    """Targets as a tensor, or a tuple or dict of them (one per output head)."""
    if isinstance(value, Mapping):
        return {key: _as_tensor(part, "targets") for key, part in value.items()}
    if isinstance(value, (tuple, list)) and value and all(_is_array(part) for part in value):
        return tuple(_as_tensor(part, "targets") for part in value)
    return _as_tensor(value, "targets")


def _is_head_targets(data: Any) -> bool:
    """``(inputs, (y1, y2))`` or ``(inputs, {"a": y1, "b": y2})``: targets of several output heads.
    The data must be a tuple (a list of two ``(x, y)`` batches is an iterable of batches)."""
    targets = data[1]
    if not isinstance(data, tuple) or isinstance(targets, list) or not _is_array_structure(targets):
        return False
    return not _is_array(targets)


def _as_tensor(value: Any, role: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise data_error(
        f"The {role} must be a tensor or numpy array.",
        describe(value),
        f"convert the {role} with torch.as_tensor(...).",
    )


def _is_array(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _is_array_structure(value: Any) -> bool:
    """A tensor/array, or a dict or tuple of them (several model inputs)."""
    if _is_array(value):
        return True
    if isinstance(value, Mapping):
        return bool(value) and all(_is_array(part) for part in value.values())
    return isinstance(value, tuple) and bool(value) and all(_is_array(part) for part in value)


def _length(structure: Any) -> int:
    leaves = tensors_of(structure) if isinstance(structure, (torch.Tensor, Mapping, tuple, list)) else []
    count = sample_count(structure)
    if count is None or len(leaves) != _array_count(structure):
        raise data_error(
            "Model inputs must be a tensor, or a tuple or dict of tensors.",
            describe(structure),
            "convert the inputs with torch.as_tensor(...).",
        )
    return count


def _array_count(structure: Any) -> int:
    """The values of a flat structure (a tensor counts as one)."""
    if _is_array(structure):
        return 1
    return len(structure) if isinstance(structure, (Mapping, tuple, list)) else 0


def split_validation(
    data: Any, fraction: float, seed: int, dtype: torch.dtype, target_key: str | None = TARGET_KEY
) -> tuple[Any, Any]:
    """Hold out ``fraction`` of ``data`` (a random subset, reproducible from ``seed``).

    Returns:
        (train, val), each in a form ``to_batches`` accepts.

    Raises:
        ConfigError: Data that cannot be split (a DataLoader or iterable of batches).
    """
    in_memory = as_in_memory(data, dtype, target_key)
    sized = isinstance(data, Dataset) and hasattr(data, "__len__")
    total = len(in_memory) if in_memory is not None else len(data) if sized else None
    if total is None:
        streamed = isinstance(data, IterableDataset) or isinstance(getattr(data, "dataset", None), IterableDataset)
        raise config_error(
            "val_split needs in-memory data or a Dataset; a DataLoader, an IterableDataset (a stream, with no "
            "length) or an iterable of batches cannot be split.",
            describe(data),
            "pass validation data with val=..." + ("" if streamed else ", or pass a Dataset instead of a DataLoader."),
        )
    held_out = round(total * fraction)
    if held_out == 0 or held_out == total:
        raise data_error(
            "val_split leaves no samples on one side.",
            f"val_split={fraction} of {total} samples = {held_out} validation samples",
            "use a val_split that holds out at least one sample and keeps at least one for training.",
        )
    order = epoch_order(total, seed, -1)
    val_index, train_index = order[:held_out].sort().values, order[held_out:].sort().values
    if in_memory is not None:
        return tuple_of(in_memory, train_index), tuple_of(in_memory, val_index)
    return Subset(data, train_index.tolist()), Subset(data, val_index.tolist())


def tuple_of(data: InMemory, index: torch.Tensor) -> tuple[Any, ...]:
    """Rows ``index`` of in-memory data, as the tuple ``to_batches`` takes."""
    batch = data.take(index)
    if batch.targets is None:
        return (batch.inputs,)
    return (batch.inputs, batch.targets) if batch.weights is None else (batch.inputs, batch.targets, batch.weights)
