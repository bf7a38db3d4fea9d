"""Weights on disk: atomic, code-free files, and the ModelCheckpoint callback.

Owns: writing files atomically (temporary file in the same folder, fsync, rename), the
weights format (a plain state dict of tensors, loaded with ``weights_only=True``, so loading
runs no code), and removing wrapper prefixes (``module.``, ``_orig_mod.``) from saved keys.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainwell.callbacks import Callback, Mode, Monitor
from trainwell.errors import check_count, config_error, data_error
from trainwell.files import atomic_write
from trainwell.run import Run

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes removed.

    Example:
        >>> list(clean_state_dict({"_orig_mod.module.weight": torch.zeros(1)}))
        ['weight']
    """
    cleaned = {}
    for key, value in state.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        cleaned[key] = value
    return cleaned


def weights_on_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict without wrapper prefixes, detached and on the CPU: what is saved."""
    return {key: value.detach().cpu() for key, value in clean_state_dict(model.state_dict()).items()}


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` so that a crash leaves either the old file or the new one."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write(buffer.getvalue(), path)


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Save ``model``'s weights (a state dict without wrapper prefixes) atomically.

    Example:
        >>> import tempfile, os
        >>> path = save_weights(nn.Linear(2, 1), os.path.join(tempfile.mkdtemp(), "w.pt"))
        >>> load_weights(nn.Linear(2, 1), path)
        <All keys matched successfully>
    """
    return atomic_save(weights_on_cpu(model), path)


def safe_load(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers, never code.

    Raises:
        DataError: A missing file, a file whose pickle would construct other objects (it is
            refused unread; the message names the object), or a file torch cannot read (empty,
            truncated, text, another format).
    """
    path = Path(path)
    if not path.is_file():
        raise data_error(f"No such file: {path}.", str(path), "check the path.")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        named = [line for line in lines if "GLOBAL" in line or "nsupported" in line]
        reason = (named or lines or [type(error).__name__])[0]
        raise data_error(
            f"Refused to load {path}: it holds objects that loading would have to construct by running code.",
            reason[:300],
            "load only files trainwell (or torch.save of plain tensors) wrote; if you trust the file, "
            "torch.load(path, weights_only=False) yourself.",
        ) from None
    except (OSError, MemoryError):  # the file system's or the machine's say, not the file's content
        raise
    except Exception as error:  # any other reader error: the content is unusable, said in one line
        size = path.stat().st_size
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise data_error(
            f"Could not read {path}: it is empty, truncated or damaged, or not a file torch.save wrote.",
            f"{size} bytes" + (f"; {type(error).__name__}: {first}" if size else " (empty)"),
            "save the weights again (trainwell.save_weights), or copy the file again in full.",
        ) from None


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> Any:
    """Load a weights file written by trainwell (or a plain state dict) into ``model``.

    Keys saved from DDP or compiled models load into the plain model too.

    Args:
        model: The model to fill.
        path: The file.
        strict: Require the keys to match exactly.

    Returns:
        torch's ``load_state_dict`` result (missing and unexpected keys).

    Raises:
        DataError: A missing file, an unsafe file, or weights for another architecture.
    """
    state = safe_load(path)
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]  # a full training checkpoint
    if not isinstance(state, Mapping):
        raise data_error(f"{path} does not hold a state dict.", type(state).__name__, "pass a weights file.")
    try:
        return model.load_state_dict(clean_state_dict(state), strict=strict)
    except RuntimeError as error:
        raise data_error(
            f"The weights in {path} do not fit this model.",
            str(error).split("\n")[0][:300],
            "build the same architecture as the model that was saved.",
        ) from error


class ModelCheckpoint(Callback):
    """Saves the model's weights at the end of epochs, atomically, in a code-free format.

    Args:
        path: The file; may name log values and the 1-based epoch, e.g.
            ``"checkpoints/epoch{epoch:02d}-{val_loss:.3f}.pt"``.
        monitor: The log key that decides which epoch is best; None saves every eligible epoch
            (no best is tracked, so ``save_best_only`` needs a monitor).
        mode: ``"auto"``, ``"min"`` or ``"max"``.
        save_best_only: Save only when ``monitor`` improves (otherwise every eligible epoch).
        every_n_epochs: Consider every n-th epoch only.

    Attributes:
        best_path: The file of the best epoch so far (None before one is saved).
        last_path: The file written last.

    Example:
        >>> checkpoint = ModelCheckpoint("best.pt", monitor="val_accuracy", save_best_only=True)
    """

    def __init__(
        self,
        path: str | Path,
        monitor: str | None = "val_loss",
        mode: Mode = "auto",
        save_best_only: bool = False,
        every_n_epochs: int = 1,
    ) -> None:
        check_count("every_n_epochs", every_n_epochs)
        if monitor is None and save_best_only:
            raise config_error(
                "save_best_only needs a value to decide which epoch is best.",
                "monitor=None, save_best_only=True",
                "pass monitor='val_loss' (or another logged value), or save_best_only=False to save every epoch.",
            )
        self.path = str(path)
        self.monitor = monitor
        self.tracker = None if monitor is None else Monitor(monitor, mode)
        self.save_best_only = save_best_only
        self.every_n_epochs = every_n_epochs
        self.best_path: Path | None = None
        self.last_path: Path | None = None

    def on_fit_start(self, run: Run) -> None:
        if self.tracker is not None:
            self.tracker.reset()
        self.best_path = self.last_path = None

    def on_epoch_end(self, run: Run) -> None:
        if (run.epoch + 1) % self.every_n_epochs:
            return
        improved = self.tracker is not None and self.tracker.improved(self.tracker.value(run))
        if self.save_best_only and not improved:
            return
        try:
            path = Path(self.path.format(epoch=run.epoch + 1, **run.logs))
        except (KeyError, ValueError, IndexError) as error:
            raise config_error(
                f"ModelCheckpoint's path names a value that is not logged: {error}.",
                self.path,
                f"use {{epoch}} and log keys: {', '.join(run.logs)}.",
            ) from None
        if run.is_main_process:
            save_weights(run.module, path)
        self.last_path = path
        if improved:
            self.best_path = path

    def state_dict(self) -> dict[str, Any]:
        """Best value and file so far."""
        monitor = None if self.tracker is None else self.tracker.state_dict()
        return {"monitor": monitor, "best_path": str(self.best_path) if self.best_path else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``."""
        if self.tracker is not None and state["monitor"] is not None:
            self.tracker.load_state_dict(state["monitor"])
        self.best_path = Path(state["best_path"]) if state["best_path"] else None
