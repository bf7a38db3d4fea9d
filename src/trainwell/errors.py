"""Exception types and the one message format every trainwell error uses.

Owns: the wording shape (what is wrong / what was received / the fix). Imports nothing
from trainwell, so every other module may raise these.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
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
