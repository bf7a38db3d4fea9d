"""The ``trainwell`` command: ``train``, ``evaluate`` and ``predict`` on tables, with run folders.

Owns: parsing options (defaults < config file < flags), building a model for a table, writing
and reading run folders, and printing results. A client of the public API like any user.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

import trainwell
from trainwell.datasets import BUNDLED, Scaler, Table, load_table, read_features, split
from trainwell.errors import TrainwellError, config_error, data_error
from trainwell.plots import confusion_matrix, plot_confusion_matrix

MODEL_FILE, SPEC_FILE, CONFIG_FILE = "model.pt", "model.json", "config.toml"


@dataclass(frozen=True)
class Option:
    """One option of ``trainwell train``, shared by the flags and the config file."""

    default: Any
    kind: Callable[[str], Any]
    help: str
    choices: tuple[str, ...] | None = None


def _hidden(text: str) -> str:
    if text and not all(part.strip().isdigit() and int(part) > 0 for part in text.split(",")):
        raise ValueError(text)
    return text


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise ValueError(text)
    return value


TRAIN_OPTIONS: dict[str, Option] = {
    "data": Option("digits", str, f"a bundled data set ({', '.join(BUNDLED)}) or a .csv / .npz file"),
    "target": Option(None, str, "the target column of a CSV file"),
    "task": Option(None, str, "override the inferred task", ("classification", "regression")),
    "test_split": Option(0.2, _fraction, "fraction held out for the final test (stratified for classes)"),
    "val_split": Option(0.1, _fraction, "fraction of the training part used for validation (0: none)"),
    "model": Option("mlp", str, "model architecture", ("mlp", "linear")),
    "hidden": Option("128,64", _hidden, "hidden layer sizes of the mlp, comma-separated"),
    "dropout": Option(0.0, _fraction, "dropout after each hidden layer"),
    "loss": Option(None, str, "loss name (default: from the task)"),
    "optimizer": Option("adam", str, "optimizer name"),
    "lr": Option(None, float, "learning rate (default: the optimizer's)"),
    "epochs": Option(20, int, "number of epochs"),
    "batch_size": Option(32, int, "samples per batch"),
    "metrics": Option(None, str, "comma-separated metric names (default: from the task)"),
    "seed": Option(None, int, "random seed (default: drawn, and recorded in the run's config)"),
    "device": Option("auto", str, "auto, cpu, cuda, mps"),
    "out": Option(None, str, "run folder (default: runs/<data>-<timestamp>)"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"trainwell: error: {message} (see trainwell {self.prog.split()[-1]} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``trainwell`` argument parser with its three commands."""
    parser = _Parser(prog="trainwell", description="Train, evaluate and use PyTorch models on tables.")
    parser.add_argument("--version", action="version", version=f"trainwell {trainwell.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser(
        "train", help="train a model and write a run folder", argument_default=argparse.SUPPRESS
    )
    train.add_argument("--config", help="a TOML file of options; flags override it")
    train.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    for name, option in TRAIN_OPTIONS.items():
        train.add_argument(f"--{name.replace('_', '-')}", type=option.kind, choices=option.choices, help=option.help)
    train.set_defaults(handler=run_train)
    evaluate = commands.add_parser("evaluate", help="score a run's model (its test split, or --data)")
    evaluate.add_argument("run_dir", type=Path)
    evaluate.add_argument("--data", help="a bundled data set or a CSV file with the target column")
    evaluate.add_argument("--target", help="the target column of --data (default: the run's)")
    evaluate.set_defaults(handler=run_evaluate)
    predict = commands.add_parser("predict", help="write a run's predictions for a CSV file")
    predict.add_argument("run_dir", type=Path)
    predict.add_argument("--data", required=True, help="a CSV file with the training feature columns")
    predict.add_argument("--out", type=Path, help="output CSV (default: RUN_DIR/predictions.csv)")
    predict.set_defaults(handler=run_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trainwell`` command. Returns the exit code (2 for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except TrainwellError as error:
        print(f"trainwell: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    return code


def one_line(message: str) -> str:
    """Fold a three-part error message into one line.

    Example:
        >>> one_line("Bad.\\n  received: x=1\\n  fix: use 2.")
        'Bad. (received: x=1) fix: use 2.'
    """
    parts = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(f"({part})" if part.startswith("received:") else part for part in parts)


def resolve_options(args: argparse.Namespace, resuming: bool = False) -> dict[str, Any]:
    """Defaults, then the config file, then the flags given on the command line. When resuming
    without --config, the interrupted run's own config is the file."""
    options = {name: option.default for name, option in TRAIN_OPTIONS.items()}
    given = vars(args)
    if "config" in given:
        options |= _read_config(Path(given["config"]))
    elif resuming and "out" in given and (_partial(Path(given["out"])) / CONFIG_FILE).is_file():
        options |= _read_config(_partial(Path(given["out"])) / CONFIG_FILE)
    options |= {name: value for name, value in given.items() if name in TRAIN_OPTIONS}
    return options


def _read_config(path: Path) -> dict[str, Any]:
    try:
        content = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise config_error(f"No such config file: {path}.", str(path), "check the path of --config.") from None
    except tomllib.TOMLDecodeError as error:
        raise config_error(f"{path} is not valid TOML: {error}.", str(path), "fix the file's syntax.") from None
    options = {}
    for name, value in content.items():
        if name not in TRAIN_OPTIONS:
            raise config_error(f"Unknown option {name!r} in {path}.", name, f"use any of: {', '.join(TRAIN_OPTIONS)}.")
        option = TRAIN_OPTIONS[name]
        try:
            options[name] = option.kind(str(value))
        except ValueError:
            raise config_error(f"Invalid value for {name} in {path}.", repr(value), option.help + ".") from None
        if option.choices and options[name] not in option.choices:
            raise config_error(f"Invalid {name} in {path}.", repr(value), f"use one of {', '.join(option.choices)}.")
    return options


def _write_config(options: dict[str, Any], path: Path) -> None:
    lines = ["# trainwell train options; re-run with: trainwell train --config " + CONFIG_FILE]
    for name, value in options.items():
        if value is None or name in ("out", "resume"):
            continue
        lines.append(f"{name} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")


def model_spec(table: Table, options: dict[str, Any]) -> dict[str, Any]:
    """What the model looks like: enough to rebuild it for ``evaluate`` and ``predict``."""
    loss = options["loss"] or _default_loss(table)
    outputs = table.num_classes if loss in ("cross_entropy", "nll") else 1
    head = {"nll": "log_softmax", "bce": "sigmoid"}.get(loss, "none")
    hidden = (
        [int(size) for size in options["hidden"].split(",")] if options["model"] == "mlp" and options["hidden"] else []
    )
    return {
        "inputs": table.features.shape[1],
        "outputs": outputs,
        "hidden": hidden,
        "dropout": options["dropout"],
        "head": head,
        "loss": loss,
        "task": table.task,
        "class_names": table.class_names,
        "feature_names": table.feature_names,
    }


def build_model(spec: dict[str, Any]) -> nn.Module:
    """An MLP (or a linear model when ``hidden`` is empty) from a model spec."""
    layers: list[nn.Module] = []
    width = spec["inputs"]
    for size in spec["hidden"]:
        layers += [nn.Linear(width, size), nn.ReLU()]
        if spec["dropout"]:
            layers.append(nn.Dropout(spec["dropout"]))
        width = size
    layers.append(nn.Linear(width, spec["outputs"]))
    if spec["head"] == "log_softmax":
        layers.append(nn.LogSoftmax(dim=1))
    elif spec["head"] == "sigmoid":
        layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def _default_loss(table: Table) -> str:
    if table.task == "regression":
        return "mse"
    return "bce_with_logits" if table.num_classes == 2 else "cross_entropy"


def _targets(table: Table, spec: dict[str, Any]) -> torch.Tensor:
    targets = torch.from_numpy(table.targets)
    if spec["task"] == "classification" and spec["outputs"] == 1:
        return targets.float().unsqueeze(1)
    return targets


def _metrics(options: dict[str, Any], table: Table) -> list[str]:
    if options["metrics"]:
        return [name.strip() for name in options["metrics"].split(",") if name.strip()]
    return ["mae"] if table.task == "regression" else ["accuracy"]


def run_train(args: argparse.Namespace) -> int:
    """``trainwell train``: train with the live display, test, and write the run folder.

    The run is written under ``.<name>.partial`` with a checkpoint every epoch, and renamed when
    complete. Ctrl-C or SIGTERM saves and keeps the partial folder; ``--resume`` continues it.
    """
    resuming = bool(getattr(args, "resume", False))
    options = resolve_options(args, resuming=resuming)
    table = load_table(options["data"], target=options["target"], task=options["task"])
    if options["seed"] is None:
        options["seed"] = int.from_bytes(os.urandom(3), "big")
    seed = options["seed"]
    rest, test = split(table, options["test_split"], seed) if options["test_split"] else (table, None)
    train, val = split(rest, options["val_split"], seed + 1) if options["val_split"] else (rest, None)
    scaler = Scaler.fit(train.features)
    spec = model_spec(table, options) | {"mean": scaler.mean.tolist(), "std": scaler.std.tolist()}
    options |= {"loss": spec["loss"], "metrics": ",".join(_metrics(options, table))}
    main = os.environ.get("RANK", "0") == "0"  # under torchrun, only rank 0 prints and writes
    folder = _run_folder(options, resuming, main)
    if folder is None:
        return 0
    torch.manual_seed(seed)
    model = build_model(spec)
    temporary = _partial(folder)
    created = [parent for parent in reversed(temporary.parents) if not parent.exists()]
    if main:
        temporary.mkdir(parents=True, exist_ok=True)
        _write_config(options, temporary / CONFIG_FILE)
    try:
        started = time.perf_counter()
        history = trainwell.fit(
            model,
            (scaler.transform(train.features), _targets(train, spec)),
            val=None if val is None else (scaler.transform(val.features), _targets(val, spec)),
            loss=spec["loss"],
            optimizer=options["optimizer"],
            lr=options["lr"],
            epochs=options["epochs"],
            batch_size=options["batch_size"],
            metrics=_metrics(options, table),
            device=options["device"],
            seed=seed,
            checkpoint_dir=temporary / "checkpoints",
            resume="auto" if resuming else False,
        )
        seconds = time.perf_counter() - started
        results = _score(model, test or train, spec, _metrics(options, table), options["device"])
        if not main:
            return 0
        print(f"\nTrained in {seconds:.1f}s. " + ("Test results" if test else "Training-set results (no test split)"))
        _print_results(results, spec)
        _write_run(temporary, model, spec, options, history, results, test or train)
        shutil.rmtree(temporary / "checkpoints")
        temporary.rename(folder)
    except KeyboardInterrupt as interrupt:
        number = getattr(interrupt, "signal_number", signal.SIGINT)
        print(
            f"\ntrainwell: interrupted ({signal.Signals(number).name}); the run is saved in {temporary}. "
            f"Continue it with: trainwell train --out {folder} --resume",
            file=sys.stderr,
        )
        return 128 + number
    except BaseException:
        if not resuming:  # a resumed run's folder holds earlier work: never delete it
            shutil.rmtree(temporary, ignore_errors=True)
            for parent in reversed(created):
                parent.rmdir()  # folders this run created for itself (e.g. runs/), left empty
        raise
    print(f"\nRun folder: {folder}")
    return 0


def _partial(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.partial")


def _run_folder(options: dict[str, Any], resuming: bool, main: bool = True) -> Path | None:
    """The final run folder; None (after saying so) when a resumed run had already finished."""
    if not resuming:
        return _new_run_folder(options, main)
    if not options["out"]:
        raise config_error("--resume needs the run folder to continue.", "no --out", "pass --out RUN_FOLDER --resume.")
    folder = Path(options["out"])
    if (folder / MODEL_FILE).is_file():
        print(f"Nothing to resume: {folder} is a finished run.")
        return None
    if not _partial(folder).is_dir():
        print(f"No interrupted run at {folder}: starting it from the beginning.")
    return folder


def _new_run_folder(options: dict[str, Any], main: bool = True) -> Path:
    if options["out"]:
        folder = Path(options["out"])
        if not main:
            return folder
        if folder.exists() and any(folder.iterdir()):
            raise config_error("The run folder exists and is not empty.", str(folder), "pass a new --out folder.")
        if _partial(folder).exists():
            raise config_error(
                "An interrupted run of that name exists.",
                str(_partial(folder)),
                f"continue it with: trainwell train --out {folder} --resume, or remove that folder.",
            )
        if folder.exists():
            folder.rmdir()
        return folder
    stem = Path(options["data"]).stem if options["data"] not in BUNDLED else options["data"]
    job = os.environ.get("TORCHELASTIC_RUN_ID")  # under torchrun: one name every rank agrees on
    base = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S') if job is None else job}"
    if not main:
        return base
    folder, number = base, 1
    while folder.exists():
        number += 1
        folder = base.with_name(f"{base.name}-{number}")
    return folder


def _score(model: nn.Module, table: Table, spec: dict[str, Any], metrics: list[str], device: str) -> dict[str, Any]:
    features = torch.from_numpy(Scaler(np.asarray(spec["mean"]), np.asarray(spec["std"])).transform(table.features))
    targets = _targets(table, spec)
    results: dict[str, Any] = {"samples": len(targets)}
    results |= trainwell.evaluate(model, (features, targets), loss=spec["loss"], metrics=metrics, device=device)
    outputs = trainwell.predict(model, features, device=device)
    if spec["task"] == "classification" and outputs is not None:  # None on ranks other than 0 under torchrun
        predicted = _predicted_classes(outputs, spec)
        matrix = confusion_matrix(torch.from_numpy(table.targets), predicted, len(spec["class_names"]))
        results["per_class"] = _per_class(matrix, spec["class_names"])
        results["confusion_matrix"] = matrix.tolist()
        results["predicted"] = predicted.tolist()
    return results


def _predicted_classes(outputs: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    if spec["outputs"] > 1:
        return outputs.argmax(1)
    threshold = 0.5 if spec["head"] == "sigmoid" else 0.0
    return (outputs.reshape(-1) > threshold).long()


def _per_class(matrix: torch.Tensor, names: list[str]) -> dict[str, dict[str, float]]:
    table = {}
    for index, name in enumerate(names):
        correct = matrix[index, index].item()
        predicted, actual = matrix[:, index].sum().item(), matrix[index].sum().item()
        precision = correct / predicted if predicted else 0.0
        recall = correct / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        table[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    return table


def _print_results(results: dict[str, Any], spec: dict[str, Any]) -> None:
    print(f"  samples   {results['samples']}")
    for key, value in results.items():
        if isinstance(value, float):
            shown = f"{value:.2%}" if "accuracy" in key else f"{value:.4f}"
            print(f"  {key:<9} {shown}")
    if "per_class" in results:
        width = max(8, *(len(name) for name in spec["class_names"]))
        print(f"\n  {'class':<{width}}  precision  recall  f1     support")
        for name, row in results["per_class"].items():
            scores = f"{row['precision']:<9.3f}  {row['recall']:<6.3f}  {row['f1']:<5.3f}"
            print(f"  {name:<{width}}  {scores}  {row['support']}")


def _write_run(
    folder: Path,
    model: nn.Module,
    spec: dict[str, Any],
    options: dict[str, Any],
    history: trainwell.History,
    results: dict[str, Any],
    table: Table,
) -> None:
    _write_config(options, folder / CONFIG_FILE)
    history.to_csv(folder / "history.csv")
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=1))
    torch.save({key: value.cpu() for key, value in model.state_dict().items()}, folder / MODEL_FILE)
    summary = {key: value for key, value in results.items() if key != "predicted"}
    (folder / "metrics.json").write_text(json.dumps({"test": summary, "epochs": history.epochs}, indent=1))
    history.plot(folder / "curves.png")
    if spec["task"] == "classification":
        plot_confusion_matrix(
            torch.from_numpy(table.targets), results["predicted"], spec["class_names"], folder / "confusion_matrix.png"
        )


def load_run(run_dir: Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Rebuild a run's model (weights loaded without executing code), its spec and options."""
    if not (run_dir / MODEL_FILE).is_file() or not (run_dir / SPEC_FILE).is_file():
        raise data_error(
            f"{run_dir} is not a trainwell run folder.",
            f"files: {', '.join(sorted(path.name for path in run_dir.iterdir())) if run_dir.is_dir() else 'none'}",
            "pass a folder written by 'trainwell train' (it holds model.pt and model.json).",
        )
    spec = json.loads((run_dir / SPEC_FILE).read_text())
    options = {name: option.default for name, option in TRAIN_OPTIONS.items()} | _read_config(run_dir / CONFIG_FILE)
    model = build_model(spec)
    model.load_state_dict(torch.load(run_dir / MODEL_FILE, weights_only=True, map_location="cpu"))
    return model, spec, options


def run_evaluate(args: argparse.Namespace) -> int:
    """``trainwell evaluate RUN_DIR``: score the run's test split again, or the whole of --data."""
    model, spec, options = load_run(args.run_dir)
    if args.data is None:
        table = load_table(options["data"], target=options["target"], task=spec["task"])
        table = split(table, options["test_split"], options["seed"])[1] if options["test_split"] else table
    else:
        table = _relabel(load_table(args.data, target=args.target or options["target"], task=spec["task"]), spec)
    results = _score(model, table, spec, _metrics(options, table), "auto")
    print(f"Results on {args.data or options['data'] + ' (test split)'}")
    _print_results(results, spec)
    return 0


def _relabel(table: Table, spec: dict[str, Any]) -> Table:
    """Map a new table's class labels onto the run's class indices."""
    if spec["task"] != "classification":
        return table
    known = {name: index for index, name in enumerate(spec["class_names"])}
    unknown = sorted(set(table.class_names) - set(known))
    if unknown:
        raise data_error(
            "The data has class labels the model was not trained on.",
            f"unknown labels: {', '.join(unknown[:10])}; known: {', '.join(spec['class_names'][:10])}",
            "evaluate on data with the training labels.",
        )
    mapping = np.asarray([known[name] for name in table.class_names], dtype=np.int64)
    return Table(
        table.name, table.features, mapping[table.targets], table.feature_names, table.task, spec["class_names"]
    )


def run_predict(args: argparse.Namespace) -> int:
    """``trainwell predict RUN_DIR --data file.csv``: write one prediction per row to a CSV file."""
    model, spec, _ = load_run(args.run_dir)
    if args.data in BUNDLED:
        features = load_table(args.data).features
    else:
        features = read_features(Path(args.data), spec["feature_names"])
    scaled = torch.from_numpy(Scaler(np.asarray(spec["mean"]), np.asarray(spec["std"])).transform(features))
    outputs = trainwell.predict(model, scaled)
    out = args.out or args.run_dir / "predictions.csv"
    if spec["task"] == "classification":
        predictions = [spec["class_names"][index] for index in _predicted_classes(outputs, spec).tolist()]
    else:
        predictions = [repr(float(value)) for value in outputs.reshape(len(outputs), -1)[:, 0]]
    with out.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["prediction"])
        writer.writerows([prediction] for prediction in predictions)
    print(f"Wrote {len(predictions)} predictions to {out}")
    return 0
