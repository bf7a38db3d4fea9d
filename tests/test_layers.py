"""The module layers of DESIGN.md: a module imports only from lower layers (and errors)."""

from __future__ import annotations

import ast
from pathlib import Path

import trainwell

SOURCE = Path(trainwell.__file__).parent
LAYERS = [
    {"__init__", "__main__", "cli", "datasets", "lr_finder", "summary", "report"},
    {"api"},
    {"loop", "doctor", "folder"},
    {"progress", "weights", "checkpoints", "callbacks", "schedules", "loggers", "trackers"},
    {"run", "history"},
    {"batches", "objective"},
    {"data", "losses", "metrics", "models", "optimizers", "precision", "distributed", "plots", "outputs"},
    {"structures", "files", "notebook"},
    {"errors"},
]
# Within the built-in hooks layer, the others may import the Callback base, and checkpoints write
# files through weights' atomic writer (as the CSV logger does on a resume); the Run holds the History.
ALLOWED_SIBLINGS = {
    ("progress", "callbacks"), ("weights", "callbacks"), ("checkpoints", "callbacks"), ("checkpoints", "weights"),
    ("schedules", "callbacks"), ("loggers", "callbacks"), ("loggers", "weights"), ("run", "history"),
    ("trackers", "callbacks"), ("trackers", "loggers"), ("trackers", "weights"),
}  # fmt: skip


def layer_of(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if module in layer:
            return index
    raise AssertionError(f"module {module!r} is in no layer: add it to LAYERS and to DESIGN.md")


def trainwell_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trainwell"):
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("trainwell."))
    return found


def test_modules_import_only_lower_layers() -> None:
    problems = []
    for path in sorted(SOURCE.glob("*.py")):
        module = path.stem
        for imported in trainwell_imports(path) - {module}:
            if imported == "__version__":
                continue
            allowed = layer_of(imported) > layer_of(module) or (module, imported) in ALLOWED_SIBLINGS
            if layer_of(module) == 0:
                allowed = True  # the application layer is a client of everything
            if not allowed:
                problems.append(f"{module} imports {imported}")
    assert problems == []


def test_leaves_import_nothing_but_the_lowest_layers() -> None:
    for path in SOURCE.glob("*.py"):
        if path.stem in LAYERS[6]:
            assert trainwell_imports(path) <= {"errors", *LAYERS[7]}, path.stem


def test_no_grab_bag_modules() -> None:
    assert not {path.stem for path in SOURCE.glob("*.py")} & {"utils", "helpers", "common", "core"}


def test_public_names() -> None:
    assert set(trainwell.__all__) == {
        "CSVLogger", "Callback", "ConfigError", "DataError", "EarlyStopping", "Evaluation", "History",
        "LRFinderResult", "LRScheduler", "LambdaCallback", "MLflowLogger", "ModelCheckpoint", "ModelSummary", "Report",
        "Run", "StepResult", "TensorBoard", "classification_report",
        "TerminateOnNaN",
        "TrainingInterrupted", "TrainwellWarning", "WandbLogger",
        "TrainwellError", "__version__", "compute_loss", "evaluate", "find_lr", "fit", "load_weights",
        "optimizer_step", "plot_confusion_matrix", "predict", "save_weights", "structured", "summary", "train_step",
    }  # fmt: skip
    for name in trainwell.__all__:
        assert hasattr(trainwell, name)
