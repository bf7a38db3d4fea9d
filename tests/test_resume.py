"""Never lose training: real processes killed with SIGKILL, real signals, damaged files.

Each scenario is compared with a golden, uninterrupted run of the same script: every final
tensor of the model and the optimizer must be bitwise equal (torch.equal), and so must the History
(but its timing columns, which are checked present).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import trainwell as tw
from trainwell import files as checkpoint_module
from trainwell.checkpoints import FORMAT_VERSION, KEEP, MANIFEST
from trainwell.history import TIME_KEYS

from conftest import blobs, make_mlp, without_time

pytestmark = pytest.mark.slow  # real subprocesses: `pytest -m "not slow"` leaves them out

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, time
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset
    import trainwell as tw

    directory, result, mode, kill_at, slow = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])

    class Augmented(Dataset):
        def __init__(self, inputs, targets):
            self.inputs, self.targets = inputs, targets
        def __len__(self):
            return len(self.inputs)
        def __getitem__(self, index):  # random augmentation, drawn in the worker processes
            return self.inputs[index] + 0.1 * torch.randn(8), self.targets[index]

    class Chaos(tw.Callback):
        def on_train_batch_end(self, run):
            if run.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if slow:
                time.sleep(slow)
        def on_fit_end(self, run):
            self.optimizer = run.optimizer.state_dict()

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(320, 8, generator=generator)
    targets = (inputs[:, :3].sum(1) > 0).long() + (inputs[:, 3] > 1).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.2), nn.ReLU(), nn.Linear(32, 3))
    data = (inputs, targets)
    if mode == "workers":
        data = DataLoader(Augmented(inputs, targets), batch_size=16, shuffle=True, num_workers=2)
    chaos = Chaos()
    try:
        history = tw.fit(model, data, loss="cross_entropy", optimizer="adam", lr=0.01, epochs=3, batch_size=16,
                         metrics=["accuracy", "f1_macro"], val_split=0.2 if mode != "workers" else 0.0, scheduler="cosine",
                         callbacks=[tw.EarlyStopping(monitor="loss", patience=5), chaos], seed=1,
                         checkpoint_dir=directory, checkpoint_every=4, resume="auto", progress=False)
    except tw.TrainingInterrupted as interrupted:
        print(interrupted, file=sys.stderr)
        sys.exit(128 + interrupted.signal_number)
    torch.save({"model": model.state_dict(), "optimizer": chaos.optimizer, "history": history.to_dict()}, result)
    """
)


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scripts") / "train.py"
    path.write_text(SCRIPT)
    return path


