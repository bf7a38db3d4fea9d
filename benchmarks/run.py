"""Benchmark trainwell against hand-written PyTorch loops: ``.venv/bin/python benchmarks/run.py``.

Owns: the command line, the schedule (every measurement in a fresh worker process, contenders in
a rotated order each round), the import-time measurement, and putting the report together (stdout
table, JSON in ``benchmarks/results/``, a dated section in ``docs/benchmarks.md``). What is timed
lives in ``worker``, the contenders in ``contenders`` and ``frameworks``, the data and models in
``workloads``, the statistics and formatting in ``report``.

Options: ``--rounds N`` (default 5; 2 with ``--quick``), ``--quick`` (fewer samples: a smoke run),
``--workloads a,b,...``, ``--out DIR``, ``--no-docs``. ``--worker CONTENDER WORKLOAD`` runs a
single measurement in this process (``--profile 25`` adds its cProfile, sorted by own time).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import report
from frameworks import framework_status
from load import wait_for_quiet
from tasks import RESULT_PREFIX
from workloads import WORKLOADS, Workload

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
DOCS = ROOT / "docs" / "benchmarks.md"
SCRIPT_VARIABLE = "TRAINWELL_BENCH_SCRIPT"  # the worker script of this run's snapshot
CORE_CONTENDERS = ["tutorial", "best_hand", "trainwell", "trainwell_quiet"]
SCORING_CONTENDERS = ["tutorial", "best_hand", "trainwell", "trainwell_default"]
TEXT_SCORING_CONTENDERS = ["best_hand", "trainwell"]  # (i): the batches are the user's DataLoader's
WORKER_TIMEOUT = 3600
IMPORT_REPEATS, QUICK_IMPORT_REPEATS = 7, 3
IMPORT_TORCH = "import time\nstart = time.perf_counter()\nimport torch\nprint(time.perf_counter() - start)"
IMPORT_BOTH = (
    "import time\nstart = time.perf_counter()\nimport torch\nmiddle = time.perf_counter()\n"
    "import trainwell\nprint(middle - start, time.perf_counter() - start)"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of every contender (default 5; 2 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples and rounds: a smoke run")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated keys (default: all)")
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "results", help="folder for the raw JSON")
    parser.add_argument("--retries", type=int, default=1, help="re-runs of a measurement other processes disturbed")
    parser.add_argument("--no-docs", action="store_true", help="do not append the results to docs/benchmarks.md")
    parser.add_argument("--worker", nargs=2, metavar=("CONTENDER", "WORKLOAD"), help="run one measurement here")
    parser.add_argument("--samples", type=int, default=None, help="with --worker: samples (default: the workload's)")
    parser.add_argument("--profile", type=int, default=0, metavar="LINES", help="with --worker: print cProfile lines")
    args = parser.parse_args(argv)
    keys = [key.strip() for key in args.workloads.split(",") if key.strip()]
    unknown = [key for key in keys if key not in WORKLOADS]
    if unknown or not keys:
        parser.error(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.retries < 0:
        parser.error("--retries must be at least 0")
    if not args.worker and (args.samples is not None or args.profile):
        parser.error("--samples and --profile go with --worker")
    args.workload_keys = keys
    return args


# The frameworks that take each kind of workload as a user would write it: Keras builds its own
# model from numpy arrays (in-memory data only); Poutyne takes a DataLoader but not dict batches or
# a loss over padded tokens; Hugging Face's Trainer trains Hugging Face models.
FRAMEWORKS_BY_KIND = {
    "train": ["lightning", "keras", "poutyne"],
    "loader": ["lightning", "poutyne"],
    "workers": ["lightning", "poutyne"],
    "text": ["lightning", "hf_trainer"],
}


def contenders_for(workload: Workload, skipped: dict[str, str | None]) -> list[str]:
    """The contenders of ``workload``: the hand-written loops, trainwell, and the frameworks that
    take its data and model as they are."""
    if workload.kind == "inference":
        return SCORING_CONTENDERS
    if workload.kind == "text_inference":
        return TEXT_SCORING_CONTENDERS
    frameworks = [name for name in FRAMEWORKS_BY_KIND[workload.kind] if skipped.get(name) is None]
    if workload.architecture != "bert_tiny":
        frameworks = [name for name in frameworks if name != "hf_trainer"]
    return CORE_CONTENDERS + frameworks


def rotated(names: list[str], round_index: int) -> list[str]:
    """``names`` starting at position ``round_index`` (so each contender takes each slot in turn)."""
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def run_in_worker(contender: str, workload: str, samples: int, env: dict[str, str]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter (the snapshot's ``run.py``, named by ``env``);
    a failure is recorded, not raised."""
    script = env.get(SCRIPT_VARIABLE, str(BENCHMARKS / "run.py"))
    command = [sys.executable, script, "--worker", contender, workload, "--samples", str(samples)]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=WORKER_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {WORKER_TIMEOUT}s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        return {"ok": False, "error": f"exit code {done.returncode}: {tail}"}
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX) :])
    return result | {"ok": True}


