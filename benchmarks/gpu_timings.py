"""The GPU proof kit's timed workloads: the ``ENTRIES`` registry (a further workload is one more
``Entry``), the fastest hand-written loops, the timing of each contender with CUDA events, and the
profiles of where a step's time goes.

Owns: what is timed and how. Must not decide pass or fail (``gpu_check`` does) or time anything
but whole epochs.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import math
import statistics
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the name PyTorch's documentation uses
from torch import nn
from torch.profiler import record_function
from torch.utils.data import DataLoader

import trainwell
from gpu_observe import (
    EPOCH_MARK,
    EpochProfiler,
    Results,
    Setup,
    StepProfiler,
    count_traffic,
    new_profile,
    phase_report,
    say,
    syncs,
)
from text import TEXT_LR, build_bert, make_sequences, pad_sentences, text_loader
from workloads import LR, MOMENTUM, WORKLOADS, build_model, make_data

MIB = 2**20
HAND_OPTIMIZER = {"fused": True}  # what trainwell's build_optimizer asks for on CUDA (and the CPU)
PROFILE_SKIP, PROFILE_STEPS = 5, 20  # the phase profile: steps of the second epoch


EpochResult = tuple[float, float]  # the epoch's mean loss and accuracy, read once at its end
Runner = Callable[[nn.Module], EpochResult]  # a contender: trains the model one epoch


@dataclass(frozen=True)
class Prepared:
    """One workload, built and with its data where it will live, ready to time.

    Attributes:
        samples: Samples in one epoch; batches: batches in one epoch.
        new_model: A freshly initialised model on the device (the same weights every call).
        fit_data: What ``trainwell.fit`` is given.
        fit_options: trainwell's keywords for this workload (loss, optimizer, batch size, ...).
        hand_epoch: The fastest hand-written loop: trains the model one epoch.
    """

    samples: int
    batches: int
    new_model: Callable[[], nn.Module]
    fit_data: Any
    fit_options: Mapping[str, Any]
    hand_epoch: Callable[[nn.Module], EpochResult]


@dataclass(frozen=True)
class Entry:
    """A timed workload of the registry.

    Attributes:
        key / title: As in the table.
        sizes: Samples of a full, a ``--quick`` and a ``--dry-run`` timing.
        prepare: ``prepare(samples, device)`` builds the data (on the device) and the contenders.
        compile_modes: trainwell's ``compile=`` modes timed as further contenders.
    """

    key: str
    title: str
    sizes: tuple[int, int, int]
    prepare: Callable[[int, torch.device], Prepared]
    compile_modes: tuple[str, ...] = ()


def hand_loop_epoch(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> EpochResult:
    """The fastest loop we write: the data on the device, a shuffled index made there and
    ``index_select``, device-side sums read once, gradients set to None, and SGD with the
    settings trainwell uses (``HAND_OPTIMIZER``)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, **HAND_OPTIMIZER)
    model.train()
    device = inputs.device
    order = torch.randperm(len(targets), device=device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(targets), batch_size):
        index = order[start : start + batch_size]
        batch_targets = targets.index_select(0, index)
        outputs = model(inputs.index_select(0, index))
        loss = F.cross_entropy(outputs, batch_targets)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum.add_(loss.detach(), alpha=batch_targets.shape[0])
        correct.add_((outputs.detach().argmax(1) == batch_targets).sum())
    total_loss, total_correct = torch.stack([loss_sum, correct.to(loss_sum.dtype)]).tolist()
    return total_loss / len(targets), total_correct / len(targets)


def image_workload(key: str) -> Callable[[int, torch.device], Prepared]:
    """``prepare`` for workloads (a), (b), (c) of ``workloads.py``: their data moved to the device."""
    workload = WORKLOADS[key]

    def prepare(samples: int, device: torch.device) -> Prepared:
        inputs, targets = (tensor.to(device) for tensor in make_data(samples, workload.architecture))
        size = workload.batch_size
        return Prepared(
            samples=samples,
            batches=math.ceil(samples / size),
            new_model=lambda: build_model(workload.architecture).to(device),
            fit_data=(inputs, targets),
            fit_options={
                "loss": "cross_entropy",
                "optimizer": "sgd",
                "lr": LR,
                "momentum": MOMENTUM,
                "batch_size": size,
            },
            hand_epoch=lambda model: hand_loop_epoch(model, inputs, targets, size),
        )

    return prepare


def _image_entry(key: str, compile_modes: tuple[str, ...] = ()) -> Entry:
    workload = WORKLOADS[key]
    dry = {"a": 384, "b": 256, "c": 128}[key]
    return Entry(
        key, workload.title, (workload.samples, workload.quick_samples, dry), image_workload(key), compile_modes
    )


