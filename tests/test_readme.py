"""The README's promises: the quick start runs as written, and the set-up commands are there."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_quick_start_runs_as_written(tmp_path: Path) -> None:
    text = README.read_text()
    quick_start = re.search(r"## Quick start\n\n```python\n(.*?)```", text, re.DOTALL)
    assert quick_start is not None
    code = quick_start.group(1) + "assert history.epochs == 10 and len(predictions) == 297\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    accuracy = float(re.search(r"'accuracy': ([\d.]+)", result.stdout).group(1))  # type: ignore[union-attr]
    assert accuracy > 0.9
    assert result.stdout.count("samples/s") == 10  # one summary line per epoch in a non-terminal


def test_the_evaluation_example_runs_and_prints_the_report_shown(tmp_path: Path) -> None:
    text = README.read_text()
    found = re.search(r"## Evaluation\n\n.*?```python\n(.*?)```\n\n```text\n(.*?)```", text, re.DOTALL)
    assert found is not None
    code, printed = found.groups()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    # The README shows the report as it prints; the loss's third decimal may vary with the CPU's
    # float kernels, the counts and what follows from them may not.
    shown, got = (
        [line for line in output.splitlines() if not line.startswith("loss ")] for output in (printed, result.stdout)
    )
    assert got == shown
    assert result.stderr == ""
    assert (tmp_path / "report.json").is_file() and (tmp_path / "confusion.png").is_file()


def test_import_does_not_pull_in_heavy_optional_modules() -> None:
    code = (
        "import sys, torch; before = set(sys.modules); import trainwell; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    added = set(ast.literal_eval(result.stdout))
    assert "trainwell" in added
    assert not added & {"matplotlib", "sklearn", "torchmetrics", "IPython", "ipywidgets", "PIL", "mlflow", "wandb"}


def test_readme_names_the_two_set_up_commands() -> None:
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci


def test_the_structured_models_section_runs_as_written(tmp_path: Path) -> None:
    text = README.read_text()
    section = re.search(r"## Hugging Face models, several outputs, padded sequences\n(.*?)\n## ", text, re.DOTALL)
    assert section is not None
    blocks = re.findall(r"```python\n(.*?)```", section.group(1), re.DOTALL)
    checks = [
        "assert logits.shape == (64, 2) and history.epochs == 1\n",
        "assert sorted(history) == ['box_mae', 'label_accuracy', 'loss', 'loss_box', 'loss_label', 'samples_per_second',"
        " 'time']\n",
        "assert history.epochs == 5 and history['accuracy'][-1] > 0.7\n",  # ~0.95 on 5 trials (an unseeded example)
    ]
    assert len(blocks) == len(checks)
    for block, check in zip(blocks, checks, strict=True):
        result = subprocess.run([sys.executable, "-c", block + check], capture_output=True, text=True, cwd=tmp_path,
                                timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr


def test_the_tracking_examples_run_as_written(tmp_path: Path) -> None:
    section = re.search(r"## Tracking runs\n(.*?)\n## ", README.read_text(), re.DOTALL)
    assert section is not None
    mlflow_block, wandb_block = re.findall(r"```python\n(.*?)```", section.group(1), re.DOTALL)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    environment = os.environ | {"OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": store,
                                "MLFLOW_EXPERIMENT_NAME": "readme", "WANDB_MODE": "offline",
                                "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}  # fmt: skip
    checks = [
        "from mlflow import MlflowClient\n"
        "client = MlflowClient()\n"
        "for name, runs in (('readme', 1), ('digits', 1)):\n"
        "    experiment = client.get_experiment_by_name(name)\n"
        "    found = client.search_runs([experiment.experiment_id])\n"
        "    assert len(found) == runs and found[0].info.status == 'FINISHED', name\n"
        "    assert [m.step for m in client.get_metric_history(found[0].info.run_id, 'loss')] == [1, 2, 3]\n",
        "import glob\n"
        "assert len(glob.glob('wandb/offline-run-*/files/history.csv')) == 2, glob.glob('wandb/*')\n"
        "assert len(glob.glob('runs/*/history.csv')) == 1\n",
    ]
    for block, check in zip((mlflow_block, wandb_block), checks, strict=True):
        result = subprocess.run([sys.executable, "-c", block + check], capture_output=True, text=True, cwd=tmp_path,
                                timeout=300, env=environment)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "TrainwellWarning" not in result.stderr