def _import_seconds(code: str, env: dict[str, str]) -> list[float]:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        raise RuntimeError(f"{code!r} failed: {done.stderr.strip().splitlines()[-1:]}")
    return [float(value) for value in done.stdout.split()]


def measure_imports(repeats: int, env: dict[str, str]) -> dict[str, Any]:
    """Median ``import torch`` and ``import torch; import trainwell`` times in fresh processes, alternating."""
    torch_alone: list[float] = []
    both: list[float] = []
    increments: list[float] = []
    for repeat in range(repeats):
        for kind in rotated(["torch", "both"], repeat):
            if kind == "torch":
                torch_alone += _import_seconds(IMPORT_TORCH, env)
            else:
                torch_part, total = _import_seconds(IMPORT_BOTH, env)
                both.append(total)
                increments.append(total - torch_part)
    return {
        "repeats": repeats,
        "import_torch_s": torch_alone,
        "import_torch_trainwell_s": both,
        "trainwell_after_torch_s": increments,
        "median_torch_s": statistics.median(torch_alone),
        "median_torch_trainwell_s": statistics.median(both),
        "median_difference_s": statistics.median(both) - statistics.median(torch_alone),
        "median_trainwell_after_torch_s": statistics.median(increments),
    }


def import_line(imports: dict[str, Any]) -> str:
    return (
        f"import torch {imports['median_torch_s'] * 1000:.0f} ms; "
        f"import torch + trainwell {imports['median_torch_trainwell_s'] * 1000:.0f} ms; "
        f"difference {imports['median_difference_s'] * 1000:+.0f} ms "
        f"(trainwell after torch in the same process: {imports['median_trainwell_after_torch_s'] * 1000:.0f} ms; "
        f"median of {imports['repeats']} fresh processes each)"
    )


