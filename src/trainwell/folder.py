"""The checkpoint folder a fit owns: its lock, its tidying, and what a run resumes from.

Owns: claiming the folder for one fit (a lock naming its holder), removing only trainwell's own
leftovers, refusing folders it cannot use, and, in a torchrun job, rank 0's decisions shared
with every process, which each checks it can see. Must not write outside the folder it was given.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from trainwell import distributed
from trainwell.checkpoints import checkpoint_files, load_checkpoint, read_checkpoint
from trainwell.errors import TrainwellError, config_error, warn

if sys.platform != "win32":
    import fcntl

LOCK = ".trainwell.lock"
# What trainwell's own writes leave behind when a process dies mid-write (atomic_write's
# temporary files of checkpoints and the manifest; check_writable's probe).
LEFTOVER_NAME = re.compile(
    r"\.(?:checkpoint-\d{10}-\d{5}-\d{7}\.pt|manifest\.json)\.[0-9a-f]{8}\.tmp|\.trainwell-write-test-\d+"
)
Decided = TypeVar("Decided")


class FolderLock:
    """One fit's exclusive claim on its checkpoint folder.

    An advisory ``flock`` on ``.trainwell.lock``: the operating system releases it when the
    process ends, however it ends, so a crashed run leaves no stale lock. The file names the
    holder (pid, host, start time) for the error a second writer gets, and carries a token
    that the other processes of a job read to prove they see the same folder. On Windows,
    which has no ``flock``, the folder is not locked.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK
        self.token = secrets.token_hex(8)
        self.descriptor: int | None = None

    def acquire(self) -> None:
        """Take the lock and write the holder into the file.

        Raises:
            ConfigError: Another process holds it (the message names that process), or the
                lock file is a symbolic link.
        """
        if sys.platform == "win32":
            return
        while True:
            try:
                descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as error:
                raise config_error(
                    "The checkpoint folder's lock file cannot be opened.",
                    f"{self.path}: {error.strerror or error}",
                    "remove that file (a symbolic link there is refused), or pass another checkpoint_dir.",
                ) from None
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                raise self._held() from None
            except OSError:  # a file system without locks (some network mounts): run, unprotected
                warn(
                    f"{self.path.parent} cannot be locked (its file system has no locks): two runs writing "
                    "this folder at once would not be detected."
                )
            # A holder that was releasing may have removed the file between our open and lock:
            # then we hold a lock on a file no one else can see, and must take the current one.
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(descriptor), os.stat(self.path, follow_symlinks=False)):
                    break
            os.close(descriptor)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "token": self.token}  # fmt: skip
        os.ftruncate(descriptor, 0)
        os.write(descriptor, json.dumps(holder).encode())
        os.fsync(descriptor)  # the other machines of a job read the token (a network file system caches)
        self.descriptor = descriptor

    def release(self) -> None:
        """Give the folder back (the lock file is removed while still held, so no one can have
        taken it in between)."""
        if self.descriptor is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.descriptor)
            self.descriptor = None

    def _held(self) -> TrainwellError:
        try:
            holder = json.loads(self.path.read_text())
            by = f"held by process {holder['pid']} on {holder['host']} since {holder['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            by = "held by another process"
        return config_error(
            "Another training run is using this checkpoint folder; two runs writing one folder would "
            "delete each other's checkpoints.",
            f"checkpoint_dir={str(self.path.parent)!r}, {by}",
            "wait for that run to end (or stop it), or give this run another checkpoint_dir.",
        )


@contextlib.contextmanager
def owned(directory: Path | None, rank: int, world_size: int) -> Iterator[None]:
    """Hold ``directory`` (nothing when None) for the block: rank 0 locks it and removes
    trainwell's own leftovers; in a job every other process checks that it sees the same folder.

    Raises:
        ConfigError: The folder is held by another run, or is not shared by the processes.
    """
    if directory is None:
        yield
        return
    lock = FolderLock(directory) if rank == 0 else None
    try:
        token = from_main(lambda: _claim(lock), rank, world_size)
        if world_size > 1:
            _check_shared(None if rank == 0 else _sees_lock(directory, token))
        yield
    finally:
        if lock is not None:
            lock.release()


def _claim(lock: FolderLock | None) -> str:
    assert lock is not None  # rank 0's
    lock.acquire()
    for path in lock.path.parent.iterdir():  # no other trainwell writer can be active now
        if LEFTOVER_NAME.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)
    return lock.token