def run_script(script: Path, directory: Path, result: Path, mode: str = "tensors", kill_at: int = -1,
               slow: float = 0.0, prelude: str = "") -> subprocess.CompletedProcess[str]:  # fmt: skip
    command = [sys.executable, "-c", prelude + script.read_text()] if prelude else [sys.executable, str(script)]
    arguments = [str(directory), str(result), mode, str(kill_at), str(slow)]
    return subprocess.run([*command, *arguments], capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def golden(script: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("golden")
    results = {}
    for mode in ("tensors", "workers"):
        finished = run_script(script, folder / f"checkpoints-{mode}", folder / f"{mode}.pt", mode)
        assert finished.returncode == 0, finished.stderr
        results[mode] = torch.load(folder / f"{mode}.pt", weights_only=True)
    return results


def assert_identical(result: Path, golden: dict[str, Any]) -> None:
    resumed = torch.load(result, weights_only=True)
    assert without_time(resumed["history"]) == without_time(golden["history"])
    assert all(seconds > 0 for seconds in resumed["history"]["time"])  # every epoch's, also those before a kill
    for key, value in golden["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for parameter, state in golden["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(resumed["optimizer"]["state"][parameter][key], value), (parameter, key)


def kill_then_finish(script: Path, tmp_path: Path, kills: list[int], mode: str = "tensors") -> Path:
    directory, result = tmp_path / "checkpoints", tmp_path / "result.pt"
    for step in kills:
        killed = run_script(script, directory, result, mode, kill_at=step)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert not result.exists()
    finished = run_script(script, directory, result, mode)
    assert finished.returncode == 0, finished.stderr
    return result


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(
    script: Path, golden: dict[str, Any], tmp_path: Path
) -> None:
    # 16 batches per epoch (256 training samples); step 23 is in the second epoch, after the checkpoint at step 20
    assert_identical(kill_then_finish(script, tmp_path, [23]), golden["tensors"])


def test_several_kills_in_one_run(script: Path, golden: dict[str, Any], tmp_path: Path) -> None:
    assert_identical(kill_then_finish(script, tmp_path, [6, 18, 19, 37]), golden["tensors"])


def test_workers_with_random_augmentation_resume_exactly(script: Path, golden: dict[str, Any], tmp_path: Path) -> None:
    # 20 batches per epoch with two worker processes drawing random noise per sample
    assert_identical(kill_then_finish(script, tmp_path, [27], mode="workers"), golden["workers"])


def test_kill_between_the_temporary_write_and_the_rename(script: Path, golden: dict[str, Any], tmp_path: Path) -> None:
    prelude = textwrap.dedent(
        """
        import os, signal
        import trainwell.files as target
        calls = {"count": 0}
        original = os.replace
        def replace_then_die(source, destination):
            calls["count"] += 1
            if calls["count"] == 7:  # during the 4th checkpoint: its file is written, not yet renamed
                os.kill(os.getpid(), signal.SIGKILL)
            return original(source, destination)
        target.os.replace = replace_then_die
        """
    )
    directory, result = tmp_path / "checkpoints", tmp_path / "result.pt"
    killed = run_script(script, directory, result, prelude=prelude)
    assert killed.returncode == -signal.SIGKILL
    assert list(directory.glob(".*.tmp"))  # the half-written file is there, and must be ignored
    finished = run_script(script, directory, result)
    assert finished.returncode == 0, finished.stderr
    assert_identical(result, golden["tensors"])
    assert not list(directory.glob(".*.tmp"))  # the resumed run, holding the folder, removed it


@pytest.mark.parametrize("damage", ["truncate", "zero", "flip"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(
    damage: str, script: Path, golden: dict[str, Any], tmp_path: Path
) -> None:
    directory, result = tmp_path / "checkpoints", tmp_path / "result.pt"
    killed = run_script(script, directory, result, kill_at=30)
    assert killed.returncode == -signal.SIGKILL
    entries = json.loads((directory / MANIFEST).read_text())["checkpoints"]
    assert len(entries) == 2 and len(list(directory.glob("checkpoint-*.pt"))) == 2  # the last two are kept
    newest = directory / entries[0]["file"]
    content = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(content[: len(content) // 2])
    elif damage == "zero":
        newest.write_bytes(b"")
    else:
        content[len(content) // 3] ^= 0x10
        newest.write_bytes(bytes(content))
    finished = run_script(script, directory, result)
    assert finished.returncode == 0, finished.stderr
    assert f"Skipping checkpoint {newest}" in finished.stderr
    assert_identical(result, golden["tensors"])


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_save_and_stop_after_the_step(
    number: int, script: Path, golden: dict[str, Any], tmp_path: Path
) -> None:
    directory, result = tmp_path / "checkpoints", tmp_path / "result.pt"
    command = [sys.executable, str(script), str(directory), str(result), "tensors", "-1", "0.05"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (directory / MANIFEST).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(number)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + number, stderr
    assert f"{signal.Signals(number).name} received: stopped after epoch" in stderr and "resume=True" in stderr
    epoch, batch = (int(part) for part in re.search(r"after epoch (\d+), batch (\d+)", stderr).groups())  # type: ignore[union-attr]
    newest = json.loads((directory / MANIFEST).read_text())["checkpoints"][0]
    assert (newest["epoch"], newest["batches_done"]) == (epoch - 1, batch)  # saved at the step it stopped after
    finished = run_script(script, directory, result)
    assert finished.returncode == 0, finished.stderr
    assert_identical(result, golden["tensors"])


def fit_with_checkpoints(directory: Path, **arguments: Any) -> tw.History:
    arguments = {
        "loss": "cross_entropy",
        "epochs": 2,
        "progress": False,
        "seed": 0,
        "checkpoint_dir": directory,
    } | arguments
    return tw.fit(arguments.pop("model", make_mlp()), arguments.pop("data", blobs()), **arguments)


@pytest.mark.parametrize("place", ["under_a_file", "/proc/trainwell-checkpoints"])
def test_an_unwritable_checkpoint_folder_is_an_error_before_training(place: str, tmp_path: Path) -> None:
    # Tests run as root here, so a read-only mode would not stop writes: these places refuse even root.
    (tmp_path / "file").write_text("")
    directory = tmp_path / "file" / "checkpoints" if place == "under_a_file" else Path(place)
    model = make_mlp()
    before = [parameter.clone() for parameter in model.parameters()]
    with pytest.raises(tw.ConfigError, match="checkpoint folder is not writable"):
        fit_with_checkpoints(directory, model=model)
    assert all(torch.equal(old, new) for old, new in zip(before, model.parameters(), strict=True))


def test_resume_refuses_a_checkpoint_of_another_setup(tmp_path: Path) -> None:
    fit_with_checkpoints(tmp_path, epochs=1)
    for changed, expected in [
        ({"model": make_mlp(hidden=8)}, "model architecture"),
        ({"optimizer": "adam"}, "optimizer: SGD in the checkpoint, Adam now"),
        ({"batch_size": 16}, "batch size: 32 in the checkpoint, 16 now"),
        ({"data": blobs(samples=200)}, "dataset size: 300 in the checkpoint, 200 now"),
    ]:
        with pytest.raises(tw.ConfigError, match="different training setup") as raised:
            fit_with_checkpoints(tmp_path, resume=True, **changed)
        assert expected in str(raised.value)


def test_finished_runs_are_a_no_op_and_more_epochs_continue(tmp_path: Path) -> None:
    golden = fit_with_checkpoints(tmp_path / "golden", epochs=4)
    trained = make_mlp()
    first = fit_with_checkpoints(tmp_path / "run", epochs=2, model=trained)
    model = make_mlp(seed=7)
    with pytest.warns(tw.errors.TrainwellWarning, match="already finished 2 epochs"):
        again = fit_with_checkpoints(tmp_path / "run", epochs=2, resume=True, model=model)
    assert again.to_dict() == first.to_dict()
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values(), strict=True)
    )
    more = fit_with_checkpoints(tmp_path / "run", epochs=4, resume=True)
    assert more["loss"][:2] == first["loss"] and len(more["loss"]) == 4
    assert more["loss"][2:] == pytest.approx(golden["loss"][2:], rel=1e-6)


def test_resuming_from_a_path_without_a_checkpoint_dir_continues_and_saves_nothing(tmp_path: Path) -> None:
    golden = fit_with_checkpoints(tmp_path / "golden", epochs=3)
    fit_with_checkpoints(tmp_path / "run", epochs=1)
    saved = sorted(path.name for path in (tmp_path / "run").iterdir())
    handlers: list[Any] = []
    watch = tw.LambdaCallback(on_epoch_end=lambda run: handlers.append(signal.getsignal(signal.SIGINT)))
    default = signal.getsignal(signal.SIGINT)
    more = fit_with_checkpoints(tmp_path, epochs=3, checkpoint_dir=None, resume=tmp_path / "run", callbacks=[watch])
    assert more["loss"] == pytest.approx(golden["loss"], rel=1e-6)
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == saved  # nowhere to save: nothing written
    assert handlers == [default, default]  # Ctrl-C is not taken over when it could not save anything


def test_resume_true_without_a_checkpoint_is_an_error_and_auto_starts_fresh(tmp_path: Path) -> None:
    with pytest.raises(tw.ConfigError, match="no intact checkpoint"):
        fit_with_checkpoints(tmp_path, resume=True)
    with pytest.warns(tw.errors.TrainwellWarning, match="starting from the beginning"):
        history = fit_with_checkpoints(tmp_path, resume="auto")
    assert history.epochs == 2


def test_a_checkpoint_carrying_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.mkdir, (str(marker),))

    fit_with_checkpoints(tmp_path, epochs=1)
    newest = json.loads((tmp_path / MANIFEST).read_text())["checkpoints"][0]
    path = tmp_path / newest["file"]
    torch.save({"format": 1, "evil": Payload()}, path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["checkpoints"] = [newest | {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with (
        pytest.warns(tw.errors.TrainwellWarning, match="unsupported GLOBAL posix.mkdir"),
        pytest.raises(tw.ConfigError, match="no intact checkpoint"),
    ):
        fit_with_checkpoints(tmp_path, resume=True)
    assert not marker.exists()


def test_a_second_ctrl_c_during_the_save_leaves_the_previous_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fit_with_checkpoints(tmp_path, epochs=1)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    original = checkpoint_module.os.fsync
    calls = {"count": 0}

    def interrupted_twice(descriptor: int) -> None:
        calls["count"] += 1
        if calls["count"] == 1:  # inside the next save: Ctrl-C, then Ctrl-C again
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        original(descriptor)

    class Arm(tw.Callback):
        def on_train_batch_end(self, run: tw.Run) -> None:
            monkeypatch.setattr(checkpoint_module.os, "fsync", interrupted_twice)  # from the first step on

    with pytest.raises(KeyboardInterrupt):
        fit_with_checkpoints(tmp_path, epochs=3, resume=True, checkpoint_every=4, callbacks=[Arm()])
    monkeypatch.setattr(checkpoint_module.os, "fsync", original)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_only_files_the_manifest_listed_are_ever_deleted(tmp_path: Path) -> None:
    # A ModelCheckpoint saving into the same folder with a name like trainwell's and a user's file
    # survive five epochs of clean-up; trainwell keeps its newest KEEP checkpoints, as before.
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    best = tw.ModelCheckpoint(folder / "checkpoint-best{epoch}.pt", monitor=None)
    tw.fit(make_mlp(), blobs(), loss="cross_entropy", epochs=5, progress=False, seed=0, checkpoint_dir=folder,
           callbacks=[best])  # fmt: skip
    names = sorted(path.name for path in folder.iterdir())
    assert [f"checkpoint-best{epoch}.pt" for epoch in range(1, 6)] == [name for name in names if "best" in name]
    assert {"notes.txt", MANIFEST} <= set(names)
    listed = [entry["file"] for entry in json.loads((folder / MANIFEST).read_text())["checkpoints"]]
    assert len(listed) == KEEP and all(name in names for name in listed)
    assert len([name for name in names if name.startswith("checkpoint-0")]) == len(listed)


def test_a_manifest_naming_other_paths_is_never_followed(tmp_path: Path) -> None:
    # A planted manifest entry "../victim.pt" is neither loaded nor deleted by the clean-up.
    folder, victim = tmp_path / "ck", tmp_path / "victim.pt"
    folder.mkdir()
    victim.write_bytes(b"precious")
    digest = hashlib.sha256(b"precious").hexdigest()
    entry = {"file": "../victim.pt", "sha256": digest, "epoch": 9, "batches_done": 0, "global_step": 9}
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT_VERSION, "checkpoints": [entry]}))
    tw.fit(make_mlp(), blobs(), loss="cross_entropy", epochs=4, progress=False, seed=0, checkpoint_dir=folder)
    assert victim.read_bytes() == b"precious"


def test_a_failed_manifest_write_leaves_no_orphan_checkpoint(tmp_path: Path) -> None:
    # The manifest's place is taken by a folder, so renaming the new manifest over it fails (a real
    # OSError from the filesystem): the checkpoint written just before is removed, as is every
    # temporary file, so nothing unlisted is left behind.
    folder = tmp_path / "ck"
    (folder / MANIFEST).mkdir(parents=True)
    with pytest.raises(OSError, match=r"could not write .*manifest\.json"):
        tw.fit(make_mlp(), blobs(), loss="cross_entropy", epochs=1, progress=False, checkpoint_dir=folder)
    assert [path.name for path in folder.iterdir()] == [MANIFEST]


LOGGED = textwrap.dedent(
    """
    import os, signal, sys
    import trainwell as tw
    sys.path.insert(0, sys.argv[4])
    from conftest import blobs, make_mlp

    directory, log, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class Kill(tw.Callback):  # after the logger wrote the epoch's row, before the checkpoint holds it
        def on_epoch_end(self, run):
            if run.epoch + 1 == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    tw.fit(make_mlp(), blobs(), loss="cross_entropy", epochs=4, metrics=["accuracy"], seed=0, progress=False,
           callbacks=[tw.CSVLogger(log, append=sys.argv[5] == "append"), Kill()], checkpoint_dir=directory,
           resume="auto")
    """
)


@pytest.mark.parametrize("append", ["append", "replace"])
def test_the_csv_log_of_a_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path: Path, append: str) -> None:
    script = tmp_path / "logged.py"
    script.write_text(LOGGED)

    def run(name: str, kill_at: int) -> subprocess.CompletedProcess[str]:
        arguments = [str(tmp_path / f"{name}-ck"), str(tmp_path / f"{name}.csv"), str(kill_at),
                     str(Path(__file__).parent), append]  # fmt: skip
        return subprocess.run([sys.executable, str(script), *arguments], capture_output=True, text=True, timeout=300,
                              check=False, env=os.environ | {"OMP_NUM_THREADS": "1"})  # fmt: skip

    assert run("golden", 0).returncode == 0
    if append == "append":  # rows of an earlier run stay first
        (tmp_path / "resumed.csv").write_text((tmp_path / "golden.csv").read_text())
    for kill_at in (2, 3):
        assert run("resumed", kill_at).returncode == -signal.SIGKILL
    finished = run("resumed", 0)
    assert finished.returncode == 0, finished.stderr
    golden = model_columns(tmp_path / "golden.csv")
    expected = golden + golden[1:] if append == "append" else golden
    assert model_columns(tmp_path / "resumed.csv") == expected  # every epoch once, the values bitwise


def model_columns(path: Path) -> list[list[str]]:
    """A CSV log's rows without its timing columns (they differ from run to run), checked present."""
    header, *rows = list(csv.reader(path.open(newline="")))
    timing = [index for index, column in enumerate(header) if column in TIME_KEYS]
    assert len(timing) == len(TIME_KEYS) and all(float(row[index]) > 0 for row in rows for index in timing)
    return [[cell for index, cell in enumerate(row) if index not in timing] for row in [header, *rows]]
