"""Writing files: every file trainwell writes goes through here.

Owns: the atomic write (a temporary file in the same folder, fsynced, renamed over the path),
so that a crash leaves the old file or the new one, and a symbolic link planted at the path is
replaced, never written through. Must not decide what is written.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def atomic_write(data: bytes, path: str | Path) -> Path:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one.

    Writes a temporary file in the same folder, fsyncs it, renames it over ``path`` and fsyncs
    the folder. On failure the temporary file is removed and the old file is untouched.

    Raises:
        OSError: The write failed (disk full, no permission); the message names the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(error.errno, f"could not write {path}: {error.strerror}") from error
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path
