"""How trainwell drives the user's model: calling it on a batch's inputs, and keeping the
train/eval mode of every submodule (and, while probing, every buffer) exactly as the user left it.

Owns: nothing but these conventions. Must not change weights.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from trainwell.structures import tensors_of


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on a batch's inputs: ``model(*inputs)`` for a tuple, ``model(**inputs)``
    for a dict or any other Mapping (a ``BatchEncoding``), ``model(inputs)`` otherwise.

    Example:
        >>> call_model(nn.Identity(), torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def keyword_names(model: nn.Module) -> set[str] | None:
    """The keyword arguments ``model.forward`` takes; None when it takes any (``**kwargs``).

    Example:
        >>> class Tagger(nn.Module):
        ...     def forward(self, input_ids, attention_mask=None):
        ...         return input_ids
        >>> sorted(keyword_names(Tagger()))
        ['attention_mask', 'input_ids']
    """
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a builtin or C-implemented forward: nothing to tell
        return None
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {parameter.name for parameter in parameters if parameter.kind in keyword}


@contextlib.contextmanager
def preserved_modes(model: nn.Module, training: bool | None = None) -> Iterator[None]:
    """Restore every submodule's train/eval flag on exit; optionally set the whole model's first.

    Args:
        model: The model.
        training: ``False`` puts the model in eval mode inside; ``True`` puts a model that is in
            eval mode in train mode (submodules a user put in eval mode inside a training model
            stay so); None changes nothing.

    Example:
        >>> model = nn.Sequential(nn.Linear(1, 1), nn.Dropout()).train()
        >>> with preserved_modes(model, training=False):
        ...     model[1].training
        False
        >>> model[1].training
        True
    """
    modes = [(module, module.training) for module in model.modules()]
    if training is False:
        model.eval()
    elif training is True and not model.training:
        model.train()
    try:
        yield
    finally:
        for module, was_training in modes:
            module.training = was_training


@contextlib.contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Put every buffer of ``model`` back as it was on exit: the same tensor, with the same values.

    Eval mode alone does not protect buffers: a forward may update a counter, or call
    ``functional.batch_norm(..., training=True)`` on running statistics. Lazy buffers not yet
    materialised are left alone (they have no values to keep).

    Example:
        >>> norm = nn.BatchNorm1d(2)
        >>> with preserved_buffers(norm):
        ...     _ = norm(torch.randn(4, 2))
        >>> norm.running_mean.tolist(), int(norm.num_batches_tracked)
        ([0.0, 0.0], 0)
    """
    saved = [
        (module, name, buffer, buffer.clone())
        for module in model.modules()
        for name, buffer in module.named_buffers(recurse=False)
        if not nn.parameter.is_lazy(buffer)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, buffer, values in saved:
                # A forward may assign a new tensor (self.calls = self.calls + 1) instead of
                # updating in place; the module must hold the original object again.
                if getattr(module, name, None) is not buffer:
                    setattr(module, name, buffer)
                buffer.copy_(values)


@contextlib.contextmanager
def probing(model: nn.Module, device: torch.device) -> Iterator[None]:
    """A look at the model that changes nothing: eval mode (every submodule's mode restored),
    no gradients, every buffer's values restored, and the random state of the CPU and of
    ``device`` (a GPU) restored on exit.

    Example:
        >>> state = torch.random.get_rng_state()
        >>> with probing(nn.Dropout(), torch.device("cpu")):
        ...     _ = torch.rand(3)
        >>> torch.equal(state, torch.random.get_rng_state())
        True
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    with (
        torch.random.fork_rng(devices=devices),
        torch.no_grad(),
        preserved_modes(model, training=False),
        preserved_buffers(model),
    ):
        yield


# evaluate/predict's default batch (see ``inference_batch_size``).
INFERENCE_FLOPS_PER_BATCH = 1e9  # enough work that a batch's fixed cost is ~1% of its time on a CPU
INFERENCE_BATCH_RANGE = (256, 4096)
INFERENCE_CPU_BYTES = 2 << 30  # what a batch's forward may produce on the CPU
INFERENCE_GPU_SHARE = 0.25  # of the GPU memory free to this process
PROBE_SAMPLES = 2


def inference_batch_size(model: nn.Module, inputs: Any, count: int, device: torch.device) -> int:
    """The batch size ``evaluate`` and ``predict`` choose when none is given, from one forward of
    ``inputs`` (``count`` samples) on ``device``.

    Big enough that a batch does ``INFERENCE_FLOPS_PER_BATCH`` of work, so that the fixed cost of
    each batch (the loop, small kernels) is amortised: overhead-bound models get large batches,
    heavy ones stay at the low end of ``INFERENCE_BATCH_RANGE``. Then small enough that the
    tensors its forward produces (summed over the model's leaf modules; without autograd far
    less is alive at once) take at most 2 GiB on the CPU, or a quarter of the GPU memory free
    to this process. A power of two. The work is counted, not timed (see ``_leaf_work``), so on
    the CPU the choice is the same every time; the probe changes nothing (see ``probing``).

    What runs outside the leaf modules cannot be counted: a model with weights used elsewhere
    (``nn.MultiheadAttention``'s projections, a functional call on a parameter), one that cannot
    be hooked (TorchScript) or one that fails on the probe (the pass itself then reports it,
    after its checks) gets the low end.

    Example:
        >>> inference_batch_size(nn.Linear(784, 10), torch.zeros(2, 784), 2, torch.device("cpu"))
        4096
    """
    low, high = INFERENCE_BATCH_RANGE
    counted = _count_forward(getattr(model, "_orig_mod", model), inputs, device)  # a compiled model: its module
    if counted is None:
        return low
    flops, produced = counted[0] / count, counted[1] / count
    size = high if flops == 0 else min(high, max(low, int(INFERENCE_FLOPS_PER_BATCH / flops)))
    if produced:
        size = min(size, max(1, int(_memory_budget(device) / produced)))
    return 1 << (size.bit_length() - 1)


def _count_forward(model: nn.Module, inputs: Any, device: torch.device) -> tuple[float, float] | None:
    """(floating-point operations, bytes produced) of one forward, summed over the leaf modules;
    None when some of the work escapes them (or the model cannot be probed)."""
    totals = [0.0, 0.0]
    ran: set[int] = set()  # the parameters of the leaf modules that ran

    def tally(module: nn.Module, args: Any, output: Any) -> None:
        produced = tensors_of(output)
        totals[0] += _leaf_work(module, produced)
        totals[1] += sum(tensor.numel() * tensor.element_size() for tensor in produced)
        ran.update(id(parameter) for parameter in module.parameters(recurse=False))

    hooks = []
    try:
        for module in model.modules():
            if next(module.children(), None) is None:
                hooks.append(module.register_forward_hook(tally))
        with probing(model, device):
            call_model(model, inputs)
    except Exception:  # TorchScript refuses hooks; a model that fails is reported by the pass itself
        return None
    finally:
        for hook in hooks:
            hook.remove()
    if any(id(parameter) not in ran for parameter in model.parameters()):
        return None
    return totals[0], totals[1]


def _memory_budget(device: torch.device) -> float:
    """What one inference batch's forward may produce: 2 GiB on the CPU; on a GPU a quarter of the
    memory free to this process (free on the device, plus what its allocator holds unused)."""
    if device.type != "cuda":
        return INFERENCE_CPU_BYTES
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free * INFERENCE_GPU_SHARE


def _leaf_work(module: nn.Module, produced: list[torch.Tensor]) -> float:
    """Floating-point operations of one leaf module's forward, counted from its weights and output.

    A module with weights applies them at every position of its output: a linear, convolution,
    recurrent (per time step) or normalisation layer does ``2 * weights * positions``, where the
    positions are the output's elements over its channels (dim 1 for convolutions, the last
    dim otherwise). A lookup (embedding) costs its output; so does a module without weights
    (an activation, a pooling): one operation per element produced.
    """
    if not produced:
        return 0.0
    output = produced[0]
    weights = sum(parameter.numel() for parameter in module.parameters(recurse=False))
    if not weights or isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or output.dim() == 0:
        return float(output.numel())
    channels = output.shape[1] if isinstance(module, nn.modules.conv._ConvNd) and output.dim() > 1 else output.shape[-1]
    return 2.0 * weights * output.numel() / max(1, channels)


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (the default dtype when it has none)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.get_default_dtype()


def smallest_batch(model: nn.Module) -> int:
    """The smallest batch ``model`` can train on: 2 when a BatchNorm layer will train (its
    statistics need two samples), else 1. A model given in eval mode is trained in train mode,
    so all of its BatchNorm layers count then.

    Example:
        >>> smallest_batch(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
        2
    """
    return (
        2
        if any(
            isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or not model.training)
            for module in model.modules()
        )
        else 1
    )