def _digest(package: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def trainwell_source() -> Path:
    """The folder of the trainwell package that ``import trainwell`` would load (not imported here)."""
    spec = importlib.util.find_spec("trainwell")
    if spec is None or spec.origin is None:
        raise SystemExit("trainwell is not installed in this environment: run `make test` or `pip install -e .`.")
    return Path(spec.origin).parent


def snapshot(folder: Path) -> dict[str, str]:
    """Copy trainwell's source and this benchmark's modules into ``folder``; return the environment
    that makes every worker run those copies, so edits made while the benchmark runs (to src/ or
    benchmarks/) do not mix versions."""
    shutil.copytree(trainwell_source(), folder / "trainwell", ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "benchmarks").mkdir()
    for module in BENCHMARKS.glob("*.py"):
        shutil.copy2(module, folder / "benchmarks" / module.name)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")]))
    env[SCRIPT_VARIABLE] = str(folder / "benchmarks" / "run.py")
    check = subprocess.run([sys.executable, "-c", "import trainwell"], capture_output=True, text=True, env=env)
    if check.returncode != 0:
        last = check.stderr.strip().splitlines()[-1:]
        raise SystemExit(f"trainwell's source does not import right now (being edited?): {last}")
    return env


def git_commit() -> str:
    """The commit checked out, with ``+changes`` when src/ has uncommitted edits (read-only git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        status = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True, cwd=ROOT)
    except OSError:
        return "unknown"
    return (head.stdout.strip() or "unknown") + ("+changes" if status.stdout.strip() else "")


def legend(plan: dict[str, list[str]], samples: dict[str, int]) -> list[str]:
    lines = []
    for key in plan:
        workload = WORKLOADS[key]
        size = {
            "inference": "batch 1024 (hand loop)",
            "text_inference": f"the user's DataLoader, batch {workload.batch_size}",
        }.get(workload.kind, f"batch {workload.batch_size}, 1 epoch")
        lines.append(f"({key}) {workload.title}: {samples[key]:,} samples, {size}")
    return lines


def docs_section(context: dict[str, Any], rows: list[report.Row], findings: list[str]) -> str:
    """The dated Markdown section: the setup, the table, then the findings."""
    info = context["machine"]
    setup = [
        f"- Machine: `{info['machine']}`, {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable)",
        f"- torch {context['torch_version']} ({context['torch_threads']} threads), trainwell {context['trainwell']} "
        f"at commit {context['commit']} (source digest {context['source_digest']})",
        f"- Command: `{context['command']}`: {context['rounds']} rounds; disturbed runs re-run up to "
        f"{context['retries']} time(s)",
        *(f"- {line}" for line in context["legend"]),
        f"- Import: {import_line(context['imports'])}",
        *(f"- Skipped {name}: {reason}" for name, reason in context["skipped"].items() if reason),
    ]
    parts = [f"## {context['date']}", "\n".join(setup), report.markdown_table(rows)]
    if findings:
        parts.append("Findings:\n\n" + "\n".join(f"- {finding}" for finding in findings))
    return "\n\n".join(parts) + "\n"


def measure(contender: str, workload: str, samples: int, env: dict[str, str], retries: int) -> dict[str, Any]:
    """One measurement, started once the machine looks quiet (or after ``wait_for_quiet``'s
    timeout), repeated up to ``retries`` times while other processes disturbed it; the earlier
    attempts are kept in ``earlier_attempts``."""
    attempts: list[dict[str, Any]] = []
    while True:
        waited = wait_for_quiet()
        result = run_in_worker(contender, workload, samples, env) | {"waited_for_quiet_s": waited}
        if not result["ok"] or not report.is_disturbed(result) or len(attempts) >= retries:
            return result | {"earlier_attempts": attempts}
        attempts.append(result)


def run_rounds(plan: dict[str, list[str]], samples: dict[str, int], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every contender of every workload once per round, in a rotated order each round."""
    measurements = []
    for round_index in range(args.rounds):
        for key, contenders in plan.items():
            for contender in rotated(contenders, round_index):
                started = time.perf_counter()
                result = measure(contender, key, samples[key], args.env, args.retries)
                result |= {"round": round_index, "contender": contender, "workload": key}
                measurements.append(result)
                line = f"  round {round_index + 1}/{args.rounds}  ({key}) {contender:<17} {_progress(result, started)}"
                print(line, flush=True)
    return measurements


def measure_paired(plan: dict[str, list[str]], samples: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    """trainwell against the hand loop in pairs inside one worker per training workload (less
    noise than the rounds of fresh processes)."""
    results = {}
    for key in plan:
        if "inference" in WORKLOADS[key].kind:
            continue
        wait_for_quiet()
        result = run_in_worker("paired:2" if args.quick else "paired", key, samples[key], args.env)
        results[key] = result
        print(f"  ({key}) paired: {report.paired_line(result) if result['ok'] else result['error']}", flush=True)
    return results


def _progress(result: dict[str, Any], started: float) -> str:
    retried = f", {len(result['earlier_attempts'])} disturbed attempt(s) re-run" if result["earlier_attempts"] else ""
    wall = f"[{time.perf_counter() - started:.0f}s wall{retried}]"
    if not result["ok"]:
        return f"FAILED {wall}\n{result['error']}"
    speeds = ", ".join(
        f"{phase} {row['samples_per_second']:,.0f}/s (others' load {row['foreign_load']:.0%})"
        for phase, row in result["phases"].items()
    )
    return f"{speeds}  {wall}"


def describe_run(args: argparse.Namespace, plan: dict[str, list[str]], samples: dict[str, int]) -> dict[str, Any]:
    """Everything the report says about this run besides the measurements."""
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": report.machine(),
        "command": " ".join([".venv/bin/python benchmarks/run.py", *args.argv]),
        "rounds": args.rounds,
        "retries": args.retries,
        "quick": args.quick,
        "plan": plan,
        "samples": samples,
        "legend": legend(plan, samples),
        "commit": git_commit(),
        "trainwell": importlib.metadata.version("trainwell"),
    }


def publish(args: argparse.Namespace, context: dict[str, Any], measurements: list[dict[str, Any]]) -> None:
    """Print the table and findings, write the JSON, append to the docs."""
    plan = context["plan"]
    phases = {key: ["evaluate", "predict"] if "inference" in WORKLOADS[key].kind else ["fit"] for key in plan}
    done = [m for m in measurements if m["ok"]]
    context["torch_version"] = done[0]["torch_version"] if done else "unknown"
    context["torch_threads"] = done[0]["torch_threads"] if done else "unknown"
    rows = report.summarize(measurements, plan, phases)
    findings = report.notes(rows, measurements)
    paired = [
        f"({key}) paired in one process: {report.paired_line(result)}"
        for key, result in context.get("paired", {}).items()
        if result["ok"]
    ]
    findings[:0] = paired
    if context["source_digest"] != _digest(trainwell_source()):
        findings.append("trainwell's source changed while this ran; every worker used the copy taken at the start.")
    print("\n" + report.text_table(rows) + "\n")
    print("\n".join(findings))
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = report.write_json(args.out, stamp, context | {"measurements": measurements, "rows": rows, "notes": findings})
    print(f"\nRaw numbers: {path}")
    if not args.no_docs:
        report.append_docs(DOCS, docs_section(context, rows, findings))
        print(f"Appended to {DOCS}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        from worker import worker_main  # imports trainwell: only in the worker process

        return worker_main(args.worker[0], args.worker[1], args.samples, args.profile)
    args.argv = argv if argv is not None else sys.argv[1:]
    args.rounds = args.rounds or (2 if args.quick else 5)
    skipped = framework_status()
    plan = {key: contenders_for(WORKLOADS[key], skipped) for key in args.workload_keys}
    samples = {key: WORKLOADS[key].quick_samples if args.quick else WORKLOADS[key].samples for key in plan}
    context = describe_run(args, plan, samples) | {"skipped": skipped}
    print("\n".join(context["legend"]))
    print("\n".join(f"Skipped {name}: {reason}" for name, reason in skipped.items() if reason), flush=True)
    with tempfile.TemporaryDirectory(prefix="trainwell-bench-") as folder:
        args.env = snapshot(Path(folder))
        context["source_digest"] = _digest(Path(folder) / "trainwell")
        context["imports"] = measure_imports(QUICK_IMPORT_REPEATS if args.quick else IMPORT_REPEATS, args.env)
        print(f"Import: {import_line(context['imports'])}", flush=True)
        measurements = run_rounds(plan, samples, args)
        context["paired"] = measure_paired(plan, samples, args)
    publish(args, context, measurements)
    return 0


if __name__ == "__main__":
    sys.exit(main())
