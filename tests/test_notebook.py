"""The notebook display and inline figures, in a real notebook: cells executed by nbclient in an
ipykernel kernel, then the saved outputs inspected (and, in-process, the display's updates)."""

from __future__ import annotations

import base64
import html.parser
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import trainwell as tw
from trainwell import notebook, progress
from trainwell.metrics import higher_is_better
from trainwell.progress import format_value

nbformat = pytest.importorskip("nbformat", reason="the dev extra installs nbformat, nbclient and ipykernel")
nbclient = pytest.importorskip("nbclient", reason="the dev extra installs nbformat, nbclient and ipykernel")
pytest.importorskip("ipykernel", reason="the dev extra installs nbformat, nbclient and ipykernel")

PNG = b"\x89PNG\r\n\x1a\n"
SETUP = """\
import json, torch, trainwell
torch.manual_seed(0)
x = torch.randn(600, 8)
y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
"""
CELLS = {
    "kernel": "from trainwell.notebook import in_notebook\nin_notebook()",
    "fit": "net = model()\nhistory = trainwell.fit(net, (x, y), loss='cross_entropy', metrics=['accuracy'], epochs=4,"
    " val_split=0.25, seed=0, batch_size=16)",
    "history": "print(json.dumps(history.to_dict()))",
    "value": "history.plot()",
    "mid_cell": "figure = history.plot()\nprint('drawn')",
    "to_file": "figure = history.plot('curves.png')",
    "changed": "changed = history.plot()\nchanged.axes[0].set_yscale('log')",
    "changed_value": "changed = history.plot()\nchanged.axes[0].set_title('changed')\nchanged",
    "again": "figure",
    "lr_finder": "trainwell.find_lr(model(), (x, y), loss='cross_entropy', steps=30).plot()",
    "report": "trainwell.classification_report(net, (x, y), loss='cross_entropy').plot_confusion_matrix()",
    "chart": "chart_history = trainwell.fit(model(), (x, y), loss='cross_entropy', metrics=['accuracy'], epochs=3,"
    " val_split=0.25, seed=0, progress='plot')",
    "first_part": "trainwell.fit(model(), (x, y), loss='cross_entropy', epochs=2, seed=0, checkpoint_dir='run')",
    "resumed": "resumed = trainwell.fit(model(), (x, y), loss='cross_entropy', epochs=4, seed=0, checkpoint_dir='run',"
    " resume=True)",
    "failed_at_start": "class Fails(trainwell.Callback):\n    def on_fit_start(self, run):\n        raise ValueError('no')\n"
    "try:\n    trainwell.fit(model(), (x, y), loss='cross_entropy', callbacks=[Fails()])\nexcept ValueError:\n    pass",
    "evaluate": "trainwell.evaluate(net, (x, y), loss='cross_entropy', metrics=['accuracy'], batch_size=16,"
    " progress=True)",
}


README = Path(__file__).parents[1] / "README.md"


def _readme_block(heading: str) -> str:
    found = re.search(rf"## {heading}\n\n.*?```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert found is not None
    return found.group(1)


CELLS |= {"readme_quick_start": _readme_block("Quick start"), "readme_notebooks": _readme_block("Notebooks")}


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, list[Any]], Path]:
    """The notebook of ``CELLS`` executed in a real kernel and saved: each cell's outputs by name."""
    folder = tmp_path_factory.mktemp("notebook")
    book = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(SETUP)] + [nbformat.v4.new_code_cell(code) for code in CELLS.values()]
    )
    client = nbclient.NotebookClient(book, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(folder)}})  # fmt: skip
    # the kernel's environment is this one (jupyter_client replaces it when env= is given), with
    # IPython's profile in the test's folder rather than the user's home
    client.execute(env=os.environ | {"OMP_NUM_THREADS": "1", "IPYTHONDIR": str(folder / "ipython")})
    nbformat.write(book, folder / "executed.ipynb")
    saved = nbformat.read(folder / "executed.ipynb", as_version=4)
    nbformat.validate(saved)
    assert saved.cells[0].outputs == []
    return {name: cell.outputs for name, cell in zip(CELLS, saved.cells[1:], strict=True)}, folder


