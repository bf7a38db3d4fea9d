"""benchmarks/gpu_check.py, the GPU proof kit: its dry run exercises every part on the CPU and writes
complete results; without a GPU (and without --dry-run) it refuses with exit status 2; and its
profile readers, which only a GPU feeds for real, count what they should on synthetic events."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
from torch.autograd import DeviceType

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
CHECKS = {
    "no_host_sync",
    "fp16_grad_scaler",
    "bf16",
    "compile_default",
    "compile_reduce_overhead",
    "data_resident",
    "dataloader_pinned",
}
SKIPPED_IN_DRY_RUN = {
    "no_host_sync",
    "fp16_grad_scaler",
    "compile_reduce_overhead",
    "data_resident",
    "dataloader_pinned",
}


def run_kit(*arguments: str) -> subprocess.CompletedProcess[str]:
    """The script as the GPU machine runs it, with only src on PYTHONPATH (its own folder comes
    first on sys.path because it runs as a script)."""
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": path}, check=False)  # fmt: skip


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.slow
def test_the_dry_run_writes_every_check_and_timing_and_prints_the_tables_last(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_kit("--dry-run", str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    document = json.loads((out / "results.json").read_text())
    assert document["dry_run"] is True
    assert document["failed"] is False and document["errors"] == [] and document["skipped"] == []

    statuses = {check["name"]: check["status"] for check in document["checks"]}
    assert set(statuses) == CHECKS
    assert {name for name, status in statuses.items() if status == "skipped"} == SKIPPED_IN_DRY_RUN
    assert all(status == "passed" for name, status in statuses.items() if name not in SKIPPED_IN_DRY_RUN)
    assert all(check["detail"] for check in document["checks"])

    rows = document["timings"]
    assert {(row["workload"], row["contender"]) for row in rows} == {
        *((key, contender) for key in document["meta"]["workloads"] for contender in ("hand loop", "trainwell")),
        ("a", "trainwell compile=reduce-overhead"),
    }
    for row in rows:
        assert all(finite(row[key]) for key in ("samples_per_second", "median_seconds", "vs_hand", "loss")), row
        assert row["peak_mb"] is None  # device memory: GPU only
    assert all(row["vs_hand"] == 1.0 for row in rows if row["contender"] == "hand loop")

    phases = document["phases"]
    assert phases["steps"] >= 1 and all(finite(value) for value in phases["host_us_per_step"].values())
    assert math.isclose(sum(phases["host_share"].values()), 1.0)
    counts = document["transfers"]["counts"]
    assert set(counts) == {"trainwell", "hand loop"} and all(finite(value) for value in counts["trainwell"].values())

    markdown = (out / "results.md").read_text()
    assert "DRY RUN on the CPU: these are not GPU numbers" in markdown
    assert "| check | result | detail |" in markdown and "| workload | contender |" in markdown
    assert result.stdout.rstrip().endswith(markdown.rstrip())


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so the kit would run for real")
def test_without_cuda_it_exits_2_and_says_what_to_do(tmp_path: Path) -> None:
    result = run_kit(str(tmp_path / "out"))
    assert result.returncode == 2
    assert "no CUDA device: torch.cuda.is_available() is False" in result.stderr
    assert f"torch {torch.__version__}" in result.stderr
    assert "run on a GPU machine, or pass --dry-run" in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()


@pytest.fixture
def kit(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("gpu_observe")


Kernel = namedtuple("Kernel", ["name", "device", "duration"])


def event(name: str, start: float, end: float, kernels: tuple[tuple[str, float], ...] = (), cpu: bool = True) -> Any:
    """A stand-in for the profiler's FunctionEvent: what the readers use of it."""
    return SimpleNamespace(
        name=name,
        device_type=DeviceType.CPU if cpu else DeviceType.CUDA,
        time_range=SimpleNamespace(start=start, end=end),
        kernels=[Kernel(kernel, 0, duration) for kernel, duration in kernels],
    )


def test_traffic_counts_runtime_calls_and_the_copies_that_ops_launched_inside_the_mark(kit: ModuleType) -> None:
    events = [
        event("gpu_check.batches", 10, 100),
        event("gpu_check.batches", 10, 100, cpu=False),  # the profiler's device-side copy of a mark
        event("aten::copy_", 20, 25, (("Memcpy HtoD (Pinned -> Device)", 3.0),)),
        event("cudaMemcpyAsync", 21, 22),
        event("aten::copy_", 30, 35, (("Memcpy HtoD (Pageable -> Device)", 3.0),)),
        event("cudaMemcpyAsync", 31, 32),
        event("cudaStreamSynchronize", 33, 34),
        event("Memcpy HtoD (Pageable -> Device)", 40, 41, cpu=False),  # counted through its op only
        event("aten::_local_scalar_dense", 90, 95, (("Memcpy DtoH (Device -> Pageable)", 1.0),)),
        event("cudaDeviceSynchronize", 150, 160),  # after the mark: the profiler's own
    ]
    counts = kit.count_traffic(events, "gpu_check.batches")
    assert counts == {
        "stream_syncs": 1,
        "device_syncs": 0,
        "event_syncs": 0,
        "memcpy_calls": 2,
        "htod_pinned": 1,
        "htod_pageable": 1,
        "dtoh": 1,
    }
    assert kit.syncs(counts) == 1
    with pytest.raises(RuntimeError, match=r"no 'gpu_check\.epoch' range"):
        kit.count_traffic(events, "gpu_check.epoch")


def test_phases_split_each_marked_step_and_charge_device_time_to_the_launching_op(kit: ModuleType) -> None:
    events = []
    for offset in (0, 200):
        events += [
            event("gpu_check.step", offset, offset + 100),
            event("gpu_check.forward", offset + 5, offset + 20),
            event("aten::addmm", offset + 10, offset + 12, (("gemm", 7.0),)),
            event("autograd::engine::evaluate_function: AddmmBackward0", offset + 30, offset + 50),
            event("aten::mm", offset + 35, offset + 40, (("gemm", 5.0),)),
            event("autograd::engine::evaluate_function: torch::autograd::AccumulateGrad", offset + 45, offset + 60),
            event("Optimizer.step#SGD.step", offset + 70, offset + 80),
            event("aten::_fused_sgd_", offset + 72, offset + 75, (("fused_sgd", 2.0),)),
            event("aten::sum", offset + 90, offset + 91, (("reduce", 1.0),)),
        ]
    events.append(event("aten::index_select", 150, 151, (("gather", 9.0),)))  # between steps: no phase
    report = kit.phase_report(events, with_device=True)
    assert report["steps"] == 2
    assert report["host_us_per_step"] == {"forward": 15, "backward": 30, "optimizer": 10, "other": 45}
    assert report["device_us_per_step"] == {"forward": 7, "backward": 5, "optimizer": 2, "other": 1}
    assert math.isclose(report["device_share"]["forward"], 7 / 15)
    assert "device_us_per_step" not in kit.phase_report(events, with_device=False)
