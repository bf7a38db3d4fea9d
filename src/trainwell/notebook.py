"""What a notebook shows: recognising one, one output replaced in place, its HTML, figures inline.

Owns: every use of IPython, which trainwell never imports itself: it is only used when a
notebook kernel has already loaded it. A notebook is recognised by what it can do, a kernel
behind the shell (Jupyter, JupyterLab, VS Code and Colab all run one), not by a class name.
The HTML needs nothing in the browser (no widgets, no scripts), so a saved notebook shows it
as it was, and every output also carries a plain-text form for viewers that show no HTML.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

Point = tuple[float, float]


def in_notebook() -> bool:
    """Whether this process is a notebook kernel (its front end shows the HTML; one that cannot,
    such as a console attached to a kernel, shows the plain-text form).

    Example:
        >>> in_notebook()  # a test run, a script, a terminal IPython: no kernel behind the shell
        False
    """
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    return getattr(shell, "kernel", None) is not None


class LiveOutput:
    """One output of the running cell, replaced in place (an IPython display id): a saved
    notebook keeps only its last state."""

    def __init__(self) -> None:
        self.handle: Any = None

    def show(self, page: str, text: str) -> None:
        """Show ``page`` (HTML), or ``text`` where HTML is not shown, in place of the previous."""
        bundle = {"text/html": page, "text/plain": text}
        if self.handle is None:
            from IPython.display import display

            self.handle = display(bundle, raw=True, display_id=True)  # type: ignore[no-untyped-call]
        else:
            self.handle.update(bundle, raw=True)


def show_figure(figure: Any, now: bool) -> None:
    """In a notebook, show a matplotlib ``figure`` as a PNG whenever it is a cell's value, and
    (when ``now``) at the end of the cell that made it, as it is then (changed after being made,
    it shows changed), unless the cell showed it already as its value. Outside a notebook, nothing."""
    if not in_notebook():
        return
    figure._ipython_display_ = functools.partial(_display_figure, figure)  # IPython's hook: shown by us only
    if now:
        _at_cell_end.append(figure)
        _call_at_cell_end()


_at_cell_end: list[Any] = []  # figures to show when the running cell ends
_cell = [0]  # cells ended since trainwell first showed a figure: tells one cell from the next


def _call_at_cell_end() -> None:
    from IPython import get_ipython

    events = get_ipython().events
    if _end_of_cell not in events.callbacks["post_run_cell"]:
        events.register("post_run_cell", _end_of_cell)


def _end_of_cell(*_: Any) -> None:
    figures = list(_at_cell_end)
    _at_cell_end.clear()
    for figure in figures:
        _display_figure(figure)
    _cell[0] += 1


def _display_figure(figure: Any) -> None:
    from IPython.display import display

    if getattr(figure, "_trainwell_shown_in", None) == _cell[0]:  # shown in this cell already
        return
    figure._trainwell_shown_in = _cell[0]
    picture = io.BytesIO()
    figure.savefig(picture, format="png", dpi=100, bbox_inches="tight")
    png = base64.b64encode(picture.getvalue()).decode("ascii")
    display({"image/png": png, "text/plain": repr(figure)}, raw=True)  # type: ignore[no-untyped-call]


def escape(text: str) -> str:
    """``text`` safe inside HTML."""
    return html.escape(text, quote=True)


class Table:
    """An HTML table and its plain-text twin that grow by rows. Each row is formatted once; a
    render formats again only the rows holding a marked cell (bold in HTML, a ``*`` after it in
    text), so a table of a thousand rows costs little more to send than a short one.

    Example:
        >>> table = Table(["epoch", "loss"])
        >>> table.append(["1", "0.5"]); table.append(["2", "0.4"])
        >>> page, text = table.render({(1, 1)})
        >>> page.count("<b>")
        1
        >>> print(text)
        epoch   loss
            1    0.5
            2    0.4*
    """

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = list(columns)
        self.rows: list[list[str]] = []
        self.html: list[str] = []  # each row's <tr>, unmarked
        self.widths = [len(column) + 1 for column in columns]  # + 1: room for a mark
        self.lines: list[str] | None = []  # each row's text, unmarked (None: the widths changed)

    def append(self, cells: Sequence[str]) -> None:
        self.rows.append(list(cells))
        self.html.append(self._row_html(len(self.rows) - 1, set()))
        widths = [max(width, len(cell) + 1) for width, cell in zip(self.widths, cells, strict=True)]
        if widths != self.widths:
            self.widths, self.lines = widths, None
        elif self.lines is not None:
            self.lines.append(self._row_text(len(self.rows) - 1, set()))

    def render(self, marked: set[tuple[int, int]]) -> tuple[str, str]:
        """(HTML, text) with the cells at ``marked`` (row, column) marked."""
        if self.lines is None:
            self.lines = [self._row_text(row, set()) for row in range(len(self.rows))]
        by_row: dict[int, set[int]] = {}
        for row, column in marked:
            by_row.setdefault(row, set()).add(column)
        body = "".join(
            self._row_html(row, by_row[row]) if row in by_row else line for row, line in enumerate(self.html)
        )
        head = "".join(f"<th>{escape(column)}</th>" for column in self.columns)
        page = (
            '<table style="text-align:right;font-variant-numeric:tabular-nums">'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        )
        header = "  ".join(f"{column} ".rjust(width) for column, width in zip(self.columns, self.widths, strict=True))
        lines = [self._row_text(row, by_row[row]) if row in by_row else line for row, line in enumerate(self.lines)]
        return page, "\n".join([header.rstrip(), *lines])

    def _row_html(self, row: int, marked: set[int]) -> str:
        cells = (
            f"<td><b>{escape(cell)}</b></td>" if column in marked else f"<td>{escape(cell)}</td>"
            for column, cell in enumerate(self.rows[row])
        )
        return f"<tr>{''.join(cells)}</tr>"

    def _row_text(self, row: int, marked: set[int]) -> str:
        cells = zip(self.rows[row], self.widths, strict=True)
        return "  ".join((cell + ("*" if column in marked else " ")).rjust(width)
                         for column, (cell, width) in enumerate(cells)).rstrip()  # fmt: skip


def bar_html(title: str, done: int, total: int | None, details: str) -> str:
    """A progress bar (the browser's own ``<progress>``; indeterminate when ``total`` is None)."""
    maximum = f' max="{total}"' if total else ""
    value = f' value="{done}"' if total else ""
    position = f"{done}/{total if total is not None else '?'}"
    return (
        f'<div style="font-variant-numeric:tabular-nums;margin-bottom:4px"><b>{escape(title)}</b>&emsp;'
        f'<progress{value}{maximum} style="width:18em;vertical-align:middle"></progress>&emsp;'
        f"{position}&emsp;{escape(details)}</div>"
    )


_COLORS = ("#1f77b4", "#ff7f0e")  # matplotlib's first two: legible on light and dark themes
_INK = "#888888"  # axes and text: an image does not inherit the page's colour, and grey reads on both
_WIDTH, _HEIGHT = 260, 170
_LEFT, _RIGHT, _TOP, _BOTTOM = 46, 10, 24, 30


def chart_svg(title: str, series: Mapping[str, Sequence[Point]], x_end: float) -> str:
    """A small line chart as inline SVG (no scripts, no images): one line per entry of
    ``series`` (label: points), x from 0 to ``x_end`` epochs. Non-finite points are left out.

    Example:
        >>> svg = chart_svg("loss", {"train": [(1, 0.9), (2, 0.5)], "validation": [(1, 1.0)]}, 2)
        >>> svg.startswith("<svg"), svg.count("<polyline"), svg.count("<circle")  # a line, and a lone point
        (True, 1, 1)
    """
    finite = {label: [(x, y) for x, y in points if math.isfinite(y)] for label, points in series.items()}
    values = [y for points in finite.values() for _, y in points]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    y_ticks = nice_ticks(low, high)
    y_low, y_high = min(y_ticks[0], low), max(y_ticks[-1], high)
    x_ticks = [tick for tick in nice_ticks(0, max(x_end, 1), integers=True) if tick <= max(x_end, 1)]
    x_high = max(x_end, 1.0)
    plot_width, plot_height = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM

    def at(x: float, y: float) -> str:
        horizontal = _LEFT + plot_width * x / x_high
        vertical = _TOP + plot_height * (1 - (y - y_low) / ((y_high - y_low) or 1.0))
        return f"{horizontal:.1f},{vertical:.1f}"

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" '
        f'style="font:10px sans-serif;fill:{_INK};stroke:{_INK}">',
        f'<text x="{_LEFT}" y="12" stroke="none" font-weight="bold">{escape(title)}</text>',
        f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_width}" height="{plot_height}" fill="none" stroke-opacity="0.4"/>',
    ]
    for tick in y_ticks:
        y = at(0, tick).split(",")[1]
        parts.append(f'<text x="{_LEFT - 4}" y="{y}" dy="3" text-anchor="end" stroke="none">{_tick_label(tick)}</text>')
        parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + plot_width}" y1="{y}" y2="{y}" stroke-opacity="0.12"/>')
    for tick in x_ticks:
        x = at(tick, y_low).split(",")[0]
        parts.append(f'<text x="{x}" y="{_HEIGHT - 16}" text-anchor="middle" stroke="none">{_tick_label(tick)}</text>')
    parts.append(
        f'<text x="{_LEFT + plot_width / 2}" y="{_HEIGHT - 4}" text-anchor="middle" stroke="none">epoch</text>'
    )
    for index, (label, points) in enumerate(finite.items()):
        color = _COLORS[index % len(_COLORS)]
        legend_x = _WIDTH - _RIGHT - 70 * (len(finite) - index)
        parts.append(f'<text x="{legend_x + 14}" y="12" stroke="none">{escape(label)}</text>')
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 10}" y1="8" y2="8" stroke="{color}" stroke-width="2"/>')
        if len(points) == 1:
            x, y = at(*points[0]).split(",")
            parts.append(f'<circle cx="{x}" cy="{y}" r="2.5" fill="{color}" stroke="none"/>')
        elif points:
            line = " ".join(at(x, y) for x, y in points)
            parts.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.6"/>')
    parts.append("</svg>")
    return "".join(parts)


