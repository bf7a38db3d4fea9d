"""What else the machine is doing: CPU time used by other processes while a measurement runs.

Owns: reading /proc/stat, the "foreign load" of a timed region (the machine's busy CPU time
minus this process's own and its child processes', such as DataLoader workers, as a fraction of
all cores), and waiting for a quiet moment before a measurement starts. On a shared 2-core
machine one busy neighbour can slow a 2-thread torch process many times over, so every
measurement records how disturbed it was.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

DISTURBED = 0.10  # foreign load above which a measurement counts as disturbed
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_STAT = Path("/proc/stat")
_PROC = Path("/proc")


def _busy_and_total() -> tuple[float, float] | None:
    """CPU seconds (busy, total) over all cores since boot; None where /proc/stat is missing."""
    try:
        fields = [int(value) for value in _STAT.read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields) - idle) / _TICKS, sum(fields) / _TICKS


def _live_children_cpu(parent: int) -> float:
    """CPU seconds used so far by the live (or not yet reaped) child processes of ``parent``."""
    seconds = 0
    for stat in _PROC.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)", which may hold spaces
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        if int(fields[1]) == parent:  # fields: state, ppid, ... utime (11), stime (12)
            seconds += int(fields[11]) + int(fields[12])
    return seconds / _TICKS


def own_cpu_seconds() -> float:
    """CPU seconds used by this process and its children: its own, the children it has reaped,
    and the live ones (DataLoader workers are processes, and their work is part of the run)."""
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + reaped.ru_utime + reaped.ru_stime + _live_children_cpu(os.getpid())


@dataclass
class LoadWatch:
    """Measures other processes' CPU use between ``start`` and ``foreign_load``."""

    busy: float = 0.0
    total: float = 0.0
    own: float = 0.0
    available: bool = False

    def start(self) -> LoadWatch:
        reading = _busy_and_total()
        self.available = reading is not None
        self.busy, self.total = reading or (0.0, 0.0)
        self.own = own_cpu_seconds()
        return self

    def foreign_load(self) -> float:
        """Other processes' CPU time since ``start`` (this process's children excepted), as a
        fraction of all cores (NaN if unknown)."""
        reading = _busy_and_total()
        if not self.available or reading is None or reading[1] <= self.total:
            return float("nan")
        busy, total = reading[0] - self.busy, reading[1] - self.total
        return max(0.0, busy - (own_cpu_seconds() - self.own)) / total


def machine_load(window: float) -> float:
    """The machine's busy fraction over ``window`` seconds (NaN if unknown)."""
    first = _busy_and_total()
    time.sleep(window)
    second = _busy_and_total()
    if first is None or second is None or second[1] <= first[1]:
        return float("nan")
    return (second[0] - first[0]) / (second[1] - first[1])


def wait_for_quiet(threshold: float = DISTURBED, window: float = 0.5, timeout: float = 20.0) -> float:
    """Wait until the machine's load over ``window`` is below ``threshold`` (at most ``timeout``
    seconds); return the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        load = machine_load(window)
        if not load >= threshold:  # also stops on NaN
            break
    return time.perf_counter() - started
