"""The GPU proof kit's eyes: how ``gpu_check`` observes trainwell from outside, and reads the profiles.

Owns: the run's settings (``Setup``), the callbacks that hold the sync guard, record where batches
live, mark profiler ranges and read the optimizer and grad scaler trainwell built, and the readers
that count synchronisations and copies and split a step's time into phases. Must not edit or wrap
trainwell: callbacks, hooks on the model and torch's profiler only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

import trainwell

if TYPE_CHECKING:
    from gpu_timings import Entry


EPOCH_MARK, BATCHES_MARK = "gpu_check.epoch", "gpu_check.batches"
STEP_MARK, FORWARD_MARK = "gpu_check.step", "gpu_check.forward"
PHASES = ("forward", "backward", "optimizer", "other")


@dataclass(frozen=True)
class Setup:
    """Where and how big this run is.

    Attributes:
        device: ``cuda`` (or ``cpu`` in a dry run).
        dry_run / quick: The command line's flags.
        runs: Timed runs per contender.
        keys: The workloads to time.
        deadline: ``time.monotonic()`` after which timings and the profile are skipped.
    """

    device: torch.device
    dry_run: bool
    quick: bool
    runs: int
    keys: tuple[str, ...]
    deadline: float

    @property
    def is_cuda(self) -> bool:
        """Whether this run measures a GPU."""
        return self.device.type == "cuda"

    @property
    def check_batch(self) -> int:
        """The checks' batch size (workload (a)'s on a GPU, so compiled graphs are shared)."""
        return 64 if self.dry_run else 128

    @property
    def check_samples(self) -> int:
        """The checks' sample count: whole batches (no tail: compile traces one shape)."""
        return self.check_batch * (4 if self.dry_run else 16)

    def samples(self, entry: Entry) -> int:
        """The samples a timing of ``entry`` uses."""
        full, quick, dry = entry.sizes
        return dry if self.dry_run else quick if self.quick else full

    def out_of_time(self) -> bool:
        """Whether the time budget is spent."""
        return time.monotonic() > self.deadline


