"""One measurement, in a fresh process: build the data and model, warm up, time one contender.

Owns: the timed region and what a worker reports (one ``BENCH_RESULT {json}`` line on stdout).
The data and model are built before the clock starts; the warm-up runs the same contender on a
few batches of the same model, so one-time costs (lazy imports, allocator growth) stay out.
For workload (f) every contender gets the user's DataLoader before its persistent workers have
started: the hand loop starts them when it first iterates the loader, trainwell when it first
iterates the loader it builds on ``loader.dataset``; each pays one start-up in the timed epoch,
as in any run (later epochs reuse the workers on both sides).
"""

from __future__ import annotations

import contextlib
import cProfile
import gc
import json
import pstats
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

import kernel
from contenders import SCORERS, TRAINERS, WITH_DISPLAY
from frameworks import FRAMEWORK_TRAINERS
from load import LoadWatch
from tasks import RESULT_PREFIX, InferenceTask, Outcome, TrainTask
from terminal import SinkReport, terminal_stdout
from workloads import WORKLOADS, Workload, build_model, make_data, workload_loader

WARMUP_BATCHES = 5
INFERENCE_REPEATS = 5
SHUFFLE_SEED = 2

Task = TypeVar("Task", TrainTask, InferenceTask)


def _memory_kb(field: str) -> int | None:
    """``VmRSS`` or ``VmHWM`` of this process from /proc/self/status, in KiB (None if unknown)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in lines if line.startswith(field + ":")), None)


class PeakMemory:
    """The process's peak RSS over its whole life, although the timed regions reset the kernel's
    high-water mark to measure their own peaks."""

    def __init__(self) -> None:
        self.before_resets_kb = 0

    def reset(self) -> int | None:
        """Reset the high-water mark to the current RSS (Linux ``clear_refs``); return that RSS."""
        self.before_resets_kb = max(self.before_resets_kb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return None
        return _memory_kb("VmRSS")

    def peak_mb(self) -> float:
        """``ru_maxrss`` of the whole worker, in MiB."""
        return max(self.before_resets_kb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


PEAK_MEMORY = PeakMemory()


def _timed(run: Callable[[Task], Outcome], task: Task, profiler: cProfile.Profile | None) -> dict[str, float]:
    """Run ``run(task)`` once on the clock (and under ``profiler`` when given), noting the CPU time
    it used and how far its memory peaked above the RSS it started from."""
    rss_before = PEAK_MEMORY.reset()
    start, cpu_start = time.perf_counter(), time.process_time()
    if profiler is not None:
        profiler.enable()
    outcome = run(task)
    if profiler is not None:
        profiler.disable()
    seconds = time.perf_counter() - start
    peak = _memory_kb("VmHWM")
    return {
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu_start,
        "samples": outcome.samples,
        "samples_per_second": outcome.samples / seconds,
        "loss": outcome.loss,
        "accuracy": outcome.accuracy,
        "timed_extra_mb": (peak - rss_before) / 1024 if peak is not None and rss_before is not None else float("nan"),
    }


def _trainer(contender: str, workload: Workload) -> Callable[[TrainTask], Outcome]:
    if workload.kind == "text":
        from text import TEXT_TRAINERS  # imports transformers only where it is used

        return TEXT_TRAINERS[contender]
    return TRAINERS.get(contender) or FRAMEWORK_TRAINERS[contender]


def _train(
    contender: str, workload: Workload, inputs: torch.Tensor, targets: torch.Tensor, profiler: cProfile.Profile | None
) -> tuple[dict[str, dict[str, float]], SinkReport]:
    trainer = _trainer(contender, workload)
    model = build_model(workload.architecture)
    warm = workload.batch_size * WARMUP_BATCHES
    size, architecture = workload.batch_size, workload.architecture
    warm_loader = workload_loader(workload, inputs[:warm], targets[:warm])
    warm_task = TrainTask(model, inputs[:warm], targets[:warm], size, architecture, warm_loader)
    del warm_loader  # held by warm_task only, so that dropping warm_task stops its workers
    task = TrainTask(model, inputs, targets, size, architecture, workload_loader(workload, inputs, targets))
    sink = SinkReport()
    shows_display = contender in WITH_DISPLAY or contender in FRAMEWORK_TRAINERS or contender == "hf_trainer"
    with terminal_stdout(sink) if shows_display else contextlib.nullcontext():
        trainer(warm_task)
        del warm_task  # its loader's workers stop with it
        gc.collect()
        watch = LoadWatch().start()
        fit = _timed(trainer, task, profiler)
        foreign_load = watch.foreign_load()
        # (f): stop the persistent workers before the pseudo-terminal closes: forked while it was
        # open, they hold it open too, and its reader would wait for them until its timeout.
        del task
    return {"fit": fit | {"foreign_load": foreign_load}}, sink


def _score(
    contender: str, workload: Workload, inputs: torch.Tensor, targets: torch.Tensor, profiler: cProfile.Profile | None
) -> dict[str, dict[str, float]]:
    """Evaluate and predict, each ``INFERENCE_REPEATS`` times; the run with the median time is kept,
    with the other processes' load over all the repeats (one pass is too short to measure it)."""
    if workload.kind == "text_inference":
        from text import TEXT_SCORERS

        evaluate, predict = TEXT_SCORERS[contender]
    else:
        evaluate, predict = SCORERS[contender].evaluate, SCORERS[contender].predict
    model = build_model(workload.architecture)
    warm = workload.batch_size * 2
    warm_loader = workload_loader(workload, inputs[:warm], targets[:warm])
    warm_task = InferenceTask(model, inputs[:warm], targets[:warm], workload.batch_size, warm_loader)
    task = InferenceTask(model, inputs, targets, workload.batch_size, workload_loader(workload, inputs, targets))
    phases = {}
    for phase, run in (("evaluate", evaluate), ("predict", predict)):
        run(warm_task)
        watch = LoadWatch().start()
        repeats = sorted(
            (_timed(run, task, profiler) for _ in range(INFERENCE_REPEATS)), key=lambda row: row["seconds"]
        )
        phases[phase] = repeats[len(repeats) // 2] | {"repeats": len(repeats), "foreign_load": watch.foreign_load()}
    return phases


PAIRED = "paired"
PAIRED_ROUNDS = 6
PAIRED_CONTENDERS = ("best_hand", "trainwell_quiet", "trainwell")
COUNTING = "trainwell_counting"  # also paired on the workloads it is written for (not the text ones)
NOTEBOOK = "trainwell_notebook"  # also paired there when the kernel's packages are installed


def _paired_epoch(
    contender: str, workload: Workload, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[float, float | None]:
    """Seconds of one epoch of ``contender`` on a fresh model (and a fresh user DataLoader), and
    for ``NOTEBOOK`` the share of them spent in the display's hooks."""
    loader = workload_loader(workload, inputs, targets)
    task = TrainTask(build_model(workload.architecture), inputs, targets, workload.batch_size, workload.architecture,
                     loader)  # fmt: skip
    del loader  # held by the task only, so that dropping the task stops (f)'s workers
    if contender in WITH_DISPLAY:
        shown: contextlib.AbstractContextManager[Any] = terminal_stdout(SinkReport())
    else:
        shown = kernel.kernel_display() if contender == NOTEBOOK else contextlib.nullcontext()
    with shown as display:
        seconds = _timed(_trainer(contender, workload), task, None)["seconds"]
        share = display.seconds / seconds if contender == NOTEBOOK else None
        del task  # (f): stop the workers while the pseudo-terminal is open (see ``_train``)
        gc.collect()
    return seconds, share


def _paired(workload: Workload, inputs: torch.Tensor, targets: torch.Tensor, pairs: int) -> dict[str, Any]:
    """trainwell against the hand loop in one process: ``pairs`` rounds (after one to warm up) of
    one epoch each of ``PAIRED_CONTENDERS`` (and ``COUNTING``, ``NOTEBOOK``), in a rotated order every
    round, so that slow phases of a shared machine hit the contenders of a round alike and the
    per-round ratios cancel them (what is left is the machine's own noise within a round, reported
    as the ratios' range)."""
    ratios: dict[str, list[float]] = {"quiet_vs_hand": [], "display_vs_hand": [], "display_vs_quiet": []}
    extra = {COUNTING: "counting_vs_quiet", NOTEBOOK: "notebook_vs_quiet"}
    if workload.kind == "text" or not kernel.available():
        del extra[NOTEBOOK]
    if workload.kind == "text":
        del extra[COUNTING]
    contenders = PAIRED_CONTENDERS + tuple(extra)
    ratios |= {name: [] for name in extra.values()}
    shares: list[float] = []  # of each NOTEBOOK epoch, the share of its time in the display's hooks
    for round_index in range(pairs + 1):
        shift = round_index % len(contenders)
        order = contenders[shift:] + contenders[:shift]
        measured = {contender: _paired_epoch(contender, workload, inputs, targets) for contender in order}
        seconds = {contender: took for contender, (took, _) in measured.items()}
        if round_index:  # the first round warms up
            shares += [share for _, share in measured.values() if share is not None]
            ratios["quiet_vs_hand"].append(seconds["best_hand"] / seconds["trainwell_quiet"])
            ratios["display_vs_hand"].append(seconds["best_hand"] / seconds["trainwell"])
            ratios["display_vs_quiet"].append(seconds["trainwell_quiet"] / seconds["trainwell"])
            for contender, name in extra.items():
                ratios[name].append(seconds["trainwell_quiet"] / seconds[contender])
    return (
        {"pairs": pairs, "speed_ratios": ratios}
        | {f"median_{name}": statistics.median(values) for name, values in ratios.items()}
        | (
            {"notebook_display_share": shares, "median_notebook_display_share": statistics.median(shares)}
            if shares
            else {}
        )
    )


def run_worker(contender: str, workload_key: str, samples: int | None, profile_lines: int = 0) -> dict[str, Any]:
    """Measure ``contender`` on one workload and return the raw numbers.

    Args:
        contender: A key of ``TRAINERS``, ``FRAMEWORK_TRAINERS`` or (workload e) ``SCORERS``;
            or ``paired`` (``paired:N`` for N rounds) for the paired measurement of trainwell
            with and without its display against the hand loop (``_paired``).
        workload_key: A key of ``WORKLOADS``.
        samples: How many samples (None: the workload's full size).
        profile_lines: When > 0, profile the timed region with cProfile and print this many
            lines (sorted by tottime) to stderr; the timings are then inflated.
    """
    workload = WORKLOADS[workload_key]
    count = samples or workload.samples
    inputs, targets = make_data(count, workload.architecture)
    torch.manual_seed(SHUFFLE_SEED)
    if contender.startswith(PAIRED):  # "paired" or "paired:<rounds>"
        pairs = int(contender.partition(":")[2] or PAIRED_ROUNDS)
        return {"contender": contender, "workload": workload_key, "samples": count} | _paired(
            workload, inputs, targets, pairs
        )
    profiler = cProfile.Profile() if profile_lines > 0 else None
    sink = SinkReport()
    if workload.kind in ("inference", "text_inference"):
        phases = _score(contender, workload, inputs, targets, profiler)
    else:
        phases, sink = _train(contender, workload, inputs, targets, profiler)
    if profiler is not None:
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(profile_lines)
    return {
        "contender": contender,
        "workload": workload_key,
        "samples": count,
        "phases": phases,
        "peak_rss_mb": PEAK_MEMORY.peak_mb(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "display_sink": sink.kind,
        "display_bytes": sink.bytes_written,
        "profiled": profiler is not None,
    }


def worker_main(contender: str, workload_key: str, samples: int | None, profile_lines: int) -> int:
    """Entry point of ``run.py --worker``: print one result line for the parent."""
    result = run_worker(contender, workload_key, samples, profile_lines)
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0
