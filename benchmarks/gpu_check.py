"""GPU proof kit: functional checks, timings against the fastest hand loop, and where a step's time
goes, on one CUDA device; ``--dry-run`` runs every part on the CPU so that the script never rots.

Owns: the command line, the functional checks (what passes or fails), the order of the sections,
and the ``results.json`` / ``results.md`` it writes. The timed workloads and profiles live in
``gpu_timings``, the callbacks and profile readers in ``gpu_observe``. Must not edit or wrap
trainwell: it observes through callbacks, hooks on the model, and torch's profiler only.

Run: ``PYTHONPATH=src:benchmarks python benchmarks/gpu_check.py OUT_DIR [--quick] [--dry-run]``
(run as a script, Python puts this folder on ``sys.path``, so ``PYTHONPATH=src`` alone works too).
Exit status: 0 when every check passed (or was skipped in a dry run), 1 when a check or a section
failed, 2 when there is no CUDA device and no ``--dry-run``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

import trainwell
from gpu_observe import (
    BATCHES_MARK,
    PHASES,
    TRAFFIC_NOTE,
    TRAFFIC_TITLES,
    EpochProfiler,
    Residency,
    Results,
    Settings,
    Setup,
    SyncGuard,
    count_traffic,
    say,
    syncs,
)
from gpu_timings import ENTRIES, HAND_OPTIMIZER, profile_phases, profile_transfers, time_entry
from run import git_commit
from workloads import LR, MOMENTUM, build_model, make_data, make_loader

SEED = 0
DEFAULT_RUNS, QUICK_RUNS, DRY_RUNS = 5, 3, 1
DEFAULT_BUDGET = 420.0  # seconds; past it, the remaining timings and the profile are skipped
COMPILE_TOLERANCE = 1e-3  # relative distance of compiled from eager weights
DRY_BANNER = (
    "> **DRY RUN on the CPU: these are not GPU numbers.** Every part of the script ran with tiny sizes; "
    "the checks that need CUDA were skipped (their CPU part ran)."
)


Status = Literal["passed", "failed", "skipped"]


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


class CheckError(Exception):
    """A check's claim does not hold; the message says what was seen."""


def require(condition: bool, message: str) -> None:
    """Raise ``CheckError(message)`` unless ``condition``."""
    if not condition:
        raise CheckError(message)


@dataclass(frozen=True)
class Verdict:
    """A check's result and its one-line detail."""

    status: Status
    detail: str


def fit_for_check(setup: Setup, model: nn.Module, data: Any, **options: Any) -> trainwell.History:
    """``trainwell.fit`` as the checks call it: SGD with momentum, accuracy, quiet, seeded; no
    per-step NaN check (so that the step itself is what is observed)."""
    keywords: dict[str, Any] = {
        "loss": "cross_entropy",
        "optimizer": "sgd",
        "lr": LR,
        "momentum": MOMENTUM,
        "batch_size": setup.check_batch,
        "metrics": ["accuracy"],
        "progress": False,
        "terminate_on_nan": False,
        "device": setup.device.type,
        "seed": SEED,
        "epochs": 2,
    }
    return trainwell.fit(model, data, **(keywords | options))


def check_data(setup: Setup, samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Workload (a)'s kind of data, on the CPU."""
    return make_data(samples or setup.check_samples, "mlp_small")


def learned(history: trainwell.History, model: nn.Module) -> str:
    """Require a finite, falling loss and finite weights; describe the loss."""
    losses = history["loss"]
    require(all(map(math.isfinite, losses)), f"non-finite loss {losses}")
    require(losses[-1] < losses[0], f"the loss did not fall: {losses}")
    require(all(bool(torch.isfinite(parameter).all()) for parameter in model.parameters()), "non-finite weights")
    return f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} epochs, weights finite"


