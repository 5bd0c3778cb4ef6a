"""Benchmark: evaluating a policy against a reference on preference pairs, fastdpo against TRL.

The same Llama-shaped policy and reference (random weights, different seeds, saved once) and
the same pairs (bench_train's generator: log-normal lengths, nothing truncated) go through:

  fastdpo-eval      `fastdpo.evaluate(policy_path, pairs_path, ref=ref_path)` as a user calls
                    it: loads data and tokenizes it, loads the reference, scores it, frees it,
                    loads the policy, scores it, bootstrap intervals (1000 resamples): the
                    whole command.
  fastdpo-modules   `fastdpo.evaluate` on models already in memory and pairs already
                    tokenized: the packed forwards plus the metrics (what TRL's `evaluate`
                    does after its constructor has loaded and tokenized everything).
  fastdpo-score     `score_rows` (behind `fastdpo score`) from paths, like fastdpo-eval.
  trl               TRL's `DPOTrainer.evaluate()` with the reference live (TRL's default),
                    padded batches of --eval-batch-size pairs, the trainer built beforehand
                    (model loading and tokenization not timed).
  trl-precompute    `precompute_ref_log_probs=True`, the raw dataset passed to `evaluate()`:
                    tokenization and the reference pass happen in the call (models loaded
                    beforehand).

Each case runs in a fresh process (`--trl-python` names an interpreter with trl for the TRL
cases, as in bench_train). After --warmup untimed calls, --repeats calls are timed; pairs/s =
pairs / median call time. The DPO loss each side reports (mean over pairs) is kept as a
cross-check that both computed the same thing.

    python benchmarks/bench_eval.py --device cpu --preset cpu --trl-python ../trl-venv/bin/python
    python benchmarks/bench_eval.py --device cpu --preset tiny --impls fastdpo-eval  # smoke test
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from importlib import util
from pathlib import Path

import bench_train
import harness
import torch

SCRIPT = Path(__file__).resolve()

IMPLS = ("fastdpo-eval", "fastdpo-modules", "fastdpo-score", "trl", "trl-precompute")
BETA = 0.1


def make_workdir(root: Path, preset_name: str, seed: int) -> dict:
    """Policy, reference (another seed) and pairs; returns their paths."""
    from transformers import AutoTokenizer

    preset = bench_train.PRESETS[preset_name]
    max_positions = bench_train.MAX_LENGTH + 16
    bench_train.write_model(root / "policy", preset, seed, max_positions)
    bench_train.write_model(root / "ref", preset, seed + 1, max_positions)
    maker = bench_train.TextMaker(AutoTokenizer.from_pretrained(root / "policy"), seed)
    rng = random.Random(seed)
    medians = preset.get("lengths", bench_train.LENGTHS)
    rows = [maker.pair(*bench_train.draw_lengths(rng, medians)) for _ in range(preset["pairs"])]
    bench_train.write_jsonl(root / "pairs.jsonl", rows)
    return {
        "policy": str(root / "policy"),
        "ref": str(root / "ref"),
        "data": str(root / "pairs.jsonl"),
    }


# --------------------------------------------------------------------------------------------
# the worker


def run_case(case: dict) -> dict:
    device = torch.device(case["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise harness.Unavailable("CUDA is not available")
    if case["impl"].startswith("fastdpo"):
        call, loss_of = _fastdpo_call(case)
    else:
        call, loss_of = _trl_call(case, device)
    # Timing, not memory: glibc keeps freed blocks (the worker's default returns them, and
    # every call of the path cases loads and frees whole models: a page fault per fresh page).
    harness.cache_malloc_blocks()
    for _ in range(case["warmup"]):
        call()
    seconds, result = [], None
    for _ in range(case["repeats"]):
        harness.synchronize(device)
        start = time.perf_counter()
        result = call()
        harness.synchronize(device)
        seconds.append(time.perf_counter() - start)
    ms = [s * 1e3 for s in seconds]
    median_s = harness.percentile(seconds, 50)
    return {
        "median_ms": harness.percentile(ms, 50),
        "p20_ms": harness.percentile(ms, 20),
        "p80_ms": harness.percentile(ms, 80),
        "pairs_per_s": case["pairs"] / median_s,
        "dpo_loss": loss_of(result),
    }


def _fastdpo_call(case: dict):
    import fastdpo
    from fastdpo.evaluation.implicit_reward import score_rows

    common = dict(device=case["device"], dtype=_dtype(case), max_tokens_per_batch=case["budget"])
    if case["impl"] == "fastdpo-eval":

        def call():
            return fastdpo.evaluate(case["policy"], case["data"], ref=case["ref"], **common)

        return call, lambda report: report["models"][case["policy"]]["loss"]
    if case["impl"] == "fastdpo-score":

        def score():
            rows, _ = score_rows(case["policy"], case["ref"], case["data"], beta=BETA, **common)
            return rows

        def loss(rows):  # the DPO loss from the scored margins, as a cross-check
            margins = torch.tensor([r["margin"] for r in rows], dtype=torch.float64)
            return float(torch.nn.functional.softplus(-margins).mean())

        return score, loss
    # fastdpo-modules: models in memory, pairs tokenized, as TRL's trainer holds them
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastdpo.evaluation.data import tokenization_kwargs

    device = torch.device(case["device"])
    dtype = torch.bfloat16 if _dtype(case) == "bfloat16" else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(case["policy"], dtype=dtype).to(device)
    ref = AutoModelForCausalLM.from_pretrained(case["ref"], dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(case["policy"])
    pairs = fastdpo.tokenize_pairs(
        fastdpo.load_preference_data(case["data"]), tokenizer, **tokenization_kwargs()
    )

    def call():
        return fastdpo.evaluate({"policy": policy}, pairs, ref=ref, **common)

    return call, lambda report: report["models"]["policy"]["loss"]


def _dtype(case: dict) -> str:
    return "float32" if case["precision"] == "fp32" else "bfloat16"


def _trl_call(case: dict, device: torch.device):
    if util.find_spec("trl") is None:
        raise harness.Unavailable("trl is not installed in this Python (see --trl-python)")
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    out = Path(tempfile.mkdtemp(prefix="bench_eval_trl_"))
    dtype = torch.float32 if case["precision"] == "fp32" else torch.bfloat16
    args = DPOConfig(
        output_dir=str(out),
        loss_type="sigmoid",
        beta=BETA,
        per_device_eval_batch_size=case["eval_batch_size"],
        max_length=bench_train.MAX_LENGTH,
        precompute_ref_log_probs=case["impl"] == "trl-precompute",
        report_to="none",
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=case["seed"],
    )
    dataset = load_dataset("json", data_files=case["data"], split="train")
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(case["policy"], dtype=dtype),
        ref_model=AutoModelForCausalLM.from_pretrained(case["ref"], dtype=dtype),
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(case["policy"]),
    )
    if case["impl"] == "trl-precompute":
        # A raw dataset passed to evaluate() is tokenized and gets its reference pass in the
        # call, like fastdpo-eval's (TRL's model loading stays outside the timing).
        return lambda: trainer.evaluate(eval_dataset=dataset), lambda m: m.get("eval_loss")

    def call():
        return trainer.evaluate()

    return call, lambda metrics: metrics.get("eval_loss")


# --------------------------------------------------------------------------------------------
# the parent


def run_one(python: str | None, case: dict, timeout_s: float) -> dict:
    """One case in a fresh `python` process running this script (TRL may live in another
    venv); a row with status "error" and the reason if it fails."""
    trl_case = case["impl"].startswith("trl")
    return harness.run_with_python(python, SCRIPT, case, timeout_s=timeout_s, trl_case=trl_case)


def render(rows: list[dict]) -> str:
    base = next((r for r in rows if r["impl"] == "trl" and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] == "ok" and base is not None:
            row["speedup_vs_trl"] = row["pairs_per_s"] / base["pairs_per_s"]
    columns: list[harness.Column] = [
        ("path", lambda r: r["impl"]),
        ("pairs/s", lambda r: harness.fmt(r.get("pairs_per_s"), ".2f")),
        ("call ms (p20-p80)", _ms_cell),
        (
            "vs trl",
            lambda r: "-" if r.get("speedup_vs_trl") is None else f"{r['speedup_vs_trl']:.2f}x",
        ),
        ("DPO loss", lambda r: harness.fmt(r.get("dpo_loss"), ".6f")),
        ("note", lambda r: "" if r["status"] == "ok" else f"{r['status']}: {r.get('note', '')}"),
    ]
    return harness.markdown_table(rows, columns)


def _ms_cell(row: dict) -> str:
    if row.get("median_ms") is None:
        return "-"
    return f"{row['median_ms']:,.0f} ({row['p20_ms']:,.0f}-{row['p80_ms']:,.0f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_arguments(parser, default_csv=harness.RESULTS_DIR / "eval.csv")
    parser.set_defaults(warmup=1, repeats=3)
    parser.add_argument("--preset", choices=list(bench_train.PRESETS), default="cpu")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated")
    parser.add_argument("--trl-python", help="interpreter with trl installed (default: this one)")
    parser.add_argument("--budget", type=int, help="fastdpo's max_tokens_per_batch")
    parser.add_argument("--eval-batch-size", type=int, default=8, help="TRL's pairs per batch")
    parser.add_argument("--workdir", type=Path, help="keep models and data here (default: temp)")
    args = parser.parse_args(argv)
    if args.worker is not None:
        harness.worker_main(run_case, args.worker)
        return
    impls = [name.strip() for name in args.impls.split(",")]
    for name in impls:
        if name not in IMPLS:
            parser.error(f"unknown impl {name!r}: choose from {', '.join(IMPLS)}")
    preset = bench_train.PRESETS[args.preset]
    python_for_trl = bench_train.trl_python(args)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_eval_data_"))
    root.mkdir(parents=True, exist_ok=True)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    try:
        paths = make_workdir(root, args.preset, args.seed)
        base = {
            "preset": args.preset,
            "precision": preset["precision"],
            "pairs": preset["pairs"],
            "budget": args.budget or max(2048, 2 * bench_train.MAX_LENGTH),
            "eval_batch_size": args.eval_batch_size,
            "workdir": str(root),
            **paths,
            **harness.run_settings(args),
        }
        rows = []
        for name in impls:
            log(f"[{name}] {args.preset}, {preset['pairs']} pairs, {args.device}")
            python = sys.executable if name.startswith("fastdpo") else python_for_trl
            row = run_one(python, {**base, "impl": name}, args.timeout)
            log(f"    {row['status']}: {row.get('pairs_per_s', row.get('note'))}")
            rows.append(row)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    harness.finish(
        rows, bench="eval", args=args, device=torch.device(args.device), table=render(rows)
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