class _Table(html.parser.HTMLParser):
    """The header, the cells and the bold cells of the first HTML table."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.header: list[str] = []
        self.rows: list[list[str]] = []
        self.bold: set[tuple[int, int]] = set()
        self._tag = ""
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "tr" and self._tag != "thead":
            self.rows.append([])
        if tag in ("th", "td", "b", "thead"):
            self._tag = tag

    def handle_endtag(self, tag: str) -> None:
        self._tag = "" if tag in ("thead", "td", "th", "b") else self._tag

    def handle_data(self, data: str) -> None:
        if self._tag == "th":
            self.header.append(data)
        elif self._tag in ("td", "b"):
            self.rows[-1].append(data)
            if self._tag == "b":
                self.bold.add((len(self.rows) - 1, len(self.rows[-1]) - 1))


def _only_display(outputs: list[Any]) -> dict[str, str]:
    displays = [output for output in outputs if output.output_type == "display_data"]
    assert len(displays) == 1, outputs
    return displays[0].data  # type: ignore[no-any-return]


def _charts(page: str) -> list[str]:
    """The SVG of each chart panel on ``page``."""
    return [base64.b64decode(data).decode() for data in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', page)]


def _is_png(outputs: list[Any]) -> bool:
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    return len(images) == 1 and base64.b64decode(images[0].data["image/png"]).startswith(PNG)


@pytest.mark.slow
def test_a_fit_leaves_one_clean_table_equal_to_the_history(executed: tuple[dict[str, list[Any]], Path]) -> None:
    outputs, _ = executed
    assert outputs["kernel"][0].data["text/plain"] == "True"  # recognised by its kernel
    assert [output.output_type for output in outputs["fit"]] == ["display_data"]  # one display for the whole fit
    bundle = _only_display(outputs["fit"])
    assert "<progress" not in bundle["text/html"]  # no stale bar
    history = json.loads(outputs["history"][0].text)
    table = _Table(bundle["text/html"])
    keys = ["loss", "accuracy", "val_loss", "val_accuracy"]
    assert table.header == ["epoch", "time", *keys]
    fractions = {"accuracy", "val_accuracy"}
    expected = [
        [str(epoch + 1), *(format_value(history[key][epoch], key in fractions) for key in keys)] for epoch in range(4)
    ]
    assert [[row[0], *row[2:]] for row in table.rows] == expected
    assert [row[1] for row in table.rows] == [f"{seconds:.2f}s" for seconds in history["time"]]
    best = set()
    for column, key in enumerate(keys, start=2):
        values = history[key]
        top = (max if higher_is_better(key) else min)(values)
        best |= {(epoch, column) for epoch, value in enumerate(values) if value == top}
    assert table.bold == best and best
    text = bundle["text/plain"].splitlines()  # the plain twin, for viewers without HTML
    assert text[0].split() == table.header and len(text) == 5
    assert all(output.output_type != "execute_result" for output in outputs["fit"])
    assert outputs["failed_at_start"] == []  # a fit that failed before its first epoch leaves no empty output


@pytest.mark.slow
def test_the_notebook_has_no_stray_output(executed: tuple[dict[str, list[Any]], Path]) -> None:
    outputs, _ = executed
    for name, cell in outputs.items():
        for output in cell:
            assert output.get("name") != "stderr", (name, output)
            text = json.dumps(dict(output))
            assert "\\r" not in text and "Warning" not in text and "HBox" not in text, (name, output)


@pytest.mark.slow
def test_figures_show_inline_once_and_write_files_without_showing(
    executed: tuple[dict[str, list[Any]], Path],
) -> None:
    outputs, folder = executed
    for name in ("value", "again", "lr_finder", "report"):  # a cell's value: one picture, not a repr too
        assert _is_png(outputs[name]) and len(outputs[name]) == 1, name
    assert _is_png(outputs["mid_cell"])  # called without a path in the middle of a cell: shown at its end
    assert [output.output_type for output in outputs["mid_cell"]] == ["stream", "display_data"]
    # changed after being made, in the cell that made it: shown as changed (as the cell's value or not)
    pictures = {name: outputs[name][0].data["image/png"] for name in ("value", "changed", "changed_value")}
    assert len(set(pictures.values())) == 3 and len(outputs["changed"]) == len(outputs["changed_value"]) == 1
    assert outputs["to_file"] == []  # given a path: the file, no picture
    assert (folder / "curves.png").read_bytes().startswith(PNG)


@pytest.mark.slow
def test_the_live_chart_and_a_resumed_run_and_an_evaluation(executed: tuple[dict[str, list[Any]], Path]) -> None:
    outputs, _ = executed
    chart = _only_display(outputs["chart"])["text/html"]
    panels = _charts(chart)  # images, which notebooks keep even when they drop inline SVG (untrusted)
    assert len(panels) == 2 and all(panel.count("<polyline") == 2 for panel in panels)  # loss, accuracy
    assert [row[0] for row in _Table(chart).rows] == ["1", "2", "3"]
    resumed = _Table(_only_display(outputs["resumed"])["text/html"])
    assert [row[0] for row in resumed.rows] == ["1", "2", "3", "4"]  # the epochs before the resume too
    summary = _only_display(outputs["evaluate"])
    assert summary["text/plain"].startswith("Evaluate  38/38 batches") and "accuracy" in summary["text/plain"]
    assert [output.output_type for output in outputs["evaluate"]] == ["display_data", "execute_result"]


@pytest.mark.slow
def test_the_readme_notebook_example_shows_what_the_readme_says(executed: tuple[dict[str, list[Any]], Path]) -> None:
    outputs, _ = executed
    assert [output.output_type for output in outputs["readme_notebooks"]] == ["display_data", "display_data"]
    board, picture = outputs["readme_notebooks"]
    assert len(_Table(board.data["text/html"]).rows) == 10 and len(_charts(board.data["text/html"])) == 2
    assert _is_png([picture])


class _Recorder:
    """What the display sends to the notebook, recorded in place of IPython's display (this
    process runs no kernel; the executed-notebook tests above use a real one)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pages: list[tuple[str, str]] = []
        monkeypatch.setattr(progress.notebook, "in_notebook", lambda: True)
        monkeypatch.setattr(notebook.LiveOutput, "show", lambda _, page, text: self.pages.append((page, text)))


