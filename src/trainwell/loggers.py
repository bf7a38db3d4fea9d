"""Loggers: ``CSVLogger`` and ``TensorBoard``, which write each epoch's values to files.

Owns: those files (written by the main process only). Must not change training.
"""

from __future__ import annotations

import csv
import errno
import io
import os
from pathlib import Path
from typing import IO, Any

from trainwell.callbacks import Callback
from trainwell.errors import config_error
from trainwell.files import atomic_write
from trainwell.run import Run


class CSVLogger(Callback):
    """Writes one row per epoch (``epoch`` 1-based, then every log key) to a CSV file.

    Rows are flushed each epoch, so the file is useful while training runs. Only the main
    process writes. A resumed run continues the file: the rows written up to its checkpoint
    are kept (a row written after it, by an epoch the resumed run trains again, is not), with
    or without ``append``.

    Args:
        path: The CSV file.
        append: Add to an existing file (its header is kept) instead of replacing it.
    """

    def __init__(self, path: str | Path, append: bool = False) -> None:
        self.path = Path(path)
        self.append = append
        self.file: IO[str] | None = None
        self.writer: Any = None
        self.columns: list[str] = []
        self.rows = 0  # data rows in the file: what a checkpoint records
        self.kept: int | None = None  # a resumed run's rows, from its checkpoint

    def on_fit_start(self, run: Run) -> None:
        self.kept = None
        if run.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if run.callback_states is None:  # a resumed run opens the file once its state is known
                self._open()

    def state_dict(self) -> dict[str, Any]:
        """The rows written so far."""
        return {"rows": self.rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep only the rows written up to the checkpoint."""
        self.kept = int(state["rows"])

    def _open(self) -> None:
        lines: list[list[str]] = []
        if (self.append or self.kept is not None) and self.path.is_file():
            with self.path.open(newline="") as file:
                lines = list(csv.reader(file))
        if self.kept is not None and len(lines) > self.kept + 1:  # rows of an epoch the resumed run trains again
            lines = lines[: self.kept + 1]
            kept = io.StringIO()
            csv.writer(kept).writerows(lines)
            atomic_write(kept.getvalue().encode(), self.path)
        self.columns, self.rows = (lines[0], len(lines) - 1) if lines else ([], 0)
        try:
            self.file = open(self.path, "a" if lines else "w", newline="", opener=_without_following)  # noqa: SIM115
        except OSError as error:
            if error.errno != errno.ELOOP:
                raise
            raise config_error(
                "CSVLogger does not write through a symbolic link.",
                f"{self.path} is a link to {os.readlink(self.path)}",
                "pass the path of the file itself, or remove the link.",
            ) from None
        self.writer = csv.writer(self.file)

    def on_epoch_end(self, run: Run) -> None:
        if not run.is_main_process:
            return
        if self.file is None:
            self._open()
        if not self.columns:
            self.columns = ["epoch", *run.logs]
            self.writer.writerow(self.columns)
        values = {"epoch": run.epoch + 1, **run.logs}
        self.writer.writerow([repr(values[column]) if column in values else "" for column in self.columns])
        self.rows += 1
        assert self.file is not None
        self.file.flush()

    def on_fit_end(self, run: Run) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _without_following(path: str, flags: int) -> int:
    """Open ``path`` unless it is a symbolic link (trainwell never writes through one)."""
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)


class TensorBoard(Callback):
    """Writes every epoch value (and, when asked, the loss every N steps) as TensorBoard scalars.

    Needs the ``tensorboard`` package (``pip install 'trainwell[tensorboard]'``).

    Args:
        log_dir: The event-file folder.
        every_n_steps: Also log the batch loss as ``batch/loss`` every N optimizer steps; each
            such read is one host synchronisation.
    """

    def __init__(self, log_dir: str | Path, every_n_steps: int | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.every_n_steps = every_n_steps
        self.writer: Any = None
        if every_n_steps is not None:
            self.on_train_batch_end = self._log_step  # type: ignore[method-assign]

    def on_fit_start(self, run: Run) -> None:
        if not run.is_main_process:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise config_error(
                "The TensorBoard callback needs the tensorboard package.",
                "import tensorboard failed",
                "pip install 'trainwell[tensorboard]' (or pip install tensorboard).",
            ) from None
        self.writer = SummaryWriter(str(self.log_dir))

    def _log_step(self, run: Run) -> None:
        assert self.every_n_steps is not None
        at_step = run.window_batches == 0  # with gradient accumulation, only once a window is stepped
        if self.writer is not None and run.loss is not None and at_step and run.global_step % self.every_n_steps == 0:
            self.writer.add_scalar("batch/loss", run.loss.item(), run.global_step)

    def on_epoch_end(self, run: Run) -> None:
        if self.writer is not None:
            for key, value in run.logs.items():
                self.writer.add_scalar(key, value, run.epoch + 1)
            self.writer.flush()

    def on_fit_end(self, run: Run) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
