"""The command line against hostile or broken input: tables, run folders, full disks, planted links.

Issue #15, cases 9 and 11-16: each is one line on stderr with exit code 2 (bad input) or 3 (the
environment), never a traceback; a run folder cannot make trainwell write anywhere else.
Tests call ``trainwell.cli.main`` in-process (tiny runs; it returns the exit code, which
``python -m trainwell`` passes to ``sys.exit``); the full disk is a real tmpfs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from trainwell import cli
from trainwell.cli import MAX_PARAMETERS, main

TINY = ["--epochs", "1", "--hidden", "4", "--seed", "0"]


def run(capsys: pytest.CaptureFixture[str], *arguments: Any) -> tuple[int, str, str]:
    code = main([str(argument) for argument in arguments])
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(result: tuple[int, str, str], *words: str, code: int = 2) -> None:
    """One line on stderr, the exit code, and the message's key words."""
    returned, _, err = result
    assert returned == code, err
    assert err.startswith("trainwell: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


def table(rows: int = 40, header: str = "a,b,y", labels: tuple[str, ...] = ("0", "1")) -> str:
    lines = [header] + [f"{i % 7},{(i * 3) % 5},{labels[i % len(labels)]}" for i in range(rows)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished iris run (4 features, 3 classes)."""
    folder = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--data", "iris", *TINY, "--out", str(folder)]) == 0
    return folder


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.fixture
def partial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Path:
    """An interrupted run: training finished its epochs and checkpoints, then writing failed."""

    def fail(*arguments: Any) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(cli, "_write_run", fail)
        result = run(capsys, "train", "--data", "iris", *TINY, "--epochs", "2", "--out", tmp_path / "run")
    assert_error(result, "No space left on device", f"trainwell train --out {tmp_path / 'run'} --resume", code=3)
    folder = tmp_path / ".run.partial"
    assert (folder / "checkpoints").is_dir() and (folder / "config.toml").is_file()
    return folder


# Case 9: tables.


@pytest.mark.parametrize(
    ("header", "target", "named"), [("a,a,y", "y", "'a'"), ("f,y,y", "y", "'y'"), ("a, a ,y", "y", "'a'")]
)
def test_repeated_column_names_are_refused(
    header: str, target: str, named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write(tmp_path / "data.csv", table(header=header))
    assert_error(run(capsys, "train", "--data", data, "--target", target, *TINY), "repeated column names", named)


def test_predict_refuses_repeated_names_and_rows_of_another_length(
    run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = json.loads((run_copy / "model.json").read_text())["feature_names"]
    repeated = write(tmp_path / "repeated.csv", ",".join([*names, names[0]]) + "\n1,2,3,4,5\n")
    assert_error(run(capsys, "predict", run_copy, "--data", repeated), "repeated column names", repr(names[0]))
    short = write(tmp_path / "short.csv", ",".join(names) + "\n1,2,3,4\n1,2,3\n")
    assert_error(run(capsys, "predict", run_copy, "--data", short), "Row 3 of short.csv has 3 cells, the header 4")
    assert not (run_copy / "predictions.csv").exists()


def test_numerically_equal_labels_are_one_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write(tmp_path / "data.csv", table(labels=("0", "1", "1.0", "01", "0.0", "2", "2.00", "+2")))
    code, _, err = run(capsys, "train", "--data", data, "--target", "y", *TINY, "--out", tmp_path / "run")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "model.json").read_text())["class_names"] == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("y\n0\n1\n0\n1\n", ["no feature columns", "columns: y"]),
        (table(labels=("cat",)), ["single class", "'cat'"]),
    ],
)
def test_tables_with_nothing_to_learn_are_refused(
    text: str, words: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write(tmp_path / "data.csv", text)
    assert_error(run(capsys, "train", "--data", data, "--target", "y", *TINY, "--out", tmp_path / "run"), *words)
    assert list(tmp_path.iterdir()) == [data]


def test_a_byte_order_mark_stays_out_of_the_column_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write(tmp_path / "data.csv", table(header="y,a,b"), encoding="utf-8-sig")
    code, _, err = run(capsys, "train", "--data", data, "--target", "y", *TINY, "--out", tmp_path / "run")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "model.json").read_text())["feature_names"] == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("café,b,y\n1,2,0\n3,4,1\n".encode("latin-1"), ["is not UTF-8 text", "0xe9", "CSV UTF-8"]),
        (bytes(range(256)) * 4, ["is not UTF-8 text"]),
        (b"a,b,y\n1,2\x00,0\n3,4,1\n", ["is a binary file", "NUL byte at position 9"]),
    ],
)
def test_csvs_that_are_not_utf8_text_are_one_line(
    content: bytes, words: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data.csv"
    data.write_bytes(content)
    assert_error(run(capsys, "train", "--data", data, "--target", "y", *TINY), *words)


def _npz_object(path: Path) -> None:
    np.savez(path, x=np.zeros((4, 2)), y=np.array([1, "a", None, 2.0], dtype=object))


def _npz_pickle(path: Path) -> None:
    import pickle

    path.write_bytes(pickle.dumps({"x": [[1.0]], "y": [0]}))


def _npz_random(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(300))


def _npz_two_columns(path: Path) -> None:
    np.savez(path, x=np.zeros((10, 2)), y=np.zeros((10, 2)))


def _npz_single_array(path: Path) -> None:
    with path.open("wb") as file:
        np.save(file, np.zeros((10, 2)))


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (_npz_object, ["is not a readable .npz file", "Object arrays"]),
        (_npz_pickle, ["is not a readable .npz file", "pickled"]),
        (_npz_random, ["is not a readable .npz file"]),
        (_npz_two_columns, ["y must hold N targets", "y (10, 2)"]),
        (_npz_single_array, ["is a single array"]),
    ],
)
def test_npz_files_that_cannot_be_read_safely_are_one_line(
    make: Any, words: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make(tmp_path / "data.npz")
    assert_error(run(capsys, "train", "--data", tmp_path / "data.npz", *TINY), *words)


# Cases 11 and 12: a failed run keeps its folder; a refused resume leaves its config.


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_is_exit_3_and_the_run_resumes(small_disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Two checkpoints of this model (Adam's state included) fill 3 MB: the third epoch's cannot be written.
    arguments = ["--data", "digits", "--hidden", "256,256", "--epochs", "3", "--seed", "3", "--out", small_disk / "run"]
    assert_error(
        run(capsys, "train", *arguments),
        "No space left on device",
        f"try again with trainwell train --out {small_disk / 'run'} --resume",
        code=3,
    )
    partial = small_disk / ".run.partial"
    assert (partial / "checkpoints" / "manifest.json").is_file() and (partial / "config.toml").is_file()

    subprocess.run(["mount", "-o", "remount,size=64M", str(small_disk)], check=True)
    code, _, err = run(capsys, "train", *arguments, "--resume")
    assert code == 0, err
    history = (small_disk / "run" / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2", "3"]
    assert not partial.exists()


def test_a_refused_resume_leaves_the_config_and_plain_resume_still_works(
    partial: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = (partial / "config.toml").read_bytes()
    out = partial.parent / "run"
    assert_error(run(capsys, "train", "--out", out, "--resume", "--hidden", "16"), "--resume")
    assert (partial / "config.toml").read_bytes() == config
    code, _, err = run(capsys, "train", "--out", out, "--resume")
    assert code == 0, err
    assert tomllib.loads((out / "config.toml").read_text())["hidden"] == "4"


def test_a_failure_before_training_starts_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_error(run(capsys, "train", "--data", "iris", *TINY, "--out", tmp_path / "run", "--lr", "-1"), "lr")
    assert list(tmp_path.iterdir()) == []


# Case 13: run names are claimed atomically.


def test_a_default_name_in_use_by_a_running_run_takes_the_next_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "time", SimpleNamespace(strftime=lambda _: "20260101-000000", perf_counter=lambda: 0.0))
    other = tmp_path / "runs" / ".iris-20260101-000000.partial"  # a run started in the same second, still training
    other.mkdir(parents=True)
    (other / "its-work").write_text("kept")
    code, out, err = run(capsys, "train", "--data", "iris", *TINY)
    assert code == 0, err
    assert "Run folder: runs/iris-20260101-000000-2" in out
    assert (other / "its-work").read_text() == "kept" and sorted(os.listdir(other)) == ["its-work"]
    assert (tmp_path / "runs" / "iris-20260101-000000-2" / "model.pt").is_file()


def test_claiming_the_same_name_twice_gives_two_folders(tmp_path: Path) -> None:
    first, _ = cli._claim(tmp_path / "runs" / "x", numbered=True)
    second, _ = cli._claim(tmp_path / "runs" / "x", numbered=True)
    assert (first.name, second.name) == ("x", "x-2")
    assert (tmp_path / "runs" / ".x.partial").is_dir() and (tmp_path / "runs" / ".x-2.partial").is_dir()


# Case 14: config.toml is real TOML.


@pytest.mark.parametrize(
    "value",
    ['say "hi"', "back\\slash", "new\nline\ttab\r", "\x00\x1f\x7f\x08\x0c", "🌱 émoji", "\u2028", "'''", 0, 2**31, 1e-05,
     1e300, -0.5, math.inf, -math.inf, True, False],
)  # fmt: skip
def test_toml_values_round_trip_through_tomllib(value: str | float) -> None:
    assert tomllib.loads(f"value = {cli._toml_value(value)}\n")["value"] == value


def test_emoji_in_the_file_name_and_target_give_a_valid_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write(tmp_path / 'données "🌱".csv', table(header="a,b,espèce🌸", labels=('x "q"', "y\\z")))
    code, _, err = run(capsys, "train", "--data", data, "--target", "espèce🌸", *TINY, "--out", tmp_path / "run")
    assert code == 0, err
    config = tomllib.loads((tmp_path / "run" / "config.toml").read_text(encoding="utf-8"))
    assert config["data"] == str(data) and config["target"] == "espèce🌸"
    assert run(capsys, "evaluate", tmp_path / "run")[0] == 0
    assert run(capsys, "train", "--config", tmp_path / "run" / "config.toml", "--out", tmp_path / "again")[0] == 0


def test_a_file_name_in_another_encoding_is_refused_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / os.fsdecode(b"latin-\xe9.csv")
    write(data, table())
    assert_error(run(capsys, "train", "--data", data, "--target", "y", *TINY), "--data is not valid UTF-8", "rename")
    assert sorted(tmp_path.iterdir()) == [data]


# Case 15: planted links, and --out paths that are not new folders.


def test_predict_replaces_a_planted_link_and_never_writes_through_it(
    run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = write(tmp_path / "victim", "precious\n")
    (run_copy / "predictions.csv").symlink_to(victim)
    code, _, err = run(capsys, "predict", run_copy, "--data", "iris")
    assert code == 0, err
    assert victim.read_text() == "precious\n"
    assert not (run_copy / "predictions.csv").is_symlink()
    assert (run_copy / "predictions.csv").read_text().splitlines()[0] == "prediction"


def test_resume_replaces_every_planted_link_in_the_partial_folder(
    partial: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = [
        "config.toml",
        "history.csv",
        "model.json",
        "model.pt",
        "metrics.json",
        "curves.png",
        "confusion_matrix.png",
    ]
    victims = {name: write(tmp_path / f"victim-{name}", "precious\n") for name in names}
    config = (partial / "config.toml").read_bytes()
    for name, victim in victims.items():
        (partial / name).unlink(missing_ok=True)
        (partial / name).symlink_to(victim)
    write(tmp_path / "config.toml", config.decode())
    code, _, err = run(capsys, "train", "--out", tmp_path / "run", "--resume", "--config", tmp_path / "config.toml")
    assert code == 0, err
    for name, victim in victims.items():
        assert victim.read_text() == "precious\n", name
        assert (tmp_path / "run" / name).is_file() and not (tmp_path / "run" / name).is_symlink()


@pytest.mark.parametrize("kind", ["file", "dangling link", "link to a folder", "partial is a link"])
def test_out_must_be_a_new_folder(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    if kind == "file":
        write(out, "a file\n")
    elif kind == "dangling link":
        out.symlink_to(tmp_path / "nowhere")
    elif kind == "link to a folder":
        (tmp_path / "elsewhere").mkdir()
        out.symlink_to(tmp_path / "elsewhere")
    else:
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / ".run.partial").symlink_to(tmp_path / "elsewhere")
    before = sorted(os.listdir(tmp_path))
    words = ["is a file, not a folder"] if kind == "file" else ["is a symbolic link"]
    assert_error(run(capsys, "train", "--data", "iris", *TINY, "--out", out), *words)
    assert_error(run(capsys, "train", "--data", "iris", *TINY, "--out", out, "--resume"), *words)
    assert sorted(os.listdir(tmp_path)) == before and not (tmp_path / "nowhere").exists()
    assert not (tmp_path / "elsewhere").exists() or list((tmp_path / "elsewhere").iterdir()) == []


def test_predict_out_must_not_be_a_folder(run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_error(run(capsys, "predict", run_copy, "--data", "iris", "--out", tmp_path), "is a folder", "--out")


# Case 16: model.pt and model.json from anyone.


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def _spec(run: Path, **fields: Any) -> None:
    spec = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps(spec | fields))


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda run: (run / "model.pt").write_bytes((run / "model.pt").read_bytes()[:300]), ["model.pt"]),
        (lambda run: (run / "model.pt").write_bytes(b""), ["model.pt"]),
        (lambda run: (run / "model.pt").write_text("hello"), ["model.pt"]),
        (lambda run: torch.save({"0.weight": torch.zeros(2, 2)}, run / "model.pt"), ["model.pt"]),
        (lambda run: torch.save(Payload(run / "pwned"), run / "model.pt"), ["model.pt"]),
        (lambda run: (run / "model.json").write_text("{not json"), ["is not valid JSON"]),
        (lambda run: (run / "model.json").write_text("[1, 2]"), ["does not hold a model spec"]),
        (lambda run: _spec(run, hidden=[2e9]), ["'hidden' must be a list of integers >= 1"]),
        (lambda run: _spec(run, hidden=[2_000_000_000]), ["parameters", f"at most {MAX_PARAMETERS:,}"]),
        (lambda run: _spec(run, inputs=5), ["contradicts itself", "5 inputs, 4 feature names"]),
        (lambda run: _spec(run, class_names=["a"]), ["contradicts itself"]),
        (lambda run: _spec(run, std=[0, 1, 1, 1]), ["'std' must be a list of positive numbers"]),
        (lambda run: _spec(run, head="exec"), ["'head' must be"]),
        (lambda run: (run / "model.json").write_text("[" * 100_000), ["is not valid JSON"]),
    ],
)
def test_a_damaged_or_hostile_run_folder_is_one_line(
    damage: Any, words: list[str], run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damage(run_copy)
    assert_error(run(capsys, "predict", run_copy, "--data", "iris"), *words)
    assert_error(run(capsys, "evaluate", run_copy), *words)
    assert not (run_copy / "pwned").exists() and not (run_copy / "predictions.csv").exists()


def test_a_model_too_large_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["train", "--data", "iris", "--hidden", "20000,20000", "--out", tmp_path / "run"]
    assert_error(run(capsys, *arguments), "parameters", "--hidden")
    assert list(tmp_path.iterdir()) == []


# The other raw tracebacks of the issue.


@pytest.mark.parametrize(("seed", "shown"), [("-5", "'-5'"), (str(2**70), str(2**70)), ("1.5", "'1.5'")])
def test_seeds_outside_what_numpy_and_torch_take_are_refused(
    seed: str, shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_error(run(capsys, "train", "--data", "iris", "--seed", seed), "--seed", shown, "0 to 2**32-1")


def test_the_largest_seed_works(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["train", "--data", "iris", "--epochs", "1", "--hidden", "4", "--seed", str(2**32 - 1)]
    assert run(capsys, *arguments, "--out", tmp_path / "run")[0] == 0


def test_config_must_be_a_toml_text_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_error(run(capsys, "train", "--config", tmp_path), "is a folder", "config.toml")
    binary = tmp_path / "config.toml"
    binary.write_bytes(bytes(range(128, 256)))
    assert_error(run(capsys, "train", "--config", binary), "not a TOML text file")
    binary.write_bytes(b"seed = -5\n")
    assert_error(run(capsys, "train", "--config", binary), "Invalid value for seed", "-5")


def test_predict_on_data_of_another_width_names_both(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    words = ["digits has 64 feature columns", "the run's model takes 4"]
    assert_error(run(capsys, "predict", run_copy, "--data", "digits"), *words)
    assert_error(run(capsys, "evaluate", run_copy, "--data", "digits"), *words)


def test_help_states_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0 and "exit codes:" in out and "3    the environment failed" in out
