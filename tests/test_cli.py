"""The ``trainwell`` command, run for real through its console entry point in subprocesses."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_iris

from trainwell.cli import main

pytestmark = pytest.mark.slow  # real subprocesses: `pytest -m "not slow"` leaves them out

COMMAND = str(Path(sys.executable).parent / "trainwell")


def trainwell(*arguments: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COMMAND, *map(str, arguments)], capture_output=True, text=True, cwd=cwd, timeout=300, check=False
    )


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def learnt(path: Path) -> list[dict[str, str]]:
    """A history.csv without its timing columns, which measure the machine rather than the run."""
    return [
        {key: value for key, value in row.items() if key not in ("time", "samples_per_second")} for row in rows(path)
    ]


@pytest.mark.parametrize(
    ("data", "classes"), [("digits", 10), ("iris", 3), ("wine", 3), ("breast_cancer", 2), ("diabetes", 0)]
)
def test_each_bundled_data_set_trains_and_writes_a_full_run_folder(data: str, classes: int, tmp_path: Path) -> None:
    result = trainwell("train", "--data", data, "--epochs", "2", "--out", tmp_path / "run", "--seed", "1")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    assert f"Run folder: {run}" in result.stdout
    expected = {"config.toml", "history.csv", "metrics.json", "curves.png", "model.pt", "model.json"}
    if classes:
        expected.add("confusion_matrix.png")
    assert {path.name for path in run.iterdir()} == expected
    history = rows(run / "history.csv")
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert "val_loss" in history[0]
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    assert metrics["samples"] > 0 and np.isfinite(metrics["loss"])
    with Image.open(run / "curves.png") as image:
        assert image.width >= 600 and image.height >= 300
    if classes:
        assert len(metrics["per_class"]) == classes
        assert 0 <= metrics["accuracy"] <= 1
        with Image.open(run / "confusion_matrix.png") as image:
            assert image.width >= 400 and image.height >= 400
    else:
        assert "mae" in metrics and "confusion_matrix" not in metrics


def test_the_demo_reaches_95_percent_on_digits(tmp_path: Path) -> None:
    result = trainwell("train", "--seed", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("digits-")
    assert json.loads((run / "metrics.json").read_text())["test"]["accuracy"] >= 0.95
    assert "Epoch 20/20" in result.stdout and "precision" in result.stdout


def test_config_round_trip_reproduces_the_history(tmp_path: Path) -> None:
    first = trainwell("train", "--data", "iris", "--epochs", "3", "--dropout", "0.2", "--out", tmp_path / "a")
    assert first.returncode == 0, first.stderr
    config = tomllib.loads((tmp_path / "a" / "config.toml").read_text())
    assert config["data"] == "iris" and config["epochs"] == 3 and isinstance(config["seed"], int)
    assert config["loss"] == "cross_entropy" and config["metrics"] == "accuracy"
    again = trainwell("train", "--config", tmp_path / "a" / "config.toml", "--out", tmp_path / "b")
    assert again.returncode == 0, again.stderr
    assert learnt(tmp_path / "a" / "history.csv") == learnt(tmp_path / "b" / "history.csv")
    override = trainwell("train", "--config", tmp_path / "a" / "config.toml", "--epochs", "1", "--out", tmp_path / "c")
    assert override.returncode == 0, override.stderr
    assert len(rows(tmp_path / "c" / "history.csv")) == 1


@pytest.fixture(scope="module")
def iris_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    iris = load_iris()
    path = tmp_path_factory.mktemp("data") / "flowers.csv"
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["sepal_length", "sepal_width", "petal_length", "petal_width", "species"])
        for features, label in zip(iris.data, iris.target, strict=True):
            writer.writerow([*features, iris.target_names[label]])
    return path


def test_csv_training_evaluate_and_predict_with_original_labels(iris_csv: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trained = trainwell("train", "--data", iris_csv, "--target", "species", "--epochs", "30", "--out", run)
    assert trained.returncode == 0, trained.stderr
    assert "setosa" in trained.stdout  # the per-class table names the classes
    spec = json.loads((run / "model.json").read_text())
    assert spec["class_names"] == ["setosa", "versicolor", "virginica"] and spec["task"] == "classification"

    evaluated = trainwell("evaluate", run)
    assert evaluated.returncode == 0, evaluated.stderr
    accuracy = json.loads((run / "metrics.json").read_text())["test"]["accuracy"]
    assert f"accuracy  {accuracy:.2%}" in evaluated.stdout

    features_only = tmp_path / "new.csv"
    with iris_csv.open() as source, features_only.open("w") as target:
        for line in source:
            target.write(",".join(reversed(line.strip().split(",")[:4])) + "\n")  # other column order, no target
    predicted = trainwell("predict", run, "--data", features_only, "--out", tmp_path / "predictions.csv")
    assert predicted.returncode == 0, predicted.stderr
    labels = [row["prediction"] for row in rows(tmp_path / "predictions.csv")]
    assert len(labels) == 150 and set(labels) <= {"setosa", "versicolor", "virginica"}
    truth = [row["species"] for row in rows(iris_csv)]
    assert sum(label == true for label, true in zip(labels, truth, strict=True)) >= 135

    whole = trainwell("evaluate", run, "--data", iris_csv)
    assert whole.returncode == 0, whole.stderr
    assert "samples   150" in whole.stdout


def test_csv_regression_is_inferred_and_the_task_can_be_overridden(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 3))
    path = tmp_path / "houses.csv"
    np.savetxt(path, np.column_stack([features, features @ [1.0, -2.0, 0.5] + 3.25]), delimiter=",",
               header="a,b,c,price", comments="")  # fmt: skip
    result = trainwell("train", "--data", path, "--target", "price", "--epochs", "2", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run" / "model.json").read_text())["task"] == "regression"
    np.savez(tmp_path / "levels.npz", x=features, y=(features[:, 0] > 0).astype(np.float64) * 2.5)
    forced = trainwell("train", "--data", tmp_path / "levels.npz", "--task", "classification", "--epochs", "2",
                       "--out", tmp_path / "forced")  # fmt: skip
    assert forced.returncode == 0, forced.stderr
    spec = json.loads((tmp_path / "forced" / "model.json").read_text())
    assert spec["class_names"] == ["0", "2.5"] and spec["loss"] == "bce_with_logits"


def _bad_files(folder: Path) -> dict[str, Path]:
    files = {
        "text_feature": "a,b,y\n1,red,0\n2,blue,1\n3,red,0\n",
        "empty_cell": "a,b,y\n1,2,0\n3,,1\n4,5,0\n",
        "nan_cell": "a,b,y\n1,2,0\n3,nan,1\n4,5,0\n",
        "one_row": "a,b,y\n1,2,0\n",
    }
    paths = {}
    for name, text in files.items():
        paths[name] = folder / f"{name}.csv"
        paths[name].write_text(text)
    return paths


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--data", "missing.csv", "--target", "y"], "No such file: missing.csv"),
        (["--data", "{text_feature}", "--target", "price"], "The target column 'price' is not in"),
        (["--data", "{text_feature}", "--target", "y"], "Feature column 'b' is not numeric (row 2)"),
        (["--data", "{empty_cell}", "--target", "y"], "Row 3, column 'b' is empty or not a finite number"),
        (["--data", "{nan_cell}", "--target", "y"], "Row 3, column 'b' is empty or not a finite number"),
        (["--data", "{one_row}", "--target", "y"], "needs at least 2 rows"),
        (["--data", "mnist"], "Unknown data set name 'mnist'"),
        (["--model", "resnet"], "argument --model: invalid choice: 'resnet'"),
        (["--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
        (["--loss", "hinge"], "Unknown loss name 'hinge'"),
        (["--config", "{missing_config}"], "No such config file"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_run_folder(arguments: list[str], message: str, tmp_path: Path) -> None:
    paths = {**_bad_files(tmp_path), "missing_config": tmp_path / "nope.toml"}
    filled = [argument.format(**paths) for argument in arguments]
    result = trainwell("train", *filled, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("trainwell: error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


def test_a_failure_during_training_leaves_no_half_written_folder(tmp_path: Path) -> None:
    result = trainwell("train", "--data", "iris", "--out", tmp_path / "run", "--device", "cuda:7")
    assert result.returncode == 2
    assert not (tmp_path / "run").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_evaluate_rejects_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    result = trainwell("evaluate", tmp_path)
    assert result.returncode == 2
    assert "is not a trainwell run folder" in result.stderr


def test_sigterm_keeps_the_partial_run_and_resume_finishes_it_identically(tmp_path: Path) -> None:
    arguments = ["train", "--data", "digits", "--epochs", "40", "--seed", "5"]
    golden = trainwell(*arguments, "--out", tmp_path / "golden")
    assert golden.returncode == 0, golden.stderr
    run = tmp_path / "run"
    process = subprocess.Popen([COMMAND, *arguments, "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    manifest = tmp_path / ".run.partial" / "checkpoints" / "manifest.json"
    deadline = time.monotonic() + 120
    while not manifest.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert f"trainwell train --out {run} --resume" in stderr
    assert not run.exists() and (tmp_path / ".run.partial" / "config.toml").is_file()
    resumed = trainwell("train", "--out", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert learnt(run / "history.csv") == learnt(tmp_path / "golden" / "history.csv")
    assert not (run / "checkpoints").exists() and not (tmp_path / ".run.partial").exists()
    again = trainwell("train", "--out", run, "--resume")
    assert again.returncode == 0 and "Nothing to resume" in again.stdout


def test_in_a_terminal_the_test_results_are_the_reports_not_an_evaluation_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Terminal:  # stdout as a terminal: where evaluate and predict would show their own lines
        def __init__(self, stream: Any) -> None:
            self.stream = stream

        def isatty(self) -> bool:
            return True

        def __getattr__(self, name: str) -> Any:
            return getattr(self.stream, name)

    monkeypatch.setattr(sys, "stdout", Terminal(sys.stdout))
    assert main(["train", "--data", "iris", "--epochs", "2", "--seed", "0", "--out", str(tmp_path / "run")]) == 0
    output = capsys.readouterr().out
    assert "Evaluate " not in output and "Predict " not in output
    assert "macro avg" in output and "Confusion matrix (rows: true class, columns: predicted)" in output
