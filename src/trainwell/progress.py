"""The progress display: a live line (terminal), one HTML output (notebook) or lines (logs).

Owns: everything ``fit``, ``evaluate`` and ``predict`` show. Reads the running sums at most
``REFRESH_SECONDS`` apart (``NOTEBOOK_REFRESH_SECONDS`` in a notebook), so the display never
forces a device synchronisation per step.
"""

from __future__ import annotations

import math
import sys
import time
from typing import IO, Any, Literal

from trainwell import notebook
from trainwell.batches import Batches
from trainwell.callbacks import Callback
from trainwell.history import TIME_KEYS, History
from trainwell.metrics import known_direction
from trainwell.plots import quantities
from trainwell.run import Run

DisplayMode = Literal["live", "notebook", "lines"]
REFRESH_SECONDS = 0.1
NOTEBOOK_REFRESH_SECONDS = 0.25  # each refresh is a message to the browser
SENDING_SHARE = 0.01  # at most this share of the time goes to building and sending notebook updates
LONGEST_WAIT_SECONDS = 2.0  # ... unless that would leave the display longer than this without one
CHART_SECONDS = 1.0  # the live chart is redrawn at most this often (and for the final state)
LINE_EVERY_SECONDS = 30.0
_BAR_FORMAT = "{desc}  {n_fmt}/{total_fmt} [{bar:30}]  {metrics}  {elapsed_s:.1f}s  ETA {remaining_s:.1f}s"


def choose_mode(progress: bool | str, stream: IO[str]) -> DisplayMode | None:
    """The display for ``progress`` (True / False / "auto" / "plot") writing to ``stream``.

    "auto" (and "plot") is the live line in a terminal, the HTML display in a notebook, and
    plain epoch lines otherwise (log files, CI); True is the live line (or the HTML display)
    even when the output is not a terminal; False is nothing.
    """
    if progress is False:
        return None
    if notebook.in_notebook():
        return "notebook"
    if progress is True or _is_terminal(stream):
        return "live"
    return "lines"


