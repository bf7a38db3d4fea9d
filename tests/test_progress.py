"""What users see: a live line in a terminal, one line per epoch in logs, nothing when asked."""

from __future__ import annotations

import io
import itertools
import re
import sys
from typing import cast

import pytest
import torch

import trainwell as tw
from trainwell import progress
from trainwell.progress import choose_mode, choose_pass_mode, format_logs

from conftest import blobs, make_mlp


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def train(epochs: int = 2, **arguments: object) -> tw.History:
    return tw.fit(make_mlp(), blobs(samples=600), loss="cross_entropy", lr=0.1, batch_size=16, epochs=epochs,
                  metrics=["accuracy"], val_split=0.2, seed=0, **arguments)  # type: ignore[arg-type]  # fmt: skip


def test_log_output_is_one_summary_line_per_epoch(capsys: pytest.CaptureFixture[str]) -> None:
    history = train(epochs=3)
    output = capsys.readouterr().out
    assert "\r" not in output
    lines = output.splitlines()
    assert len(lines) == 3
    pattern = (
        r"Epoch (\d)/3  [\d.]+s  [\d,]+ samples/s  loss (\d\.\d{4})  accuracy (\d+\.\d\d)%"
        r"  val_loss (\d\.\d{4})  val_accuracy (\d+\.\d\d)%"
    )
    for epoch, line in enumerate(lines):
        match = re.fullmatch(pattern, line)
        assert match, line
        assert int(match.group(1)) == epoch + 1
        assert float(match.group(2)) == pytest.approx(history["loss"][epoch], abs=5e-5)
        assert float(match.group(3)) == pytest.approx(history["accuracy"][epoch] * 100, abs=5e-3)
        assert float(match.group(5)) == pytest.approx(history["val_accuracy"][epoch] * 100, abs=5e-3)


