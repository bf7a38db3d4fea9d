"""Batch sources and the one batch plan that owns their geometry.

Owns: how many batches an epoch has, which samples each process takes in each of them and how
much each batch counts (the ``BatchPlan``), and the sources that deliver them on the device:
in-memory tensors, map-style Datasets (and the DataLoaders rebuilt on them), and loaders used
as given. Nothing else computes batch counts, tails or shards. Must not run the model.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterable, Iterator, Mapping
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
    TensorDataset,
    default_collate,
    get_worker_info,
)

from trainwell.data import (
    ACCEPTED,
    TARGET_KEY,
    Batch,
    InMemory,
    Repair,
    as_in_memory,
    epoch_order,
    mix_seeds,
    split_batch,
)
from trainwell.errors import TrainwellWarning, config_error, data_error, describe
from trainwell.structures import map_tensors


@dataclass(frozen=True)
class Layout:
    """Where this process stands and what the model can take; the plan's inputs besides the data.

    Attributes:
        rank / world_size: This process and the job's size (0 and 1 outside torchrun).
        lockstep: Training: every process makes the same number of steps, each over its share of
            the same global batch (a process left without samples in a ragged last step gets one
            sample that counts for nothing, so DDP's all-reduce still meets). Evaluation (False):
            each process reads only its own samples, none twice.
        min_batch: The smallest batch the model can train on (2 with BatchNorm in train mode).
    """

    rank: int = 0
    world_size: int = 1
    lockstep: bool = True
    min_batch: int = 1


class Step(NamedTuple):
    """One batch of the plan.

    Attributes:
        positions: The positions in the epoch's order this process takes (a slice, maybe strided).
        size: How many of them count (0 for a process's placeholder in a ragged last step).
        global_size: The samples of this step over all processes.
    """

    positions: slice
    size: int
    global_size: int


@dataclass(frozen=True)
class BatchPlan:
    """The geometry of every epoch, computed once from the sample count, the batch size,
    ``drop_last`` and the ``Layout``.

    In lockstep, global step k covers positions ``[k*N*B, (k+1)*N*B)`` of the epoch's order (N
    processes, B per process) and rank r takes every N-th of them from r: N processes with batch
    B see exactly the batches one process with batch N*B would. When the model needs
    ``min_batch`` > 1 samples, a ragged last step that would leave a process fewer is left out.

    Example:
        >>> plan = BatchPlan(samples=67, batch_size=32, layout=Layout(rank=1, world_size=2, min_batch=2))
        >>> plan.num_batches, plan.left_out
        (1, 3)
    """

    samples: int
    batch_size: int
    drop_last: bool = False
    layout: Layout = Layout()

    @property
    def _width(self) -> int:
        return self.batch_size * self.layout.world_size if self.layout.lockstep else self.batch_size

    @property
    def _shares(self) -> tuple[int, int]:
        """(the samples the plan uses each epoch, the size of a ragged last global step)."""
        layout, width = self.layout, self._width
        end = self.samples - self.samples % width if self.drop_last else self.samples
        if not layout.lockstep:
            return end, 0
        tail = end % width
        smallest = tail // layout.world_size
        if tail and layout.min_batch > 1 and smallest < layout.min_batch:
            return end - tail, 0
        return end, tail

    @property
    def left_out(self) -> int:
        """Samples of each epoch left out because the model cannot take a batch that small."""
        end = self.samples - self.samples % self._width if self.drop_last else self.samples
        return end - self._shares[0]

    @property
    def num_batches(self) -> int:
        """Batches per epoch on this process."""
        end, tail = self._shares
        if self.layout.lockstep:
            return end // self._width + (1 if tail else 0)
        mine = len(range(self.layout.rank, end, self.layout.world_size))
        return -(-mine // self.batch_size)

    def steps(self, skip: int = 0) -> Iterator[Step]:
        """The batches of an epoch after the first ``skip``."""
        layout, width = self.layout, self._width
        end, _ = self._shares
        rank, world = layout.rank, layout.world_size
        if not layout.lockstep:  # rank r's samples r, r+N, ..., in batches of B
            for start in range(skip * width * world, end, width * world):
                positions = slice(start + rank, min(start + width * world, end), world)
                size = len(range(positions.start, positions.stop, world))
                if size:
                    yield Step(positions, size, size)
            return
        for start in range(skip * width, end, width):
            stop = min(start + width, end)
            positions = slice(start + rank, stop, world)
            size = len(range(positions.start, stop, world))
            if size == 0:  # a placeholder: one sample, counted for nothing
                positions = slice(start, start + 1, 1)
            yield Step(positions, size, stop - start)


class Batches(Protocol):
    """What the loop iterates: the same batches, in an order that depends only on the epoch."""

    num_samples: int | None
    batch_size: int | None

    @property
    def num_batches(self) -> int | None:
        """Batches per epoch on this process (None when the source cannot tell)."""
        ...

    @property
    def left_out(self) -> int:
        """Samples per epoch the plan leaves out because the model cannot train on so few."""
        ...

    def for_epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """Yield the batches of ``epoch``, leaving out the first ``skip``."""
        ...

    def sample(self, count: int) -> Batch:
        """The first ``count`` samples (or the first batch), for checks before training."""
        ...

    def repair(self, fix: Repair) -> None:
        """Apply ``fix`` to every batch (in-memory data: once, to all of it)."""
        ...

    def lay_out(self, layout: Layout) -> None:
        """Plan the batches for this process and model.

        Raises:
            ConfigError: A source that cannot be split between processes.
        """
        ...

    def in_memory(self) -> InMemory | None:
        """All of the data, when it is held in memory (for checks over every sample)."""
        ...


DEVICE_DATA_SHARE = 0.25


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether in-memory data of ``nbytes`` should live on ``device`` for the whole fit: on a
    GPU, when it takes at most ``DEVICE_DATA_SHARE`` of the free memory (the rest is left to the
    model, its gradients, optimizer state and activations)."""
    if device.type != "cuda":
        return False
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes <= free * DEVICE_DATA_SHARE


class _Planned:
    """What the sources with a plan share: the plan and its counts."""

    plan: BatchPlan
    batch_size: int | None
    users_size = False  # the batch size is a DataLoader's, not to be changed

    @property
    def num_batches(self) -> int | None:
        return self.plan.num_batches

    @property
    def left_out(self) -> int:
        return self.plan.left_out

    def lay_out(self, layout: Layout) -> None:
        self.plan = BatchPlan(self.plan.samples, self.plan.batch_size, self.plan.drop_last, layout)

    def resize(self, batch_size: int) -> None:
        """Batch ``batch_size`` samples from now on (evaluate's and predict's chosen default)."""
        self.batch_size = batch_size
        self.plan = BatchPlan(self.plan.samples, batch_size, self.plan.drop_last, self.plan.layout)


class TensorBatches(_Planned):
    """In-memory data batched by slicing a shuffled index (no per-sample indexing or collate).

    On a GPU the data moves there once, at the first epoch, when it fits (``fits_on_device``):
    each step then gathers its batch on the device, with no host-to-device copy. Otherwise each
    batch is gathered on the host into pinned memory and copied without blocking.
    """

    def __init__(
        self,
        data: InMemory,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        device: torch.device,
        drop_last: bool = False,
    ) -> None:
        self.data = data
        self.batch_size: int | None = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.device = device
        self.num_samples: int | None = len(data)
        self.plan = BatchPlan(len(data), batch_size, drop_last)
        self.on_device = device.type == "cpu"

    def _keep_on_device(self) -> None:
        if not self.on_device and fits_on_device(self.data.nbytes(), self.device):
            self.data = self.data.to(self.device)
            self.on_device = True

    def for_epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        self._keep_on_device()
        where = self.device if self.on_device else torch.device("cpu")  # where the steps slice the order
        order = epoch_order(len(self.data), self.seed, epoch).to(where) if self.shuffle else None
        on_cpu = self.device.type == "cpu"
        for positions, size, global_size in self.plan.steps(skip):
            batch = self.data.take(positions if order is None else order[positions], size, global_size)
            yield batch if on_cpu else to_device(batch, self.device)

    def sample(self, count: int) -> Batch:
        return to_device(self.data.take(slice(0, count)), self.device)

    def repair(self, fix: Repair) -> None:
        self.data = InMemory.of(fix(self.data.take(slice(None))))

    def in_memory(self) -> InMemory | None:
        return self.data


class _EpochBatches:
    """The batch sampler of a DataLoader built once: it yields the keys of the current epoch's
    batches, which ``DatasetBatches`` sets before each pass (so persistent workers survive)."""

    def __init__(self) -> None:
        self.batches: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class DatasetBatches(_Planned):
    """A map-style Dataset read through one DataLoader whose batches come from the plan, in an
    order that is a function of (seed, epoch).

    With worker processes, each batch carries a seed from (seed, epoch, its first position): the worker that
    loads it seeds torch, random and numpy with it first, so random augmentation is the same
    whichever worker loads a batch, and after a mid-epoch resume. In the main process the run's
    own random stream (which checkpoints capture) is left alone.

    Args:
        loader_options: Further DataLoader arguments (``num_workers``, ``collate_fn``,
            ``pin_memory``, ``persistent_workers``, ...), e.g. those of a DataLoader the user built.
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
        target_key: str | None = TARGET_KEY,
    ) -> None:
        self.fix: Repair | None = None
        self.target_key = target_key
        self.dataset = dataset
        self.batch_size: int | None = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.device = device
        self.loader_options = {"pin_memory": device.type == "cuda", **(loader_options or {})}
        self.seeded = bool(self.loader_options.get("num_workers"))
        total = len(dataset)  # type: ignore[arg-type]
        self.num_samples: int | None = total
        self.plan = BatchPlan(total, batch_size, drop_last)
        self.epoch_batches = _EpochBatches()
        self.loader: DataLoader[Any] | None = None

    def for_epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        assert self.num_samples is not None
        order = epoch_order(self.num_samples, self.seed, epoch) if self.shuffle else torch.arange(self.num_samples)
        steps = list(self.plan.steps(skip))
        keys: list[Any] = [order[step.positions].tolist() for step in steps]
        if self.seeded:  # a batch's seed: its first position in the epoch (differs between ranks)
            base = mix_seeds(self.seed, epoch)
            keys = [(mix_seeds(base, step.positions.start), part) for step, part in zip(steps, keys, strict=True)]
        self.epoch_batches.batches = keys
        if self.loader is None:
            source = _SeededBatches(self.dataset) if self.seeded else self.dataset
            # Its own generator: a DataLoader without one draws each pass's worker base seed from
            # torch's global stream, which would shift the run's dropout after a resume.
            generator = torch.Generator().manual_seed(self.seed)
            self.loader = DataLoader(
                source, batch_sampler=self.epoch_batches, generator=generator, **self.loader_options
            )
        for raw, step in zip(self.loader, steps, strict=True):
            batch = to_device(split_batch(raw, self.target_key), self.device)._replace(
                size=step.size, global_size=step.global_size
            )
            yield batch if self.fix is None else self.fix(batch)

    def sample(self, count: int) -> Batch:
        assert self.num_samples is not None
        indices = list(range(min(count, self.num_samples)))
        worker_only = ("num_workers", "prefetch_factor", "multiprocessing_context", "persistent_workers")
        options = {key: value for key, value in self.loader_options.items() if key not in worker_only}
        loader = DataLoader(self.dataset, batch_size=len(indices), sampler=indices, **options)
        return to_device(split_batch(next(iter(loader)), self.target_key), self.device)

    def repair(self, fix: Repair) -> None:
        self.fix = _chain(self.fix, fix)

    def in_memory(self) -> InMemory | None:
        return None


class _SeededBatches(Dataset[Any]):
    """Reads the batch ``(seed, indices)``: in a worker process it first seeds torch, random and
    numpy with ``seed``, once per batch (seeding per sample would cost ~0.1 ms a sample)."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, key: tuple[int, list[int]]) -> list[Any]:
        seed, indices = key
        if get_worker_info() is not None:
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
        read_many = getattr(self.dataset, "__getitems__", None)
        return list(read_many(indices)) if read_many is not None else [self.dataset[index] for index in indices]


class LoaderBatches:
    """A user's DataLoader or collection of batches, used as given (no plan: its sampler decides).

    Args:
        one_pass: The data is read once (``evaluate``/``predict``), so an iterator is fine.
    """

    def __init__(
        self,
        iterable: Iterable[Any],
        *,
        device: torch.device,
        one_pass: bool = False,
        target_key: str | None = TARGET_KEY,
    ) -> None:
        self.fix: Repair | None = None
        self.target_key = target_key
        self.iterable = iterable
        self.device = device
        self.one_pass = one_pass
        self.first: Any = None  # the first raw batch of a one-pass iterator, read by ``sample``
        self.skips_single = False
        self.said_skip = False
        self.batch_size: int | None = getattr(iterable, "batch_size", None)
        self.num_batches: int | None = _optional_len(iterable)
        dataset = getattr(iterable, "dataset", None)
        self.num_samples: int | None = _optional_len(dataset) if dataset is not None else None
        self.left_out = 0

    def lay_out(self, layout: Layout) -> None:
        if layout.world_size > 1:
            raise config_error(
                "This data cannot be split between the processes of a torchrun job.",
                type(self.iterable).__name__,
                "pass in-memory tensors, a Dataset, or a DataLoader with a plain (random or sequential) sampler; "
                "trainwell then gives each process its share.",
            )
        self.skips_single = layout.min_batch > 1

    def _raw(self) -> Iterator[Any]:
        if self.first is not None:
            yield self.first
            self.first = None
        yield from self.iterable

    def for_epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        set_epoch = getattr(getattr(self.iterable, "sampler", None), "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
        for position, raw in enumerate(self._raw()):
            if position < skip:
                continue
            batch = to_device(split_batch(raw, self.target_key), self.device)
            if self.skips_single and batch.size == 1:
                if not self.said_skip:  # known only when it comes: said once, at the first
                    self.said_skip = True
                    warnings.warn(
                        f"The model has BatchNorm, which cannot train on a batch of one sample: batch {position + 1} "
                        f"of epoch {epoch + 1} (and any other of one sample) is left out.",
                        TrainwellWarning,
                        stacklevel=2,
                    )
                continue
            yield batch if self.fix is None else self.fix(batch)

    def sample(self, count: int) -> Batch:
        for raw in self.iterable:
            if self.one_pass and iter(self.iterable) is self.iterable:
                self.first = raw  # an iterator: keep the batch for the pass
            return to_device(split_batch(raw, self.target_key), self.device)
        if getattr(self.iterable, "drop_last", False):
            raise _dropped_everything(self.batch_size, self.num_samples)
        raise data_error("The data yielded no batches.", describe(self.iterable), "pass data with at least one sample.")

    def repair(self, fix: Repair) -> None:
        self.fix = _chain(self.fix, fix)

    def in_memory(self) -> InMemory | None:
        return None


def resizable(batches: Batches) -> _Planned | None:
    """``batches`` when trainwell chose their size (in-memory data, a Dataset), so that it may be
    changed; None for a DataLoader's batches and for iterables."""
    return batches if isinstance(batches, _Planned) and not batches.users_size else None


def _chain(previous: Repair | None, fix: Repair) -> Repair:
    return fix if previous is None else lambda batch: fix(previous(batch))


def to_batches(
    data: Any,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    one_pass: bool = False,
    inputs_only: bool = False,
    target_key: str | None = TARGET_KEY,
) -> Batches:
    """Dispatch any accepted kind of data to its ``Batches``.

    Args:
        data: See ``ACCEPTED``. A tuple ``(inputs, targets)`` or ``(inputs,)`` of tensors/arrays
            is in-memory data (a list too, unless ``inputs_only``); a bare tensor, array or dict is
            inputs without targets.
        batch_size: Samples per batch (ignored for DataLoaders and iterables of batches).
        shuffle: Shuffle in-memory data and Datasets every epoch.
        seed: Seeds the shuffled order, together with the epoch.
        device: Where batches are delivered.
        dtype: Floating-point arrays and tensors in memory are cast to this (the model's dtype).
        one_pass: The data is read once (evaluate, predict): a one-shot iterator is accepted.
        inputs_only: Only inputs are expected (predict): a list of tensors of one shape and
            dtype is a list of input batches, not ``[inputs, targets]``.
        target_key: Batches that are one Mapping (a dict, a ``BatchEncoding``) hold their targets
            under this key (and the model gets them too); None to read no targets from Mappings.

    Raises:
        ConfigError: An unsupported kind of data, with the accepted kinds.
        DataError: Mismatched lengths, empty data, unsupported arrays.
    """
    in_memory = None if inputs_only and _alike_batches(data) else as_in_memory(data, dtype, target_key)
    if in_memory is not None:
        if len(in_memory) == 0:
            raise data_error("The data is empty.", describe(data), "pass at least one sample.")
        return TensorBatches(in_memory, batch_size=batch_size, shuffle=shuffle, seed=seed, device=device)
    if isinstance(data, DataLoader):
        if _optional_len(data.dataset) == 0:
            raise data_error("The DataLoader's dataset is empty.", describe(data.dataset), "pass at least one sample.")
        return _from_loader(data, seed=seed, device=device, dtype=dtype, target_key=target_key)
    if isinstance(data, IterableDataset):  # it yields samples, as torch defines it: batch them
        loader = DataLoader(data, batch_size=batch_size)
        return LoaderBatches(loader, device=device, one_pass=one_pass, target_key=target_key)
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        if len(data) == 0:
            raise data_error("The dataset is empty.", describe(data), "pass at least one sample.")
        return DatasetBatches(
            data, batch_size=batch_size, shuffle=shuffle, seed=seed, device=device, target_key=target_key
        )
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)):
        if iter(data) is data and not one_pass:
            raise config_error(
                "The data is a one-shot iterator (such as a generator): it would be empty after one pass.",
                describe(data),
                "pass a list of batches, a Dataset or a DataLoader, which can be read every epoch.",
            )
        return LoaderBatches(data, device=device, one_pass=one_pass, target_key=target_key)
    raise config_error("Unsupported kind of data.", describe(data), f"pass {ACCEPTED}.")


