"""Shared benchmark machinery: timing, peak memory, isolated cases, environment, CSV, markdown.

Every benchmark script in this folder follows one pattern:

1. The parent process expands its command line into a list of cases (plain dicts).
2. Each case runs in a fresh subprocess (`run_isolated`), so compile caches, allocator pools and
   the process's peak-RSS high-water mark of one case never leak into another.
3. The subprocess (`worker_main`) builds inputs, warms up, measures peak memory over one call,
   times `repeats` calls (`measure`), and prints one JSON line that the parent reads back.
4. The parent adds the environment (device, versions, date, commit) to every row, appends the rows
   to a CSV under `benchmarks/results/`, and prints a markdown table.

Peak memory is the memory one call adds on top of what was resident before it (its inputs
included): on CUDA `torch.cuda.max_memory_allocated` minus the allocated bytes before the call;
on the CPU the kernel's peak-RSS counter (VmHWM), reset just before the call, minus VmRSS before
it. Warm-up (torch.compile, autotuning) happens before the reset, so it does not count.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from fastdpo.memory import PeakMemoryMeter, cache_malloc_blocks, limit_malloc_retention

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# The worker prints exactly one line starting with this; anything else on stdout is ignored.
_RESULT_PREFIX = "BENCH_RESULT "

# Distributions whose versions go into every CSV row (column name -> distribution name).
VERSIONED_PACKAGES = {
    "torch": "torch",
    "triton": "triton",
    "transformers": "transformers",
    "liger_kernel": "liger-kernel",
    "cut_cross_entropy": "cut-cross-entropy",
    "fastdpo": "fastdpo",
}


class Unavailable(Exception):
    """A baseline that is not installed or cannot run on this device; the message says why."""


# --------------------------------------------------------------------------------------------
# timing and memory


@dataclass(kw_only=True)
class Timing:
    """Wall-clock statistics of repeated calls, in milliseconds."""

    median_ms: float
    """Median over the timed repeats."""
    p20_ms: float
    """20th percentile (a fast-but-typical call)."""
    p80_ms: float
    """80th percentile (a slow-but-typical call)."""
    repeats: int
    """Number of timed calls."""
    cpu_median_ms: float
    """Median process CPU time per call (all threads). On a shared CPU it moves less than
    wall time when other processes take cores away (spin-waiting threads still count)."""


def synchronize(device: torch.device) -> None:
    """Waits for queued device work, so host timers measure the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile `q` in [0, 100] of `values` (non-empty)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def time_fn(fn: Callable[[], object], *, device: torch.device, warmup: int, repeats: int) -> Timing:
    """Calls `fn` `warmup` times untimed, then `repeats` times timed, one call per sample."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples_ms, cpu_samples_ms = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        samples_ms.append((time.perf_counter() - start) * 1e3)
        cpu_samples_ms.append((time.process_time() - cpu_start) * 1e3)
    return Timing(
        median_ms=percentile(samples_ms, 50),
        p20_ms=percentile(samples_ms, 20),
        p80_ms=percentile(samples_ms, 80),
        repeats=repeats,
        cpu_median_ms=percentile(cpu_samples_ms, 50),
    )


def peak_memory_bytes(fn: Callable[[], object], *, device: torch.device) -> int:
    """Bytes one call of `fn` adds at its peak over the memory resident before it."""
    with PeakMemoryMeter(device) as meter:
        fn()
    return meter.peak_bytes


def measure(
    call: Callable[[], object], *, device: torch.device, warmup: int, repeats: int
) -> tuple[int, Timing]:
    """(peak bytes of one call, timing of `repeats` calls) after `warmup` (>= 1) calls.

    Run inside `worker_main`: memory is measured while glibc returns freed blocks at once (see
    `limit_malloc_retention`), then glibc goes back to caching blocks for the timed calls, so
    that timings do not pay page faults a normal process would not.
    """
    for _ in range(max(1, warmup)):  # the first call compiles / autotunes
        call()
    peak = peak_memory_bytes(call, device=device)
    cache_malloc_blocks()
    timing = time_fn(call, device=device, warmup=1, repeats=repeats)
    return peak, timing


def tflops(flop: float, milliseconds: float) -> float:
    """Effective TFLOP/s: `flop` counted by the caller's formula, over the measured time."""
    return flop / (milliseconds * 1e-3) / 1e12


# --------------------------------------------------------------------------------------------
# one case per subprocess