def choose_pass_mode(progress: bool | str, stream: IO[str]) -> DisplayMode | None:
    """The display of ``evaluate`` and ``predict``: as ``choose_mode``, except that "auto" in a
    notebook is the log's: a pass is often short and its result is the cell's output, so a
    notebook, like a log, sees lines only from a pass that runs long (True shows its bar).

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
    return "  ".join(f"{key} {format_value(value, key in fraction_keys)}" for key, value in logs.items())


def format_value(value: float, fraction: bool) -> str:
    """One value as ``format_logs`` shows it.

    Example:
        >>> format_value(0.93412, True), format_value(0.23141, False), format_value(12345.0, False)
        ('93.41%', '0.2314', '1.234e+04')
    """
    if fraction and math.isfinite(value):
        return f"{value * 100:.2f}%"
    return f"{value:.4g}" if abs(value) >= 1e4 or 0 < abs(value) < 1e-3 else f"{value:.4f}"


class ProgressDisplay(Callback):
    """Shows training as it goes; added last by ``fit`` unless ``progress=False``.

    In a notebook it is one HTML output replaced in place: during an epoch a bar with the running
    values and the time left, above a table of the finished epochs (the best value of each column
    in bold) and, with ``chart``, a chart of the loss and metrics. Once ``fit`` ends only the table
    and chart remain, so a saved notebook shows them as they were, with no stale bars.

    In ``evaluate`` and ``predict`` it shows their pass the same way: a live line (or bar), then
    one line with the batches done, the time and the values; in logs a pass prints lines only once
    it has run ``LINE_EVERY_SECONDS`` (then its summary line too), so short passes print nothing.

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
        self.board = _Board(chart) if mode == "notebook" else None
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
        if self.board is not None:
            self.board.start(run, self._title(run), done, total, self._fractions(run))
        elif self.mode == "live":
            self.bar = _bar_class()(
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
        if not _own_pass(run):
            if self.board is not None:
                self.board.send_held(run)  # e.g. the epoch's end, held back by the refresh rate
        elif run.eval_batches_done >= self.next_check:
            self._advance(run, run.eval_batches_done, _total(run.eval_batches))

    def _advance(self, run: Run, done: int, total: int | None) -> None:
        """Redraw the bar (or, in logs, print a line every ``LINE_EVERY_SECONDS``) when due."""
        now = time.perf_counter()
        refresh = NOTEBOOK_REFRESH_SECONDS if self.board is not None else REFRESH_SECONDS
        wait = refresh - (now - self.last_refresh)
        if wait > 0:
            self._check_again_in(wait, done, now)
            return
        self.last_refresh = now
        self._check_again_in(refresh, done, now)
        if self.board is not None:
            if now < self.board.due:  # the last update took long: no read for one not sent
                return
            running = {} if run.phase == "predict" else run.running_logs()
            elapsed = now - self.epoch_started
            left = _time_left(elapsed, done - self.first_batch, None if total is None else total - done)
            self.board.advance(run, done, running, _join(_seconds(elapsed), left))
        elif self.bar is not None:
            self.bar.metrics = self._running(run)
            self.bar.update(done - self.bar.n)
        elif now - self.last_line >= LINE_EVERY_SECONDS:
            self.last_line = now
            self.printed = True
            position = f"{done}/{_or_unknown(total)}"
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
        elif self.board is not None:
            self.board.validating(run)
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
        position = f"{run.eval_batches_done}/{_or_unknown(total)} batches"
        logs = format_logs(run.eval_logs, self._fractions(run))
        line = _join(self._title(run), position, _seconds(seconds), logs)
        if self.board is not None:
            self.board.finish(run, line)
        else:
            self._print(line)

    def on_epoch_end(self, run: Run) -> None:
        self._close_bar()
        if self.board is not None:
            self.board.epoch_end(run)
            return
        seconds = run.logs.get("time", time.perf_counter() - self.epoch_started)
        speed = run.logs.get("samples_per_second", math.nan)
        logs = format_logs({key: value for key, value in run.logs.items() if key not in TIME_KEYS},
                           self._fractions(run))  # fmt: skip
        self._print(f"{self._title(run)}  {_seconds(seconds)}  {_speed(speed)}  {logs}")

    def on_fit_end(self, run: Run) -> None:
        self._close_bar()
        if self.board is not None:
            self.board.finish(run)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _print(self, line: str) -> None:
        out = self._out()
        out.write(line + "\n")
        out.flush()


class _Board:
    """The notebook's display of a run: the current pass's bar over the table of finished epochs
    (and the chart), one output replaced in place. Everything it shows comes from the History
    and the running values the display already reads: it reads nothing from the device itself.

    Sends at most one update per ``NOTEBOOK_REFRESH_SECONDS`` (an epoch's start and end included,
    so many short epochs cost no more than one long one), and less often once an update itself
    takes long (a table of a thousand epochs): the next waits ``SENDING_SHARE`` times the last
    one's cost, up to ``LONGEST_WAIT_SECONDS``. The final state is always sent; an update held
    back is sent at the next hook that finds it due."""

    def __init__(self, chart: bool) -> None:
        self.output = notebook.LiveOutput()
        self.chart = chart
        self.table = _EpochTable()
        self.fractions: set[str] = set()
        self.title = ""
        self.total: int | None = None
        self.bar: tuple[int, str] | None = None  # (batches done, details) of the pass shown, if any
        self.ticks: dict[str, list[notebook.Point]] = {}  # the epoch's running values, for the chart
        self.drawn = ("", -math.inf)  # the chart's HTML, and when it was drawn
        self.due = -math.inf  # when the next update may be sent
        self.held = False  # whether a change waits to be sent

    def start(self, run: Run, title: str, done: int, total: int | None, fractions: set[str]) -> None:
        self.title, self.total, self.fractions = title, total, fractions
        self.bar, self.ticks = (done, ""), {}
        self._show(run)

    def advance(self, run: Run, done: int, running: dict[str, float], timing: str) -> None:
        self.bar = (done, _join(format_logs(running, self.fractions), timing))
        if self.chart and self.total and not _own_pass(run):
            x = run.epoch + done / self.total
            for key, value in running.items():
                self.ticks.setdefault(key, []).append((x, value))
        self._show(run)

    def validating(self, run: Run) -> None:
        if self.bar is not None:
            self.bar = (self.bar[0], "validating...")
            self._show(run)

    def send_held(self, run: Run) -> None:
        """Send a held-back update once it is due (called during fit's validation)."""
        if self.held:
            self._show(run)

    def epoch_end(self, run: Run) -> None:
        self.bar, self.ticks = None, {}
        self._show(run)

    def finish(self, run: Run, line: str = "") -> None:
        """Send the final state: the table (and chart), or ``line`` (an evaluate's summary); where
        a pass stopped before its end, a line saying so in place of its bar."""
        if self.bar is not None and not line:
            done = run.eval_batches_done if _own_pass(run) else run.batches_done
            where = "validating" if self.bar[1] == "validating..." else f"at batch {done}/{_or_unknown(self.total)}"
            line = f"{self.title} stopped {where}"
        self.bar, self.ticks = None, {}
        self._show(run, line=line, final=True)

    def _show(self, run: Run, line: str = "", final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now < self.due:
            self.held = True
            return
        self.held = False
        html_parts, text_parts = [], []
        if self.bar is not None:
            done, details = self.bar
            html_parts.append(notebook.bar_html(self.title, done, self.total, details))
            text_parts.append(_join(self.title, f"{done}/{_or_unknown(self.total)}", details))
        elif line:
            html_parts.append(f"<div>{notebook.escape(line)}</div>")
            text_parts.append(line)
        table_html, table_text = self.table.render(run.history, self.fractions)
        chart = self._chart(run, now, final) if self.chart and not _own_pass(run) else ""
        if table_html or chart:
            html_parts.append(f'<div style="display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start">'
                              f"{table_html}{chart}</div>")  # fmt: skip
            text_parts.append(table_text)
        if html_parts or self.output.handle is not None:  # a fit that failed before it began: no output
            self.output.show("".join(html_parts), "\n".join(part for part in text_parts if part))
        spent = time.perf_counter() - now
        self.due = now + max(NOTEBOOK_REFRESH_SECONDS, min(spent / SENDING_SHARE, LONGEST_WAIT_SECONDS))

    def _chart(self, run: Run, now: float, final: bool) -> str:
        """One panel per quantity: the finished epochs' values, and this epoch's running ones;
        redrawn at most once per ``CHART_SECONDS`` (and for the final state)."""
        if not final and now - self.drawn[1] < CHART_SECONDS:
            return self.drawn[0]
        history = run.history
        names = quantities(key for key in history if key not in (*TIME_KEYS, "lr"))
        names += [key for key in self.ticks if key not in names]
        panels = []
        for name in names:
            series = {}
            for label, key in (("train", name), ("validation", f"val_{name}")):
                points = [(epoch + 1.0, value) for epoch, value in enumerate(history.get(key, []))]
                points += self.ticks.get(key, [])
                if points:
                    series[label] = points
            panels.append(notebook.svg_image(notebook.chart_svg(name, series, run.epochs)))
        self.drawn = ("".join(panels), now)
        return self.drawn[0]


class _EpochTable:
    """The History as a table: the epoch, its time, then every value, each row formatted once;
    in each column whose direction is known (losses, errors, accuracy, F1, ...: ``known_direction``)
    the best value of two epochs or more is marked. A column of unknown direction (a custom
    metric's name) is not: the table does not guess which end is better."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.table = notebook.Table([])

    def render(self, history: History, fractions: set[str]) -> tuple[str, str]:
        """(HTML, text) of ``history``'s epochs; ("", "") before the first."""
        keys = [key for key in history if key not in TIME_KEYS]
        if keys != self.keys:  # a key first seen now: every row again (the History pads the earlier ones)
            self.keys, self.table = keys, notebook.Table(["epoch", "time", *keys])
        times = history.get("time", [])
        for epoch in range(len(self.table.rows), history.epochs):
            seconds = times[epoch] if epoch < len(times) else math.nan
            self.table.append([str(epoch + 1), _seconds(seconds) if math.isfinite(seconds) else ""]
                              + [format_value(history[key][epoch], key in fractions) for key in keys])  # fmt: skip
        if not self.table.rows:
            return "", ""
        best = set()
        for column, key in enumerate(keys, start=2):
            direction = known_direction(key)
            values = [value for value in history[key] if math.isfinite(value)]
            if direction is None or len(values) < 2 or min(values) == max(values):
                continue
            top = max(values) if direction == "max" else min(values)
            best |= {(epoch, column) for epoch, value in enumerate(history[key]) if value == top}
        return self.table.render(best)


def _time_left(elapsed: float, done: int, left: int | None) -> str:
    if left is None or done <= 0:
        return ""
    return f"ETA {_seconds(elapsed / done * left)}"


def _bar_class() -> type[Any]:
    """tqdm's bar with a ``{metrics}`` field, as tqdm's docs show for extra format fields; tqdm
    is imported only when a bar is drawn."""
    from tqdm.std import tqdm

    class EpochBar(tqdm):  # type: ignore[type-arg]
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


def _or_unknown(total: int | None) -> str:
    return "?" if total is None else str(total)


def _join(*parts: str) -> str:
    return "  ".join(part for part in parts if part)


def _speed(samples_per_second: float) -> str:
    return f"{samples_per_second:,.0f} samples/s" if math.isfinite(samples_per_second) else ""


def _seconds(seconds: float) -> str:
    return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.0f}s"


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
