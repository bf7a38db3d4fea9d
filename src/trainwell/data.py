"""Turns every accepted kind of data into ``Batches`` with ``for_epoch(epoch, skip)``.

Owns: recognising input kinds (tensors/arrays, Dataset, DataLoader, iterables of batches),
converting arrays, validation splits, and the shuffled order, which is a function of
(seed, epoch) only. Must not run the model or compute losses.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
    default_collate,
    get_worker_info,
)

from trainwell.errors import config_error, data_error, describe

ACCEPTED = (
    "(inputs, targets) as tensors or numpy arrays, a torch Dataset, a DataLoader, "
    "or an iterable of (inputs, targets) batches"
)


class Batch(NamedTuple):
    """One batch on the training device.

    Attributes:
        inputs: A tensor, a tuple of tensors (``model(*inputs)``) or a dict (``model(**inputs)``).
        targets: The targets, or None for data without targets.
        size: Number of samples, known on the host without a device synchronisation.
        weights: Per-sample loss weights (from a third data element), or None.
        share: Multiplies the loss before backward so that, averaged by DistributedDataParallel,
            the gradient is the mean over the global batch (1 except for a ragged last step).
    """

    inputs: Any
    targets: torch.Tensor | None
    size: int
    weights: torch.Tensor | None = None
    share: float = 1.0


@dataclass(frozen=True)
class Shard:
    """One process's share of every batch in a job of ``world_size`` processes.

    Global step k covers positions ``[k*N*B, (k+1)*N*B)`` of the epoch's order (N processes,
    B per process); rank r takes every N-th of them, starting at r. So N processes with batch B
    see exactly the batches one process with batch N*B would.

    Attributes:
        rank / world_size: This process and the job's size.
        pad: Training: every rank makes the same number of steps; a rank left without samples
            in a ragged last step gets one sample with ``share=0`` (it counts for nothing).
            Evaluation (False): each rank reads only its own samples, none twice.
    """

    rank: int
    world_size: int
    pad: bool

    def steps(self, total: int, batch_size: int) -> int:
        """Batches per epoch on this rank."""
        if self.pad:
            return -(-total // (batch_size * self.world_size))
        mine = len(range(self.rank, total, self.world_size))
        return -(-mine // batch_size)

    def windows(self, order: torch.Tensor, batch_size: int, skip: int) -> Iterator[tuple[torch.Tensor, int, float]]:
        """(this rank's positions, its sample count, its share) for each step after ``skip``."""
        width = batch_size * self.world_size
        if not self.pad:
            mine = order[self.rank :: self.world_size]
            for start in range(skip * batch_size, len(mine), batch_size):
                part = mine[start : start + batch_size]
                yield part, len(part), 1.0
            return
        for start in range(skip * width, len(order), width):
            window = order[start : start + width]
            part = window[self.rank :: self.world_size]
            if len(part) == 0:
                yield window[:1], 0, 0.0
            else:
                yield part, len(part), len(part) * self.world_size / len(window)


class Batches(Protocol):
    """What the loop iterates: the same batches, in an order that depends only on the epoch."""

    num_batches: int | None
    num_samples: int | None

    def for_epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """Yield the batches of ``epoch``, leaving out the first ``skip``."""
        ...

    def sample(self, count: int) -> Batch:
        """The first ``count`` samples (or the first batch), for checks before training."""
        ...

    def repair(self, fix: Repair) -> None:
        """Apply ``fix`` to every batch (in-memory data: once, to all of it)."""
        ...

    def skip_single_batches(self) -> None:
        """Leave out batches of one sample (BatchNorm cannot train on them)."""
        ...


Repair = Callable[[Batch], Batch]


@dataclass
class InMemory:
    """Data held as tensors: inputs (tensor, tuple or dict of tensors), optional targets and
    optional per-sample weights."""

    inputs: Any
    targets: torch.Tensor | None
    weights: torch.Tensor | None = None

    def __len__(self) -> int:
        return _length(self.inputs)

    @classmethod
    def of(cls, batch: Batch) -> InMemory:
        """The in-memory data of one (whole-data) batch."""
        return cls(batch.inputs, batch.targets, batch.weights)

    def take(self, index: torch.Tensor | slice) -> Batch:
        """Rows ``index`` as a batch (an index tensor gathers, a slice views)."""
        if isinstance(self.inputs, torch.Tensor):  # the common case, once per step: no generic walk
            inputs: Any = _rows(self.inputs, index)
            size = inputs.shape[0]
        else:
            inputs = _map_tensors(self.inputs, lambda tensor: _rows(tensor, index))
            size = _length(inputs)
        targets = None if self.targets is None else _rows(self.targets, index)
        weights = None if self.weights is None else _rows(self.weights, index)
        return Batch(inputs, targets, size, weights)

    def nbytes(self) -> int:
        """The memory its tensors take."""
        tensors = [*_leaves(self.inputs), self.targets, self.weights]
        return sum(tensor.nbytes for tensor in tensors if isinstance(tensor, torch.Tensor))

    def to(self, device: torch.device) -> InMemory:
        """The same data on ``device``."""

        def move(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device)

        targets = None if self.targets is None else move(self.targets)
        weights = None if self.weights is None else move(self.weights)
        return InMemory(_map_tensors(self.inputs, move), targets, weights)


DEVICE_DATA_SHARE = 0.25


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether in-memory data of ``nbytes`` should live on ``device`` for the whole fit: on a
    GPU, when it takes at most ``DEVICE_DATA_SHARE`` of the free memory (the rest is left to the
    model, its gradients, optimizer state and activations)."""
    if device.type != "cuda":
        return False
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes <= free * DEVICE_DATA_SHARE


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
    generator = torch.Generator().manual_seed(_mix(seed, epoch))
    return torch.randperm(num_samples, generator=generator)


class TensorBatches:
    """In-memory data batched by slicing a shuffled index (no per-sample indexing or collate).

    On a GPU the data moves there once, at the first epoch, when it fits (``fits_on_device``):
    each step then gathers its batch on the device, with no host-to-device copy. Otherwise each
    batch is gathered on the host into pinned memory and copied without blocking.
    """

    def __init__(self, data: InMemory, *, batch_size: int, shuffle: bool, seed: int, device: torch.device) -> None:
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.device = device
        self.num_samples: int | None = len(data)
        self.num_batches: int | None = -(-len(data) // batch_size)
        self.drops_single_last = False
        self._drop_last = False
        self.shard: Shard | None = None
        self.on_device = device.type == "cpu"

    def _keep_on_device(self) -> None:
        if not self.on_device and fits_on_device(self.data.nbytes(), self.device):
            self.data = self.data.to(self.device)
            self.on_device = True

    def set_shard(self, shard: Shard) -> None:
        """Deliver only this process's share of each batch."""
        self.shard = shard
        self.num_batches = shard.steps(self._end(), self.batch_size)

    def _end(self) -> int:
        total = len(self.data)
        if self._drop_last:
            return total - total % self.batch_size
        return total - 1 if self.drops_single_last else total

    @property
    def drop_last(self) -> bool:
        """Whether an incomplete last batch is left out."""
        return self._drop_last

    @drop_last.setter
    def drop_last(self, value: bool) -> None:
        self._drop_last = value
        self.num_batches = len(self.data) // self.batch_size if value else -(-len(self.data) // self.batch_size)

    def for_epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        self._keep_on_device()
        total, end = len(self.data), self._end()
        where = self.device if self.on_device else torch.device("cpu")  # where the steps slice the order
        order = epoch_order(total, self.seed, epoch).to(where) if self.shuffle else None
        if self.shard is not None:
            positions = (torch.arange(total, device=where) if order is None else order)[:end]
            for rows, size, share in self.shard.windows(positions, self.batch_size, skip):
                yield _to_device(self.data.take(rows)._replace(size=size, share=share), self.device)
            return
        for start in range(skip * self.batch_size, end, self.batch_size):
            stop = min(start + self.batch_size, end)
            index = slice(start, stop) if order is None else order[start:stop]
            yield _to_device(self.data.take(index), self.device)

    def sample(self, count: int) -> Batch:
        return _to_device(self.data.take(slice(0, count)), self.device)

    def repair(self, fix: Repair) -> None:
        self.data = InMemory.of(fix(self.data.take(slice(None))))

    def skip_single_batches(self) -> None:
        if len(self.data) % self.batch_size == 1 and len(self.data) > 1:
            self.drops_single_last = True  # a different sample each epoch when shuffled
            self.num_batches = len(self.data) // self.batch_size


class _Streamed:
    """What Dataset- and DataLoader-backed batches share: per-batch repairs and skips."""

    device: torch.device

    def __init__(self) -> None:
        self.fix: Repair | None = None
        self.skips_single = False

    def repair(self, fix: Repair) -> None:
        previous = self.fix
        self.fix = fix if previous is None else lambda batch: fix(previous(batch))

    def skip_single_batches(self) -> None:
        self.skips_single = True

    def _deliver(self, raws: Iterable[Any]) -> Iterator[Batch]:
        for raw in raws:
            batch = _to_device(split_batch(raw), self.device)
            if self.skips_single and batch.size == 1:
                continue
            yield batch if self.fix is None else self.fix(batch)


class DatasetBatches(_Streamed):
    """A map-style Dataset, read through a DataLoader whose order comes from ``epoch_order``.

    Workers' random numbers are reseeded per sample from (seed, epoch, position), so random
    augmentation is the same whichever worker loads a sample, and after a mid-epoch resume.

    Args:
        loader_options: Further DataLoader arguments (``num_workers``, ``collate_fn``,
            ``pin_memory``, ``worker_init_fn``, ...), e.g. those of a DataLoader the user built.
        drop_last: Leave out an incomplete last batch.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        device: torch.device,
        drop_last: bool = False,
        loader_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.device = device
        self.drop_last = drop_last
        self.loader_options = {"pin_memory": device.type == "cuda", **(loader_options or {})}
        # Only worker processes need seeding per sample; in the main process the run's own
        # random stream (which checkpoints capture) already makes augmentation reproducible.
        self.seeded = bool(self.loader_options.get("num_workers"))
        total = len(dataset)  # type: ignore[arg-type]
        self.num_samples: int | None = total
        self.num_batches: int | None = total // batch_size if drop_last else -(-total // batch_size)
        self.shard: Shard | None = None

    def set_shard(self, shard: Shard) -> None:
        """Deliver only this process's share of each batch."""
        self.shard = shard
        total = len(self.dataset)  # type: ignore[arg-type]
        self.num_batches = shard.steps(total - total % self.batch_size if self.drop_last else total, self.batch_size)

    def _loader(self, keys: Sequence[Any], epoch: int, batch_sizes: list[int] | None = None) -> DataLoader[Any]:
        generator = torch.Generator().manual_seed(_mix(self.seed, epoch))  # not torch's global generator
        if batch_sizes is not None:  # sharded: batches of the given sizes, in order
            bounds = [sum(batch_sizes[:position]) for position in range(len(batch_sizes) + 1)]
            batch_sampler = [list(keys[bounds[i] : bounds[i + 1]]) for i in range(len(batch_sizes))]
            return DataLoader(self._source(), batch_sampler=batch_sampler, generator=generator, **self.loader_options)
        return DataLoader(
            self._source(),
            batch_size=self.batch_size,
            sampler=keys,
            drop_last=self.drop_last,
            generator=generator,
            **self.loader_options,
        )

    def _source(self) -> Dataset[Any]:
        return _SeededSamples(self.dataset) if self.seeded else self.dataset

    def for_epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        total = len(self.dataset)  # type: ignore[arg-type]
        order = epoch_order(total, self.seed, epoch).tolist() if self.shuffle else list(range(total))
        base = _mix(self.seed, epoch)
        keys: list[Any] = (
            [(index, _mix(base, position)) for position, index in enumerate(order)] if self.seeded else order
        )
        if self.shard is None:
            yield from self._deliver(self._loader(keys[skip * self.batch_size :], epoch))
            return
        end = len(keys) - len(keys) % self.batch_size if self.drop_last else len(keys)
        plan = list(self.shard.windows(torch.arange(end), self.batch_size, skip))
        chosen = [keys[position] for positions, _, _ in plan for position in positions.tolist()]
        batches = self._deliver(self._loader(chosen, epoch, batch_sizes=[len(positions) for positions, _, _ in plan]))
        for batch, (_, size, share) in zip(batches, plan, strict=True):
            yield batch._replace(size=size, share=share)

    def sample(self, count: int) -> Batch:
        indices = list(range(min(count, len(self.dataset))))  # type: ignore[arg-type]
        worker_only = ("num_workers", "prefetch_factor", "multiprocessing_context")
        options = {key: value for key, value in self.loader_options.items() if key not in worker_only}
        loader = DataLoader(self.dataset, batch_size=len(indices), sampler=indices, **options)
        return _to_device(split_batch(next(iter(loader))), self.device)


class _SeededSamples(Dataset[Any]):
    """Reads ``dataset[index]`` for keys ``(index, seed)``; in a worker process it first seeds
    torch, random and numpy with ``seed`` (in the main process the run's own random stream,
    which checkpoints capture, is left alone)."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if get_worker_info() is not None:
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
        return self.dataset[index]


def _mix(seed: int, value: int) -> int:
    """A 63-bit seed derived from two integers."""
    return (seed * 6364136223846793005 + value * 1442695040888963407 + 1) % (2**63)


class LoaderBatches(_Streamed):
    """A user's DataLoader or re-iterable collection of batches, used as given."""

    def __init__(self, iterable: Iterable[Any], *, device: torch.device) -> None:
        super().__init__()
        self.iterable = iterable
        self.device = device
        self.num_batches: int | None = _optional_len(iterable)
        dataset = getattr(iterable, "dataset", None)
        self.num_samples: int | None = _optional_len(dataset) if dataset is not None else None

    def for_epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        set_epoch = getattr(getattr(self.iterable, "sampler", None), "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
        yield from self._deliver(raw for position, raw in enumerate(self.iterable) if position >= skip)

    def sample(self, count: int) -> Batch:
        for raw in self.iterable:
            return _to_device(split_batch(raw), self.device)
        if getattr(self.iterable, "drop_last", False):
            raise _dropped_everything(getattr(self.iterable, "batch_size", None), self.num_samples)
        raise data_error("The data yielded no batches.", describe(self.iterable), "pass data with at least one sample.")


def split_batch(raw: Any) -> Batch:
    """Read one batch as yielded by a DataLoader or iterable: ``(inputs, targets)``,
    ``(inputs, targets, sample_weights)``, ``(inputs,)`` or bare inputs (a tensor or dict).

    Raises:
        DataError: A batch of another shape.
    """
    if isinstance(raw, (tuple, list)):
        if len(raw) in (2, 3):
            weights = _as_tensor(raw[2], "sample weights") if len(raw) == 3 else None
            return Batch(raw[0], _as_tensor(raw[1], "targets"), _length(raw[0]), weights)
        if len(raw) == 1:
            return Batch(raw[0], None, _length(raw[0]))
        raise data_error(
            "Each batch must be (inputs, targets), (inputs, targets, sample_weights) or (inputs,).",
            f"a batch of {len(raw)} elements: {describe(raw)}",
            "yield (inputs, targets); put several model inputs in a tuple or dict: ((x1, x2), y).",
        )
    if isinstance(raw, (torch.Tensor, Mapping)):
        return Batch(raw, None, _length(raw))
    raise data_error(
        "Each batch must be (inputs, targets) or (inputs,).", describe(raw), "yield (inputs, targets) tuples."
    )


def to_batches(
    data: Any, *, batch_size: int, shuffle: bool, seed: int, device: torch.device, dtype: torch.dtype
) -> Batches:
    """Dispatch any accepted kind of data to its ``Batches``.

    Args:
        data: See ``ACCEPTED``. A tuple ``(inputs, targets)`` or ``(inputs,)`` of tensors/arrays
            is in-memory data; a bare tensor, array or dict is inputs without targets.
        batch_size: Samples per batch (ignored for DataLoaders and iterables of batches).
        shuffle: Shuffle in-memory data and Datasets every epoch.
        seed: Seeds the shuffled order, together with the epoch.
        device: Where batches are delivered.
        dtype: Floating-point arrays and tensors in memory are cast to this (the model's dtype).

    Raises:
        ConfigError: An unsupported kind of data, with the accepted kinds.
        DataError: Mismatched lengths, empty data, unsupported arrays.
    """
    in_memory = as_in_memory(data, dtype)
    if in_memory is not None:
        if len(in_memory) == 0:
            raise data_error("The data is empty.", describe(data), "pass at least one sample.")
        return TensorBatches(in_memory, batch_size=batch_size, shuffle=shuffle, seed=seed, device=device)
    if isinstance(data, DataLoader):
        if _optional_len(data.dataset) == 0:
            raise data_error("The DataLoader's dataset is empty.", describe(data.dataset), "pass at least one sample.")
        return _from_loader(data, seed=seed, device=device, dtype=dtype)
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        if len(data) == 0:
            raise data_error("The dataset is empty.", describe(data), "pass at least one sample.")
        return DatasetBatches(data, batch_size=batch_size, shuffle=shuffle, seed=seed, device=device)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)):
        if iter(data) is data:
            raise config_error(
                "The data is a one-shot iterator (such as a generator): it would be empty after one pass.",
                describe(data),
                "pass a list of batches, a Dataset or a DataLoader, which can be read every epoch.",
            )
        return LoaderBatches(data, device=device)
    raise config_error("Unsupported kind of data.", describe(data), f"pass {ACCEPTED}.")


