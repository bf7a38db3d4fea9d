"""Crash-safe training checkpoints and exact resume, mid-epoch included.

Owns: the training-state format (state dicts, counters, History, running sums, callback
states and random states, with a format version), the manifest that marks checkpoints
complete (with a content hash), keeping the last two, falling back past damaged ones, and
turning Ctrl-C / SIGTERM into "finish the step, save, stop". Files load with
``weights_only=True``: no code runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import numpy as np
import torch

from trainwell import distributed
from trainwell.callbacks import Callback
from trainwell.errors import ConfigError, DataError, TrainingInterrupted, TrainwellError, config_error, warn
from trainwell.files import atomic_write
from trainwell.run import Run
from trainwell.weights import clean_state_dict, safe_load, weights_on_cpu

FORMAT_VERSION = 2  # 2: the state is keyed by stateful object (model, optimizer, ..., position)
MANIFEST = "manifest.json"
CHECKPOINT_NAME = re.compile(r"checkpoint-\d{10}-\d{5}-\d{7}\.pt")  # what save_checkpoint names its files
KEEP = 2
STATEFUL_KEYS = ("model", "optimizer", "scaler", "history", "position")  # stateful_objects', in order
# What restoring reads, checked when a checkpoint is read (a test holds it equal to what is written).
REQUIRED_KEYS = (*STATEFUL_KEYS, "callbacks", "per_process", "fingerprint")
POSITION_KEYS = ("epoch", "batches_done", "global_step", "stopped", "seed", "extra_logs")


def check_writable(directory: Path) -> None:
    """Raise ``ConfigError`` unless checkpoints can be written to ``directory`` (before training)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".trainwell-write-test-{os.getpid()}"  # one per process: ranks check at once
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)  # rank 0, tidying the folder it locked, may have removed it
    except OSError as error:
        raise config_error(
            "The checkpoint folder is not writable.",
            f"checkpoint_dir={str(directory)!r}: {error.strerror or error}",
            "pass a folder you can write to, or fix its permissions.",
        ) from None


class Stateful(Protocol):
    """Anything a checkpoint saves: torch's ``state_dict`` / ``load_state_dict`` pair."""

    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any, /) -> Any: ...


