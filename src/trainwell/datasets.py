"""Tables for the command-line tool: scikit-learn's bundled data sets, CSV and .npz files.

Owns: reading a table, inferring its task, splitting it (stratified) and standardising it with
training statistics. Needs no network. Must not train or print.
"""

from __future__ import annotations

import csv
import io
import math
import zipfile
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from trainwell.errors import data_error, unknown_name_error

Task = Literal["classification", "regression"]
BUNDLED = ("digits", "iris", "wine", "breast_cancer", "diabetes")
# Integer targets with at most this many distinct values are read as class labels.
MAX_CLASSES_INFERRED = 20


@dataclass(frozen=True)
class Table:
    """Features and targets of one data set.

    Attributes:
        name: Short name (``digits``, or the file's stem).
        features: float32 array (N, F).
        targets: int64 class indices (classification) or float32 (N, 1) values (regression).
        feature_names: One name per column of ``features``.
        task: ``"classification"`` or ``"regression"``.
        class_names: The original label of each class index (classification only).
    """

    name: str
    features: np.ndarray
    targets: np.ndarray
    feature_names: list[str]
    task: Task
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for regression)."""
        return len(self.class_names)

    def subset(self, index: np.ndarray) -> Table:
        """The rows ``index``."""
        return replace(self, features=self.features[index], targets=self.targets[index])


def load_table(data: str, *, target: str | None = None, task: Task | None = None) -> Table:
    """Load a bundled data set by name, or a ``.csv`` / ``.npz`` file.

    Args:
        data: One of ``BUNDLED`` or a path.
        target: The target column of a CSV file (required for CSV).
        task: Overrides the inferred task (integers/strings with few distinct values are classes).

    Raises:
        DataError: A missing file or column, non-numeric or empty cells, too few rows.
        ConfigError: An unknown data set name.

    Example:
        >>> table = load_table("iris")
        >>> table.features.shape, table.task, table.class_names
        ((150, 4), 'classification', ['setosa', 'versicolor', 'virginica'])
    """
    if data in BUNDLED:
        table = _bundled(data)
    elif data.endswith((".csv", ".npz")):
        path = Path(data)
        if not path.is_file():
            raise data_error(f"No such file: {data}.", f"--data {data}", "check the path, or use a bundled data set.")
        table = _read_csv(path, target) if data.endswith(".csv") else _read_npz(path)
    else:
        raise unknown_name_error("data set", data, [*BUNDLED, "<file>.csv", "<file>.npz"])
    if task is not None and task != table.task:
        table = _with_task(table, task)
    if len(table.targets) < 2:
        raise data_error(
            "The data needs at least 2 rows to split into training and test parts.",
            f"{len(table.targets)} row(s) in {data}",
            "add rows to the file.",
        )
    return table


def _bundled(name: str) -> Table:
    from sklearn import datasets

    loader = getattr(datasets, f"load_{name}")
    bunch = loader()
    features = np.asarray(bunch.data, dtype=np.float32)
    names = [str(feature) for feature in getattr(bunch, "feature_names", [f"x{i}" for i in range(features.shape[1])])]
    if name == "diabetes":
        return Table(name, features, _column(bunch.target), names, "regression", [])
    classes = [str(label) for label in getattr(bunch, "target_names", np.unique(bunch.target))]
    return Table(name, features, np.asarray(bunch.target, dtype=np.int64), names, "classification", classes)


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """The header and the non-empty data rows of a CSV file, each row as long as the header.

    Read as UTF-8, with or without a byte-order mark (spreadsheets write one; it must not
    become part of the first column's name).
    """
    if not path.is_file():
        raise data_error(f"No such file: {path}.", str(path), "check the path.")
    fix = "save the table as CSV in UTF-8 (a spreadsheet's 'CSV UTF-8'), or pass a .npz file."
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise data_error(
            f"{path.name} is not UTF-8 text (a binary file, or another encoding such as Latin-1).",
            f"byte 0x{error.object[error.start]:02x} at position {error.start}",
            fix,
        ) from None
    if "\x00" in text:
        raise data_error(
            f"{path.name} is a binary file, not CSV text.", f"a NUL byte at position {text.index(chr(0))}", fix
        )
    try:
        rows = [row for row in csv.reader(io.StringIO(text, newline="")) if row]
    except csv.Error as error:  # e.g. a cell larger than the csv module's limit
        raise data_error(f"{path.name} is not a readable CSV file.", str(error), fix) from None
    if not rows:
        raise data_error(f"{path.name} is empty.", str(path), "pass a CSV file with a header row and data rows.")
    header = [name.strip() for name in rows[0]]
    # With a repeated name, "the column y" would mean different columns to train and predict.
    repeated = [name for name, count in Counter(header).items() if count > 1]
    if repeated:
        raise data_error(
            f"{path.name} has repeated column names.",
            f"{', '.join(map(repr, repeated))} in the header {','.join(header)}",
            "give every column its own name.",
        )
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise data_error(
                f"Row {line} of {path.name} has {len(row)} cells, the header {len(header)}.",
                ",".join(row)[:200],
                "give every row one cell per column.",
            )
    return header, rows[1:]


def _read_csv(path: Path, target: str | None) -> Table:
    header, body = _rows(path)
    if target is None:
        raise data_error("A CSV file needs --target COLUMN.", f"columns: {', '.join(header)}", "add --target NAME.")
    if target not in header:
        raise data_error(
            f"The target column {target!r} is not in {path.name}.",
            f"columns: {', '.join(header)}",
            "pass --target with one of those names.",
        )
    if len(header) < 2:
        raise data_error(
            f"{path.name} has no feature columns: only the target.",
            f"columns: {', '.join(header)}",
            "add the columns to learn from, or pass the file that has them.",
        )
    column = header.index(target)
    feature_columns = [index for index in range(len(header)) if index != column]
    features = np.empty((len(body), len(feature_columns)), dtype=np.float32)
    labels: list[str] = []
    for line, row in enumerate(body, start=2):
        labels.append(_cell(row[column], line, target, numeric=False))
        for position, index in enumerate(feature_columns):
            features[line - 2, position] = float(_cell(row[index], line, header[index], numeric=True))
    return _from_labels(path.stem, features, labels, [header[index] for index in feature_columns])


def read_features(path: Path, feature_names: Sequence[str]) -> np.ndarray:
    """The columns ``feature_names`` of a CSV file (any order, extra columns ignored), as float32.

    Raises:
        DataError: A missing file or column, a non-numeric or empty cell.
    """
    header, body = _rows(path)
    missing = [name for name in feature_names if name not in header]
    if missing:
        raise data_error(
            f"{path.name} lacks feature columns the model was trained on.",
            f"missing: {', '.join(missing)}; columns: {', '.join(header)}",
            "pass a CSV with the same feature columns as the training data.",
        )
    if not body:
        raise data_error(f"{path.name} has no data rows.", "a header only", "add rows to predict.")
    columns = [header.index(name) for name in feature_names]
    features = np.empty((len(body), len(columns)), dtype=np.float32)
    for line, row in enumerate(body, start=2):
        for position, index in enumerate(columns):
            features[line - 2, position] = float(_cell(row[index], line, header[index], numeric=True))
    return features


def _cell(text: str, line: int, column: str, *, numeric: bool) -> str:
    text = text.strip()
    if not text or text.lower() in ("nan", "na", "null", "none", "inf", "-inf"):
        raise data_error(
            f"Row {line}, column {column!r} is empty or not a finite number.",
            repr(text),
            "fill or drop rows with missing values before training.",
        )
    if numeric:
        try:
            value = float(text)
        except ValueError:
            raise data_error(
                f"Feature column {column!r} is not numeric (row {line}).",
                repr(text),
                "encode it as numbers (e.g. one-hot columns) or drop the column.",
            ) from None
        if not math.isfinite(value):
            raise data_error(f"Row {line}, column {column!r} is not finite.", repr(text), "replace it with a number.")
    return text


def _from_labels(
    name: str, features: np.ndarray, labels: Sequence[str], feature_names: list[str], task: Task | None = None
) -> Table:
    """Classes from labels (numbers sort numerically), or regression values; ``task`` forces one."""
    numbers = _as_numbers(labels)
    names = [_class_name(label) for label in labels]
    distinct = sorted(set(names), key=lambda name: (float(name) if numbers is not None else 0.0, name))
    is_integral = numbers is not None and bool(np.all(numbers == np.round(numbers)))
    inferred: Task = "classification"
    if numbers is not None and not (is_integral and len(distinct) <= MAX_CLASSES_INFERRED):
        inferred = "regression"
    if (task or inferred) == "regression":
        if numbers is None:
            raise data_error(
                "Text labels cannot be regression targets.",
                ", ".join(distinct[:5]),
                "use --task classification.",
            )
        return Table(name, features, _column(numbers), feature_names, "regression", [])
    index = {label: position for position, label in enumerate(distinct)}
    targets = np.asarray([index[label] for label in names], dtype=np.int64)
    return Table(name, features, targets, feature_names, "classification", distinct)


def _read_npz(path: Path) -> Table:
    features, targets = _arrays(path)
    if features.ndim != 2 or targets.ndim == 0 or targets.size != len(targets) or len(targets) != len(features):
        raise data_error(
            "x must be (N, F) and y must hold N targets, one per row.",
            f"x {features.shape}, y {targets.shape}",
            "reshape x to one row per sample and y to (N,).",
        )
    if not np.issubdtype(features.dtype, np.number) or not np.all(np.isfinite(features)):
        raise data_error("x must be finite numbers.", f"x of dtype {features.dtype}", "clean the array first.")
    if np.issubdtype(targets.dtype, np.number) and not np.all(np.isfinite(targets)):
        raise data_error("y must be finite numbers.", "NaN or inf in y", "drop or fill those rows first.")
    labels = [str(value) for value in targets.reshape(-1)]
    names = [f"x{i}" for i in range(features.shape[1])]
    return _from_labels(path.stem, features.astype(np.float32), labels, names)


def _arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``x`` and ``y`` of an .npz file, read without unpickling anything."""
    fix = "save it with np.savez(path, x=features, y=targets) of numbers or strings (no object arrays)."
    arrays: dict[str, np.ndarray] = {}
    try:
        archive = np.load(path, allow_pickle=False)
        if isinstance(archive, np.lib.npyio.NpzFile):
            with archive:
                arrays = {name: archive[name] for name in archive.files if name in ("x", "y")}
                files = archive.files
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise data_error(f"{path.name} is not a readable .npz file.", str(error)[:200], fix) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise data_error(f"{path.name} is a single array, not an .npz archive.", "an .npy file", fix)
    if len(arrays) < 2:
        raise data_error(f"{path.name} must hold arrays named 'x' and 'y'.", f"arrays: {', '.join(files)}", fix)
    return arrays["x"], arrays["y"]


def _with_task(table: Table, task: Task) -> Table:
    if table.task == "classification":
        labels = [table.class_names[index] for index in table.targets]
    else:
        labels = [repr(float(value)) for value in table.targets.reshape(-1)]
    return _from_labels(table.name, table.features, labels, table.feature_names, task)


def _as_numbers(labels: Sequence[str]) -> np.ndarray | None:
    try:
        return np.asarray([float(label) for label in labels], dtype=np.float64)
    except ValueError:
        return None


def _class_name(label: str) -> str:
    """One name per number: ``"1"``, ``"1.0"`` and ``"01"`` are one class, named ``"1"`` (so a
    file mixing them does not get two classes of the same name)."""
    try:
        number = float(label)
    except ValueError:
        return label
    return str(int(number)) if number.is_integer() else repr(number)


def _column(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).reshape(-1, 1)


def split(table: Table, fraction: float, seed: int) -> tuple[Table, Table]:
    """Split off ``fraction`` of the rows, stratified by class for classification.

    Returns:
        (rest, held_out).

    Raises:
        DataError: A split that leaves one side empty.
    """
    rows = len(table.targets)
    held = round(rows * fraction)
    if not 0 < held < rows:
        raise data_error(
            "The split leaves no rows on one side.",
            f"{fraction} of {rows} rows = {held}",
            "use a fraction that holds out at least one row and keeps at least one.",
        )
    rng = np.random.default_rng(seed)
    if table.task == "classification" and np.bincount(table.targets).min() >= 2:
        held_out = _stratified(table.targets, held, rng)
    else:
        held_out = rng.permutation(rows)[:held]
    mask = np.zeros(rows, dtype=bool)
    mask[held_out] = True
    return table.subset(np.flatnonzero(~mask)), table.subset(np.flatnonzero(mask))


def _stratified(labels: np.ndarray, held: int, rng: np.random.Generator) -> np.ndarray:
    """``held`` row indices with each class in proportion (largest remainders get the rest)."""
    counts = np.bincount(labels)
    exact = counts * held / len(labels)
    quota = np.floor(exact).astype(int)
    for position in np.argsort(-(exact - quota))[: held - quota.sum()]:
        quota[position] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == label))[:take] for label, take in enumerate(quota) if take]
    return np.concatenate(chosen)


@dataclass(frozen=True)
class Scaler:
    """Per-feature standardisation learnt from training rows only."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> Scaler:
        """Learn the mean and standard deviation (constant columns keep a scale of 1)."""
        std = features.std(axis=0)
        return cls(features.mean(axis=0), np.where(std > 0, std, 1.0).astype(np.float32))

    def transform(self, features: np.ndarray) -> np.ndarray:
        """Standardise ``features``."""
        scaled: np.ndarray = ((features - self.mean) / self.std).astype(np.float32)
        return scaled