def _dropped_everything(batch_size: int | None, samples: int | None) -> Exception:
    return data_error(
        "The DataLoader yields no batches: drop_last=True drops the only, incomplete batch.",
        f"batch_size={batch_size}, {samples} samples, drop_last=True",
        "use a batch_size no larger than the number of samples, or drop_last=False.",
    )


def _from_loader(loader: DataLoader[Any], *, seed: int, device: torch.device, dtype: torch.dtype) -> Batches:
    """A DataLoader with a plain random or sequential sampler is rebuilt on its dataset, so that
    its order is a function of (seed, epoch) (exact resume without replaying data); a
    TensorDataset with the default collate takes the in-memory fast path. Other loaders
    (custom samplers, iterable datasets) are used as given."""
    sampler = loader.sampler
    standard = type(sampler) in (RandomSampler, SequentialSampler) and loader.batch_size is not None
    if not standard or isinstance(loader.dataset, IterableDataset) or not hasattr(loader.dataset, "__len__"):
        return LoaderBatches(loader, device=device)
    shuffle = isinstance(sampler, RandomSampler)
    assert loader.batch_size is not None
    in_memory = as_in_memory(loader.dataset, dtype) if loader.collate_fn is default_collate else None
    if in_memory is not None:
        batches = TensorBatches(in_memory, batch_size=loader.batch_size, shuffle=shuffle, seed=seed, device=device)
        batches.drop_last = loader.drop_last
        if batches.num_batches == 0:
            raise _dropped_everything(loader.batch_size, len(in_memory))
        return batches
    options = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "worker_init_fn": loader.worker_init_fn,
        "timeout": loader.timeout,
    }
    if loader.num_workers:
        options |= {
            "prefetch_factor": loader.prefetch_factor,
            "multiprocessing_context": loader.multiprocessing_context,
        }
    rebuilt = DatasetBatches(
        loader.dataset,
        batch_size=loader.batch_size,
        shuffle=shuffle,
        seed=seed,
        device=device,
        drop_last=loader.drop_last,
        loader_options=options,
    )
    if rebuilt.num_batches == 0:
        raise _dropped_everything(loader.batch_size, rebuilt.num_samples)
    return rebuilt