class _Weights:
    """The user's model as saved: its weights on the CPU, without wrapper prefixes."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return weights_on_cpu(self.module)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


class _Position:
    """Where the run stands: the epoch and batches done in it, optimizer steps, whether a callback
    stopped it, its seed (the data order) and the values callbacks logged in the epoch so far."""

    def __init__(self, run: Run, epoch: int, batches_done: int) -> None:
        self.run, self.epoch, self.batches_done = run, epoch, batches_done

    def state_dict(self) -> dict[str, Any]:
        run = self.run
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "global_step": run.global_step,
            "stopped": run.stop_training,
            "seed": run.seed,
            "extra_logs": dict(run.extra_logs) if self.batches_done else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        run = self.run
        run.epoch = run.start_epoch = int(state["epoch"])
        run.batches_done, run.global_step = int(state["batches_done"]), int(state["global_step"])
        run.extra_logs = dict(state["extra_logs"])


class _ProcessState:
    """What differs between the processes of a job: random states and the epoch's running sums."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def state_dict(self) -> dict[str, Any]:
        return {"random": _random_states(), "tally": self.run.train_tally.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.run.batches_done:  # a mid-epoch checkpoint: the epoch's sums so far
            self.run.train_tally.load_state_dict(state["tally"], self.run.device)
        _set_random_states(state["random"])


def stateful_objects(run: Run, *, epoch: int, batches_done: int) -> dict[str, Stateful]:
    """The one list of what a checkpoint holds, keyed as saved: saving and restoring iterate it.
    ``epoch`` and ``batches_done`` are where a resumed run continues."""
    assert run.optimizer is not None
    objects = (
        _Weights(run.module),
        run.optimizer,
        run.precision.scaler,
        run.history,
        _Position(run, epoch, batches_done),
    )
    return dict(zip(STATEFUL_KEYS, objects, strict=True))


def training_state(run: Run, *, epoch: int, batches_done: int, per_process: Any) -> dict[str, Any]:
    """Everything needed to continue ``run`` exactly where it is (at an optimizer-step boundary):
    at ``batches_done`` batches into ``epoch``. ``per_process`` holds this process's random
    states and running sums, or every process's (a list in rank order) in a torchrun job."""
    state = {
        key: item.state_dict() for key, item in stateful_objects(run, epoch=epoch, batches_done=batches_done).items()
    }
    return state | {
        "format": FORMAT_VERSION,
        "callbacks": run.callbacks.state_dict(),
        "per_process": per_process,
        "fingerprint": fingerprint(run),
    }


def fingerprint(run: Run) -> dict[str, Any]:
    """What must not change between a run and its resumption."""
    assert run.optimizer is not None and run.train_batches is not None
    return {
        "parameters": {key: list(value.shape) for key, value in clean_state_dict(run.module.state_dict()).items()},
        "optimizer": type(run.optimizer).__name__,
        "batch_size": run.train_batches.batch_size,
        "samples": run.train_batches.num_samples,
        "grad_accum_steps": run.grad_accum_steps,
        "world_size": run.world_size,
    }


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (empty when resuming is safe)."""
    found = []
    if saved["parameters"] != current["parameters"]:
        before = {key: tuple(shape) for key, shape in saved["parameters"].items()}
        now = {key: tuple(shape) for key, shape in current["parameters"].items()}
        changed = sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key))
        shown = ", ".join(f"{key} {before.get(key, 'absent')} -> {now.get(key, 'absent')}" for key in changed[:4])
        found.append(f"model architecture ({shown})")
    for key, label in (("optimizer", "optimizer"), ("batch_size", "batch size"), ("samples", "dataset size"),
                       ("grad_accum_steps", "grad_accum_steps"), ("world_size", "processes")):  # fmt: skip
        if saved.get(key, 1) != current[key]:
            found.append(f"{label}: {saved[key]} in the checkpoint, {current[key]} now")
    return found


def save_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` as a new checkpoint, then the manifest that marks it complete; keep the
    newest ``KEEP``. A failure leaves the previous checkpoints and manifest as they were.

    Raises:
        OSError: Writing failed; the message names the path and the OS error.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    position = state["position"]
    name = f"checkpoint-{position['global_step']:010d}-{position['epoch']:05d}-{position['batches_done']:07d}.pt"
    previous = read_manifest(directory) or []
    listed = {old["file"] for old in previous}
    atomic_write(data, directory / name)
    kept = [
        _entry(name, position, hashlib.sha256(data).hexdigest()),
        *[old for old in previous if old["file"] != name][: KEEP - 1],
    ]
    try:
        write_manifest(directory, kept)
    except BaseException:
        if name not in listed:  # written by this call and never listed: no one else's file
            (directory / name).unlink(missing_ok=True)
        raise
    # Only what the manifest listed is deleted: other files in the folder, a ModelCheckpoint's
    # "checkpoint-best3.pt" too, are not trainwell's to remove.
    for old in listed - {item["file"] for item in kept}:
        (directory / old).unlink(missing_ok=True)
    return directory / name


def _entry(name: str, position: dict[str, Any], sha256: str) -> dict[str, Any]:
    entry = {key: position[key] for key in ("epoch", "batches_done", "global_step", "stopped")}
    return entry | {"file": name, "sha256": sha256}


def write_manifest(directory: Path, entries: list[dict[str, Any]]) -> None:
    """List ``entries`` (newest first) as the folder's complete checkpoints."""
    atomic_write(
        json.dumps({"format": FORMAT_VERSION, "checkpoints": entries}, indent=1).encode(), directory / MANIFEST
    )


def load_checkpoint(path: Path, *, owner: bool = False) -> tuple[dict[str, Any], Path, str] | None:
    """The newest complete, intact checkpoint in a folder (or the given file).

    A damaged one (missing, truncated, hash mismatch, unreadable) is skipped with a warning
    naming it, and the previous one is tried. A folder without a (readable) manifest is
    recovered from its checkpoint files, each read and checked; ``owner`` (the caller holds
    the folder's lock) also writes the rebuilt manifest, so that those files are kept and
    cleaned up as usual.

    Returns:
        (state, file, sha256 of the file), or None when the folder holds no checkpoint at all.

    Raises:
        ConfigError: Checkpoints of another format version (never skipped, never deleted), or
            checkpoint files none of which is intact.
    """
    if path.is_file():
        state, digest = read_checkpoint(path)
        return state, path, digest
    entries = read_manifest(path)
    candidates = [(path / entry["file"], entry["sha256"]) for entry in entries or []]
    if entries is None:  # no manifest (or a damaged one): every checkpoint file, newest first
        candidates = [(file, None) for file in checkpoint_files(path)]
    for file, sha256 in candidates:
        try:
            state, digest = read_checkpoint(file, sha256)
        except DataError as error:
            warn(f"Skipping checkpoint {file}: {error}")
            continue
        if entries is None and owner:
            _rebuild_manifest(path, file, state, digest)
        return state, file, digest
    if candidates:
        raise config_error(
            "There is no intact checkpoint to resume from, though the folder holds checkpoint files.",
            f"{path}: {', '.join(file.name for file, _ in candidates)} (each skipped, see the warnings above)",
            "move those files away (trainwell never deletes them) or pass another checkpoint_dir to start afresh; "
            "resume=PATH tries one file.",
        )
    return None


def _rebuild_manifest(directory: Path, newest: Path, state: dict[str, Any], digest: str) -> None:
    """List the intact checkpoint files of a folder whose manifest was lost (newest first)."""
    entries = [_entry(newest.name, state["position"], digest)]
    for file in checkpoint_files(directory):
        if file.name < newest.name:
            try:
                older, sha256 = read_checkpoint(file)
            except DataError:
                continue
            entries.append(_entry(file.name, older["position"], sha256))
    write_manifest(directory, entries)
    warn(
        f"The checkpoint manifest of {directory} was missing or damaged: rebuilt it from the {len(entries)} "
        f"intact checkpoint file(s) there; resuming from {newest.name}."
    )


def read_checkpoint(file: Path, sha256: str | None = None) -> tuple[dict[str, Any], str]:
    """A checkpoint file's state and the sha256 of its bytes, checked against ``sha256`` when given.

    Raises:
        DataError: The file is missing, damaged or unreadable.
        ConfigError: It is a trainwell checkpoint of another format version.
    """
    if not file.is_file():
        raise DataError(f"{file} is missing")
    data = file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise DataError("its content does not match the hash recorded when it was written (damaged or truncated)")
    try:
        state = safe_load(file)
    except (DataError, OSError, MemoryError):  # the machine's say (no memory, no disk), not damage
        raise
    except Exception as error:  # a truncated or garbled zip archive: any reader error means unusable
        raise DataError(f"unreadable ({type(error).__name__}: {str(error)[:200]})") from None
    if not isinstance(state, dict) or "format" not in state:
        raise DataError("not a trainwell checkpoint")
    if state["format"] != FORMAT_VERSION:
        raise _other_format(file, state["format"])
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if not missing and isinstance(state["position"], dict):
        missing = [f"position.{key}" for key in POSITION_KEYS if key not in state["position"]]
    if missing:
        raise DataError(f"a format-{FORMAT_VERSION} checkpoint without {', '.join(missing)} (damaged or edited)")
    return state, digest


def read_manifest(directory: Path) -> list[dict[str, Any]] | None:
    """The checkpoints the folder's manifest lists, newest first; None when there is no
    manifest or it is damaged (then the checkpoint files themselves are what is there).

    Raises:
        ConfigError: The manifest is of another format version.
    """
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return None
    try:
        content = json.loads(manifest.read_text())
        found = content["format"]  # every trainwell manifest has one: without it, it is damaged
        if found != FORMAT_VERSION:
            raise _other_format(manifest, found)
        entries = content["checkpoints"]
        return [entry for entry in entries if {"file", "sha256"} <= set(entry) and _is_own_name(entry["file"])]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        if isinstance(error, TrainwellError):
            raise
        warn(f"Ignoring the damaged checkpoint manifest {manifest}.")
        return None


def checkpoint_files(directory: Path) -> list[Path]:
    """The files in ``directory`` named as trainwell names checkpoints, newest first (the names
    order by optimizer step)."""
    return sorted((path for path in directory.glob("checkpoint-*.pt") if _is_own_name(path.name)), reverse=True)


def _other_format(file: Path, found: Any) -> ConfigError:
    return config_error(
        f"{file.name} is a trainwell checkpoint of format {found}; this trainwell reads format {FORMAT_VERSION} "
        "(there is no migration between them).",
        str(file),
        "finish that run with the trainwell version that wrote it, or pass another checkpoint_dir to start "
        "afresh: trainwell never deletes checkpoints it cannot read.",
    )


def _is_own_name(name: Any) -> bool:
    """Whether a manifest entry names a checkpoint file trainwell writes, in the folder itself (a
    manifest that names another path is never read from or deleted through)."""
    return isinstance(name, str) and CHECKPOINT_NAME.fullmatch(name) is not None


def restore(run: Run, state: dict[str, Any]) -> None:
    """Put ``run`` back into the saved state: every stateful object now, the callbacks' states
    right after ``on_fit_start`` (``run.callback_states``, given by the loop)."""
    position = state["position"]
    for key, item in stateful_objects(run, epoch=position["epoch"], batches_done=position["batches_done"]).items():
        item.load_state_dict(state[key])
    processes = state["per_process"]
    _ProcessState(run).load_state_dict(processes[run.rank] if isinstance(processes, list) else processes)
    run.callback_states = state["callbacks"]


def restore_result(run: Run, state: dict[str, Any]) -> None:
    """Load a finished run's result (its weights and History): there is nothing to continue."""
    position = state["position"]
    objects = stateful_objects(run, epoch=position["epoch"], batches_done=position["batches_done"])
    for key in ("model", "history"):
        objects[key].load_state_dict(state[key])


class Checkpointer(Callback):
    """Saves the training state at the end of every epoch and every ``every_n_steps`` optimizer
    steps; turns Ctrl-C / SIGTERM into "finish the current step, save, raise
    ``TrainingInterrupted``".

    Added by ``fit(checkpoint_dir=...)`` after the user's callbacks (so their state is final
    when saved) and before the display.
    """

    def __init__(self, directory: Path, every_n_steps: int | None = None) -> None:
        self.directory = directory
        self.every_n_steps = every_n_steps
        self.signal_number: int | None = None
        self.previous_handlers: dict[int, Any] = {}

    def on_fit_start(self, run: Run) -> None:
        self.signal_number = None
        # In a torchrun job, torchrun itself stops and restarts the processes; a signal seen by
        # the ranks at different steps could not be turned into one common stop without a
        # collective per step, so there the periodic checkpoints are what resuming uses.
        if run.world_size == 1 and threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous_handlers[number] = signal.signal(number, self._on_signal)

    def _on_signal(self, number: int, frame: FrameType | None) -> None:
        if self.signal_number is not None:  # a second signal: stop now; the last checkpoint is intact
            raise KeyboardInterrupt
        self.signal_number = number

    def on_train_batch_end(self, run: Run) -> None:
        if run.window_batches:  # only at optimizer-step boundaries is the state complete
            return
        if self.signal_number is not None:
            self._save(run, run.epoch, run.batches_done)
            self._interrupt(run)
        if self.every_n_steps and run.global_step % self.every_n_steps == 0:
            self._save(run, run.epoch, run.batches_done)

    def on_epoch_end(self, run: Run) -> None:
        self._save(run, run.epoch + 1, 0)
        if self.signal_number is not None and not run.stop_training and run.epoch + 1 < run.epochs:
            self._interrupt(run)

    def on_fit_end(self, run: Run) -> None:
        for number, handler in self.previous_handlers.items():
            signal.signal(number, handler)
        self.previous_handlers = {}

    def _save(self, run: Run, epoch: int, batches_done: int) -> None:
        mine = _ProcessState(run).state_dict()
        per_process = mine if run.world_size == 1 else distributed.gather(mine)
        if run.is_main_process:
            state = training_state(run, epoch=epoch, batches_done=batches_done, per_process=per_process)
            save_checkpoint(self.directory, state)

    def _interrupt(self, run: Run) -> None:
        assert self.signal_number is not None
        name = signal.Signals(self.signal_number).name
        raise TrainingInterrupted(
            f"{name} received: stopped after epoch {run.epoch + 1}, batch {run.batches_done}, and saved a "
            f"checkpoint in {self.directory}. Run the same fit with resume=True (the command line: add --resume) "
            "to continue exactly from there.",
            self.signal_number,
        )


def _random_states() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    assert isinstance(keys, np.ndarray)
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_random_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def nothing_left(state: dict[str, Any], epochs: int) -> str | None:
    """Why the saved run needs no more training (a callback stopped it, or it reached
    ``epochs``), or None when there is more to do."""
    position = state["position"]
    if position["stopped"]:
        return f"Nothing to resume: the run was stopped by a callback after epoch {position['epoch']}."
    if position["epoch"] >= epochs:
        return f"Nothing to resume: the run already finished {position['epoch']} epochs (epochs={epochs})."
    return None
