"""Loggers: ``CSVLogger`` and ``TensorBoard``, which write each epoch's values to files, and
``StepLosses``, the batch loss every N steps read without a host synchronisation per step.

Owns: those files (written by the main process only). Must not change training.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import socket
import time
import weakref
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import torch

from trainwell.callbacks import Callback
from trainwell.errors import check_count, config_error
from trainwell.files import atomic_write
from trainwell.run import Run

STEP_KEY = "batch/loss"  # the loss of the batch that completed a logged optimizer step
READ_EVERY_SECONDS = 5.0


def default_log_dir(now: datetime | None = None) -> Path:
    """TensorBoard's own default folder, ``runs/<Mon DD_HH-MM-SS>_<host>`` in the working directory.

    Example:
        >>> default_log_dir(datetime(2025, 5, 4, 22, 14, 54)).name.startswith("May04_22-14-54_")
        True
    """
    return Path("runs") / f"{(now or datetime.now()).strftime('%b%d_%H-%M-%S')}_{socket.gethostname()}"


def claim_log_dir(parent: str | Path = "runs", now: datetime | None = None) -> Path:
    """Create and return a new folder ``<parent>/<Mon DD_HH-MM-SS>_<host>``, with ``-2``, ``-3``,
    ... appended when a run of the same second (or another process) has it already: two runs never
    share a folder.

    Example:
        >>> import tempfile
        >>> parent, now = tempfile.mkdtemp(), datetime(2025, 5, 4)
        >>> first, second = claim_log_dir(parent, now), claim_log_dir(parent, now)
        >>> second.name == first.name + "-2"
        True
    """
    base = Path(parent) / default_log_dir(now).name
    base.parent.mkdir(parents=True, exist_ok=True)
    number = 1
    while True:
        folder = base if number == 1 else base.with_name(f"{base.name}-{number}")
        try:
            folder.mkdir()  # exclusive: fails when the folder exists
        except FileExistsError:
            number += 1
            continue
        return folder


class LogFolder:
    """The folder trainwell chooses for a fit's files: claimed (``claim_log_dir``) once per fit, by
    the first logger that asks, so that loggers sharing it (``log_to=["csv", "tensorboard"]``) write
    to one folder and each fit gets its own."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.fit: weakref.ref[Run] | None = None

    def claim(self, run: Run) -> Path:
        """The folder of ``run``'s fit, created when ``run`` asks first."""
        if self.path is None or self.fit is None or self.fit() is not run:
            self.path, self.fit = claim_log_dir(), weakref.ref(run)
        return self.path


class StepLosses:
    """The batch loss every ``every_n_steps`` optimizer steps, without a host synchronisation per step.

    Each chosen step keeps its loss as a (detached) device tensor; the kept losses are read together,
    in one transfer, once ``seconds`` have passed since the last read (the host clock is looked at
    only on the chosen steps) and whenever ``read`` is called (at the end of each epoch). With
    gradient accumulation only batches that complete an optimizer step count.

    Args:
        every_n_steps: Keep the loss of every N-th optimizer step (``run.global_step``).
        seconds: Read the kept losses at most this long after the previous read (None:
            ``READ_EVERY_SECONDS``).

    Example:
        >>> losses = StepLosses(every_n_steps=10)
        >>> losses.read()
        []
    """

    def __init__(self, every_n_steps: int, seconds: float | None = None) -> None:
        check_count("every_n_steps", every_n_steps)
        self.every_n_steps = every_n_steps
        self.seconds = READ_EVERY_SECONDS if seconds is None else seconds
        self.steps: list[int] = []
        self.losses: list[torch.Tensor] = []
        self.read_at = time.monotonic()

    def keep(self, run: Run) -> list[tuple[int, float]]:
        """At the end of a batch: keep its loss when it completed a chosen step. Returns the kept
        ``(step, loss)`` pairs when it is time to read them, else ``[]``."""
        if run.window_batches or run.loss is None or run.global_step % self.every_n_steps:
            return []
        self.steps.append(run.global_step)
        self.losses.append(run.loss.detach().clone())  # a copy: the step may reuse its tensor
        if time.monotonic() - self.read_at < self.seconds:
            return []
        return self.read()

    def read(self) -> list[tuple[int, float]]:
        """Every kept ``(step, loss)`` pair, read in one transfer, and forget them."""
        self.read_at = time.monotonic()
        if not self.losses:
            return []
        values = torch.stack(self.losses).float().tolist()
        pairs = list(zip(self.steps, values, strict=True))
        self.steps, self.losses = [], []
        return pairs