def _alike_batches(data: Any) -> bool:
    """A list of tensors or arrays of one shape and dtype (input batches, not inputs and targets)."""
    if not isinstance(data, list) or not data or not all(isinstance(part, (torch.Tensor, np.ndarray)) for part in data):
        return False
    return len({(tuple(part.shape), str(part.dtype)) for part in data}) == 1


def _dropped_everything(batch_size: int | None, samples: int | None) -> Exception:
    return data_error(
        "The DataLoader yields no batches: drop_last=True drops the only, incomplete batch.",
        f"batch_size={batch_size}, {samples} samples, drop_last=True",
        "use a batch_size no larger than the number of samples, or drop_last=False.",
    )


def _from_loader(
    loader: DataLoader[Any], *, seed: int, device: torch.device, dtype: torch.dtype, target_key: str | None
) -> Batches:
    """A DataLoader with a plain random or sequential sampler is rebuilt on its dataset, so that
    its order is a function of (seed, epoch) (exact resume without replaying data); a
    TensorDataset with the default collate takes the in-memory fast path. Other loaders
    (custom samplers, iterable datasets) are used as given."""
    sampler = loader.sampler
    standard = type(sampler) in (RandomSampler, SequentialSampler) and loader.batch_size is not None
    if not standard or isinstance(loader.dataset, IterableDataset) or not hasattr(loader.dataset, "__len__"):
        return LoaderBatches(loader, device=device, target_key=target_key)
    shuffle = isinstance(sampler, RandomSampler)
    assert loader.batch_size is not None
    fast = isinstance(loader.dataset, TensorDataset) and loader.collate_fn is default_collate
    in_memory = as_in_memory(loader.dataset, dtype, target_key) if fast else None
    rebuilt: TensorBatches | DatasetBatches
    if in_memory is not None:
        rebuilt = TensorBatches(
            in_memory,
            batch_size=loader.batch_size,
            shuffle=shuffle,
            seed=seed,
            device=device,
            drop_last=loader.drop_last,
        )
    else:
        options = {
            "num_workers": loader.num_workers,
            "collate_fn": loader.collate_fn,
            # With workers on a GPU, the loader pins their batches in its own thread (else to_device
            # pins them in the training thread): a user's pin_memory=False is the DataLoader's
            # default, not a choice. Workers yield CPU tensors, which can always be pinned.
            "pin_memory": loader.pin_memory or (device.type == "cuda" and loader.num_workers > 0),
            "worker_init_fn": loader.worker_init_fn,
            "timeout": loader.timeout,
        }
        if loader.num_workers:
            options |= {
                "prefetch_factor": loader.prefetch_factor,
                "multiprocessing_context": loader.multiprocessing_context,
                "persistent_workers": loader.persistent_workers,
            }
        rebuilt = DatasetBatches(
            loader.dataset,
            batch_size=loader.batch_size,
            shuffle=shuffle,
            seed=seed,
            device=device,
            drop_last=loader.drop_last,
            loader_options=options,
            target_key=target_key,
        )
    if rebuilt.num_batches == 0:
        raise _dropped_everything(loader.batch_size, rebuilt.num_samples)
    rebuilt.users_size = True
    return rebuilt


def _optional_len(value: Any) -> int | None:
    try:
        return len(value)
    except TypeError:
        return None


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch on ``device`` (from pinned memory without blocking, on CUDA)."""
    if device.type == "cpu":
        return batch

    def move(tensor: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
            tensor = tensor.pin_memory()  # a copy from pinned memory does not block the host
        return tensor.to(device, non_blocking=True)

    weights = None if batch.weights is None else move(batch.weights)
    return batch._replace(
        inputs=map_tensors(batch.inputs, move), targets=map_tensors(batch.targets, move), weights=weights
    )
