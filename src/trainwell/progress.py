"""The progress display: a live line (terminal), a widget (notebook) or one line per epoch (logs).

Owns: everything ``fit``, ``evaluate`` and ``predict`` print. Reads the running sums at most
``REFRESH_SECONDS`` apart, so the display never forces a device synchronisation per step.
"""

from __future__ import annotations

import math
import sys
import time
from typing import IO, Any, Literal

from trainwell.batches import Batches
from trainwell.callbacks import Callback
from trainwell.history import TIME_KEYS
from trainwell.run import Run

DisplayMode = Literal["live", "notebook", "lines"]
REFRESH_SECONDS = 0.1
LINE_EVERY_SECONDS = 30.0
_BAR_FORMAT = "{desc}  {n_fmt}/{total_fmt} [{bar:30}]  {metrics}  {elapsed_s:.1f}s  ETA {remaining_s:.1f}s"


def choose_mode(progress: bool | str, stream: IO[str]) -> DisplayMode | None:
    """The display for ``progress`` (True / False / "auto" / "plot") writing to ``stream``.

    "auto" is the live line in a terminal, the widget in a notebook, and plain epoch lines
    otherwise (log files, CI); True is the live line (or widget) even when the output is not
    a terminal; False is nothing.
    """
    if progress is False:
        return None
    if _in_notebook():
        return "notebook"
    if progress is True or _is_terminal(stream):
        return "live"
    return "lines"


def choose_pass_mode(progress: bool | str, stream: IO[str]) -> DisplayMode | None:
    """The display of ``evaluate`` and ``predict``: as ``choose_mode``, except that "auto" in a
    notebook is the log's: a pass is often short and its result is the cell's output, so a
    notebook, like a log, sees lines only from a pass that runs long (True shows the widget).

    Example:
        >>> import io
        >>> choose_pass_mode("auto", io.StringIO()), choose_pass_mode(False, io.StringIO())
        ('lines', None)
    """
    mode = choose_mode(progress, stream)
    return "lines" if mode == "notebook" and progress == "auto" else mode


def format_logs(logs: dict[str, float], fraction_keys: set[str]) -> str:
    """``loss 0.2314  accuracy 93.41%``: fractions as percentages, the rest with 4 significant digits.

    Example:
        >>> format_logs({"loss": 0.23141, "accuracy": 0.93412}, {"accuracy"})
        'loss 0.2314  accuracy 93.41%'
    """
    parts = []
    for key, value in logs.items():
        if key in fraction_keys and math.isfinite(value):
            parts.append(f"{key} {value * 100:.2f}%")
        else:
            parts.append(f"{key} {value:.4g}" if abs(value) >= 1e4 or 0 < abs(value) < 1e-3 else f"{key} {value:.4f}")
    return "  ".join(parts)


