"""Benchmark: fastdpo's Trainer on 1 to N processes under torchrun (DDP and FSDP2).

The same model, data and global steps (--pairs-per-step pairs each) on every process count;
each case is one `torchrun --standalone --nproc-per-node N` launch (1 process: plain Python)
of this script's worker, whose rank 0 prints the result row. Per case: step time (median and
p20/p80 over the timed steps), global pairs/s and tokens/s, tokens/s per process, scaling
efficiency against the 1-process case, the worst rank's share of a step's tokens (1/N when
balanced), and peak memory of the busiest rank (the trainer's `peak_memory_mb`: CUDA max
allocated, CPU peak RSS of the process).

Scaling efficiency is tokens/s(N) over the ideal: on CUDA N x tokens/s(1) (one GPU per
process); on the CPU tokens/s(1) itself, because the processes share the machine's cores: with
--threads-total T (default: the core count) every process gets T / N intra-op threads, so 1
process and N processes use the same cores and the efficiency is what splitting the work
across processes costs. On the CPU the numbers show only that the path runs and what gloo's
all-reduce / all-gather add at this size; GPU numbers (NCCL) are a separate run.

    python benchmarks/bench_train_nproc.py --device cpu --preset cpu --nproc 1,2
    python benchmarks/bench_train_nproc.py --device cuda --preset gpu-1b --nproc 1,2,4,8
    python benchmarks/bench_train_nproc.py --device cpu --preset tiny --nproc 1,2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_train
import harness
import torch

SCRIPT = Path(__file__).resolve()
STRATEGIES = ("ddp", "fsdp2")


def run_case(case: dict) -> dict | None:
    """One case on this rank; the result row on rank 0, None elsewhere."""
    from fastdpo import TrainConfig, Trainer

    out = Path(case["workdir"]) / f"run-{case['nproc']}-{case['strategy']}"
    timed = case["repeats"]
    config = TrainConfig(
        model=case["model"],
        data=case["data"],
        output_dir=str(out),
        overwrite_output_dir=True,
        loss="sigmoid",
        max_length=bench_train.MAX_LENGTH,
        max_tokens_per_batch=case["budget"],
        pairs_per_step=case["pairs_per_step"],
        max_steps=case["warmup"] + timed,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        seed=case["seed"],
        dtype="float32" if case["precision"] == "fp32" else "auto",
        device=case["device"],
        strategy=case["strategy"] if case["nproc"] > 1 else "auto",
        logging_steps=1,
        progress=False,
        report_to="none",
    )
    trainer = Trainer(config)
    result = trainer.train()
    trainer.parallel.shutdown()
    if trainer.rank != 0:
        return None
    rows = [row for row in result.history if "pairs_per_second" in row][case["warmup"] :]
    step_ms = [1e3 * case["pairs_per_step"] / row["pairs_per_second"] for row in rows]
    tokens_per_s = sum(r["tokens_per_second"] * s for r, s in zip(rows, step_ms, strict=True))
    tokens_per_s /= sum(step_ms)
    shares = [row.get("worst_rank_token_share", 1.0) for row in rows]
    return {
        "median_ms": harness.percentile(step_ms, 50),
        "p20_ms": harness.percentile(step_ms, 20),
        "p80_ms": harness.percentile(step_ms, 80),
        "pairs_per_s": 1e3 * case["pairs_per_step"] * len(step_ms) / sum(step_ms),
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_process": tokens_per_s / case["nproc"],
        "worst_rank_share_mean": sum(shares) / len(shares),
        "worst_rank_share_max": max(shares),
        "peak_mib": max(row["peak_memory_mb"] for row in rows),
        "strategy_used": trainer.parallel.strategy,
    }


def launch(case: dict, timeout_s: float) -> dict:
    """The case through torchrun (or plain Python for 1 process); rank 0's row back."""
    env = {**os.environ, "OMP_NUM_THREADS": str(case["threads_per_process"])}
    command = [sys.executable]
    if case["nproc"] > 1:
        command += ["-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc-per-node", str(case["nproc"])]
    command += [str(SCRIPT), "--worker", json.dumps(case)]
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=SCRIPT.parent
        )
    except subprocess.TimeoutExpired:
        return {**case, "status": "error", "note": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(harness._RESULT_PREFIX):
            return json.loads(line[len(harness._RESULT_PREFIX) :])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
    return {**case, "status": "error", "note": f"exit code {proc.returncode}: {reason}"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_arguments(parser, default_csv=harness.RESULTS_DIR / "train_nproc.csv")
    parser.set_defaults(warmup=1, repeats=8)
    parser.add_argument("--preset", choices=sorted(bench_train.PRESETS), default="cpu")
    parser.add_argument("--nproc", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--threads-total", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.worker:
        case = json.loads(args.worker)
        row = run_case(case)
        if row is not None:
            print(harness._RESULT_PREFIX + json.dumps({**case, "status": "ok", **row}), flush=True)
        return

    preset = bench_train.PRESETS[args.preset]
    workdir = Path(tempfile.mkdtemp(prefix="bench_train_nproc_"))
    paths = bench_train.make_workdir(workdir, args.preset, args.seed, bench_train.MAX_LENGTH)
    base = {
        **harness.run_settings(args),
        **paths,
        "workdir": str(workdir),
        "preset": args.preset,
        "precision": preset["precision"],
        "budget": preset["budget"],
        "pairs_per_step": preset["pairs_per_step"],
    }
    cases = []
    for nproc in (int(n) for n in args.nproc.split(",")):
        strategies = args.strategies.split(",") if nproc > 1 else ["none"]
        threads = max(1, args.threads_total // nproc)
        for strategy in strategies:
            cases.append(
                {**base, "nproc": nproc, "strategy": strategy, "threads_per_process": threads}
            )
    rows = []
    for index, case in enumerate(cases, 1):
        print(f"[{index}/{len(cases)}] nproc={case['nproc']} {case['strategy']}", file=sys.stderr)
        row = launch(case, args.timeout)
        print(f"    {row['status']} {row.get('note', '')}", file=sys.stderr, flush=True)
        rows.append(row)
    single = next((r for r in rows if r["nproc"] == 1 and r["status"] == "ok"), None)
    for row in rows:
        if single is not None and row["status"] == "ok":
            devices = row["nproc"] if args.device == "cuda" else 1  # CPU: the same cores
            ideal = devices * single["tokens_per_s"]
            row["scaling_efficiency"] = row["tokens_per_s"] / ideal
        for key in ("workdir", "model", "data"):
            row.pop(key, None)
    columns = [
        ("processes", lambda r: r["nproc"]),
        ("strategy", lambda r: r["strategy"]),
        ("threads/process", lambda r: r["threads_per_process"]),
        ("step ms (p20-p80)", lambda r: _step(r)),
        ("pairs/s", lambda r: harness.fmt(r.get("pairs_per_s"), ".2f")),
        ("tokens/s", lambda r: harness.fmt(r.get("tokens_per_s"), ",.0f")),
        ("tokens/s/process", lambda r: harness.fmt(r.get("tokens_per_s_per_process"), ",.0f")),
        ("scaling eff.", lambda r: harness.fmt(r.get("scaling_efficiency"), ".2f")),
        ("worst rank share", lambda r: harness.fmt(r.get("worst_rank_share_mean"), ".3f")),
        ("peak MiB/rank", lambda r: harness.fmt(r.get("peak_mib"), ",.0f")),
        ("status", lambda r: r["status"] + (f": {r['note']}" if r.get("note") else "")),
    ]
    table = harness.markdown_table(rows, columns)
    harness.finish(
        rows, bench="train_nproc", args=args, device=torch.device(args.device), table=table
    )


def _step(row: dict) -> str:
    if row["status"] != "ok":
        return "-"
    return f"{row['median_ms']:,.0f} ({row['p20_ms']:,.0f}-{row['p80_ms']:,.0f})"


if __name__ == "__main__":
    main()