def as_in_memory(data: Any, dtype: torch.dtype) -> InMemory | None:
    """Recognise in-memory data, converting arrays; None when ``data`` is another kind."""
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
        return _in_memory(data, None, dtype=dtype)
    if isinstance(data, tuple) and len(data) == 1 and _is_array_structure(data[0]):
        return _in_memory(data[0], None, dtype=dtype)
    is_sequence = isinstance(data, (tuple, list)) and len(data) in (2, 3)
    if is_sequence and _is_array_structure(data[0]) and all(_is_array(part) for part in data[1:]):
        return _in_memory(*data, dtype=dtype)
    return None


def _in_memory(inputs: Any, targets: Any, weights: Any = None, *, dtype: torch.dtype) -> InMemory:
    inputs = _map_tensors(inputs, lambda part: _convert(part, "inputs", dtype))
    converted = None if targets is None else _convert(targets, "targets", dtype)
    sample_weights = None if weights is None else _convert(weights, "sample weights", dtype)
    lengths = {_length(part) for part in _leaves(inputs)}
    lengths |= {_length(part) for part in (converted, sample_weights) if part is not None}
    if len(lengths) > 1:
        raise data_error(
            "Inputs, targets and sample weights must have the same number of samples (first dimension).",
            f"inputs {describe(inputs)}; targets {describe(converted)}; weights {describe(sample_weights)}",
            "pass one target (and weight) per sample; check the data was not sliced differently.",
        )
    return InMemory(inputs, converted, sample_weights)


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
    if tensor.dim() == 0:
        raise data_error(f"The {role} must have a sample dimension.", describe(tensor), "pass one row per sample.")
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


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