class ProgressDisplay(Callback):
    """Shows training as it goes; added last by ``fit`` unless ``progress=False``.

    In ``evaluate`` and ``predict`` it shows their pass the same way: a live line, then one line
    with the batches done, the time and the values; in logs a pass prints lines only once it has
    run ``LINE_EVERY_SECONDS`` (then its summary line too), so short passes print nothing.

    Args:
        mode: ``"live"``, ``"notebook"`` or ``"lines"`` (see ``choose_mode``).
        stream: Where to write (default: standard output at the time of writing).
        chart: In a notebook, also draw a live chart of the loss and metrics.
    """

    def __init__(self, mode: DisplayMode, stream: IO[str] | None = None, chart: bool = False) -> None:
        self.mode = mode
        self.stream = stream
        self.chart = chart
        self.bar: Any = None
        self.epoch_started = 0.0
        self.last_refresh = 0.0
        self.last_line = 0.0
        self.first_batch = 0  # batches_done when this epoch's display began (> 0 after a resume)
        self.next_check = 0  # the batch at which to read the clock again
        self.printed = False  # whether this pass printed a progress line (logs)

    def _out(self) -> IO[str]:
        return self.stream if self.stream is not None else sys.stdout

    def _fractions(self, run: Run) -> set[str]:
        return run.train_tally.fraction_keys | run.val_tally.fraction_keys

    def _title(self, run: Run) -> str:
        if _own_pass(run):
            return "Predict" if run.phase == "predict" else "Evaluate"
        return f"Epoch {run.epoch + 1}/{run.epochs}"

    def on_epoch_start(self, run: Run) -> None:
        assert run.train_batches is not None
        self._start(run, run.batches_done, run.train_batches.num_batches)

    def _start(self, run: Run, done: int, total: int | None) -> None:
        """Start showing a pass of ``total`` batches (None: unknown), ``done`` of them done already."""
        self.epoch_started = self.last_refresh = self.last_line = time.perf_counter()
        self.first_batch = done
        self.next_check = done + 1
        self.printed = False
        if self.mode == "lines":
            return
        self.bar = _bar_class(self.mode == "notebook")(
            total=total,
            initial=done,
            desc=self._title(run),
            bar_format=_BAR_FORMAT,
            ascii=".>=",
            file=self._out(),
            leave=False,
            dynamic_ncols=True,
            mininterval=0,  # on_train_batch_end already limits refreshes to REFRESH_SECONDS
            miniters=1,
        )

    def on_train_batch_end(self, run: Run) -> None:
        if run.batches_done >= self.next_check:
            self._advance(run, run.batches_done, _total(run.train_batches))

    def on_eval_batch_end(self, run: Run) -> None:
        if _own_pass(run) and run.eval_batches_done >= self.next_check:
            self._advance(run, run.eval_batches_done, _total(run.eval_batches))

    def _advance(self, run: Run, done: int, total: int | None) -> None:
        """Redraw the bar (or, in logs, print a line every ``LINE_EVERY_SECONDS``) when due."""
        now = time.perf_counter()
        wait = REFRESH_SECONDS - (now - self.last_refresh)
        if wait > 0:
            self._check_again_in(wait, done, now)
            return
        self.last_refresh = now
        self._check_again_in(REFRESH_SECONDS, done, now)
        if self.bar is not None:
            self.bar.metrics = self._running(run)
            self.bar.update(done - self.bar.n)
        elif now - self.last_line >= LINE_EVERY_SECONDS:
            self.last_line = now
            self.printed = True
            position = f"{done}/{total if total is not None else '?'}"
            self._print(_join(self._title(run), position, self._running(run), _seconds(now - self.epoch_started)))

    def _running(self, run: Run) -> str:
        """The pass's values so far (``predict`` has none: nothing is read)."""
        return "" if run.phase == "predict" else format_logs(run.running_logs(), self._fractions(run))

    def _check_again_in(self, seconds: float, done: int, now: float) -> None:
        """Skip the clock for the batches that half of ``seconds`` takes at this pass's pace, so
        most steps cost one comparison and the refreshes stay ~REFRESH_SECONDS apart."""
        elapsed = now - self.epoch_started
        per_second = (done - self.first_batch) / elapsed if elapsed > 0 else 0.0
        self.next_check = done + max(1, int(per_second * seconds / 2))

    def on_eval_start(self, run: Run) -> None:
        if _own_pass(run):
            self._start(run, 0, _total(run.eval_batches))
        elif self.bar is not None:
            self.bar.metrics = "validating..."
            self.bar.refresh()

    def on_eval_end(self, run: Run) -> None:
        if not _own_pass(run):
            return
        seconds = time.perf_counter() - self.epoch_started
        self._close_bar()
        if self.mode == "lines" and not self.printed:  # a short pass in a log: nothing at all
            return
        total = _total(run.eval_batches)
        position = f"{run.eval_batches_done}/{total if total is not None else '?'} batches"
        logs = format_logs(run.eval_logs, self._fractions(run))
        self._print(_join(self._title(run), position, _seconds(seconds), logs))

    def on_epoch_end(self, run: Run) -> None:
        self._close_bar()
        seconds = run.logs.get("time", time.perf_counter() - self.epoch_started)
        speed = run.logs.get("samples_per_second", math.nan)
        logs = format_logs({key: value for key, value in run.logs.items() if key not in TIME_KEYS},
                           self._fractions(run))  # fmt: skip
        self._print(f"{self._title(run)}  {_seconds(seconds)}  {_speed(speed)}  {logs}")

    def on_fit_end(self, run: Run) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _print(self, line: str) -> None:
        out = self._out()
        out.write(line + "\n")
        out.flush()


def _bar_class(notebook: bool) -> type[Any]:
    """tqdm's bar (or notebook widget) with a ``{metrics}`` field, as tqdm's docs show for
    extra format fields; tqdm is imported only when a bar is drawn."""
    base: type[Any]
    if notebook:
        from tqdm.auto import tqdm as base
    else:
        from tqdm.std import tqdm as base

    class EpochBar(base):  # type: ignore[misc]
        metrics = ""
        monitor_interval = 0  # no monitor thread: the refresh rate is set by on_train_batch_end

        @property
        def format_dict(self) -> dict[str, Any]:
            return {**super().format_dict, "metrics": self.metrics}

    return EpochBar


def _own_pass(run: Run) -> bool:
    """Whether the run is ``evaluate``'s or ``predict``'s own pass (no training), not fit's validation."""
    return run.train_batches is None


def _total(batches: Batches | None) -> int | None:
    """The pass's number of batches (None: unknown, as for a generator)."""
    return batches.num_batches if batches is not None else None


def _join(*parts: str) -> str:
    return "  ".join(part for part in parts if part)


def _speed(samples_per_second: float) -> str:
    return f"{samples_per_second:,.0f} samples/s" if math.isfinite(samples_per_second) else ""


def _seconds(seconds: float) -> str:
    return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.0f}s"


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    get_ipython = getattr(shell, "get_ipython", None)
    return get_ipython is not None and type(get_ipython()).__name__ == "ZMQInteractiveShell"
