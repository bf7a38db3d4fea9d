"""The ``trainwell`` command: ``train``, ``evaluate`` and ``predict`` on tables, with run folders.

Owns: parsing options (defaults < config file < flags), building a model for a table, writing
and reading run folders, and printing results. A client of the public API like any user. Every
file it writes goes through ``_save`` (temporary file + rename, never through a symbolic link).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import io
import itertools
import json
import math
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
from trainwell.errors import TrainwellError, config_error, data_error, format_message
from trainwell.files import atomic_write
from trainwell.report import Report
from trainwell.weights import atomic_save, load_weights

MODEL_FILE, SPEC_FILE, CONFIG_FILE = "model.pt", "model.json", "config.toml"
# Far past any model for a table, far below what would exhaust memory: a run folder's model.json
# (which anyone can edit) must not be able to make `predict` allocate gigabytes.
MAX_PARAMETERS = 100_000_000
MAX_SPEC_BYTES = 16 * 2**20
EXIT_CODES = """exit codes:
  0    done (or nothing left to resume)
  2    bad input: options, config file, data, or run folder (one line on stderr says what and the fix)
  3    the environment failed: a full disk, no permission, a read-only file system (one line on stderr)
  130  Ctrl-C, 143 SIGTERM
Once training has started, a failed or stopped run keeps its folder .<name>.partial (with its
checkpoints): continue it with  trainwell train --out <folder> --resume"""


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


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:  # what numpy and torch both accept
        raise argparse.ArgumentTypeError(f"seed {text!r} is not an integer from 0 to 2**32-1 (4294967295)")
    return value


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
    "seed": Option(None, _seed, "random seed, 0 to 2**32-1 (default: drawn, and recorded in the run's config)"),
    "device": Option("auto", str, "auto, cpu, cuda, mps"),
    "out": Option(None, str, "run folder (default: runs/<data>-<timestamp>)"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"trainwell: error: {message} (see trainwell {self.prog.split()[-1]} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``trainwell`` argument parser with its three commands."""
    parser = _Parser(
        prog="trainwell",
        description="Train, evaluate and use PyTorch models on tables.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"trainwell {trainwell.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser(
        "train",
        help="train a model and write a run folder",
        argument_default=argparse.SUPPRESS,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    """Entry point of the ``trainwell`` command. Returns the exit code (see ``EXIT_CODES``)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a bad flag that argparse has reported
        return stop.code if isinstance(stop.code, int) else 2
    try:
        code: int = args.handler(args)
    except (TrainwellError, OSError) as error:
        if isinstance(error, OSError):  # the disk or permissions, not the input (a TrainwellError is a ValueError)
            message, code = _environment_message(error), 3
        else:
            message, code = str(error), 2
        notes = getattr(error, "__notes__", [])
        print(f"trainwell: error: {one_line(chr(10).join([message, *notes]))}", file=sys.stderr)
    return code


_ENVIRONMENT_FIXES = {
    errno.ENOSPC: "free space on that disk",
    errno.EDQUOT: "free space within your disk quota",
    errno.EROFS: "write to a writable file system",
    errno.EACCES: "fix the permissions of that folder",
    errno.EPERM: "fix the permissions of that folder",
}


def _environment_message(error: OSError) -> str:
    where = f": {error.filename}" if error.filename else ""
    return format_message(
        f"A file operation failed: {error.strerror or error}{where}.",
        f"{type(error).__name__} {errno.errorcode.get(error.errno or 0, error.errno)}",
        f"{_ENVIRONMENT_FIXES.get(error.errno or 0, 'check the disk and the path')}, then try again.",
    )


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
    for name, value in options.items():
        if isinstance(value, str) and not _is_unicode(value):
            raise config_error(
                f"--{name.replace('_', '-')} is not valid UTF-8 text, so the run's config.toml could not record it.",
                ascii(value),
                "rename the file (or column) using UTF-8 characters.",
            )
    return options


def _is_unicode(text: str) -> bool:
    """False for text with lone surrogates: how Python passes on a file name in another encoding.
    No TOML file can hold them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_config(path: Path) -> dict[str, Any]:
    try:
        content = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise config_error(f"No such config file: {path}.", str(path), "check the path of --config.") from None
    except IsADirectoryError:
        raise config_error(
            f"{path} is a folder, not a config file.", str(path), f"pass a file, e.g. {path / CONFIG_FILE}."
        ) from None
    except UnicodeDecodeError:
        raise config_error(
            f"{path} is not a TOML text file (not UTF-8).", str(path), "pass a config.toml written by trainwell train."
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise config_error(f"{path} is not valid TOML: {error}.", str(path), "fix the file's syntax.") from None
    options = {}
    for name, value in content.items():
        if name not in TRAIN_OPTIONS:
            raise config_error(f"Unknown option {name!r} in {path}.", name, f"use any of: {', '.join(TRAIN_OPTIONS)}.")
        option = TRAIN_OPTIONS[name]
        try:
            options[name] = option.kind(str(value))
        except (ValueError, argparse.ArgumentTypeError):
            raise config_error(f"Invalid value for {name} in {path}.", repr(value), option.help + ".") from None
        if option.choices and options[name] not in option.choices:
            raise config_error(f"Invalid {name} in {path}.", repr(value), f"use one of {', '.join(option.choices)}.")
    return options


def _config_text(options: dict[str, Any]) -> str:
    """The options as TOML (``tomllib`` reads them back unchanged; a test proves it)."""
    lines = ["# trainwell train options; re-run with: trainwell train --config " + CONFIG_FILE]
    for name, value in options.items():
        if value is None or name in ("out", "resume"):
            continue
        lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: str | float) -> str:
    """A TOML value: a bool, integer, float, or a basic string with TOML's escapes (control
    characters as \\uXXXX; everything else, emoji included, as UTF-8 text)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return repr(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(f"\\u{ord(char):04x}" if char < " " or char == "\x7f" else char for char in escaped) + '"'


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


def check_size(spec: dict[str, Any], fix: str) -> None:
    """Refuse a model spec of more than ``MAX_PARAMETERS`` parameters, before anything is allocated."""
    widths = [spec["inputs"], *spec["hidden"], spec["outputs"]]
    count = sum((width + 1) * following for width, following in itertools.pairwise(widths))
    if count > MAX_PARAMETERS:
        raise config_error(
            f"The model would have {count:,} parameters; the command line builds at most {MAX_PARAMETERS:,}.",
            f"{spec['inputs']} inputs, hidden {spec['hidden']}, {spec['outputs']} outputs",
            fix,
        )


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
    complete. Once training has started, the partial folder is kept whatever stops the run (Ctrl-C,
    SIGTERM, a full disk, an error); ``--resume`` continues it.
    """
    resuming = bool(getattr(args, "resume", False))
    options = resolve_options(args, resuming=resuming)
    table = load_table(options["data"], target=options["target"], task=options["task"])
    if table.task == "classification" and table.num_classes < 2:
        raise data_error(
            "The target has a single class: there is nothing to learn.",
            f"every row of {options['data']} is {table.class_names[0]!r}",
            "pass data with at least two classes (or --task regression for numbers).",
        )
    if options["seed"] is None:
        options["seed"] = int.from_bytes(os.urandom(3), "big")
    seed = options["seed"]
    rest, test = split(table, options["test_split"], seed) if options["test_split"] else (table, None)
    train, val = split(rest, options["val_split"], seed + 1) if options["val_split"] else (rest, None)
    scaler = Scaler.fit(train.features)
    spec = model_spec(table, options) | {"mean": scaler.mean.tolist(), "std": scaler.std.tolist()}
    check_size(spec, "pass smaller --hidden sizes (the default is 128,64).")
    options |= {"loss": spec["loss"], "metrics": ",".join(_metrics(options, table))}
    main = os.environ.get("RANK", "0") == "0"  # under torchrun, only rank 0 prints and writes
    folder = _run_folder(options, resuming, main)
    if folder is None:
        return 0
    torch.manual_seed(seed)
    model = build_model(spec)
    created: list[Path] = []
    if main and not (resuming and _partial(folder).is_dir()):
        folder, created = _claim(folder, numbered=not options["out"])
    temporary = _partial(folder)
    start = _RunStart(temporary / CONFIG_FILE if main else None, options)
    try:
        began = time.perf_counter()
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
            callbacks=[start],
        )
        seconds = time.perf_counter() - began
        results = _score(model, test or train, spec, _metrics(options, table), options["device"])
        if not main:
            return 0
        print(f"\nTrained in {seconds:.1f}s. " + ("Test results" if test else "Training-set results (no test split)"))
        _print_results(results, spec)
        _write_run(temporary, model, spec, options, history, results, test or train)
        shutil.rmtree(temporary / "checkpoints")
        temporary.rename(folder)
    except BaseException as error:
        kept = resuming or start.started  # a resumed run's earlier work, or this run's checkpoints
        if main and not kept:
            _remove(temporary, created)
        if isinstance(error, KeyboardInterrupt):
            return _interrupted(error, temporary if kept else None, folder)
        if main and kept:
            error.add_note(
                f"The run so far is kept in {temporary}: try again with trainwell train --out {folder} --resume"
            )
        raise
    print(f"\nRun folder: {folder}")
    return 0


class _RunStart(trainwell.Callback):
    """Writes the run's config.toml when fit starts training, that is after fit has accepted a
    resume (a refused one, say with another --hidden, leaves the interrupted run's config as it
    was), and records that training started: from then on the partial folder is always kept."""

    def __init__(self, config: Path | None, options: dict[str, Any]) -> None:
        self.config = config
        self.options = options
        self.started = False

    def on_fit_start(self, run: trainwell.Run) -> None:
        if self.config is not None:
            _save(self.config, _config_text(self.options))
        self.started = True


def _interrupted(interrupt: KeyboardInterrupt, kept: Path | None, folder: Path) -> int:
    number = getattr(interrupt, "signal_number", signal.SIGINT)
    saved = (
        f"the run is saved in {kept}. Continue it with: trainwell train --out {folder} --resume"
        if kept
        else "training had not started; nothing was kept"
    )
    print(f"\ntrainwell: interrupted ({signal.Signals(number).name}); {saved}", file=sys.stderr)
    return 128 + number


def _remove(temporary: Path, created: list[Path]) -> None:
    """Remove a run that had not started training, and the folders it made for itself (runs/)."""
    shutil.rmtree(temporary, ignore_errors=True)
    for parent in reversed(created):
        with contextlib.suppress(OSError):  # another run may have put its folder there meanwhile
            parent.rmdir()


def _partial(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.partial")


def _run_folder(options: dict[str, Any], resuming: bool, main: bool = True) -> Path | None:
    """The final run folder, checked but not created; None (after saying so) when a resumed run
    had already finished."""
    if not resuming:
        return _new_run_folder(options, main)
    if not options["out"]:
        raise config_error("--resume needs the run folder to continue.", "no --out", "pass --out RUN_FOLDER --resume.")
    folder = Path(options["out"])
    _check_out(folder, resuming=True)
    if (folder / MODEL_FILE).is_file():
        print(f"Nothing to resume: {folder} is a finished run.")
        return None
    if not _partial(folder).is_dir():
        print(f"No interrupted run at {folder}: starting it from the beginning.")
    return folder


def _new_run_folder(options: dict[str, Any], main: bool = True) -> Path:
    if options["out"]:
        folder = Path(options["out"])
        if main:
            _check_out(folder, resuming=False)
        return folder
    stem = Path(options["data"]).stem if options["data"] not in BUNDLED else options["data"]
    job = os.environ.get("TORCHELASTIC_RUN_ID")  # under torchrun: one name every rank agrees on
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S') if job is None else job}"


def _check_out(folder: Path, resuming: bool) -> None:
    """Refuse an --out that cannot become a run folder safely, before any work."""
    for path in (folder, _partial(folder)):
        if path.is_symlink():  # a run folder is never written through a link
            raise config_error(
                f"{path} is a symbolic link.",
                f"{path} -> {os.readlink(path)}",
                "pass another --out, or remove the link.",
            )
        if os.path.lexists(path) and not path.is_dir():
            raise config_error(f"{path} is a file, not a folder.", str(path), "pass a new folder path as --out.")
    if resuming:
        return
    if folder.is_dir() and any(folder.iterdir()):
        raise config_error("The run folder exists and is not empty.", str(folder), "pass a new --out folder.")
    if _partial(folder).exists():
        raise config_error(
            "An interrupted run of that name exists.",
            str(_partial(folder)),
            f"continue it with: trainwell train --out {folder} --resume, or remove that folder.",
        )


def _claim(folder: Path, numbered: bool) -> tuple[Path, list[Path]]:
    """Create the run's partial folder with ``mkdir``, which fails when it exists, so two runs
    never share one: a default name then takes the next number (``-2``, ``-3``, ...), a given
    --out is refused. Returns the folder and the parents created for it."""
    created = [parent for parent in reversed(folder.parents) if not parent.exists()]
    folder.parent.mkdir(parents=True, exist_ok=True)
    base, number = folder, 1
    while True:
        try:
            _partial(folder).mkdir()
        except FileExistsError:
            if not numbered:
                _check_out(folder, resuming=False)  # says which run holds it
                raise
        else:
            if not numbered or not os.path.lexists(folder):
                return folder, created
            _partial(folder).rmdir()  # another run finished under this name meanwhile
        number += 1
        folder = base.with_name(f"{base.name}-{number}")


def _check_width(features: np.ndarray, spec: dict[str, Any], source: str) -> None:
    if features.shape[1] != spec["inputs"]:
        raise data_error(
            f"{source} has {features.shape[1]} feature columns; the run's model takes {spec['inputs']}.",
            f"{source}: {features.shape[1]} columns; the model's: {', '.join(spec['feature_names'][:8])}",
            "pass data with the feature columns the run was trained on.",
        )


def _standardised(features: np.ndarray, spec: dict[str, Any]) -> torch.Tensor:
    return torch.from_numpy(Scaler(np.asarray(spec["mean"]), np.asarray(spec["std"])).transform(features))


def _score(model: nn.Module, table: Table, spec: dict[str, Any], metrics: list[str], device: str) -> dict[str, Any]:
    features = _standardised(table.features, spec)
    targets = _targets(table, spec)
    results: dict[str, Any] = {"samples": len(targets)}
    # The command prints the results itself: no evaluation or prediction line of their own.
    results |= trainwell.evaluate(model, (features, targets), loss=spec["loss"], metrics=metrics, device=device,
                                  progress=False)  # fmt: skip
    outputs = trainwell.predict(model, features, device=device, progress=False)
    if spec["task"] == "classification" and outputs is not None:  # None on ranks other than 0 under torchrun
        report = Report.from_predictions(outputs, torch.from_numpy(table.targets), class_names=spec["class_names"],
                                         threshold=_threshold(spec))  # fmt: skip
        results["report"] = report
    return results


def _threshold(spec: dict[str, Any]) -> float:
    """Where a one-output classifier says yes: its sigmoid output at 0.5, its logit at 0."""
    return 0.5 if spec["head"] == "sigmoid" else 0.0


def _predicted_classes(outputs: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    if spec["outputs"] > 1:
        return outputs.argmax(1)
    return (outputs.reshape(-1) > _threshold(spec)).long()


def _print_results(results: dict[str, Any], spec: dict[str, Any]) -> None:
    print(f"  samples   {results['samples']}")
    for key, value in results.items():
        if isinstance(value, float):
            shown = f"{value:.2%}" if "accuracy" in key else f"{value:.4f}"
            print(f"  {key:<9} {shown}")
    if "report" in results:
        print("\n" + "\n".join(f"  {line}" if line else "" for line in str(results["report"]).splitlines()))


def _write_run(
    folder: Path,
    model: nn.Module,
    spec: dict[str, Any],
    options: dict[str, Any],
    history: trainwell.History,
    results: dict[str, Any],
    table: Table,
) -> None:
    _save(folder / CONFIG_FILE, _config_text(options))
    history.to_csv(folder / "history.csv")
    _save(folder / SPEC_FILE, json.dumps(spec, indent=1))
    atomic_save({key: value.cpu() for key, value in model.state_dict().items()}, folder / MODEL_FILE)
    report: Report | None = results.get("report")
    summary = {key: value for key, value in results.items() if key != "report"}
    summary |= {} if report is None else report.to_dict()  # per_class, confusion_matrix, overall, curves
    _save(folder / "metrics.json", json.dumps({"test": summary, "epochs": history.epochs}, indent=1))
    history.plot(folder / "curves.png")
    if report is not None:
        report.plot_confusion_matrix(folder / "confusion_matrix.png")


def _save(path: Path, content: str) -> None:
    """Write one text file of a run (UTF-8) atomically: a file planted there as a symbolic link is
    replaced, never written through, and a crash leaves the old file or the new one. (The
    History's CSV and the pictures are written the same way by trainwell itself.)"""
    atomic_write(content.encode("utf-8"), path)


def load_run(run_dir: Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Rebuild a run's model, its spec and options. A run folder may come from anyone: model.json
    is checked field by field and in size before anything is built, and model.pt is read by
    weights.load_weights (tensors only, no code runs) into a model of that exact shape."""
    if not (run_dir / MODEL_FILE).is_file() or not (run_dir / SPEC_FILE).is_file():
        raise data_error(
            f"{run_dir} is not a trainwell run folder.",
            f"files: {', '.join(sorted(path.name for path in run_dir.iterdir())) if run_dir.is_dir() else 'none'}",
            "pass a folder written by 'trainwell train' (it holds model.pt and model.json).",
        )
    spec = _read_spec(run_dir / SPEC_FILE)
    options = {name: option.default for name, option in TRAIN_OPTIONS.items()} | _read_config(run_dir / CONFIG_FILE)
    model = build_model(spec)
    _load_weights(model, run_dir / MODEL_FILE)
    return model, spec, options


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_list(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(map(check, value))


_SPEC_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "inputs": ("an integer >= 1", _is_count),
    "outputs": ("an integer >= 1", _is_count),
    "hidden": ("a list of integers >= 1", _is_list(_is_count)),
    "dropout": ("a number in [0, 1)", lambda value: _is_number(value) and 0 <= value < 1),
    "head": ("none, log_softmax or sigmoid", lambda value: value in ("none", "log_softmax", "sigmoid")),
    "loss": ("a loss name", lambda value: isinstance(value, str)),
    "task": ("classification or regression", lambda value: value in ("classification", "regression")),
    "class_names": ("a list of strings", _is_list(lambda name: isinstance(name, str))),
    "feature_names": ("a list of strings", _is_list(lambda name: isinstance(name, str))),
    "mean": ("a list of finite numbers", _is_list(_is_number)),
    "std": ("a list of positive numbers", _is_list(lambda value: _is_number(value) and value > 0)),
}


def _read_spec(path: Path) -> dict[str, Any]:
    """model.json, with every field checked (the rules are ``_SPEC_FIELDS``) and its size capped."""
    fix = "pass a run folder written by 'trainwell train' (or train the run again)."
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise data_error(f"{path} is too large for a model spec.", f"{size:,} bytes", fix)
    try:
        spec = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:
        raise data_error(f"{path} is not valid JSON.", str(error)[:200], fix) from None
    if not isinstance(spec, dict):
        raise data_error(f"{path} does not hold a model spec (a JSON object).", type(spec).__name__, fix)
    for name, (rule, check) in _SPEC_FIELDS.items():
        if name not in spec or not check(spec[name]):
            raise data_error(f"{path}: {name!r} must be {rule}.", f"{name}={spec.get(name, 'missing')!r:.100}", fix)
    classes = len(spec["class_names"])
    widths = {spec["inputs"], len(spec["feature_names"]), len(spec["mean"]), len(spec["std"])}
    if spec["task"] == "classification":  # one output: a threshold between the first two classes
        consistent = classes >= 2 and spec["outputs"] in (1, classes)
    else:
        consistent = classes == 0 and spec["outputs"] == 1
    if len(widths) > 1 or not consistent:
        raise data_error(
            f"{path} contradicts itself.",
            f"{spec['inputs']} inputs, {len(spec['feature_names'])} feature names, {len(spec['mean'])} means, "
            f"{spec['outputs']} outputs, {classes} class names for {spec['task']}",
            fix,
        )
    check_size(spec, fix)
    return spec


def _load_weights(model: nn.Module, path: Path) -> None:
    size = path.stat().st_size
    if size > 4 * MAX_PARAMETERS + 2**20:  # float32 weights plus the archive's records: refused unread
        raise data_error(
            f"{path} is larger than any model the command line builds.", f"{size:,} bytes", "train the run again."
        )
    load_weights(model, path)


def run_evaluate(args: argparse.Namespace) -> int:
    """``trainwell evaluate RUN_DIR``: score the run's test split again, or the whole of --data."""
    model, spec, options = load_run(args.run_dir)
    if args.data is None:
        table = load_table(options["data"], target=options["target"], task=spec["task"])
        table = split(table, options["test_split"], options["seed"])[1] if options["test_split"] else table
    else:
        table = load_table(args.data, target=args.target or options["target"], task=spec["task"])
        _check_width(table.features, spec, args.data)
        table = _relabel(table, spec)
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
    out = args.out or args.run_dir / "predictions.csv"
    if out.is_dir():
        raise config_error(
            "predict --out is a folder; it names the CSV file to write.",
            str(out),
            f"pass a file path, e.g. --out {out / 'predictions.csv'}.",
        )
    model, spec, _ = load_run(args.run_dir)
    if args.data in BUNDLED:
        features = load_table(args.data).features
    else:
        features = read_features(Path(args.data), spec["feature_names"])
    _check_width(features, spec, args.data)
    outputs = trainwell.predict(model, _standardised(features, spec))
    if spec["task"] == "classification":
        predictions = [spec["class_names"][index] for index in _predicted_classes(outputs, spec).tolist()]
    else:
        predictions = [repr(float(value)) for value in outputs.reshape(len(outputs), -1)[:, 0]]
    text = io.StringIO()
    csv.writer(text).writerows([["prediction"], *([prediction] for prediction in predictions)])
    _save(out, text.getvalue())
    print(f"Wrote {len(predictions)} predictions to {out}")
    return 0