def run_isolated(script: Path, case: dict, *, timeout_s: float) -> dict:
    """Runs `case` through `script --worker` in a fresh Python process; returns its result row.

    A case that crashes or times out comes back as a row with status "error" and the reason in
    "note", so one failing baseline does not end the whole run.
    """
    row, _ = _run_worker(sys.executable, script, case, timeout_s=timeout_s, env=None)
    return row


def run_with_python(
    python: str | None, script: Path, case: dict, *, timeout_s: float, trl_case: bool
) -> dict:
    """`run_isolated` with a chosen interpreter (TRL may live in another venv), offline and
    with a datasets cache under the case's "workdir".

    `python` None means TRL is not installed: the row says "skipped". A `trl_case` row that the
    worker returned gets "trl_version" as seen by that interpreter.
    """
    if python is None:
        return {**case, "status": "skipped", "note": "trl not installed (pass --trl-python)"}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["HF_DATASETS_CACHE"] = str(Path(case["workdir"]) / "datasets-cache")
    row, from_worker = _run_worker(python, script, case, timeout_s=timeout_s, env=env)
    if from_worker and trl_case:
        row["trl_version"] = version_in(python, "trl")
    return row


def _run_worker(
    python: str, script: Path, case: dict, *, timeout_s: float, env: dict | None
) -> tuple[dict, bool]:
    """The worker's result row and True, or an "error" row (timeout, crash) and False."""
    command = [python, str(script), "--worker", json.dumps(case)]
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT, env=env
        )
    except subprocess.TimeoutExpired:
        return {**case, "status": "error", "note": f"timed out after {timeout_s:.0f} s"}, False
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX) :]), True
    stderr_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    reason = stderr_lines[-1] if stderr_lines else "no output"
    note = f"worker exit code {proc.returncode}: {reason}"
    return {**case, "status": "error", "note": note}, False


def version_in(python: str, distribution: str) -> str:
    """The installed version of `distribution` as `python` sees it; "unknown" if not found."""
    code = f"from importlib import metadata; print(metadata.version({distribution!r}))"
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def run_cases(
    script: Path, cases: Sequence[dict], *, timeout_s: float, rounds: int = 1
) -> list[dict]:
    """`run_isolated` over `cases` in order, `rounds` times, with one progress line per case on
    stderr; one row per case.

    With several rounds, the cases alternate (every case once per round), so a slow spell of a
    shared machine hits all of them alike. A case's row is then its round with the median
    `median_ms` (so its fields stay consistent; the lower middle one for an even count), with
    every round's median in "round_medians_ms" for paired comparisons (see `paired_ratio`).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    runs: list[list[dict]] = [[] for _ in cases]
    for round_index in range(rounds):
        for index, case in enumerate(cases, 1):
            label = " ".join(f"{key}={case[key]}" for key in case if key not in ("seed",))
            prefix = f"round {round_index + 1}/{rounds} " if rounds > 1 else ""
            print(f"[{prefix}{index}/{len(cases)}] {label}", file=sys.stderr, flush=True)
            row = run_isolated(script, case, timeout_s=timeout_s)
            ok = row["status"] == "ok"
            detail = f"{row['median_ms']:.1f} ms" if ok else row.get("note", "")
            print(f"    {row['status']}: {detail}", file=sys.stderr, flush=True)
            runs[index - 1].append(row)
    return [_median_round(case_runs) for case_runs in runs]


def _median_round(case_runs: list[dict]) -> dict:
    """One case's row from its rounds: the median-time ok round, or the last failure."""
    ok = [row for row in case_runs if row["status"] == "ok"]
    if len(ok) < len(case_runs):  # a round failed: report that, not a partial median
        failed = [(k, row) for k, row in enumerate(case_runs, 1) if row["status"] != "ok"]
        index, row = failed[-1]
        if len(case_runs) == 1:
            return row
        return {**row, "note": f"round {index}/{len(case_runs)}: {row.get('note', '')}"}
    # With an even count this is the lower (faster) of the two middle rounds.
    ordered = sorted(ok, key=lambda row: row["median_ms"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["rounds"] = len(ok)
    row["round_medians_ms"] = [run["median_ms"] for run in case_runs]
    return row


def paired_ratio(row: dict, reference: dict) -> float:
    """`row`'s median time over `reference`'s: the median of the per-round ratios when both ran
    the same rounds (each round measured them back to back), else the ratio of their medians."""
    mine, theirs = row.get("round_medians_ms"), reference.get("round_medians_ms")
    if mine and theirs and len(mine) == len(theirs):
        return percentile([a / b for a, b in zip(mine, theirs, strict=True)], 50)
    return row["median_ms"] / reference["median_ms"]


def add_common_arguments(parser: argparse.ArgumentParser, *, default_csv: Path) -> None:
    """Options every benchmark script takes (device, repeats, outputs, worker mode)."""
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda when available",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (min 1)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per case")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every case this many times, alternating cases, and report the median round "
        "(use an odd number)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--csv", type=Path, default=default_csv, help="rows are appended here (%(default)s)"
    )
    parser.add_argument("--markdown", type=Path, help="also write the markdown table here")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    parser.add_argument("--worker", metavar="CASE_JSON", help=argparse.SUPPRESS)