def _sees_lock(directory: Path, token: str) -> str | None:
    try:
        seen = json.loads((directory / LOCK).read_text()).get("token")
    except (OSError, ValueError, AttributeError):
        seen = None
    return None if seen == token else f"does not see rank 0's lock file in {directory}"


def _check_shared(problem: str | None) -> None:
    """Every process of a job must see the one checkpoint folder rank 0 writes (else a resume
    would start each from a different point: gloo aborts, NCCL hangs)."""
    problems = [(index, text) for index, text in enumerate(distributed.gather(problem)) if text]
    if problems:
        raise config_error(
            "The checkpoint folder is not shared by the processes of this job: only rank 0 writes "
            "checkpoints, and every process must read the same ones to resume.",
            "; ".join(f"rank {index} {text}" for index, text in problems),
            "put checkpoint_dir on storage every machine of the job sees (a shared file system) and pass "
            "the same path on every process.",
        )


def from_main(decide: Callable[[], Decided], rank: int, world_size: int) -> Decided:
    """Rank 0's ``decide()`` on every process of a job; when it raises, every process raises
    (none is left waiting in a collective the others have left)."""
    if world_size == 1:
        return decide()
    if rank == 0:
        try:
            value = decide()
        except Exception as error:
            shared = error
            if not isinstance(error, TrainwellError):  # what every process can unpickle and raise
                shared = config_error(
                    f"Rank 0 stopped before training: {type(error).__name__}: {error}",
                    "the checkpoint folder or the checkpoint rank 0 read",
                    "see rank 0's error, fix it, and start the job again.",
                )
            distributed.broadcast((False, shared))
            raise
        distributed.broadcast((True, value))
        return value
    succeeded, value = distributed.broadcast(None)
    if not succeeded:
        raise value
    return value


def resume_state(
    resume: bool | str | Path, directory: Path | None, rank: int, world_size: int
) -> dict[str, Any] | None:
    """What a fit continues from (None: it starts afresh). Rank 0 chooses, in ``directory`` or
    at the path ``resume`` names; every other process reads that one file and checks its hash.

    Raises:
        ConfigError: ``resume=True`` and nothing to resume; ``resume=False`` into a folder whose
            run would be overwritten; checkpoints of another format, or none intact; a file
            some process cannot read.
    """
    states: list[dict[str, Any]] = []

    def decide() -> tuple[str, str] | None:
        found = _choose(resume, directory)
        if found is None:
            return None
        states.append(found[0])
        return str(found[1]), found[2]

    chosen = from_main(decide, rank, world_size)
    if chosen is None:
        return None
    if rank == 0:
        state, problem = states[0], None
    else:
        file, digest = chosen
        try:
            state, problem = read_checkpoint(Path(file), digest)[0], None
        except (TrainwellError, OSError) as error:
            state, problem = {}, f"cannot read {file} ({error})"
    if world_size > 1:
        _check_shared(problem)
    return state


def _choose(resume: bool | str | Path, directory: Path | None) -> tuple[dict[str, Any], Path, str] | None:
    """Rank 0's choice (None: start afresh)."""
    if resume is False:
        if directory is not None:
            _refuse_used(directory, resume)
        return None
    own = resume is True or resume == "auto"
    source = directory if resume is True or resume == "auto" else Path(resume)
    assert source is not None  # checked with the options
    if directory is not None and not own and directory.resolve() not in (source.resolve(), source.resolve().parent):
        _refuse_used(directory, resume)  # continuing another folder's run here would overwrite this one's
    found = load_checkpoint(source, owner=own) if source.exists() else None
    if found is None and directory is not None:
        _refuse_used(directory, resume)  # checkpoint files no manifest entry lists: not to be overwritten
    if found is None and resume != "auto":
        raise config_error(
            "There is no intact checkpoint to resume from.",
            f"resume={resume!r}, looked in {source}",
            "check the path, or pass resume='auto' to start afresh when there is none.",
        )
    return found


def _refuse_used(directory: Path, resume: bool | str | Path) -> None:
    """A fit that starts afresh in a folder holding a run's checkpoints would delete them."""
    files = checkpoint_files(directory) if directory.is_dir() else []
    if files:
        raise config_error(
            "The checkpoint folder already holds the checkpoints of a run; starting afresh there would delete them.",
            f"checkpoint_dir={str(directory)!r} holds {files[0].name}, resume={resume!r}",
            "pass resume=True (or 'auto') to continue that run, or another checkpoint_dir to start afresh "
            "(or remove those files yourself).",
        )