def _leaves(structure: Any) -> list[torch.Tensor]:
    if isinstance(structure, torch.Tensor):
        return [structure]
    if isinstance(structure, Mapping):
        return list(structure.values())
    return list(structure)


def _map_tensors(structure: Any, fn: Any) -> Any:
    if isinstance(structure, Mapping):
        return {key: fn(value) for key, value in structure.items()}
    if isinstance(structure, (tuple, list)):
        return tuple(fn(value) for value in structure)
    return fn(structure)


def _length(structure: Any) -> int:
    leaves = (
        [structure]
        if _is_array(structure)
        else _leaves(structure)
        if isinstance(structure, (Mapping, tuple, list))
        else []
    )
    if not leaves or not all(_is_array(leaf) for leaf in leaves):
        raise data_error(
            "Model inputs must be a tensor, or a tuple or dict of tensors.",
            describe(structure),
            "convert the inputs with torch.as_tensor(...).",
        )
    return int(leaves[0].shape[0])


def _optional_len(value: Any) -> int | None:
    try:
        return len(value)
    except TypeError:
        return None


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch

    def move(tensor: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
            tensor = tensor.pin_memory()  # a copy from pinned memory does not block the host
        return tensor.to(device, non_blocking=True)

    targets = None if batch.targets is None else move(batch.targets)
    weights = None if batch.weights is None else move(batch.weights)
    return Batch(_map_tensors(batch.inputs, move), targets, batch.size, weights)


def split_validation(data: Any, fraction: float, seed: int, dtype: torch.dtype) -> tuple[Any, Any]:
    """Hold out ``fraction`` of ``data`` (a random subset, reproducible from ``seed``).

    Returns:
        (train, val), each in a form ``to_batches`` accepts.

    Raises:
        ConfigError: Data that cannot be split (a DataLoader or iterable of batches).
    """
    in_memory = as_in_memory(data, dtype)
    total = len(in_memory) if in_memory is not None else _optional_len(data) if isinstance(data, Dataset) else None
    if total is None:
        raise config_error(
            "val_split needs in-memory data or a Dataset; a DataLoader or iterable of batches cannot be split.",
            describe(data),
            "pass validation data with val=..., or pass a Dataset instead of a DataLoader.",
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
