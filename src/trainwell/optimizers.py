"""Optimizer registry and construction from a name, a learning rate and options.

Owns: OPTIMIZERS and checking optimizer arguments. Must not step or inspect training.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainwell.errors import config_error, describe, unknown_name_error


@dataclass(frozen=True)
class OptimizerEntry:
    """A registry entry: the torch class and the learning rate used when ``lr`` is not given."""

    factory: Callable[..., torch.optim.Optimizer]
    default_lr: float


OPTIMIZERS: dict[str, OptimizerEntry] = {
    "sgd": OptimizerEntry(torch.optim.SGD, 0.01),
    "adam": OptimizerEntry(torch.optim.Adam, 1e-3),
    "adamw": OptimizerEntry(torch.optim.AdamW, 1e-3),
    "rmsprop": OptimizerEntry(torch.optim.RMSprop, 1e-3),
}


def check_lr(lr: float | None) -> None:
    """Raise ``ConfigError`` unless ``lr`` is None or a finite positive number."""
    if lr is None:
        return
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise config_error(
            "lr must be a finite number > 0.", f"lr={lr!r}", "pass e.g. lr=0.01 (SGD) or lr=1e-3 (Adam)."
        )


def build_optimizer(
    optimizer: str | torch.optim.Optimizer, model: nn.Module, lr: float | None, options: Mapping[str, Any]
) -> torch.optim.Optimizer:
    """Build a named optimizer over ``model``'s trainable parameters, or check a given one.

    Args:
        optimizer: A name from ``OPTIMIZERS`` or an optimizer instance, used as given.
        model: The model being trained.
        lr: Learning rate for a named optimizer (its default when None).
        options: Extra keyword arguments for a named optimizer (``momentum=0.9``, ...).

    Returns:
        The optimizer.

    Raises:
        ConfigError: Unknown name or option, ``lr``/options given with an instance, an optimizer
            that holds none of the model's parameters, or a model without trainable parameters.

    Example:
        >>> build_optimizer("sgd", nn.Linear(2, 1), 0.1, {"momentum": 0.9}).defaults["momentum"]
        0.9
    """
    check_lr(lr)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if not trainable:
        raise config_error(
            "The model has no trainable parameters.",
            f"{type(model).__name__} with {sum(1 for _ in model.parameters())} parameters, none with requires_grad",
            "unfreeze some parameters (parameter.requires_grad_(True)) before training.",
        )
    if isinstance(optimizer, torch.optim.Optimizer):
        if lr is not None or options:
            given = ", ".join(["lr"] * (lr is not None) + list(options))
            raise config_error(
                "lr and optimizer options apply only to a named optimizer; an optimizer instance is used as given.",
                f"an instance of {type(optimizer).__name__} together with {given}",
                "set them when building the optimizer, or pass its name, e.g. optimizer='sgd'.",
            )
        _check_holds_parameters(optimizer, trainable)
        return optimizer
    if not isinstance(optimizer, str):
        raise config_error(
            "optimizer must be a name or a torch.optim.Optimizer.",
            f"optimizer={describe(optimizer)}",
            f"pass one of {', '.join(OPTIMIZERS)}, or torch.optim.SGD(model.parameters(), lr=0.01).",
        )
    if optimizer not in OPTIMIZERS:
        raise unknown_name_error("optimizer", optimizer, OPTIMIZERS)
    entry = OPTIMIZERS[optimizer]
    _check_options(optimizer, entry.factory, options)
    arguments = {"lr": entry.default_lr if lr is None else lr, **options}
    if _fused_applies(entry.factory, model, trainable, options):
        try:
            return entry.factory(trainable, **arguments, fused=True)
        except RuntimeError:  # a device or dtype this torch has no fused kernel for
            pass
    return entry.factory(trainable, **arguments)


FUSED_DEVICES = ("cpu", "cuda")


def _fused_applies(
    factory: Callable[..., Any], model: nn.Module, trainable: list[nn.Parameter], options: Mapping[str, Any]
) -> bool:
    """Whether to ask for torch's fused kernel: one kernel updates every parameter, instead of a
    few per parameter (SGD on the MLP of benchmark (a): 34 us a step instead of 55 on the CPU; on
    GPUs it is the fastest implementation). Not when the user chose ``fused``/``foreach``/
    ``differentiable``, for sparse gradients (``nn.Embedding(sparse=True)``), or for parameters
    that are not floating point on one device of ``FUSED_DEVICES``."""
    if "fused" not in inspect.signature(factory).parameters or {"fused", "foreach", "differentiable"} & set(options):
        return False
    if any(getattr(module, "sparse", False) is True for module in model.modules()):
        return False
    devices = {parameter.device for parameter in trainable}
    return (
        len(devices) == 1
        and next(iter(devices)).type in FUSED_DEVICES
        and all(parameter.is_floating_point() for parameter in trainable)
    )


def _check_options(name: str, factory: Callable[..., Any], options: Mapping[str, Any]) -> None:
    accepted = [key for key in inspect.signature(factory).parameters if key not in ("params", "lr")]
    for key in options:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise config_error(
                f"Unknown keyword {key!r}: it is neither an argument of fit nor an option of the {name} optimizer.",
                f"{key}={describe(options[key])}",
                f"{hint}{name} accepts: {', '.join(accepted)}.",
            )


def check_step_without_closure(optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ConfigError`` when ``optimizer.step`` requires a closure, as ``torch.optim.LBFGS``'s does.

    trainwell's default step calls ``optimizer.step()`` without arguments, so such an optimizer
    would fail at the first step. A custom ``step`` may pass the closure itself, so the caller
    decides whether to run this check; ``build_optimizer`` does not.

    Args:
        optimizer: The optimizer instance.

    Raises:
        ConfigError: ``step`` has a ``closure`` parameter without a default.

    Example:
        >>> check_step_without_closure(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1))
        >>> check_step_without_closure(torch.optim.LBFGS(nn.Linear(2, 1).parameters()))
        Traceback (most recent call last):
        ...
        trainwell.errors.ConfigError: LBFGS needs a closure that re-evaluates the loss; ...
    """
    try:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):  # a step without an inspectable signature (a C extension)
        return
    if closure is None or closure.default is not inspect.Parameter.empty:
        return
    name = type(optimizer).__name__
    raise config_error(
        f"{name} needs a closure that re-evaluates the loss; trainwell's step calls optimizer.step() once per "
        "batch without one.",
        f"optimizer={type(optimizer).__module__}.{type(optimizer).__qualname__}",
        "use optimizer='adam' or 'sgd', or pass fit(..., step=my_step) where my_step calls "
        "optimizer.step(closure) itself.",
    )


def _check_holds_parameters(optimizer: torch.optim.Optimizer, trainable: Iterable[nn.Parameter]) -> None:
    held = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
    if not any(id(parameter) in held for parameter in trainable):
        raise config_error(
            "The optimizer holds none of the model's trainable parameters, so training would change nothing.",
            f"{type(optimizer).__name__} over {len(held)} other parameters",
            "build it from this model: torch.optim.SGD(model.parameters(), lr=...), after creating the model.",
        )
