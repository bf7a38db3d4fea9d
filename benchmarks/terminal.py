"""A stand-in for the user's terminal, so live progress displays run as they would interactively.

Owns: the pseudo-terminal that ``sys.stdout`` points to while a contender with a display trains,
and the thread that reads it the way a terminal emulator would. Falls back to a StringIO where
no pseudo-terminal can be opened.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import struct
import termios
import threading
from collections.abc import Iterator
from dataclasses import dataclass

ROWS, COLUMNS = 40, 120
_READ_SIZE = 65_536


@dataclass
class SinkReport:
    """What the display wrote: ``kind`` is ``pty`` or ``stringio``; ``bytes_written`` counts its output."""

    kind: str = "none"
    bytes_written: int = 0


class _Drain:
    """Reads the terminal side of a pseudo-terminal until it closes, counting the bytes."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.bytes_read = 0
        self.thread = threading.Thread(target=self._run, name="terminal-drain", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, _READ_SIZE)
            except OSError:  # EIO once the writing side is closed
                return
            if not chunk:
                return
            self.bytes_read += len(chunk)


@contextlib.contextmanager
def terminal_stdout(report: SinkReport) -> Iterator[None]:
    """Point ``sys.stdout`` at a 120-column pseudo-terminal (or a StringIO) for the block.

    Args:
        report: Filled in when the block ends: the sink used and the bytes written to it.
    """
    try:
        master, replica = os.openpty()
    except OSError:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            yield
        report.kind, report.bytes_written = "stringio", len(buffer.getvalue().encode())
        return
    fcntl.ioctl(replica, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    drain = _Drain(master)
    stream = open(replica, "w", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed below, before the drain ends
    try:
        with contextlib.redirect_stdout(stream):
            yield
    finally:
        stream.close()
        drain.thread.join(timeout=5)
        os.close(master)
    report.kind, report.bytes_written = "pty", drain.bytes_read