def test_terminal_output_redraws_a_live_line(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stdout", terminal)
    monkeypatch.setattr(progress, "REFRESH_SECONDS", 0.0)
    train(epochs=2)
    output = terminal.getvalue()
    assert "\r" in output
    live = re.findall(
        r"Epoch 1/2  (\d+)/30 \[[=>.]+\]  loss \d\.\d{4}  accuracy \d+\.\d\d%  [\d.]+s  ETA [\d.]+s", output
    )
    assert len(live) >= 10  # refreshed while the epoch ran
    assert [int(position) for position in live] == sorted(int(position) for position in live)
    summaries = [line for line in output.replace("\r", "\n").splitlines() if "samples/s" in line]
    assert [line.split()[1] for line in summaries] == ["1/2", "2/2"]


def test_refreshes_are_rate_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stdout", terminal)
    monkeypatch.setattr(progress, "REFRESH_SECONDS", 3600.0)
    reads: list[int] = []
    original = tw.Run.running_logs
    monkeypatch.setattr(tw.Run, "running_logs", lambda run: reads.append(1) or original(run))
    train(epochs=1)
    assert reads == []  # 30 steps, no refresh due: the sums were never read during the epoch


def test_refreshes_keep_their_pace_while_most_steps_skip_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    class Clock:  # steps of exactly 1 ms: the display's reads of the clock are counted
        now, reads = 0.0, 0

        def perf_counter(self) -> float:
            self.reads += 1
            return self.now

    clock = Clock()
    monkeypatch.setattr(progress, "time", clock)
    monkeypatch.setattr("sys.stdout", FakeTerminal())
    refreshes: list[float] = []
    original = tw.Run.running_logs
    monkeypatch.setattr(tw.Run, "running_logs", lambda run: refreshes.append(clock.now) or original(run))
    tick = tw.LambdaCallback(on_train_batch_start=lambda run: setattr(clock, "now", clock.now + 0.001))
    x, y = blobs(samples=1000)
    tw.fit(make_mlp(), (x, y), loss="cross_entropy", batch_size=1, epochs=1, callbacks=[tick], progress=True)
    assert len(refreshes) == 9  # 1 s of steps: a refresh every 0.1 s after the first
    assert all(0.1 <= later - earlier <= 0.11 for earlier, later in itertools.pairwise(refreshes))
    assert clock.reads < 120  # rather than one per step (1,000)


def test_progress_false_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    train(progress=False)
    assert capsys.readouterr().out == ""


def test_long_epochs_in_logs_print_an_occasional_progress_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(progress, "REFRESH_SECONDS", 0.0)
    monkeypatch.setattr(progress, "LINE_EVERY_SECONDS", 0.0)
    train(epochs=1)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 31  # one per batch (interval 0 here), then the summary
    assert re.fullmatch(r"Epoch 1/1  5/30  loss \d\.\d{4}  accuracy \d+\.\d\d%  [\d.]+s", lines[4])


def test_mode_choice() -> None:
    assert choose_mode(False, FakeTerminal()) is None
    assert choose_mode("auto", FakeTerminal()) == "live"
    assert choose_mode("auto", io.StringIO()) == "lines"
    assert choose_mode(True, io.StringIO()) == "live"


def test_format_logs() -> None:
    logs = {"loss": 0.5, "accuracy": 0.25, "mae": 12345.0, "val_accuracy": float("nan")}
    assert (
        format_logs(logs, {"accuracy", "val_accuracy"})
        == "loss 0.5000  accuracy 25.00%  mae 1.234e+04  val_accuracy nan"
    )


def test_the_epoch_line_shows_the_historys_time_and_speed(capsys: pytest.CaptureFixture[str]) -> None:
    history = train(epochs=2)
    lines = capsys.readouterr().out.splitlines()
    for epoch, line in enumerate(lines):
        match = re.match(r"Epoch \d/2  ([\d.]+)s  ([\d,]+) samples/s  loss", line)
        assert match, line
        assert float(match.group(1)) == pytest.approx(history["time"][epoch], abs=0.01)
        assert int(match.group(2).replace(",", "")) == round(history["samples_per_second"][epoch])
        assert "time" not in line and "samples_per_second" not in line  # not repeated as values


def evaluate(**arguments: object) -> dict[str, float]:
    x, y = blobs(samples=600)  # 38 batches of 16 (the last one of 8)
    return tw.evaluate(make_mlp(), (x, y), loss="cross_entropy", metrics=["accuracy"], batch_size=16,
                       **arguments)  # type: ignore[arg-type]  # fmt: skip


def predict(**arguments: object) -> object:
    return tw.predict(make_mlp(), blobs(samples=600)[0], batch_size=16, **arguments)  # type: ignore[arg-type]


def test_evaluate_and_predict_show_a_live_line_then_their_final_values_in_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stdout", terminal)
    monkeypatch.setattr(progress, "REFRESH_SECONDS", 0.0)
    results = evaluate()
    output = terminal.getvalue()
    live = re.findall(r"Evaluate  (\d+)/38 \[[=>.]+\]  loss \d\.\d{4}  accuracy \d+\.\d\d%  [\d.]+s  ETA", output)
    assert len(live) >= 10 and [int(done) for done in live] == sorted(int(done) for done in live)
    final = output.replace("\r", "\n").splitlines()[-1]
    match = re.fullmatch(r"Evaluate  38/38 batches  [\d.]+s  loss (\d\.\d{4})  accuracy (\d+\.\d\d)%", final)
    assert match, final
    assert float(match.group(1)) == pytest.approx(results["loss"], abs=5e-5)
    assert float(match.group(2)) == pytest.approx(results["accuracy"] * 100, abs=5e-3)

    terminal.seek(0)
    terminal.truncate()
    outputs = predict()
    output = terminal.getvalue()
    assert len(re.findall(r"Predict  \d+/38 \[[=>.]+\]", output)) >= 10
    assert re.fullmatch(r"Predict  38/38 batches  [\d.]+s", output.replace("\r", "\n").splitlines()[-1])
    assert isinstance(outputs, torch.Tensor) and outputs.shape == (600, 3)


def test_evaluate_and_predict_print_nothing_when_asked_or_when_short_in_a_log(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluate()  # "auto" in a log: a short pass prints nothing
    predict()
    assert capsys.readouterr().out == ""
    monkeypatch.setattr("sys.stdout", FakeTerminal())
    evaluate(progress=False)
    predict(progress=False)
    assert cast(io.StringIO, sys.stdout).getvalue() == ""


def test_a_long_evaluation_in_a_log_prints_occasional_lines_then_its_values(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(progress, "REFRESH_SECONDS", 0.0)
    monkeypatch.setattr(progress, "LINE_EVERY_SECONDS", 0.0)
    evaluate()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 39  # one per batch (interval 0 here), then the summary
    assert re.fullmatch(r"Evaluate  5/38  loss \d\.\d{4}  accuracy \d+\.\d\d%  [\d.]+s", lines[4])
    assert re.fullmatch(r"Evaluate  38/38 batches  [\d.]+s  loss \d\.\d{4}  accuracy \d+\.\d\d%", lines[-1])
    predict()
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"Predict  5/38  [\d.]+s", lines[4]) and lines[-1].startswith("Predict  38/38 batches")


def test_evaluate_reads_its_sums_only_when_the_display_refreshes(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    original = tw.Run.running_logs
    monkeypatch.setattr(tw.Run, "running_logs", lambda run: reads.append(1) or original(run))
    evaluate()  # a log: no display reads at all
    monkeypatch.setattr("sys.stdout", FakeTerminal())
    monkeypatch.setattr(progress, "REFRESH_SECONDS", 3600.0)
    evaluate()  # a terminal, no refresh due during the pass
    predict(progress=True)
    assert reads == []


def test_pass_mode_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_pass_mode("auto", FakeTerminal()) == "live"
    assert choose_pass_mode("auto", io.StringIO()) == "lines"
    assert choose_pass_mode(False, FakeTerminal()) is None
    monkeypatch.setattr(progress.notebook, "in_notebook", lambda: True)
    assert choose_mode("auto", io.StringIO()) == "notebook"  # fit: the HTML display
    assert choose_pass_mode("auto", io.StringIO()) == "lines"  # evaluate, predict: nothing unless long
    assert choose_pass_mode(True, io.StringIO()) == "notebook"


def test_evaluate_and_predict_check_progress_before_any_work() -> None:
    model = make_mlp()
    with pytest.raises(tw.ConfigError, match=r"(?s)Invalid progress.*progress='yes'"):
        tw.evaluate(model, blobs(), loss="cross_entropy", progress="yes", device="meta")  # type: ignore[arg-type]
    with pytest.raises(tw.ConfigError, match=r"Invalid progress"):
        tw.predict(model, blobs()[0], progress=None, device="meta")  # type: ignore[arg-type]