def svg_image(svg: str) -> str:
    """``svg`` as an HTML image: JupyterLab and others remove inline ``<svg>`` from a notebook
    they do not trust (one received from someone else), but keep images with data addresses."""
    data = base64.b64encode(svg.encode()).decode("ascii")
    return f'<img src="data:image/svg+xml;base64,{data}" alt="chart" width="{_WIDTH}" height="{_HEIGHT}">'


def nice_ticks(low: float, high: float, integers: bool = False) -> list[float]:
    """About four round tick values covering ``low`` .. ``high`` (steps of 1, 2 or 5 x 10^k).

    Example:
        >>> nice_ticks(0.23, 0.91), nice_ticks(0, 7, integers=True)
        ([0.2, 0.4, 0.6, 0.8, 1.0], [0, 2, 4, 6, 8])
    """
    if high <= low:
        low, high = low - 0.5, high + 0.5
    raw = (high - low) / 4
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(factor * magnitude for factor in (1, 2, 5, 10) if factor * magnitude >= raw)
    if integers:
        step = max(1, round(step))
    first = math.floor(low / step) * step
    count = math.ceil((high - first) / step - 1e-9) + 1
    return [round(first + index * step, 12) for index in range(count)]


def _tick_label(value: float) -> str:
    return f"{value:.4g}"