def text_hand_epoch(model: nn.Module, loader: DataLoader[Any], device: torch.device) -> EpochResult:
    """(g)'s fastest hand loop: the user's collate DataLoader with ``pin_memory`` on a GPU, each
    batch copied without blocking, the model's own loss, fused AdamW as trainwell builds it,
    sums kept on the device and read once."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=TEXT_LR, **HAND_OPTIMIZER)
    model.train()
    sums = torch.zeros(2, device=device)  # loss * sentences, correct
    seen = 0  # counted on the host: a tensor made from it would be a blocking copy every step
    for batch in loader:
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        out = model(**batch)
        loss, labels = out["loss"], batch["labels"]
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hits = (out["logits"].detach().argmax(-1) == labels).sum()
        sums.add_(torch.stack([loss.detach() * len(labels), hits.to(sums.dtype)]))
        seen += len(labels)
    total_loss, correct = sums.tolist()
    return total_loss / seen, correct / seen


def text_workload(samples: int, device: torch.device) -> Prepared:
    """``prepare`` for (g): a tiny BERT classifier (torch's encoder of the same sizes where
    transformers is not installed) on course-style dict batches padded by a collate function;
    the data stays on the CPU, as a Dataset's does, and every batch is copied to the device."""
    tokens, labels = make_sequences(samples, tagger=False)
    size = WORKLOADS["g"].batch_size
    loader = text_loader(tokens, labels, size, tagger=False)
    hand_loader = DataLoader(loader.dataset, size, shuffle=True, collate_fn=pad_sentences,
                             pin_memory=device.type == "cuda")  # fmt: skip
    return Prepared(
        samples=samples,
        batches=math.ceil(samples / size),
        new_model=lambda: build_bert().to(device),
        fit_data=loader,
        fit_options={"optimizer": "adamw", "lr": TEXT_LR},
        hand_epoch=lambda model: text_hand_epoch(model, hand_loader, device),
    )


def _text_title() -> str:
    model = "Hugging Face BERT" if importlib.util.find_spec("transformers") else "torch encoder (no transformers)"
    return f"{model}, 2 layers, hidden 64: dict batches through a collate DataLoader, the model's own loss, AdamW"


ENTRIES: list[Entry] = [
    _image_entry("a", ("reduce-overhead",)),
    _image_entry("b"),
    _image_entry("c"),
    Entry("g", _text_title(), (WORKLOADS["g"].samples, WORKLOADS["g"].quick_samples, 128), text_workload),
]
HAND = "hand loop"
TRAINWELL = "trainwell"


def trainwell_epoch(
    setup: Setup, prepared: Prepared, compile: bool | str = False
) -> Callable[[nn.Module], EpochResult]:
    """trainwell's contender: one epoch of ``fit(..., metrics=["accuracy"], progress=False)``."""

    def epoch(model: nn.Module) -> EpochResult:
        history = trainwell.fit(
            model, prepared.fit_data, **prepared.fit_options, epochs=1, metrics=["accuracy"], progress=False,
            device=setup.device.type, compile=compile,
        )  # fmt: skip
        return history["loss"][0], history["accuracy"][0]

    return epoch


def contenders(setup: Setup, entry: Entry, prepared: Prepared) -> dict[str, Runner]:
    """The hand loop, trainwell, and trainwell compiled in each of the entry's modes."""
    compiled = {f"{TRAINWELL} compile={mode}": trainwell_epoch(setup, prepared, mode) for mode in entry.compile_modes}
    return {HAND: prepared.hand_epoch, TRAINWELL: trainwell_epoch(setup, prepared)} | compiled


@dataclass(frozen=True)
class Timing:
    """One timed epoch: its seconds, the device memory it peaked at (None on the CPU) above what
    was allocated when it started, and the loss and accuracy it reported."""

    seconds: float
    peak_mb: float | None
    base_mb: float | None
    loss: float
    accuracy: float


def timed(setup: Setup, work: Callable[[], EpochResult]) -> Timing:
    """Run ``work`` once on the clock: CUDA events around it (synchronised before and after) on a
    GPU, ``time.perf_counter`` on the CPU."""
    gc.collect()
    if not setup.is_cuda:
        start = time.perf_counter()
        loss, accuracy = work()
        return Timing(time.perf_counter() - start, None, None, loss, accuracy)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    loss, accuracy = work()
    end.record()
    torch.cuda.synchronize()
    return Timing(begin.elapsed_time(end) / 1000, torch.cuda.max_memory_allocated() / MIB, base / MIB, loss, accuracy)


def warm_up(runners: Mapping[str, Runner], models: Mapping[str, nn.Module]) -> dict[str, str]:
    """One untimed epoch per contender (compiling, if it does); the contenders that failed, with why."""
    failures = {}
    for name, runner in runners.items():
        say(f"  warm-up: {name}")
        try:
            runner(models[name])
        except Exception as error:  # a contender that cannot run (say, no compiler) leaves the others timed
            say(traceback.format_exc())
            failures[name] = f"{type(error).__name__}: {error}"[:500]
    return failures


