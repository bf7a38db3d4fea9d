"""Numeric precision: the one autocast context and the one grad scaler the loop uses.

Owns: every use of autocast and GradScaler. For fp32 both are no-ops, so the loop has a
single code path for every precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from trainwell.errors import config_error

PrecisionName = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[PrecisionName, ...] = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """How forward passes are cast and losses scaled.

    Attributes:
        name: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        autocast: Returns a fresh context manager for one forward pass and loss.
        scaler: A grad scaler; disabled (a pass-through) except for fp16 on CUDA.
    """

    name: PrecisionName
    autocast: Callable[[], contextlib.AbstractContextManager[object]]
    scaler: torch.amp.GradScaler


def build_precision(name: str, device: torch.device) -> Precision:
    """Build the autocast context and scaler for ``name`` on ``device``.

    Raises:
        ConfigError: An unknown precision, or fp16 where autocast does not support it.

    Example:
        >>> build_precision("fp32", torch.device("cpu")).scaler.is_enabled()
        False
    """
    if name not in PRECISIONS:
        raise config_error("Unknown precision.", f"precision={name!r}", f"use one of {', '.join(PRECISIONS)}.")
    if name == "fp16" and device.type == "cpu":
        raise config_error(
            "fp16 mixed precision needs a GPU.",
            f"precision='fp16' on device {device}",
            "use precision='bf16' on the CPU, or train on a CUDA device.",
        )
    scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16" and device.type == "cuda")
    if name == "fp32":
        return Precision(name, contextlib.nullcontext, scaler)
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    return Precision(name, lambda: torch.autocast(device.type, dtype=dtype), scaler)