def _fit(**options: Any) -> tw.History:
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    settings = {"loss": "cross_entropy", "metrics": ["accuracy"], "epochs": 3, "batch_size": 16, "seed": 0} | options
    return tw.fit(model, (x, y), **settings)


def test_the_display_reads_the_running_values_only_at_its_refreshes(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = _Recorder(monkeypatch)
    reads: list[int] = []
    original = tw.Run.running_logs
    monkeypatch.setattr(tw.Run, "running_logs", lambda run: reads.append(1) or original(run))
    monkeypatch.setattr(progress, "NOTEBOOK_REFRESH_SECONDS", 3600.0)
    _fit(progress="plot")
    assert reads == []  # no refresh due: nothing read from the device by the display
    # the first epoch's bar when it starts, then nothing until the final state
    assert len(recorder.pages) == 2 and "<progress" in recorder.pages[0][0]
    assert "<progress" not in recorder.pages[-1][0] and len(_charts(recorder.pages[-1][0])) == 2
    assert len(recorder.pages[-1][1].splitlines()) == 1 + 3


def test_many_short_epochs_send_no_more_updates_than_the_refresh_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = _Recorder(monkeypatch)
    monkeypatch.setattr(progress, "NOTEBOOK_REFRESH_SECONDS", 0.05)
    started = time.perf_counter()
    _fit(epochs=300, batch_size=256, val_split=0.25, progress="plot")  # one batch per epoch, and validation
    seconds = time.perf_counter() - started
    assert len(recorder.pages) <= seconds / 0.05 + 2  # not three per epoch: at most one per refresh, and the last
    assert len(recorder.pages[-1][1].splitlines()) == 1 + 300


def test_updates_that_take_long_are_sent_less_often(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = _Recorder(monkeypatch)
    record = notebook.LiveOutput.show
    monkeypatch.setattr(notebook.LiveOutput, "show", lambda *args: time.sleep(0.02) or record(*args))
    monkeypatch.setattr(progress, "NOTEBOOK_REFRESH_SECONDS", 0.0)
    monkeypatch.setattr(progress, "SENDING_SHARE", 0.1)  # each 20 ms update waits 0.2 s before the next
    reads: list[int] = []
    original = tw.Run.running_logs
    monkeypatch.setattr(tw.Run, "running_logs", lambda run: reads.append(1) or original(run))
    started = time.perf_counter()
    _fit(epochs=100, batch_size=64, progress="plot")
    seconds = time.perf_counter() - started
    assert 2 <= len(recorder.pages) <= seconds / 0.2 + 2  # the first, one per 0.2 s at most, and the last
    assert len(reads) <= len(recorder.pages)  # the running values are read only for an update sent


def test_during_an_epoch_the_bar_shows_the_running_values_and_the_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = _Recorder(monkeypatch)
    monkeypatch.setattr(progress, "NOTEBOOK_REFRESH_SECONDS", 0.0)
    monkeypatch.setattr(progress, "SENDING_SHARE", 1.0)  # every hook may send
    _fit(epochs=2)
    bars = [text for page, text in recorder.pages if "<progress" in page]
    assert any(text.startswith("Epoch 2/2  8/16  loss ") and "ETA" in text for text in bars)
    last = recorder.pages[-1][1].splitlines()
    assert last[0].split() == ["epoch", "time", "loss", "accuracy"] and len(last) == 3


def test_a_fit_stopped_in_an_epoch_says_where_instead_of_leaving_its_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = _Recorder(monkeypatch)

    class Fails(tw.Callback):
        def on_train_batch_end(self, run: tw.Run) -> None:
            if run.epoch == 1 and run.batches_done == 5:
                raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        _fit(callbacks=[Fails()])
    page, text = recorder.pages[-1]
    assert "<progress" not in page and text.splitlines()[0] == "Epoch 2/3 stopped at batch 5/16"
    assert len(text.splitlines()) == 3  # the header and the one finished epoch


@pytest.mark.parametrize("pass_name", ["evaluate", "predict"])
def test_an_evaluation_that_raises_says_where_it_stopped_instead_of_leaving_its_bar(
    monkeypatch: pytest.MonkeyPatch, pass_name: str
) -> None:
    recorder = _Recorder(monkeypatch)

    class Fails(tw.Callback):
        def on_eval_batch_end(self, run: tw.Run) -> None:
            if run.eval_batches_done == 3:
                raise RuntimeError("stop here")

    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    with pytest.raises(RuntimeError, match="stop here"):
        if pass_name == "evaluate":
            tw.evaluate(torch.nn.Linear(4, 2), (x, y), loss="cross_entropy", batch_size=8, progress=True,
                        callbacks=[Fails()])  # fmt: skip
        else:
            tw.predict(torch.nn.Linear(4, 2), x, batch_size=8, progress=True, callbacks=[Fails()])
    page, text = recorder.pages[-1]
    assert "<progress" not in page and text == f"{pass_name.capitalize()} stopped at batch 3/8"


def test_the_chart_is_redrawn_at_most_once_a_chart_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = _Recorder(monkeypatch)
    monkeypatch.setattr(progress, "NOTEBOOK_REFRESH_SECONDS", 0.0)
    monkeypatch.setattr(progress, "SENDING_SHARE", 1.0)  # every hook may send
    monkeypatch.setattr(progress, "CHART_SECONDS", 3600.0)
    _fit(progress="plot")
    charts = [tuple(_charts(page)) for page, _ in recorder.pages]
    assert len(charts) > 20 and len(set(charts)) == 2  # the first drawing (empty) and the final state only


def test_the_best_value_of_a_column_is_marked_only_where_its_direction_is_known() -> None:
    history = tw.History()
    for loss, accuracy, psnr, lr in ((0.9, 0.5, 20.0, 0.1), (0.5, 0.7, 30.0, 0.05), (0.6, 0.8, 25.0, 0.01)):
        history.append({"loss": loss, "accuracy": accuracy, "psnr": psnr, "lr": lr, "time": 1.0})
    page, text = progress._EpochTable().render(history, {"accuracy"})
    table = _Table(page)
    assert table.header == ["epoch", "time", "loss", "accuracy", "psnr", "lr"]
    # the lowest loss, the highest accuracy; a custom metric's direction and the lr's are not guessed
    assert table.bold == {(1, 2), (2, 3)}
    assert text.splitlines()[2].split() == ["2", "1.00s", "0.5000*", "70.00%", "30.0000", "0.0500"]


def test_names_and_values_are_escaped_in_the_html(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = _Recorder(monkeypatch)

    def strange(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs.argmax(1) == targets).float().mean()

    _fit(metrics={"<img src=x onerror=alert(1)>": strange}, progress="plot", epochs=2)
    page = recorder.pages[-1][0]
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert all("<img src=x" not in chart for chart in _charts(page))


def test_a_notebook_is_recognised_by_its_kernel_not_by_a_class_name(monkeypatch: pytest.MonkeyPatch) -> None:
    ipython = pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()  # a real shell with no kernel behind it (as a terminal's)
    try:
        assert ipython.get_ipython() is shell and not notebook.in_notebook()

        class Shell:  # Colab's shell is its own subclass with a kernel; it cannot run here, so a stand-in
            kernel = object()

        monkeypatch.setattr(ipython, "get_ipython", lambda: Shell())
        assert notebook.in_notebook()
    finally:
        InteractiveShell.clear_instance()


def test_a_value_that_is_not_finite_is_left_out_of_the_chart() -> None:
    svg = notebook.chart_svg("loss", {"train": [(1, 1.0), (2, math.nan), (3, 0.5)]}, 3)
    assert svg.count("<polyline") == 1 and "nan" not in svg