def check_no_host_sync(setup: Setup) -> Verdict:
    """No synchronising CUDA call over whole epochs of in-memory training."""
    samples = setup.check_samples - setup.check_batch * 3 // 8  # a ragged last batch
    epochs, per_epoch, guarded = 2, math.ceil(samples / setup.check_batch), 0
    for accumulation in (1, 2):
        guard = SyncGuard(strict=setup.is_cuda)
        model = build_model("mlp_small")
        fit_for_check(setup, model, check_data(setup, samples), epochs=epochs, grad_accum_steps=accumulation,
                      callbacks=[guard], metrics=["accuracy", "f1_macro", "iou"])  # fmt: skip
        expected = epochs * per_epoch
        require(
            guard.guarded_epochs == epochs and guard.guarded_batches == expected,
            f"the guard held over {guard.guarded_batches} batches in {guard.guarded_epochs} epochs, not {expected}",
        )
        guarded += guard.guarded_batches
    what = (f"{guarded} batches (grad_accum_steps 1 and 2, {epochs} epochs each, a ragged last batch; metrics "
            "accuracy, f1_macro and iou)")  # fmt: skip
    if not setup.is_cuda:
        return Verdict(
            "skipped", f"dry run: the guard ran over {what} on the CPU; torch.cuda.set_sync_debug_mode needs CUDA"
        )
    return Verdict(
        "passed",
        f"no synchronising call under sync_debug_mode 'error' over {what}. Outside the guard: fit's set-up and "
        "pre-flight checks, each epoch's shuffled order (made on the host, copied once) and its first batch, "
        "and the one read of the epoch's loss/metric sums before on_epoch_end",
    )


def check_fp16(setup: Setup) -> Verdict:
    """``precision="fp16"`` trains with an enabled grad scaler."""
    model = build_model("mlp_small")
    if not setup.is_cuda:
        try:
            fit_for_check(setup, model, check_data(setup), precision="fp16")
        except trainwell.ConfigError:
            return Verdict(
                "skipped", "dry run: fp16 with a grad scaler needs CUDA (on the CPU fit refuses it: checked)"
            )
        raise CheckError("fit(precision='fp16') on the CPU was not refused")
    settings = Settings()
    history = fit_for_check(setup, model, check_data(setup), precision="fp16", epochs=3, callbacks=[settings])
    described = learned(history, model)
    require(settings.scaler_enabled, "the grad scaler was disabled")
    require(math.isfinite(settings.scale) and settings.scale > 0, f"the scaler's scale is {settings.scale}")
    return Verdict("passed", f"{described}; grad scaler enabled, scale {settings.scale:g}")


def check_bf16(setup: Setup) -> Verdict:
    """``precision="bf16"`` trains (autocast also works on the CPU)."""
    model = build_model("mlp_small")
    history = fit_for_check(setup, model, check_data(setup), precision="bf16", epochs=3)
    return Verdict("passed", f"{setup.device.type}: {learned(history, model)}")


def trained_weights(setup: Setup, compile: bool | str) -> torch.Tensor:
    """All weights of workload (a)'s model after one seeded epoch, as one vector."""
    model = build_model("mlp_small")
    history = fit_for_check(setup, model, check_data(setup), epochs=1, compile=compile)
    require(math.isfinite(history["loss"][0]), f"compile={compile!r}: loss {history['loss'][0]}")
    return torch.cat([parameter.detach().flatten().cpu() for parameter in model.parameters()])


