"""Exception types and the one message format every trainwell error uses.

Owns: the wording shape (what is wrong / what was received / the fix). Imports nothing
from trainwell, so every other module may raise these.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch


class TrainwellError(ValueError):
    """Base class of every error trainwell raises about the caller's input.

    It subclasses ``ValueError`` so code that already catches bad-argument errors keeps working.
    """


class ConfigError(TrainwellError):
    """An argument of ``fit``/``evaluate``/``predict`` is invalid (a name, a number, a choice)."""


class DataError(TrainwellError):
    """The data, or the model's outputs against the targets, break the loss's contract."""


class OutOfMemoryError(TrainwellError, torch.OutOfMemoryError):
    """A batch did not fit in the device's memory; the message names the batch size to lower.

    Also a ``torch.OutOfMemoryError``, so code that catches that one (a batch-size search) still
    does; torch's own error is its ``__cause__``.
    """


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during ``fit``: raised after the current step, once a checkpoint is saved.

    Attributes:
        signal_number: The signal received (``signal.SIGINT`` or ``signal.SIGTERM``).
    """

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number


class TrainwellWarning(UserWarning):
    """A repair trainwell made to the input (a cast, a reshape) or a likely mistake it noticed."""


def warn(message: str) -> None:
    """Show ``message`` as a ``TrainwellWarning`` attributed to the user's line that called
    trainwell (the first frame outside this package), however deep inside it the warning arose."""
    package, frame, level = os.path.dirname(__file__), sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, TrainwellWarning, stacklevel=level)


def format_message(what: str, received: str, fix: str) -> str:
    """Return the standard three-part message.

    Args:
        what: What is wrong, as one sentence.
        received: What trainwell was given (values, shapes, dtypes).
        fix: What the caller should change.

    Returns:
        A message of three labelled lines.

    Example:
        >>> print(format_message("epochs must be >= 1.", "epochs=0", "pass epochs=1 or more."))
        epochs must be >= 1.
          received: epochs=0
          fix: pass epochs=1 or more.
    """
    return f"{what}\n  received: {received}\n  fix: {fix}"


def config_error(what: str, received: str, fix: str) -> ConfigError:
    """Build a ``ConfigError`` with the standard message."""
    return ConfigError(format_message(what, received, fix))


def data_error(what: str, received: str, fix: str) -> DataError:
    """Build a ``DataError`` with the standard message."""
    return DataError(format_message(what, received, fix))


def check_count(name: str, value: Any, minimum: int = 1) -> None:
    """Raise ``ConfigError`` unless ``value`` is an integer (not a bool) >= ``minimum``.

    Example:
        >>> check_count("patience", 0, minimum=0)
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise config_error(
            f"{name} must be an integer >= {minimum}.", f"{name}={value!r}", f"pass {name}={max(minimum, 1)} or more."
        )


def unknown_name_error(kind: str, name: str, known: Iterable[str]) -> ConfigError:
    """An unknown registry name: lists the known names and the closest match.

    Example:
        >>> err = unknown_name_error("loss", "cross_entropi", ["mse", "cross_entropy"])
        >>> "did you mean 'cross_entropy'" in str(err)
        True
    """
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return config_error(
        f"Unknown {kind} name {name!r}.",
        f"{kind}={name!r}",
        f"{hint}use one of: {', '.join(known)}.",
    )


def describe(value: Any) -> str:
    """A short description of a value for messages: shapes and dtypes, never whole tensors.

    Example:
        >>> describe(torch.zeros(3, 2))
        'tensor of shape (3, 2), dtype float32'
    """
    if isinstance(value, torch.Tensor):
        shape = "(" + ", ".join(str(size) for size in value.shape) + ("," if value.dim() == 1 else "") + ")"
        return f"tensor of shape {shape}, dtype {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, dict):
        return "dict {" + ", ".join(f"{key!r}: {describe(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        kind = "tuple" if isinstance(value, tuple) else "list"
        if len(value) > 4:
            return f"{kind} of {len(value)} items"
        return f"{kind} (" + ", ".join(describe(item) for item in value) + ")"
    array_shape = getattr(value, "shape", None)
    if array_shape is not None and hasattr(value, "dtype"):
        return f"{type(value).__name__} of shape {tuple(array_shape)}, dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 60 else f"{type(value).__name__} object"


@contextlib.contextmanager
def out_of_memory_advice(function: str, batch_size: int | None, samples: int | None = None) -> Iterator[None]:
    """Re-raise an out-of-memory error of the block (torch's on a GPU, the allocator's
    ``RuntimeError`` on the CPU) as ``OutOfMemoryError``, saying which batch size of ``function``
    to lower (its batches hold ``batch_size`` of the data's ``samples``). Only an except clause:
    nothing is checked while nothing is raised.

    Example:
        >>> with out_of_memory_advice("evaluate", 4096, samples=64):  # doctest: +ELLIPSIS
        ...     raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        Traceback (most recent call last):
        trainwell.errors.OutOfMemoryError: A batch of 64 samples did not fit in memory in evaluate.
          received: CUDA out of memory. Tried to allocate 2.00 GiB
          fix: pass batch_size=32 to evaluate (a DataLoader keeps its own batch_size: ...).
    """
    try:
        yield
    except RuntimeError as error:
        text = str(error)
        if isinstance(error, OutOfMemoryError) or not (
            isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text
        ):
            raise
        if batch_size and samples:
            batch_size = min(batch_size, samples)  # a batch is never larger than the data
        smaller = f"batch_size={max(batch_size // 2, 1)}" if batch_size else "smaller batches"
        accumulate = "; raise grad_accum_steps as much: same samples per optimizer step" if function == "fit" else ""
        raise OutOfMemoryError(
            format_message(
                f"A batch{f' of {batch_size} samples' if batch_size else ''} did not fit in memory in {function}.",
                (text.strip().splitlines() or [type(error).__name__])[0][:300],
                f"pass {smaller} to {function} (a DataLoader keeps its own batch_size: build it with a smaller "
                f"one){accumulate}.",
            )
        ) from error