def measure(
    setup: Setup, runners: Mapping[str, Runner], prepared: Prepared
) -> tuple[dict[str, list[Timing]], dict[str, str]]:
    """A warm-up epoch per contender, then ``setup.runs`` timed epochs each, the contenders in a
    rotated order every run. Each contender keeps its own model. Returns the timings, and the
    contenders left out because their warm-up failed."""
    models = {name: prepared.new_model() for name in runners}
    failures = warm_up(runners, models)
    names = [name for name in runners if name not in failures]
    timings: dict[str, list[Timing]] = {name: [] for name in names}
    for run in range(setup.runs):
        for name in names[run % len(names) :] + names[: run % len(names)]:
            timings[name].append(timed(setup, functools.partial(runners[name], models[name])))
    return timings, failures


def timing_rows(entry: Entry, prepared: Prepared, timings: Mapping[str, list[Timing]]) -> list[dict[str, Any]]:
    """One row per contender: median seconds, samples/s, speed relative to the hand loop, memory."""
    hand = statistics.median(timing.seconds for timing in timings[HAND])
    rows = []
    for name, runs in timings.items():
        median = statistics.median(timing.seconds for timing in runs)
        peaks = [timing.peak_mb for timing in runs if timing.peak_mb is not None]
        extras = [
            timing.peak_mb - timing.base_mb
            for timing in runs
            if timing.peak_mb is not None and timing.base_mb is not None
        ]
        rows.append({
            "workload": entry.key, "title": entry.title, "contender": name, "samples": prepared.samples,
            "batches": prepared.batches, "runs": len(runs), "seconds": [timing.seconds for timing in runs],
            "median_seconds": median, "samples_per_second": prepared.samples / median, "vs_hand": hand / median,
            "peak_mb": max(peaks) if peaks else None, "extra_mb": max(extras) if extras else None,
            "loss": runs[-1].loss, "accuracy": runs[-1].accuracy,
        })  # fmt: skip
    return rows


def time_entry(setup: Setup, entry: Entry, results: Results) -> None:
    """Time every contender of ``entry`` into ``results``."""
    prepared = entry.prepare(setup.samples(entry), setup.device)
    say(f"timing ({entry.key}) {entry.title}: {prepared.samples} samples, {setup.runs} runs")
    timings, failures = measure(setup, contenders(setup, entry, prepared), prepared)
    if HAND not in timings:
        raise RuntimeError(f"the hand loop failed: {failures[HAND]}")
    results.timings += timing_rows(entry, prepared, timings)
    results.errors += [{"section": f"timing {entry.key}: {name}", "error": why} for name, why in failures.items()]


PHASE_METHOD = (
    "host: a step is on_train_batch_start..on_train_batch_end (callback marks); forward = the model's call "
    "(a forward pre-hook and hook on the model, for the profiled steps only); backward = first to last autograd "
    "node evaluated in the step (autograd::engine::evaluate_function events); optimizer = torch's own "
    "Optimizer.step#/Optimizer.zero_grad# ranges; other = the rest of the step (loss, metric sums, trainwell's "
    "accounting, hooks). device: each kernel's or copy's time is charged to the phase in which the host op that "
    "launched it started. The batch fetch between steps is outside every phase."
)


def profile_phases(setup: Setup, entry: Entry) -> dict[str, Any]:
    """A profile of a few trainwell steps in the second epoch: each phase's share of the step."""
    prepared = entry.prepare(entry.sizes[2] if setup.dry_run else entry.sizes[1], setup.device)
    skip = min(PROFILE_SKIP, prepared.batches // 2)
    profiler = StepProfiler(setup, epoch=1, skip=skip, count=min(PROFILE_STEPS, prepared.batches - skip))
    trainwell.fit(prepared.new_model(), prepared.fit_data, **prepared.fit_options, epochs=2, metrics=["accuracy"],
                  progress=False, device=setup.device.type, callbacks=[profiler])  # fmt: skip
    return {"workload": entry.key, "method": PHASE_METHOD} | phase_report(profiler.events, setup.is_cuda)


def profile_transfers(setup: Setup, entry: Entry) -> dict[str, Any]:
    """Synchronisations and copies inside one whole training epoch (the second), of trainwell
    (``on_epoch_start`` to ``on_epoch_end``) and of the hand loop (its whole epoch function)."""
    prepared = entry.prepare(entry.sizes[2] if setup.dry_run else entry.sizes[1], setup.device)
    profiler = EpochProfiler(setup, epoch=1)
    trainwell.fit(prepared.new_model(), prepared.fit_data, **prepared.fit_options, epochs=2, metrics=["accuracy"],
                  progress=False, device=setup.device.type, callbacks=[profiler])  # fmt: skip
    model = prepared.new_model()
    prepared.hand_epoch(model)
    with new_profile(setup) as hand_profile, record_function(EPOCH_MARK):
        prepared.hand_epoch(model)
    counts = {
        TRAINWELL: count_traffic(profiler.events, EPOCH_MARK),
        HAND: count_traffic(hand_profile.events(), EPOCH_MARK),
    }
    return {
        "workload": entry.key,
        "samples": prepared.samples,
        "steps": prepared.batches,
        "counts": counts,
        "syncs_per_step": {name: syncs(traffic) / prepared.batches for name, traffic in counts.items()},
    }