def relative_distance(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||``."""
    return float(torch.linalg.vector_norm(value - reference) / torch.linalg.vector_norm(reference))


def compile_check(mode: bool | str) -> Callable[[Setup], Verdict]:
    """The check that ``fit(compile=mode)`` trains to the eager weights, within a loose tolerance."""

    def check(setup: Setup) -> Verdict:
        if mode is not True and not setup.is_cuda:
            return Verdict("skipped", f"dry run: compile={mode!r} captures CUDA graphs, which need CUDA")
        eager = trained_weights(setup, compile=False)
        compiled = trained_weights(setup, compile=mode)
        initial = torch.cat([parameter.detach().flatten() for parameter in build_model("mlp_small").parameters()])
        distance, moved = relative_distance(compiled, eager), relative_distance(eager, initial)
        steps = setup.check_samples // setup.check_batch
        require(distance <= COMPILE_TOLERANCE, f"compiled weights are {distance:.2e} from eager (moved {moved:.2e})")
        return Verdict(
            "passed",
            f"{setup.device.type}: after {steps} SGD steps the weights are {distance:.1e} (relative) from eager, "
            f"tolerance {COMPILE_TOLERANCE:g}, while training moved them {moved:.1e}: compiled kernels fuse ops and "
            "order float sums differently, so they agree to rounding, not bit for bit, and momentum carries it on",
        )

    return check


def check_resident(setup: Setup) -> Verdict:
    """In-memory tensors move to the device once; every batch is taken from that one copy."""
    inputs, targets = check_data(setup)
    shuffled, profiler = Residency(), EpochProfiler(setup, epoch=1)
    fit_for_check(setup, build_model("mlp_small"), (inputs, targets), callbacks=[shuffled, profiler])
    ordered = Residency()
    fit_for_check(setup, build_model("mlp_small"), (inputs, targets), epochs=1, shuffle=False, callbacks=[ordered])
    where = setup.device.type
    require(shuffled.batch_devices == {where}, f"batches on {sorted(shuffled.batch_devices)}, not {where}")
    require(shuffled.data_devices == {where}, f"the data the batches come from is on {sorted(shuffled.data_devices)}")
    require(len(shuffled.data_pointers) == 1, f"{len(shuffled.data_pointers)} device copies of the data over 2 epochs")
    require(ordered.views == ordered.batches, f"unshuffled: {ordered.views} of {ordered.batches} batches are views")
    require(inputs.device.type == "cpu", "the user's tensors were moved in place")
    traffic = count_traffic(profiler.events, BATCHES_MARK)
    summary = (
        f"one {where} copy of the data under all {shuffled.batches} batches of 2 epochs (the user's tensors stay on "
        f"the CPU); shuffled batches are gathered from it on the device (index_select, a copy), unshuffled ones "
        f"are views of it ({ordered.views} of {ordered.batches})"
    )
    if not setup.is_cuda:
        return Verdict("skipped", f"dry run: {summary}; residency on a GPU needs CUDA")
    require(traffic["memcpy_calls"] == 0, f"copies between an epoch's first and last batch: {traffic}")
    return Verdict("passed", f"{summary}; 0 cudaMemcpy* calls from an epoch's first batch to its last")


def check_loader(setup: Setup) -> Verdict:
    """A user's DataLoader of CPU tensors trains on the GPU through pinned, non-blocking copies."""
    inputs, targets = check_data(setup)
    seen, profiler = Residency(), EpochProfiler(setup, epoch=1)
    loader = make_loader(inputs, targets, setup.check_batch)
    history = fit_for_check(setup, build_model("mlp_small"), loader, callbacks=[seen, profiler])
    require(math.isfinite(history["loss"][-1]), f"loss {history['loss']}")
    require(seen.batch_devices == {setup.device.type}, f"batches on {sorted(seen.batch_devices)}")
    if not setup.is_cuda:
        return Verdict(
            "skipped", f"dry run: {seen.batches} DataLoader batches trained on the CPU; pinned memory needs CUDA"
        )
    # From the first batch's start to the last one's end, batches 2..N are fetched and copied.
    traffic, fetched = count_traffic(profiler.events, BATCHES_MARK), seen.batches // 2 - 1
    seen_traffic = f"(between an epoch's first and last batch: {traffic})"
    require(traffic["htod_pageable"] == 0, f"host-to-device copies from pageable memory {seen_traffic}")
    require(traffic["htod_pinned"] >= fetched, f"fewer pinned copies than the {fetched} batches fetched {seen_traffic}")
    require(syncs(traffic) == 0, f"synchronisations {seen_traffic}")
    pinned_by = (
        "the DataLoader trainwell rebuilt (pin_memory=True)"
        if seen.loader_pin_memory
        else "trainwell's to_device in the main process (Tensor.pin_memory(); the DataLoader trainwell rebuilt from "
        f"the user's, which has no workers, has pin_memory={seen.loader_pin_memory})"
    )
    return Verdict(
        "passed",
        f"batches on cuda; from an epoch's first batch to its last, {fetched} batches fetched with "
        f"{traffic['htod_pinned']} host-to-device copies, all from pinned memory (0 pageable), through "
        f"{traffic['memcpy_calls']} cudaMemcpy* calls and 0 synchronisations; pinned by {pinned_by}",
    )


CHECKS: dict[str, tuple[str, Callable[[Setup], Verdict]]] = {
    "no_host_sync": ("no host sync over whole epochs", check_no_host_sync),
    "fp16_grad_scaler": ("fp16 with the grad scaler trains", check_fp16),
    "bf16": ("bf16 trains", check_bf16),
    "compile_default": ("compile=True trains to the eager weights", compile_check(True)),
    "compile_reduce_overhead": (
        "compile='reduce-overhead' trains to the eager weights",
        compile_check("reduce-overhead"),
    ),
    "data_resident": ("in-memory data moved to the device once", check_resident),
    "dataloader_pinned": ("a user's DataLoader: pinned, non-blocking copies", check_loader),
}


def run_check(setup: Setup, name: str) -> dict[str, Any]:
    """Run one check; an exception is that check's failure, with its traceback kept."""
    title, check = CHECKS[name]
    say(f"check {name}")
    start = time.perf_counter()
    result: dict[str, Any] = {"name": name, "title": title}
    try:
        verdict = check(setup)
        result |= {"status": verdict.status, "detail": verdict.detail}
    except Exception as error:  # one failing check must not stop the others
        lines = str(error).strip().splitlines() or [""]
        result |= {"status": "failed", "detail": f"{type(error).__name__}: {lines[0][:400]}"}
        result["traceback"] = traceback.format_exc()
        say(result["traceback"])
    finally:
        if setup.is_cuda:
            torch.cuda.set_sync_debug_mode("default")
    return result | {"seconds": time.perf_counter() - start}


def trainwell_optimizer(setup: Setup) -> dict[str, Any]:
    """The optimizer trainwell builds for ``optimizer="sgd", momentum=...`` on this device."""
    settings = Settings()
    fit_for_check(setup, build_model("mlp_small"), check_data(setup, setup.check_batch), epochs=1, callbacks=[settings])
    return settings.optimizer


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def describe_machine(setup: Setup, argv: Sequence[str]) -> dict[str, Any]:
    """Card, versions, date and commit."""
    return {
        "card": torch.cuda.get_device_name()
        if setup.is_cuda
        else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "quick": setup.quick,
        "runs": setup.runs,
        "workloads": list(setup.keys),
        "argv": list(argv),
    }


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1e6 else f"{value:,.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]


def _timing_lines(results: Results) -> list[str]:
    keys = ("workload", "contender", "samples_per_second", "vs_hand", "median_seconds", "peak_mb", "extra_mb")
    rows = [[row[key] for key in keys] + [row["loss"], row["accuracy"]] for row in results.timings]
    for row in rows:
        row[2], row[4] = round(row[2]), row[4] * 1e3  # samples/s as a whole number; milliseconds
    header = ["workload", "contender", "samples/s", "x hand loop", "median ms", "peak MiB", "MiB over start", "loss",
              "accuracy"]  # fmt: skip
    optimizer = ", ".join(f"{key}={value}" for key, value in results.optimizer.items())
    hand = ", ".join(f"{key}={value}" for key, value in HAND_OPTIMIZER.items())
    notes = [
        "",
        f"One epoch, data on the device, median of {results.meta['runs']} runs after a warm-up epoch, contenders "
        "alternated run by run; 'x hand loop' is throughput relative to the hand loop (1.00: as fast).",
        f"Optimizers of workloads a-c: the hand loop's SGD(lr={LR}, momentum={MOMENTUM}, {hand}); trainwell's "
        f"optimizer='sgd' built {optimizer or 'n/a'}.",
    ]
    skipped = [f"Skipped: ({item['workload']}) {item['reason']}" for item in results.skipped]
    return ["## Timings", "", *table(header, rows), *notes, *skipped]


def _profile_lines(results: Results) -> list[str]:
    lines: list[str] = []
    phases = results.phases
    if phases is not None:
        device = phases.get("device_us_per_step") or {}
        shares = phases.get("device_share") or {}
        rows = [
            (name, phases["host_us_per_step"][name], phases["host_share"][name], device.get(name), shares.get(name))
            for name in PHASES
        ]
        lines += [f"## Where a step's time goes (workload {phases['workload']}, {phases['steps']} trainwell steps)", ""]
        lines += table(["phase", "host us/step", "host share", "device us/step", "device share"], rows)
        lines += ["", f"Method: {phases['method']}", ""]
    transfers = results.transfers
    if transfers is not None:
        rows = [
            (name, transfers["steps"], *counts.values(), transfers["syncs_per_step"][name])
            for name, counts in transfers["counts"].items()
        ]
        header = ["contender", "steps", *TRAFFIC_TITLES.values(), "syncs/step"]
        title = f"workload {transfers['workload']}, {transfers['samples']} samples"
        lines += [f"## Host-device traffic in one whole epoch ({title})", "", *table(header, rows), "", TRAFFIC_NOTE]
    return lines


def render_markdown(results: Results) -> str:
    """The results as markdown: a header, the checks, the timings, the profile."""
    meta = results.meta
    lines = ["# trainwell GPU check", ""]
    if results.dry_run:
        lines += [DRY_BANNER, ""]
    lines += [
        f"Card: {meta['card']} | torch {meta['torch']} | CUDA {meta['cuda']} | python {meta['python']} | "
        f"{meta['date']} | commit {meta['commit']} | quick: {meta['quick']}",
        "",
        "## Checks",
        "",
        *table(["check", "result", "detail"], ((c["title"], c["status"].upper(), c["detail"]) for c in results.checks)),
        "",
    ]
    if results.errors:
        lines += ["## Errors", "", *(f"- {error['section']}: {error['error']}" for error in results.errors), ""]
    lines += [*_timing_lines(results), "", *_profile_lines(results)]
    return "\n".join(lines).rstrip() + "\n"


def write_results(out_dir: Path, results: Results) -> str:
    """Write ``results.json`` and ``results.md``; return the markdown."""
    document = {"dry_run": results.dry_run} | asdict(results) | {"failed": results.failed}
    (out_dir / "results.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    markdown = render_markdown(results)
    (out_dir / "results.md").write_text(markdown)
    return markdown


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def no_cuda_message() -> str:
    """What is missing and what to do, when there is no CUDA device."""
    built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
    return (
        f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, {built}); run on a GPU "
        "machine, or pass --dry-run to exercise this script on the CPU"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("out_dir", type=Path, help="folder for results.json and results.md (created)")
    parser.add_argument("--quick", action="store_true", help="the workloads' quick sizes and 3 runs")
    parser.add_argument(
        "--dry-run", action="store_true", help="every part on the CPU with tiny sizes (not GPU numbers)"
    )
    parser.add_argument("--runs", type=int, default=None, help="timed runs per contender (default 5; 3 quick; 1 dry)")
    parser.add_argument("--workloads", default=",".join(entry.key for entry in ENTRIES), help="keys to time")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds before timings are skipped")
    args = parser.parse_args(argv)
    known = [entry.key for entry in ENTRIES]
    args.keys = tuple(key.strip() for key in args.workloads.split(",") if key.strip())
    if not args.keys or any(key not in known for key in args.keys):
        parser.error(f"--workloads {args.workloads!r}: choose from {', '.join(known)}")
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def build_setup(args: argparse.Namespace, started: float) -> Setup:
    """The run's settings from the command line."""
    runs = args.runs or (DRY_RUNS if args.dry_run else QUICK_RUNS if args.quick else DEFAULT_RUNS)
    device = torch.device("cpu" if args.dry_run else "cuda")
    return Setup(device, args.dry_run, args.quick, runs, args.keys, started + args.budget)


def guarded(results: Results, section: str, work: Callable[[], Any]) -> Any:
    """Run one section; an exception is recorded as that section's error (the run goes on)."""
    try:
        return work()
    except Exception as error:  # the other sections still run, and the results are written
        say(traceback.format_exc())
        results.errors.append({"section": section, "error": f"{type(error).__name__}: {error}"[:500]})
        return None


def run_timings(setup: Setup, results: Results, write: Callable[[], str]) -> None:
    """Time each selected entry, within the budget."""
    results.optimizer = guarded(results, "optimizer", lambda: trainwell_optimizer(setup)) or {}
    for entry in (entry for entry in ENTRIES if entry.key in setup.keys):
        if setup.out_of_time():
            results.skipped.append({"workload": entry.key, "reason": "the time budget (--budget) was spent"})
            continue
        guarded(results, f"timing {entry.key}", functools.partial(time_entry, setup, entry, results))
        write()


def run_profiles(setup: Setup, results: Results) -> None:
    """Profile the steps and count the traffic of one workload ((a) when it is selected)."""
    entry = next((entry for entry in ENTRIES if entry.key == "a" and "a" in setup.keys), None)
    entry = entry or next(entry for entry in ENTRIES if entry.key in setup.keys)
    if setup.out_of_time():
        results.skipped.append({"workload": entry.key, "reason": "profile: the time budget (--budget) was spent"})
        return
    say(f"profiling ({entry.key})")
    results.phases = guarded(results, "phase profile", lambda: profile_phases(setup, entry))
    results.transfers = guarded(results, "traffic profile", lambda: profile_transfers(setup, entry))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the checks, the timings and the profiles; write and print the results."""
    started = time.monotonic()
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        sys.stderr.write(no_cuda_message() + "\n")
        return 2
    setup = build_setup(args, started)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = Results(describe_machine(setup, sys.argv if argv is None else argv), setup.dry_run)

    def write() -> str:
        return write_results(args.out_dir, results)

    for name in CHECKS:
        results.checks.append(run_check(setup, name))
        write()
    run_timings(setup, results, write)
    run_profiles(setup, results)
    markdown = write()
    say(f"done in {time.monotonic() - started:.0f} s; results in {args.out_dir}")
    sys.stdout.write(markdown)
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())
