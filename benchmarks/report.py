"""Turning raw worker results into the report: medians, paired ratios, tables, JSON and the docs.

Owns: the summary statistics, the text and Markdown tables, the machine description, the JSON
file and the dated section appended to ``docs/benchmarks.md``. Must not run measurements.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from load import DISTURBED

SLOW_RATIO = 0.97
REFERENCE = "best_hand"
BASELINE = "tutorial"

DOCS_INTRO = """# Benchmarks

`benchmarks/run.py` measures what trainwell costs compared with writing the training loop by hand.
Run it with `.venv/bin/python benchmarks/run.py` (or `make bench`); `--quick` is a smoke run,
`--rounds N` (default 5), `--workloads a,b,...`, `--out DIR` for the raw JSON (default
`benchmarks/results/`, not committed) and `--no-docs` to leave this file alone.

## Method

- Workloads: (a) MLP 784-64-10 on 60,000 synthetic MNIST-shaped samples (each a noisy copy of
  one of ten fixed random templates, labelled by its template), batch 128, SGD lr 0.01 momentum
  0.9, one epoch, cross-entropy, with training accuracy; (b) MLP 784-1024-1024-10, same data;
  (c) a small CNN (conv32-conv64-pool-fc128) on 1x28x28 inputs, batch 64, on 10,000 samples only
  (it is slow on a small CPU); (d) as (a), but the data is a user's `DataLoader(custom Dataset,
  batch_size=128, shuffle=True)` that every contender iterates; (e) `evaluate` and `predict`
  over 60,000 samples with the (a) model; (f) the (c) CNN on 6,000 samples read through a user's
  `DataLoader(custom Dataset with a random flip, batch_size=64, shuffle=True, num_workers=2,
  persistent_workers=True)`, every contender given the loader with its workers already started.
- Contenders: `tutorial` (DataLoader over a TensorDataset, `.item()` on the loss and the correct
  count every step), `best_hand` (in-memory tensors, `randperm` + `index_select`, sums kept on the
  device, one host sync per epoch, `zero_grad(set_to_none=True)`), `trainwell` (`fit(...,
  metrics=["accuracy"], progress=True)`, the live display drawn on a pseudo-terminal that a thread
  reads like a terminal would) and `trainwell_quiet` (`progress=False`). For (e): the tutorial's
  test loop (batch 256, `no_grad`, `.item()` per batch), a hand-written `inference_mode` loop with
  batches of 1024, trainwell's `evaluate`/`predict` with batch 1024 (`trainwell`) and with its
  default batch size (`trainwell_default`). Lightning, Keras 3 (torch backend) and Poutyne join
  (a)-(c) when importable, set up as their documentation shows to display loss and accuracy.
- Every measurement runs in a fresh process: the data and model are built, the contender runs a
  few warm-up batches on the same model, then one timed epoch (for (e): five timed passes, the
  median kept). Contenders alternate within each round, in a rotated order every round.
  `torch.set_num_threads` is left at its default. Workers run copies of trainwell's source and
  of the benchmark taken when the run starts, so edits made meanwhile do not mix versions.
- Other processes: on a shared machine a neighbour that takes one core can slow a two-thread
  torch process many times over. Each measurement starts once the machine has been quiet for
  half a second (waiting 20 s at most), and records the CPU time other processes used during its
  timed region. A measurement where that was over 10% of the machine is run again once
  (`--retries`); the `disturbed` column counts the runs that stayed disturbed.
- Reported per workload and contender: the median samples/s over rounds (and the range), the
  ratio to `best_hand` and to `tutorial` (the median of per-round ratios, paired within a round,
  so slow phases of a shared machine cancel out; above 1 is faster), the final training accuracy
  as a check that every contender learns the same (for (e): `evaluate`'s, of the untrained
  model), the worker's peak RSS (`ru_maxrss`, the data and torch included), and `timed +MB`:
  how far the RSS peaked above its level at the start of the timed region (the median over rounds).
  Absolute speeds depend on the machine and its load: compare ratios, not samples/s, across runs.
- Import cost: `import torch` against `import torch; import trainwell`, each timed inside fresh
  processes, alternating.
- To see where trainwell spends its time: `.venv/bin/python benchmarks/run.py --worker trainwell a
  --profile 25` prints the timed epoch's cProfile, sorted by own time.

Each run appends a dated section below.
"""


@dataclass
class Row:
    """One line of the table: a contender on a workload (and phase, for evaluate/predict)."""

    workload: str
    phase: str
    contender: str
    median: float
    low: float
    high: float
    versus_reference: float
    versus_baseline: float
    accuracy: float
    peak_rss_mb: float
    timed_extra_mb: float
    runs: str
    disturbed: int

    @property
    def label(self) -> str:
        return self.workload if self.phase == "fit" else f"{self.workload} {self.phase}"


def _rate(measurement: dict[str, Any], phase: str) -> float | None:
    if not measurement.get("ok"):
        return None
    return float(measurement["phases"][phase]["samples_per_second"])


def _paired_ratio(
    measurements: Sequence[dict[str, Any]], workload: str, phase: str, contender: str, other: str
) -> float:
    """The median over rounds of contender's speed / other's speed in the same round."""
    by_round: dict[tuple[int, str], float] = {}
    for measurement in measurements:
        rate = _rate(measurement, phase) if measurement["workload"] == workload else None
        if rate is not None:
            by_round[(measurement["round"], measurement["contender"])] = rate
    ratios = [
        by_round[(round_index, contender)] / by_round[(round_index, other)]
        for round_index, name in by_round
        if name == contender and (round_index, other) in by_round
    ]
    return statistics.median(ratios) if ratios else float("nan")


def _row(measurements: Sequence[dict[str, Any]], workload: str, phase: str, contender: str) -> Row:
    mine = [m for m in measurements if m["workload"] == workload and m["contender"] == contender]
    done = [m for m in mine if m.get("ok")]
    rates = [float(m["phases"][phase]["samples_per_second"]) for m in done]
    nan = float("nan")
    return Row(
        workload=workload,
        phase=phase,
        contender=contender,
        median=statistics.median(rates) if rates else nan,
        low=min(rates, default=nan),
        high=max(rates, default=nan),
        versus_reference=_paired_ratio(measurements, workload, phase, contender, REFERENCE),
        versus_baseline=_paired_ratio(measurements, workload, phase, contender, BASELINE),
        accuracy=statistics.median(float(m["phases"][phase]["accuracy"]) for m in done) if done else nan,
        peak_rss_mb=max((float(m["peak_rss_mb"]) for m in done), default=nan),
        timed_extra_mb=statistics.median(float(m["phases"][phase]["timed_extra_mb"]) for m in done) if done else nan,
        runs=f"{len(done)}/{len(mine)}",
        disturbed=sum(float(m["phases"][phase]["foreign_load"]) > DISTURBED for m in done),
    )


def summarize(
    measurements: Sequence[dict[str, Any]], plan: dict[str, list[str]], phases: dict[str, list[str]]
) -> list[Row]:
    """One Row per workload, phase and contender, in plan order."""
    return [
        _row(measurements, workload, phase, contender)
        for workload, contenders in plan.items()
        for phase in phases[workload]
        for contender in contenders
    ]


def _number(value: float, digits: int = 0, suffix: str = "") -> str:
    return "-" if value != value else f"{value:,.{digits}f}{suffix}"  # NaN is not equal to itself


def _cells(row: Row) -> list[str]:
    accuracy = "-" if row.accuracy != row.accuracy else f"{row.accuracy * 100:.2f}%"
    return [
        row.label,
        row.contender,
        _number(row.median),
        f"{_number(row.low)}-{_number(row.high)}",
        _number(row.versus_reference, 3),
        _number(row.versus_baseline, 2),
        accuracy,
        _number(row.peak_rss_mb),
        _number(row.timed_extra_mb, 1),
        row.runs,
        str(row.disturbed),
    ]


HEADERS = [
    "workload",
    "contender",
    "samples/s",
    "range",
    "x best_hand",
    "x tutorial",
    "accuracy",
    "peak RSS MB",
    "timed +MB",
    "runs",
    "disturbed",
]


def text_table(rows: Sequence[Row]) -> str:
    """The table aligned for a terminal, with a blank line between workloads."""
    cells = [_cells(row) for row in rows]
    widths = [max(len(line[column]) for line in [HEADERS, *cells]) for column in range(len(HEADERS))]
    lines = ["  ".join(header.ljust(width) for header, width in zip(HEADERS, widths, strict=True))]
    previous = None
    for row, line in zip(rows, cells, strict=True):
        if previous is not None and row.label != previous:
            lines.append("")
        previous = row.label
        left, numbers = line[:2], line[2:]
        aligned = [cell.ljust(width) for cell, width in zip(left, widths, strict=False)]
        aligned += [cell.rjust(width) for cell, width in zip(numbers, widths[2:], strict=True)]
        lines.append("  ".join(aligned).rstrip())
    return "\n".join(lines)


def markdown_table(rows: Sequence[Row]) -> str:
    """The table in Markdown."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(HEADERS) - 2)) + "|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def notes(rows: Sequence[Row], measurements: Sequence[dict[str, Any]]) -> list[str]:
    """Findings worth a sentence: the display's cost, and trainwell rows slower than SLOW_RATIO."""
    found = []
    for row in rows:
        if row.contender == "trainwell" and any(
            o.contender == "trainwell_quiet" and o.label == row.label for o in rows
        ):
            ratio = _paired_ratio(measurements, row.workload, row.phase, "trainwell", "trainwell_quiet")
            found.append(f"({row.label}) the live display: trainwell runs at {_number(ratio, 3)}x trainwell_quiet")
    for row in rows:
        if row.contender in ("trainwell", "trainwell_quiet") and row.versus_reference < SLOW_RATIO:
            found.append(
                f"({row.label}) SLOW: {row.contender} runs at {row.versus_reference:.3f}x best_hand (< {SLOW_RATIO})"
            )
    return found


def paired_line(result: dict[str, Any]) -> str:
    """The summary of a ``paired`` worker result: trainwell against the hand loop, with and without
    its display, and the display's own cost."""

    def span(name: str) -> str:
        values = sorted(result["speed_ratios"][name])
        return f"{result['median_' + name]:.3f}x ({values[0]:.3f}-{values[-1]:.3f})"

    extras = {"counting_vs_quiet": "; with f1_macro: ", "notebook_vs_quiet": "; the notebook display: "}
    more = "".join(label + span(name) for name, label in extras.items() if name in result["speed_ratios"])
    if "notebook_display_share" in result:
        shares = sorted(result["notebook_display_share"])
        more += (f", its hooks {result['median_notebook_display_share']:.3%} of the epoch "
                 f"({shares[0]:.3%}-{shares[-1]:.3%})")  # fmt: skip
    return (
        f"trainwell_quiet {span('quiet_vs_hand')} best_hand, trainwell {span('display_vs_hand')}; the display: "
        f"{span('display_vs_quiet')} trainwell_quiet{more} (median of {result['pairs']} rounds, range)"
    )


def is_disturbed(measurement: dict[str, Any]) -> bool:
    """Whether other processes used more than DISTURBED of the machine during any timed phase."""
    return any(float(phase["foreign_load"]) > DISTURBED for phase in measurement.get("phases", {}).values())


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """Architecture (``uname -m``), CPU model, core count and the cores this process may use."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"machine": platform.machine(), "cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable}


def write_json(directory: Path, stamp: str, payload: dict[str, Any]) -> Path:
    """Write every raw number to ``directory/bench-<stamp>.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"bench-{stamp}.json"
    payload = {**payload, "rows": [asdict(row) | {"label": row.label} for row in payload.get("rows", [])]}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def append_docs(path: Path, section: str) -> None:
    """Append ``section`` to the docs page, creating it with the method's description first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text() if path.exists() else DOCS_INTRO
    path.write_text(existing.rstrip("\n") + "\n\n" + section.strip("\n") + "\n")
