"""Multi-process training under torchrun: the only module that touches ``torch.distributed``.

Owns: reading the torchrun environment, starting the process group, choosing each process's
device, wrapping the model in DistributedDataParallel, and the few collectives trainwell uses
(a sum once per epoch, broadcasting the seed, gathering predictions and random states).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job.

    Attributes:
        rank: Global rank (0 is the main process, which prints and writes files).
        local_rank: Rank on this machine (picks the GPU).
        world_size: Number of processes.
    """

    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main_process(self) -> bool:
        """Whether this process prints and writes files."""
        return self.rank == 0


def setup() -> Distributed | None:
    """Join the torchrun job this process belongs to (None when not launched by torchrun).

    Starts the process group when the user has not (nccl when each rank has a GPU, gloo
    otherwise).
    """
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return Distributed(dist.get_rank(), local, dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if torch.cuda.is_available() and torch.cuda.device_count() > local:
        torch.cuda.set_device(local)
        backend = "nccl"
    # Keys of a restarted attempt (torchrun --max-restarts) must not meet the dead attempt's:
    # a stale peer address makes the new processes connect to a process that is gone.
    store, rank, world_size = next(dist.rendezvous("env://"))  # type: ignore[attr-defined]
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefixed = dist.PrefixStore(f"trainwell/attempt-{attempt}/", store)  # type: ignore[attr-defined]
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world_size)
    atexit.register(_close)  # the group trainwell opened is closed before the interpreter exits
    sys.excepthook = _note_failure
    return Distributed(dist.get_rank(), local, dist.get_world_size())


_failed: list[bool] = []


def _note_failure(kind: type[BaseException], value: BaseException, trace: Any) -> None:
    _failed.append(True)
    _previous_hook(kind, value, trace)


_previous_hook = sys.excepthook


def _close() -> None:
    """Close the group trainwell opened. After a normal end the processes first wait for each
    other: one that tears its connections down while a peer still uses them aborts that peer.
    After an uncaught error there is no waiting (the peers fail on the lost connection)."""
    if not dist.is_initialized():
        return
    if not _failed:
        dist.barrier()
    dist.destroy_process_group()


def device_for(info: Distributed, requested: torch.device) -> torch.device:
    """Each process's device: its own GPU (``cuda:LOCAL_RANK``) when CUDA is used, else as requested."""
    if requested.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return requested


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model in DistributedDataParallel (which also makes every rank start from rank 0's weights)."""
    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (the model itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over all processes (gloo reduces on the CPU)."""
    backend_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    summed = tensor.detach().clone() if backend_device is None else tensor.detach().to(backend_device)
    if backend_device is None and summed.device.type != "cpu":
        summed = summed.cpu()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed.to(tensor.device)


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every process."""
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather(value: Any) -> list[Any]:
    """Every process's ``value``, in rank order, on every process."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def interleave(parts: list[torch.Tensor]) -> torch.Tensor:
    """Undo sharding by ``rank::world_size``: rank r's rows go back to positions r, r+N, ...

    Example:
        >>> interleave([torch.tensor([0, 2, 4]), torch.tensor([1, 3])]).tolist()
        [0, 1, 2, 3, 4]
    """
    total = sum(len(part) for part in parts)
    merged = parts[0].new_empty((total, *parts[0].shape[1:]))
    for rank, part in enumerate(parts):
        merged[rank :: len(parts)] = part
    return merged


def deferred_sync(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """A backward pass inside this context keeps DDP from all-reducing the gradients (the
    gradients of a window's earlier batches are reduced with its last); nothing otherwise."""
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def average_gradients(parameters: list[torch.Tensor]) -> None:
    """Average the gradients over the processes, as DDP's all-reduce would have (for a window
    left open when training stopped inside it)."""
    gradients = [parameter.grad for parameter in parameters if parameter.grad is not None]
    for gradient in gradients:
        reduced = all_reduce_sum(gradient)
        gradient.copy_(reduced / dist.get_world_size())