def say(message: str) -> None:
    """Progress on stderr (stdout ends with the results' markdown)."""
    sys.stderr.write(f"[gpu_check] {message}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------------------------------
# Observing trainwell from outside: callbacks and profiler marks
# ---------------------------------------------------------------------------------------------


def batches_per_epoch(run: trainwell.Run) -> int:
    """The training batches of one epoch of ``run`` (the workloads here always know it)."""
    count = run.train_batches.num_batches if run.train_batches is not None else None
    if count is None:
        raise RuntimeError("gpu_check needs data whose number of batches is known")
    return count


class Marks:
    """Profiler ranges opened and closed in different hooks (``record_function`` by hand)."""

    def __init__(self) -> None:
        self.open: list[record_function] = []

    def enter(self, name: str) -> None:
        """Open a range named ``name``."""
        mark = record_function(name)
        mark.__enter__()
        self.open.append(mark)

    def exit(self) -> None:
        """Close the innermost open range."""
        self.open.pop().__exit__(None, None, None)

    def exit_all(self) -> None:
        """Close every open range."""
        while self.open:
            self.exit()


def new_profile(setup: Setup) -> profile:
    """A profiler of host ops, plus CUDA runtime calls and device activity on a GPU."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.is_cuda else [])
    return profile(activities=activities)


class SyncGuard(trainwell.Callback):
    """Holds ``torch.cuda.set_sync_debug_mode("error")`` over each epoch's batches: from the first
    batch's ``on_train_batch_start`` to the last batch's ``on_train_batch_end``, so that fetching
    every batch after the first is inside too. ``strict=False`` (the CPU) only counts."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.holding = False
        self.guarded_batches = 0
        self.guarded_epochs = 0

    def _hold(self, holding: bool) -> None:
        if self.strict:
            torch.cuda.set_sync_debug_mode("error" if holding else "default")
        self.holding = holding

    def on_train_batch_start(self, run: trainwell.Run) -> None:
        if run.batches_done == 0:
            self._hold(True)
        self.guarded_batches += self.holding

    def on_train_batch_end(self, run: trainwell.Run) -> None:
        if run.batches_done == batches_per_epoch(run):
            self._hold(False)
            self.guarded_epochs += 1

    def on_fit_end(self, run: trainwell.Run) -> None:
        self._hold(False)


class Residency(trainwell.Callback):
    """Records at every batch where the batch lives and, for in-memory data, which tensor the
    batches come from (``Batches.in_memory()``: after the first epoch starts, the device copy)."""

    def __init__(self) -> None:
        self.batches = 0
        self.batch_devices: set[str] = set()
        self.data_devices: set[str] = set()
        self.data_pointers: set[int] = set()
        self.views = 0
        self.loader_pin_memory: Any = None

    def on_fit_start(self, run: trainwell.Run) -> None:
        options = getattr(run.train_batches, "loader_options", None)
        self.loader_pin_memory = None if options is None else options.get("pin_memory")

    def on_train_batch_start(self, run: trainwell.Run) -> None:
        assert run.batch is not None
        batch = run.batch.inputs
        self.batches += 1
        self.batch_devices.add(batch.device.type)
        data = run.train_batches.in_memory() if run.train_batches is not None else None
        if data is not None and isinstance(data.inputs, torch.Tensor):
            self.data_devices.add(data.inputs.device.type)
            self.data_pointers.add(data.inputs.data_ptr())
            self.views += batch.untyped_storage().data_ptr() == data.inputs.untyped_storage().data_ptr()


class EpochProfiler(trainwell.Callback):
    """Profiles epoch ``epoch`` of a fit, with two marked ranges: the whole epoch (``on_epoch_start``
    to ``on_epoch_end``, so the once-per-epoch read of the sums is inside) and its batches (the
    first batch's ``on_train_batch_start`` to the last one's ``on_train_batch_end``)."""

    def __init__(self, setup: Setup, epoch: int) -> None:
        self.profile = new_profile(setup)
        self.epoch = epoch
        self.marks = Marks()
        self.running = False
        self.events: list[Any] = []

    def on_epoch_start(self, run: trainwell.Run) -> None:
        if run.epoch == self.epoch:
            self.profile.start()
            self.running = True
            self.marks.enter(EPOCH_MARK)

    def on_train_batch_start(self, run: trainwell.Run) -> None:
        if self.running and run.batches_done == 0:
            self.marks.enter(BATCHES_MARK)

    def on_train_batch_end(self, run: trainwell.Run) -> None:
        if self.running and run.batches_done == batches_per_epoch(run):
            self.marks.exit()

    def on_epoch_end(self, run: trainwell.Run) -> None:
        if self.running:
            self._finish()

    def on_fit_end(self, run: trainwell.Run) -> None:
        if self.running:  # an exception inside the profiled epoch
            self._finish()

    def _finish(self) -> None:
        self.marks.exit_all()
        self.profile.stop()
        self.running = False
        self.events = list(self.profile.events())


class StepProfiler(trainwell.Callback):
    """Profiles ``count`` steps after the first ``skip`` of epoch ``epoch``: each step marked from
    ``on_train_batch_start`` to ``on_train_batch_end``, each forward pass marked by a pre-hook and
    a hook on the model, registered for those steps only (they cost a few microseconds a step)."""

    def __init__(self, setup: Setup, epoch: int, skip: int, count: int) -> None:
        self.profile = new_profile(setup)
        self.epoch, self.skip, self.count = epoch, skip, count
        self.marks = Marks()
        self.forward = Marks()
        self.hooks: list[Any] = []
        self.steps = 0
        self.events: list[Any] = []

    def on_train_batch_start(self, run: trainwell.Run) -> None:
        if run.epoch == self.epoch and run.batches_done == self.skip:
            self.profile.start()
            self.hooks = [
                run.module.register_forward_pre_hook(lambda module, args: self.forward.enter(FORWARD_MARK)),
                run.module.register_forward_hook(lambda module, args, output: self.forward.exit()),
            ]
        if self.hooks:
            self.marks.enter(STEP_MARK)

    def on_train_batch_end(self, run: trainwell.Run) -> None:
        if not self.hooks:
            return
        self.marks.exit()
        self.steps += 1
        if self.steps == self.count:
            self._finish()

    def on_fit_end(self, run: trainwell.Run) -> None:
        if self.hooks:
            self._finish()

    def _finish(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        self.marks.exit_all()
        self.forward.exit_all()
        self.profile.stop()
        self.events = list(self.profile.events())


class Settings(trainwell.Callback):
    """Reads the optimizer trainwell built and the grad scaler it used."""

    def __init__(self) -> None:
        self.optimizer: dict[str, Any] = {}
        self.scaler_enabled = False
        self.scale = float("nan")

    def on_fit_start(self, run: trainwell.Run) -> None:
        assert run.optimizer is not None
        defaults = run.optimizer.defaults
        self.optimizer = {"class": type(run.optimizer).__name__} | {
            key: defaults.get(key) for key in ("lr", "momentum", "fused", "foreach")
        }

    def on_fit_end(self, run: trainwell.Run) -> None:
        scaler = run.precision.scaler
        self.scaler_enabled = scaler.is_enabled()
        if self.scaler_enabled:
            self.scale = float(scaler.get_scale())


# ---------------------------------------------------------------------------------------------
# Reading profiles
# ---------------------------------------------------------------------------------------------

TRAFFIC: dict[str, Callable[[str], bool]] = {
    "stream_syncs": lambda name: name.startswith("cudaStreamSynchronize"),
    "device_syncs": lambda name: name.startswith("cudaDeviceSynchronize"),
    "event_syncs": lambda name: name.startswith("cudaEventSynchronize"),
    "memcpy_calls": lambda name: name.startswith("cudaMemcpy"),
    "htod_pinned": lambda name: name.startswith("Memcpy HtoD") and "Pinned" in name,
    "htod_pageable": lambda name: name.startswith("Memcpy HtoD") and "Pageable" in name,
    "dtoh": lambda name: name.startswith("Memcpy DtoH"),
}
TRAFFIC_TITLES = {
    "stream_syncs": "cudaStreamSynchronize",
    "device_syncs": "cudaDeviceSynchronize",
    "event_syncs": "cudaEventSynchronize",
    "memcpy_calls": "cudaMemcpy* calls",
    "htod_pinned": "HtoD copies, pinned",
    "htod_pageable": "HtoD copies, pageable",
    "dtoh": "DtoH copies",
}
TRAFFIC_NOTE = (
    "trainwell's epoch: on_epoch_start..on_epoch_end, so it holds making the epoch's shuffled order (on the host, "
    "then copied), fetching the first batch and the one read of the loss/metric sums; the hand loop's: its whole "
    "epoch function (randperm on the device, one read at the end)."
)


def mark_ranges(events: Iterable[Any], name: str) -> list[tuple[float, float]]:
    """The host time ranges (microseconds) of the marks named ``name``, in order."""
    ranges = [
        (event.time_range.start, event.time_range.end)
        for event in events
        if event.name == name and event.device_type == DeviceType.CPU
    ]
    return sorted(ranges)


def count_traffic(events: Sequence[Any], name: str) -> dict[str, int]:
    """Synchronisations and copies issued inside the mark ``name``: the CUDA runtime calls made on
    the host there, and the device copies launched by host ops that started there (a copy is
    named by the op that launched it, so it is placed by host time, whenever the device ran it)."""
    ranges = mark_ranges(events, name)
    if not ranges:
        raise RuntimeError(f"the profile has no {name!r} range")
    start, end = ranges[0]
    inside = [
        event for event in events if event.device_type == DeviceType.CPU and start <= event.time_range.start <= end
    ]
    names = [event.name for event in inside] + [
        kernel.name for event in inside for kernel in getattr(event, "kernels", None) or []
    ]
    return {key: sum(map(matches, names)) for key, matches in TRAFFIC.items()}


def syncs(traffic: Mapping[str, int]) -> int:
    """Stream, device and event synchronisations together."""
    return traffic["stream_syncs"] + traffic["device_syncs"] + traffic["event_syncs"]


def _within(moment: float, ranges: Iterable[tuple[float, float]]) -> bool:
    return any(start <= moment <= end for start, end in ranges)


def _backward_ranges(events: Sequence[Any], steps: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Per step: from the first to the last autograd node evaluated in it."""
    nodes = [
        event.time_range
        for event in events
        if event.device_type == DeviceType.CPU and event.name.startswith("autograd::engine::evaluate_function")
    ]
    ranges = []
    for start, end in steps:
        inside = [node for node in nodes if start <= node.start <= end]
        if inside:
            ranges.append((min(node.start for node in inside), max(node.end for node in inside)))
    return ranges


def phase_ranges(events: Sequence[Any]) -> dict[str, list[tuple[float, float]]]:
    """The host time ranges of each phase of the marked steps (``other`` is the whole step)."""
    steps = mark_ranges(events, STEP_MARK)
    optimizer = [
        (event.time_range.start, event.time_range.end)
        for event in events
        if event.device_type == DeviceType.CPU and event.name.startswith(("Optimizer.step#", "Optimizer.zero_grad#"))
    ]
    return {
        "forward": mark_ranges(events, FORWARD_MARK),
        "backward": _backward_ranges(events, steps),
        "optimizer": [span for span in optimizer if _within(span[0], steps)],
        "other": steps,
    }


def device_time_by_phase(events: Sequence[Any], ranges: Mapping[str, list[tuple[float, float]]]) -> dict[str, float]:
    """Device time (microseconds) of the kernels and copies each host op launched, charged to the
    phase in which that op started (``other``: elsewhere in a step; outside the steps: dropped)."""
    totals = dict.fromkeys(PHASES, 0.0)
    for event in events:
        kernels = getattr(event, "kernels", None) or []
        if event.device_type != DeviceType.CPU or not kernels:
            continue
        phase = next((name for name in PHASES if _within(event.time_range.start, ranges[name])), None)
        if phase is not None:
            totals[phase] += sum(kernel.duration for kernel in kernels)
    return totals


def phase_report(events: Sequence[Any], with_device: bool) -> dict[str, Any]:
    """Host (and device) microseconds per step in each phase, and their shares of the step."""
    ranges = phase_ranges(events)
    steps = len(ranges["other"])
    if steps == 0:
        raise RuntimeError("the phase profile holds no marked step")
    host = {name: sum(end - start for start, end in ranges[name]) / steps for name in PHASES}
    host["other"] -= host["forward"] + host["backward"] + host["optimizer"]
    report: dict[str, Any] = {"steps": steps, "host_us_per_step": host, "host_share": _shares(host)}
    if with_device:
        device = {name: total / steps for name, total in device_time_by_phase(events, ranges).items()}
        report |= {"device_us_per_step": device, "device_share": _shares(device)}
    return report


def _shares(values: Mapping[str, float]) -> dict[str, float]:
    total = sum(values.values())
    return {name: value / total if total > 0 else 0.0 for name, value in values.items()}


@dataclass
class Results:
    """Everything the run found; written after every section, so a run cut short leaves its part."""

    meta: dict[str, Any]
    dry_run: bool
    checks: list[dict[str, Any]] = field(default_factory=list)
    timings: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    optimizer: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, Any] | None = None
    transfers: dict[str, Any] | None = None

    @property
    def failed(self) -> bool:
        """Whether a check failed or a section raised."""
        return bool(self.errors) or any(check["status"] == "failed" for check in self.checks)
