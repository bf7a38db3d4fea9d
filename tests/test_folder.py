"""trainwell owns its checkpoint folder: one run at a time (a real lock, held by a real second
process), nothing it cannot use is deleted or silently restarted over, and a lost manifest is
rebuilt from the checkpoint files themselves."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import trainwell as tw
from trainwell.checkpoints import FORMAT_VERSION, MANIFEST, POSITION_KEYS, REQUIRED_KEYS, read_checkpoint
from trainwell.folder import LOCK

from conftest import blobs, make_mlp, without_time

pytestmark = pytest.mark.slow  # real subprocesses and real training: `pytest -m "not slow"` leaves them out

HOLDER = textwrap.dedent(
    """
    import sys, time
    import torch
    import trainwell as tw
    sys.path.insert(0, sys.argv[2])
    from conftest import blobs, make_mlp

    class Slow(tw.Callback):
        def on_train_batch_end(self, run):
            time.sleep(0.2)

    tw.fit(make_mlp(), blobs(), loss="cross_entropy", epochs=50, progress=False, seed=0,
           checkpoint_dir=sys.argv[1], callbacks=[Slow()])
    """
)


def fit_with(directory: Path, model: torch.nn.Module | None = None, **arguments: Any) -> tw.History:
    defaults = {"loss": "cross_entropy", "epochs": 2, "progress": False, "seed": 0, "checkpoint_dir": directory}
    return tw.fit(model if model is not None else make_mlp(), blobs(), **defaults | arguments)


def contents(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def start_holder(directory: Path, tmp_path: Path) -> subprocess.Popen[str]:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    tests = Path(__file__).parent
    holder = subprocess.Popen([sys.executable, str(script), str(directory), str(tests)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ | {"OMP_NUM_THREADS": "1"})  # fmt: skip
    deadline = time.monotonic() + 60
    while not (directory / "manifest.json").exists():  # it has the lock and wrote its first checkpoint
        assert holder.poll() is None and time.monotonic() < deadline, holder.communicate()[1]
        time.sleep(0.1)
    return holder


def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder_and_a_killed_holder_frees_it(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "ck"
    holder = start_holder(directory, tmp_path)
    try:
        model = make_mlp()
        before = [parameter.clone() for parameter in model.parameters()]
        for resume in (False, True, "auto"):
            with pytest.raises(tw.ConfigError, match="Another training run is using this checkpoint folder") as raised:
                fit_with(directory, model=model, resume=resume)
            assert f"held by process {holder.pid} on {socket.gethostname()}" in str(raised.value)
        assert all(torch.equal(old, new) for old, new in zip(before, model.parameters(), strict=True))
        assert holder.poll() is None  # the holder trains on, untouched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The operating system released the dead holder's lock: no stale lock to clear by hand. Its
    # checkpoints are continued, and this run's lock is gone when it ends.
    history = fit_with(directory, epochs=60, resume=True)
    assert history.epochs == 60
    assert not (directory / LOCK).exists()


def test_the_lock_is_released_when_fit_fails(tmp_path: Path) -> None:
    class Broken(tw.Callback):
        def on_epoch_end(self, run: Any) -> None:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fit_with(tmp_path, callbacks=[Broken()])
    assert not (tmp_path / LOCK).exists()
    assert fit_with(tmp_path, resume="auto").epochs == 2  # the same process takes the folder again


def test_a_lost_manifest_is_rebuilt_from_the_checkpoint_files_and_the_run_continues_exactly(tmp_path: Path) -> None:
    golden_model = make_mlp()
    golden = fit_with(tmp_path / "golden", model=golden_model, epochs=4)
    directory = tmp_path / "run"
    fit_with(directory, epochs=2)
    files = sorted(path.name for path in directory.glob("checkpoint-*.pt"))
    (directory / MANIFEST).unlink()  # e.g. `scp run/*.pt elsewhere:run/`
    model = make_mlp(seed=7)
    with pytest.warns(tw.TrainwellWarning, match="rebuilt it from the 2 intact checkpoint file"):
        history = fit_with(directory, model=model, epochs=4, resume="auto")
    assert without_time(history) == without_time(golden)
    for key, value in golden_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key  # the same process and seed: bitwise
    listed = [entry["file"] for entry in json.loads((directory / MANIFEST).read_text())["checkpoints"]]
    assert all(name not in listed for name in files)  # listed again, hence cleaned up as the run went on
    assert not set(files) & {path.name for path in directory.iterdir()}


def test_a_damaged_manifest_with_a_truncated_newest_file_falls_back_to_the_intact_one(tmp_path: Path) -> None:
    fit_with(tmp_path, epochs=2)
    newest, older = sorted(tmp_path.glob("checkpoint-*.pt"), reverse=True)
    (tmp_path / MANIFEST).write_text("{not json")
    newest.write_bytes(newest.read_bytes()[:500])
    with pytest.warns(tw.TrainwellWarning) as caught:
        history = fit_with(tmp_path, epochs=3, resume=True)
    messages = " ".join(str(warning.message) for warning in caught)
    assert "damaged checkpoint manifest" in messages and f"Skipping checkpoint {newest}" in messages
    assert f"resuming from {older.name}" in messages
    # trainwell's warnings are shown at the user's call, not inside trainwell (torch may add its own)
    assert {warning.filename for warning in caught if issubclass(warning.category, tw.TrainwellWarning)} == {__file__}
    assert history.epochs == 3


@pytest.mark.parametrize("resume", [True, "auto", False])
@pytest.mark.parametrize("version", [1, FORMAT_VERSION + 1])
def test_checkpoints_of_another_format_are_refused_naming_the_versions_and_never_deleted(
    tmp_path: Path, version: int, resume: bool | str
) -> None:
    fit_with(tmp_path, epochs=1)
    for file in tmp_path.glob("checkpoint-*.pt"):  # a valid file and manifest of another version
        state = torch.load(file, weights_only=True)
        torch.save(state | {"format": version}, file)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["checkpoints"] = [
        entry | {"sha256": read_sha(tmp_path / entry["file"])} for entry in manifest["checkpoints"]
    ]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    for manifest_version in (FORMAT_VERSION, version):  # the manifest of either version, or none
        (tmp_path / MANIFEST).write_text(json.dumps(manifest | {"format": manifest_version}))
        saved = contents(tmp_path)
        expected = f"of format {version}; this trainwell reads format {FORMAT_VERSION}"
        if resume is False:
            expected = "already holds the checkpoints of a run"
        with pytest.raises(tw.ConfigError, match=expected):
            fit_with(tmp_path, epochs=3, resume=resume)
        assert contents(tmp_path) == saved


def read_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_starting_afresh_in_a_used_folder_is_refused_and_deletes_nothing(tmp_path: Path) -> None:
    fit_with(tmp_path, epochs=1)
    (tmp_path / MANIFEST).unlink()  # with or without its manifest, the files are a run
    saved = contents(tmp_path)
    with pytest.raises(tw.ConfigError, match="already holds the checkpoints of a run") as raised:
        fit_with(tmp_path, epochs=3)
    assert "pass resume=True (or 'auto') to continue that run, or another checkpoint_dir" in str(raised.value)
    assert contents(tmp_path) == saved


def test_checkpoint_files_none_of_which_is_intact_are_refused_not_restarted_over(tmp_path: Path) -> None:
    fit_with(tmp_path, epochs=2)
    for file in tmp_path.glob("checkpoint-*.pt"):
        file.write_bytes(file.read_bytes()[:-10])
    saved = contents(tmp_path)
    for resume in (True, "auto"):
        refused = pytest.raises(tw.ConfigError, match="no intact checkpoint to resume from, though the folder holds")
        with pytest.warns(tw.TrainwellWarning, match="Skipping checkpoint"), refused:
            fit_with(tmp_path, epochs=3, resume=resume)
        assert contents(tmp_path) == saved


def test_leftover_temporary_files_of_trainwell_are_removed_and_no_others(tmp_path: Path) -> None:
    fit_with(tmp_path, epochs=1)
    ours = [".checkpoint-0000000010-00001-0000000.pt.0a1b2c3d.tmp", ".manifest.json.deadbeef.tmp",
            ".trainwell-write-test-4242"]  # fmt: skip
    theirs = [".best.pt.0a1b2c3d.tmp", "checkpoint-best.pt", ".notes.tmp"]
    for name in ours + theirs:
        (tmp_path / name).write_bytes(b"left by a killed process")
    fit_with(tmp_path, epochs=2, resume=True)
    names = {path.name for path in tmp_path.iterdir()}
    assert not names & set(ours) and set(theirs) <= names


@pytest.mark.parametrize("key", [*REQUIRED_KEYS, "position.seed"])
def test_a_checkpoint_missing_a_part_is_refused_before_any_weight_changes(tmp_path: Path, key: str) -> None:
    fit_with(tmp_path, epochs=2)
    newest, older = sorted(tmp_path.glob("checkpoint-*.pt"), reverse=True)
    state, _ = read_checkpoint(newest)
    assert set(state) == {*REQUIRED_KEYS, "format"}  # what is written is exactly what is checked
    assert set(state["position"]) == set(POSITION_KEYS)
    part, _, inner = key.partition(".")
    del (state[part] if inner else state)[inner or part]
    torch.save(state, newest)  # edited, with a manifest that agrees: only the missing part is wrong
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["checkpoints"][0]["sha256"] = read_sha(newest)
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    model = make_mlp(seed=3)
    before = [parameter.clone() for parameter in model.parameters()]
    with pytest.raises(tw.DataError, match=f"a format-{FORMAT_VERSION} checkpoint without {key}"):
        tw.fit(model, blobs(), loss="cross_entropy", epochs=3, progress=False, resume=newest)
    assert all(torch.equal(old, new) for old, new in zip(before, model.parameters(), strict=True))
    with pytest.warns(tw.TrainwellWarning, match=f"Skipping checkpoint {newest}"):
        history = fit_with(tmp_path, epochs=3, resume=True)  # the folder falls back to the intact one
    assert history.epochs == 3 and older.name in {entry["file"] for entry in manifest["checkpoints"]}


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A real 4 MiB file system (tmpfs), so that "disk full" is the kernel's own ENOSPC."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mount)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here (mounting needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


class FillDisk(tw.Callback):
    """At the end of epoch ``at``, before the checkpoint is written, fills the disk until only
    room for ``pages`` pages of 4 KiB remains."""

    def __init__(self, directory: Path, at: int, pages: int) -> None:
        self.directory, self.at, self.pages = directory, at, pages

    def on_epoch_end(self, run: Any) -> None:
        if run.epoch + 1 == self.at:
            stats = os.statvfs(self.directory)
            with (self.directory.parent / "filler").open("wb") as file:
                os.posix_fallocate(file.fileno(), 0, stats.f_bavail * stats.f_frsize - self.pages * 4096)


@pytest.mark.parametrize("where", ["checkpoint", "manifest"])
def test_a_real_full_disk_keeps_the_previous_checkpoint_leaves_no_orphan_and_resumes(
    small_disk: Path, tmp_path: Path, where: str
) -> None:
    directory = small_disk / "ck"
    golden = fit_with(tmp_path / "golden", model=make_mlp(hidden=4096), epochs=4)
    fit_with(directory, model=make_mlp(hidden=4096), epochs=2)
    before = contents(directory)
    # Room for nothing, or for exactly the next checkpoint (its size in pages, as the last one's)
    # and not for the manifest that would mark it complete.
    pages = 0 if where == "checkpoint" else -(-max(len(data) for data in before.values()) // 4096)
    with pytest.raises(OSError, match=r"could not write .*No space left on device") as raised:
        fit_with(directory, model=make_mlp(hidden=4096), epochs=4, resume=True,
                 callbacks=[FillDisk(directory, at=3, pages=pages)])  # fmt: skip
    assert (MANIFEST if where == "manifest" else "checkpoint-") in str(raised.value)
    assert contents(directory) == before  # no orphan, no temporary file, the previous checkpoints intact
    (small_disk / "filler").unlink()
    resumed = fit_with(directory, model=make_mlp(hidden=4096), epochs=4, resume=True)
    assert resumed["loss"] == pytest.approx(golden["loss"], rel=1e-6)


def test_the_librarys_own_writers_never_write_through_a_planted_link(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the pictures need the plot extra")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    x, y = blobs()
    history = tw.fit(make_mlp(), (x, y), loss="cross_entropy", progress=False)
    report = tw.classification_report(make_mlp(), (x, y), loss="cross_entropy")
    writers = {
        "history.csv": history.to_csv,
        "curves.png": history.plot,
        "report.json": report.to_json,
        "matrix.png": report.plot_confusion_matrix,
    }
    for name, write in writers.items():
        (tmp_path / name).symlink_to(victim)
        write(tmp_path / name)
        assert not (tmp_path / name).is_symlink() and (tmp_path / name).stat().st_size > 0, name
    log = tmp_path / "log.csv"
    log.symlink_to(victim)
    with pytest.raises(tw.ConfigError, match="CSVLogger does not write through a symbolic link"):
        tw.fit(make_mlp(), (x, y), loss="cross_entropy", callbacks=[tw.CSVLogger(log)], progress=False)
    assert victim.read_text() == "precious"


def test_a_dict_metric_resumed_mid_epoch_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    def parts(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        predicted = outputs.argmax(1)
        return {"hits": (predicted == targets).float().mean(), "zeros": (predicted == 0).float().mean()}

    class Crash(tw.Callback):
        def on_train_batch_end(self, run: Any) -> None:
            if run.global_step == 3:
                raise RuntimeError("crash")

    options: dict[str, Any] = {"metrics": [parts], "batch_size": 32, "epochs": 1}
    golden = fit_with(tmp_path / "golden", **options)
    with pytest.raises(RuntimeError, match="crash"):
        fit_with(tmp_path / "run", checkpoint_every=1, callbacks=[Crash()], **options)
    resumed = fit_with(tmp_path / "run", checkpoint_every=1, resume=True, **options)
    for key in ("loss", "hits", "zeros"):  # the same process and seed: equal up to the float sums' order
        assert resumed[key] == pytest.approx(golden[key], rel=1e-12), key


def test_auto_refuses_checkpoint_files_that_no_manifest_entry_lists(tmp_path: Path) -> None:
    fit_with(tmp_path, epochs=1)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["checkpoints"] = [entry | {"file": "../elsewhere.pt"} for entry in manifest["checkpoints"]]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))  # valid, but lists nothing of this folder
    saved = contents(tmp_path)
    with pytest.raises(tw.ConfigError, match="already holds the checkpoints of a run"):
        fit_with(tmp_path, epochs=2, resume="auto")
    assert contents(tmp_path) == saved


def test_running_out_of_memory_while_reading_a_checkpoint_is_not_taken_for_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Filling this machine's memory for real would take the test run down with it: torch.load
    # raises MemoryError here instead, as it does when a checkpoint does not fit.
    fit_with(tmp_path, epochs=2)

    def no_memory(*arguments: Any, **options: Any) -> Any:
        raise MemoryError

    monkeypatch.setattr(torch, "load", no_memory)
    with pytest.raises(MemoryError):  # not "Skipping checkpoint ... unreadable" and a fall back to an older one
        fit_with(tmp_path, epochs=3, resume=True)