class CSVLogger(Callback):
    """Writes one row per epoch (``epoch`` 1-based, then every log key) to a CSV file.

    Rows are flushed each epoch, so the file is useful while training runs. Only the main
    process writes. A resumed run continues the file: the rows written up to its checkpoint
    are kept (a row written after it, by an epoch the resumed run trains again, is not), with
    or without ``append``.

    Args:
        path: The CSV file. None: ``history.csv`` in a new folder ``runs/<Mon DD_HH-MM-SS>_<host>``
            (TensorBoard's convention; see ``fit(log_to="csv")``) for each fit, created when it
            starts (``-2``, ... appended when the name is taken); a resumed run continues the file
            its checkpoint names.
        append: Add to an existing file (its header is kept) instead of replacing it.
    """

    def __init__(self, path: str | Path | None = None, append: bool = False) -> None:
        self.folder = LogFolder() if path is None else None  # trainwell chooses: a resumed run takes its checkpoint's
        self.path: Path | None = None if path is None else Path(path)
        self.append = append
        self.file: IO[str] | None = None
        self.writer: Any = None
        self.columns: list[str] = []
        self.rows = 0  # data rows in the file: what a checkpoint records
        self.kept: int | None = None  # a resumed run's rows, from its checkpoint

    def on_fit_start(self, run: Run) -> None:
        self.kept = None
        if self.folder is not None:
            self.path = None  # this fit's folder: claimed now, or the checkpoint's
        if run.is_main_process and run.callback_states is None:  # a resumed run opens the file once its state is known
            self._open(run)

    def state_dict(self) -> dict[str, Any]:
        """The file and the rows written so far."""
        return {"rows": self.rows, "path": str(self.path)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep only the rows written up to the checkpoint (in its file, when trainwell chose it)."""
        self.kept = int(state["rows"])
        if self.folder is not None and state.get("path"):
            self.path = Path(state["path"])

    def _open(self, run: Run) -> None:
        if self.path is None:
            assert self.folder is not None
            self.path = self.folder.claim(run) / "history.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
            self._open(run)
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
    """Writes every epoch value (and, when asked, the loss every N steps) as TensorBoard scalars,
    with the epoch (1-based) as the step, and fit's resolved options as the text ``config``.

    Needs the ``tensorboard`` package (``pip install 'trainwell[tensorboard]'``). A resumed run
    continues the same folder; without ``every_n_steps`` the epochs logged after its checkpoint are
    purged (TensorBoard's ``purge_step``), so each epoch shows once. With ``every_n_steps`` (whose
    steps count optimizer steps, not epochs) nothing is purged, and an epoch trained again after a
    resume shows twice.

    Args:
        log_dir: The event-file folder. None: a new folder ``runs/<Mon DD_HH-MM-SS>_<host>`` for
            each fit, as TensorBoard's own ``SummaryWriter`` names it, created when it starts
            (``-2``, ... appended when the name is taken); a resumed run continues the folder its
            checkpoint names.
        every_n_steps: Also log the batch loss as ``batch/loss`` every N optimizer steps (the step
            is the optimizer step). The losses stay on the device and are read together every few
            seconds and at each epoch's end: no host synchronisation per step.
    """

    def __init__(self, log_dir: str | Path | None = None, every_n_steps: int | None = None) -> None:
        if every_n_steps is not None:
            check_count("every_n_steps", every_n_steps)
        self.folder = (
            LogFolder() if log_dir is None else None
        )  # trainwell chooses: a resumed run takes its checkpoint's
        self.log_dir: Path | None = None if log_dir is None else Path(log_dir)
        self.every_n_steps = every_n_steps
        self.writer: Any = None
        self.step_losses: StepLosses | None = None
        self.purge_step: int | None = None
        self.config: dict[str, Any] = {}
        if every_n_steps is not None:
            self.on_train_batch_end = self._log_step  # type: ignore[method-assign]

    def on_fit_start(self, run: Run) -> None:
        self.writer, self.purge_step, self.config = None, None, {}
        if self.folder is not None:
            self.log_dir = None  # this fit's folder: claimed now, or the checkpoint's
        if not run.is_main_process:
            return
        self._summary_writer()  # refuses a missing package before training
        if run.callback_states is None:  # a resumed run opens its folder once its state is known
            self.config = dict(run.config)
            self._open(run)
        elif self.every_n_steps is None:
            self.purge_step = run.start_epoch + 1  # the first epoch the resumed run logs
        if self.every_n_steps is not None:
            self.step_losses = StepLosses(self.every_n_steps)

    def state_dict(self) -> dict[str, Any]:
        """The event-file folder."""
        return {"log_dir": str(self.log_dir)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the checkpoint's folder, when trainwell chose it."""
        if self.folder is not None and state.get("log_dir"):
            self.log_dir = Path(state["log_dir"])

    def _summary_writer(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise config_error(
                "The TensorBoard callback needs the tensorboard package.",
                "import tensorboard failed",
                "pip install 'trainwell[tensorboard]' (or pip install tensorboard).",
            ) from None
        return SummaryWriter

    def _open(self, run: Run) -> Any:
        if self.writer is None:
            if self.log_dir is None:
                assert self.folder is not None
                self.log_dir = self.folder.claim(run)
            self.writer = self._summary_writer()(str(self.log_dir), purge_step=self.purge_step)
            if self.config:
                table = "\n".join(f"| {key} | {value} |" for key, value in self.config.items())
                self.writer.add_text("config", f"| option | value |\n|---|---|\n{table}", 0)
        return self.writer

    def _log_step(self, run: Run) -> None:
        if self.step_losses is not None:
            self._write_steps(run, self.step_losses.keep(run))

    def _write_steps(self, run: Run, pairs: list[tuple[int, float]]) -> None:
        for step, value in pairs:
            self._open(run).add_scalar(STEP_KEY, value, step)

    def on_epoch_end(self, run: Run) -> None:
        if not run.is_main_process:
            return
        if self.step_losses is not None:
            self._write_steps(run, self.step_losses.read())
        writer = self._open(run)
        for key, value in run.logs.items():
            writer.add_scalar(key, value, run.epoch + 1)
        writer.flush()

    def on_fit_end(self, run: Run) -> None:
        if self.step_losses is not None and run.is_main_process:
            self._write_steps(run, self.step_losses.read())  # the steps of an epoch that did not end
        self.step_losses = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