def run_settings(args: argparse.Namespace) -> dict:
    """The fields every case takes from `add_common_arguments`' options."""
    return {
        "device": args.device,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seed": args.seed,
    }


def finish(
    rows: list[dict], *, bench: str, args: argparse.Namespace, device: torch.device, table: str
) -> None:
    """Tags `rows` with the benchmark's name and the environment, appends them to the CSV,
    prints (and writes) the table."""
    env = environment(device)
    for row in rows:
        row.update(env, bench=bench)
    append_csv(rows, args.csv)
    text = f"{table}\n\n{environment_summary(env)}\n"
    print(text)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.markdown.with_name(args.markdown.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.markdown)


def worker_main(run_case: Callable[[dict], dict], case_json: str) -> None:
    """Subprocess side of `run_isolated`: runs one case and prints its result row as JSON.

    `run_case` returns the measured fields or raises `Unavailable` (the row becomes "skipped"
    with the reason). Any other exception propagates: the parent records it as an error.
    """
    limit_malloc_retention()
    case = json.loads(case_json)
    try:
        row = {**case, "status": "ok", **run_case(case)}
    except Unavailable as why:
        row = {**case, "status": "skipped", "note": str(why)}
    print(_RESULT_PREFIX + json.dumps(row), flush=True)


# --------------------------------------------------------------------------------------------
# environment, CSV, markdown


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' on CUDA; the CPU model and core count on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "unknown CPU"
    with contextlib.suppress(OSError):  # no /proc (not Linux): keep "unknown CPU"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def git_commit() -> str:
    """Short commit hash of the checkout, with '+uncommitted' when the working tree differs
    from it (modified or new files that git does not ignore)."""
    try:
        head, status = (
            subprocess.run(
                ["git", *args], capture_output=True, text=True, check=True, cwd=REPO_ROOT
            ).stdout.strip()
            for args in (["rev-parse", "--short", "HEAD"], ["status", "--porcelain"])
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+uncommitted" if status else "")


def environment(device: torch.device) -> dict:
    """Columns added to every CSV row: device, package versions, UTC date, commit."""
    env = {"device_name": device_name(device)}
    for column, distribution in VERSIONED_PACKAGES.items():
        try:
            env[column] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            env[column] = "not installed"
    # torch's CUDA build from PyPI has no local tag in its distribution version ("2.11.0"); its
    # __version__ names the build ("2.11.0+cu130", "2.13.0+cpu").
    env["torch"] = torch.__version__
    env["date"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    env["commit"] = git_commit()
    return env


def append_csv(rows: Iterable[dict], path: Path) -> None:
    """Appends `rows` to the CSV at `path` (header = union of all columns, old rows kept).

    The file is rewritten through a temporary name and renamed, so a crash never leaves half a
    file behind.
    """
    rows = list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    old_rows: list[dict] = []
    columns: list[str] = []
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            old_rows = list(reader)
    for row in rows:
        columns += [key for key in row if key not in columns]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(old_rows)
        writer.writerows(rows)
    tmp.replace(path)


Column = tuple[str, Callable[[dict], object]]


def fmt(value: object, spec: str = ".1f") -> str:
    """`value` formatted with `spec`, or '-' for a missing value."""
    if value is None or value == "":
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """A GitHub markdown table: one line per row, `columns` = (header, row -> cell)."""
    header = "| " + " | ".join(name for name, _ in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = [
        "| " + " | ".join(str(cell(row)).replace("|", "/") for _, cell in columns) + " |"
        for row in rows
    ]
    return "\n".join([header, rule, *body])


def environment_summary(env: dict) -> str:
    """One markdown paragraph naming the device, versions, date and commit of a run."""
    versions = ", ".join(f"{column} {env[column]}" for column in VERSIONED_PACKAGES)
    return (
        f"Device: {env['device_name']}. Versions: {versions}. "
        f"Date: {env['date']}. Commit: {env['commit']}."
    )
