"""Benchmark: end-to-end DPO training, fastdpo's Trainer against TRL's DPOTrainer.

Both trainers load the same Llama-shaped model (random weights, saved once to a folder) and
train on the same pairs (a JSONL file of text), each case in a fresh subprocess, through their
public APIs as a user calls them:

  fastdpo           `fastdpo.Trainer`: reference cache built before training (counted as the
                    precompute), packed micro-batches of --budget tokens, no logits.
  trl               `trl.DPOTrainer` in its default setup: the reference model live next to the
                    policy, padded batches, gradient checkpointing on (TRL's default).
  trl-nogc          the same with gradient checkpointing off (faster, more memory).
  trl-precompute    `precompute_ref_log_probs=True`: one reference pass first, no reference
                    model during training.
  trl-padding-free  `padding_free=True` (skipped where TRL turns it off: TRL 1.16 warns and
                    falls back to padding).
  trl-liger         `use_liger_kernel=True` (Liger's Triton kernels: CUDA and liger-kernel only).

TRL runs in another Python when it is not installed next to fastdpo: `--trl-python PATH` (or the
FASTDPO_TRL_PYTHON variable) names an interpreter that has trl and fastdpo (editable) installed;
without one, the TRL rows are skipped with the reason.

Measured per case: one optimizer step of --pairs-per-step pairs is the unit. After --warmup
untimed steps, --repeats epochs of steps are timed one by one (fastdpo: its own per-step log
window; TRL: a callback from step begin to step end). pairs/s and real tokens/s (tokens of the
sequences, no padding: prompt once per sequence, so twice per pair) over the timed steps; the
reference precompute time (fastdpo: the reference cache, TRL: `_precompute_ref_logps`) alone,
and pairs/s with it amortized over one epoch (pairs of an epoch / (epoch time + precompute));
peak memory of the whole run above what the process held before the trainer was built (models,
reference, optimizer, activations; CPU: peak RSS, CUDA: `max_memory_allocated`).

`--longest`: per trainer, the longest pair (prompt + chosen + rejected tokens; prompt 1/8,
completions 3/8 each) whose one-pair training step (and reference pass) stays under
--memory-limit MiB of peak memory, found by doubling from --longest-start, then bisection to
--longest-resolution tokens.

    python benchmarks/bench_train.py --device cpu --preset cpu --trl-python ../trl-venv/bin/python
    python benchmarks/bench_train.py --device cpu --preset cpu --longest --impls fastdpo,trl
    python benchmarks/bench_train.py --device cuda --preset gpu-1b --longest
    python benchmarks/bench_train.py --device cpu --preset tiny --impls fastdpo   # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from importlib import metadata, util
from pathlib import Path

import harness
import torch

SCRIPT = Path(__file__).resolve()

IMPLS = ("fastdpo", "trl", "trl-nogc", "trl-precompute", "trl-padding-free", "trl-liger")
DEFAULT_IMPLS = ("fastdpo", "trl", "trl-precompute", "trl-padding-free", "trl-liger")

PRESETS = {
    # The CPU case: Llama-shaped, 4 layers, hidden 256, vocabulary 32000, fp32.
    "cpu": {
        "model": dict(
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=32000,
        ),
        "precision": "fp32",
        "pairs": 64,
        "pairs_per_step": 8,
        "budget": 4096,
        "memory_limit_mib": 2048,
        "longest_start": 1024,
    },
    # The GPU case: TinyLlama-1.1B's shape, bf16 autocast over fp32 weights on both sides.
    "gpu-1b": {
        "model": dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
        ),
        "precision": "bf16-amp",
        "pairs": 128,
        "pairs_per_step": 8,
        "budget": 8192,
        "memory_limit_mib": 40960,
        "longest_start": 4096,
    },
    # Smoke tests: seconds, numbers meaningless.
    "tiny": {
        "model": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
        ),
        "precision": "fp32",
        "pairs": 8,
        "pairs_per_step": 4,
        "budget": 1024,
        "memory_limit_mib": 512,
        "longest_start": 64,
        "lengths": {"prompt": 8, "chosen": 12, "rejected": 10},
    },
}

LENGTHS = {"prompt": 80, "chosen": 120, "rejected": 100}
"""Median tokens of each part (log-normal, see `LENGTH_SIGMA`)."""
LENGTH_SIGMA = 0.7
"""Log-normal shape: ~1% of completions past 4x the median."""
MAX_PROMPT = 512
MAX_LENGTH = 1024
"""Lengths are drawn within these (prompt <= 512, prompt + completion <= 1024), so neither
trainer truncates anything and both see the same tokens."""


# --------------------------------------------------------------------------------------------
# model and data (made once by the parent, read by every case)


def write_model(folder: Path, preset: dict, seed: int, max_positions: int) -> None:
    """A random-weight Llama of the preset's shape (fp32) and the tiny tokenizer, saved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastdpo.testing.tokenizer import build_tiny_tokenizer

    config = LlamaConfig(
        **preset["model"],
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer = build_tiny_tokenizer()
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer ({len(tokenizer)}) does not fit the vocabulary")
    tokenizer.save_pretrained(folder)


class TextMaker:
    """Text of an exact token count: words that are one token each and that the byte-level
    pre-tokenizer keeps apart (a leading space, letters only); prompts end in '?' so no token
    merges across the prompt / completion boundary."""

    def __init__(self, tokenizer, seed: int) -> None:
        words = []
        for token, index in tokenizer.get_vocab().items():
            text = tokenizer.convert_tokens_to_string([token])
            word_like = len(text) > 1 and text[0] == " " and text[1:].isalpha()
            if word_like and tokenizer(text, add_special_tokens=False)["input_ids"] == [index]:
                words.append(text)
        if len(words) < 20:
            raise ValueError(f"only {len(words)} single-token words in the tokenizer")
        self.words = sorted(words)
        self.rng = random.Random(seed)

    def text(self, tokens: int) -> str:
        return "".join(self.rng.choice(self.words) for _ in range(tokens))

    def pair(self, prompt: int, chosen: int, rejected: int) -> dict:
        """Token counts as the trainers see them: prompt incl. BOS and '?', completions incl.
        the EOS both trainers append."""
        return {
            "prompt": self.text(prompt - 2) + "?",
            "chosen": self.text(chosen - 1),
            "rejected": self.text(rejected - 1),
        }


def draw_lengths(rng: random.Random, medians: dict) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) token counts, log-normal around `medians`, within limits."""

    def draw(median: int, low: int, high: int) -> int:
        return max(low, min(high, round(math.exp(rng.gauss(math.log(median), LENGTH_SIGMA)))))

    prompt = draw(medians["prompt"], 4, MAX_PROMPT)
    room = MAX_LENGTH - prompt
    return prompt, draw(medians["chosen"], 2, room), draw(medians["rejected"], 2, room)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def make_workdir(root: Path, preset_name: str, seed: int, max_positions: int) -> dict:
    """Model folder and training data; returns their paths."""
    from transformers import AutoTokenizer

    preset = PRESETS[preset_name]
    write_model(root / "model", preset, seed, max_positions)
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    maker = TextMaker(tokenizer, seed)
    rng = random.Random(seed)
    medians = preset.get("lengths", LENGTHS)
    rows = [maker.pair(*draw_lengths(rng, medians)) for _ in range(preset["pairs"])]
    write_jsonl(root / "train.jsonl", rows)
    return {"model": str(root / "model"), "data": str(root / "train.jsonl")}


def longest_parts(total: int) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) of a --longest pair of `total` tokens (prompt counted twice:
    it precedes both completions)."""
    prompt = max(4, total // 8)
    chosen = (total - 2 * prompt) // 2
    return prompt, chosen, total - 2 * prompt - chosen


# --------------------------------------------------------------------------------------------
# the worker: one trainer, one case


def run_case(case: dict) -> dict:
    device = torch.device(case["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise harness.Unavailable("CUDA is not available")
    out = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        if case["impl"] == "fastdpo":
            return _run_fastdpo(case, device, out)
        return _run_trl(case, device, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _data_path(case: dict, out: Path) -> str:
    """The case's data file: the shared training data, or (--longest) one pair of
    `pair_tokens` tokens, written here from the seed (the same text in every process)."""
    if case["mode"] != "longest":
        return case["data"]
    from transformers import AutoTokenizer

    maker = TextMaker(AutoTokenizer.from_pretrained(case["model"]), case["seed"])
    path = out / "longest.jsonl"
    write_jsonl(path, [maker.pair(*longest_parts(case["pair_tokens"]))])
    return str(path)


def _steps(case: dict) -> tuple[int, int]:
    """(untimed warm-up steps, timed steps)."""
    if case["mode"] == "longest":
        return 0, 1
    steps_per_epoch = math.ceil(case["pairs"] / case["pairs_per_step"])
    return case["warmup"], case["repeats"] * steps_per_epoch


def _run_fastdpo(case: dict, device: torch.device, out: Path) -> dict:
    import fastdpo.train.trainer as trainer_module
    from fastdpo import TrainConfig, Trainer

    warmup, timed = _steps(case)
    longest = case["mode"] == "longest"
    config = TrainConfig(
        model=case["model"],
        data=_data_path(case, out),
        output_dir=str(out / "run"),
        loss="sigmoid",
        beta=0.1,
        max_length=case["pair_tokens"] if longest else MAX_LENGTH,
        max_tokens_per_batch=case["pair_tokens"] if longest else case["budget"],
        pairs_per_step=1 if longest else case["pairs_per_step"],
        max_steps=warmup + timed,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        seed=case["seed"],
        dtype="float32" if case["precision"] == "fp32" else "auto",
        device=case["device"],
        reference="auto",
        logging_steps=1,
        progress=False,
        report_to="none",
    )
    precompute = _Stopwatch()
    # Time the reference cache pass: the trainer calls this once while it is built.
    trainer_module.prepare_reference = precompute.wrap(trainer_module.prepare_reference)
    meter = _RunMeter(device)
    trainer = Trainer(config)
    # train() ends by writing a checkpoint and final/ (TRL here writes nothing): the peak is
    # read when the first write starts, so serialization buffers do not count.
    trainer._save = meter.stop_before(trainer._save)
    trainer._save_final = meter.stop_before(trainer._save_final)
    result = trainer.train()
    meter.stop()
    rows = [row for row in result.history if "pairs_per_second" in row][warmup:]
    # The trainer's own per-step log: its window runs from the end of one log row to the next.
    step_s = [config.pairs_per_step / row["pairs_per_second"] for row in rows]
    tokens = [row["tokens_per_second"] * s for row, s in zip(rows, step_s, strict=True)]
    return _result(case, step_s, tokens, precompute.seconds, meter.peak_bytes)


def _run_trl(case: dict, device: torch.device, out: Path) -> dict:
    if util.find_spec("trl") is None:
        raise harness.Unavailable("trl is not installed in this Python (see --trl-python)")
    impl = case["impl"]
    if impl == "trl-liger":
        if device.type != "cuda":
            raise harness.Unavailable("Liger's kernels are Triton GPU kernels: CUDA only")
        if util.find_spec("liger_kernel") is None:
            raise harness.Unavailable("liger-kernel is not installed")
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    warmup, timed = _steps(case)
    longest = case["mode"] == "longest"
    bf16 = case["precision"] == "bf16-amp"
    args = DPOConfig(
        output_dir=str(out / "run"),
        loss_type="sigmoid",
        beta=0.1,
        per_device_train_batch_size=1 if longest else case["pairs_per_step"],
        gradient_accumulation_steps=1,
        max_steps=warmup + timed,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_length=case["pair_tokens"] if longest else MAX_LENGTH,
        bf16=bf16,
        fp16=False,
        gradient_checkpointing=impl != "trl-nogc",
        precompute_ref_log_probs=impl == "trl-precompute",
        padding_free=impl == "trl-padding-free",
        use_liger_kernel=impl == "trl-liger",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=case["seed"],
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
        model_init_kwargs={"dtype": torch.float32},
    )
    dataset = load_dataset("json", data_files=_data_path(case, out), split="train")
    tokenizer = AutoTokenizer.from_pretrained(case["model"])
    precompute = _Stopwatch()
    DPOTrainer._precompute_ref_logps = precompute.wrap(DPOTrainer._precompute_ref_logps)
    timer = _StepTimer(device)

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *unused, **kwargs):
            timer.begin()

        def on_step_end(self, *unused, **kwargs):
            timer.end()

    meter = _RunMeter(device)
    trainer = DPOTrainer(
        model=case["model"],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimes()],
    )
    if impl == "trl-padding-free" and not getattr(trainer, "padding_free", False):
        raise harness.Unavailable(
            f"TRL {metadata.version('trl')} turns padding_free off (falls back to padding)"
        )
    trainer.train()
    meter.stop()
    # num_tokens: TRL's running count of attention-mask tokens (real tokens, no padding).
    counts = [row["num_tokens"] for row in trainer.state.log_history if "num_tokens" in row]
    tokens = [b - a for a, b in zip([0, *counts[:-1]], counts, strict=True)][warmup:]
    return _result(case, timer.seconds[warmup:], tokens, precompute.seconds, meter.peak_bytes)


class _RunMeter:
    """`harness.PeakMemoryMeter` started now, stopped once: by `stop()` or before a wrapped call."""

    def __init__(self, device: torch.device) -> None:
        # Through the harness: one meter for every benchmark, wherever fastdpo keeps it.
        self._meter = harness.PeakMemoryMeter(device).__enter__()
        self._running = True

    def stop(self) -> None:
        if self._running:
            self._meter.__exit__(None, None, None)
            self._running = False

    def stop_before(self, fn):
        def wrapped(*args, **kwargs):
            self.stop()
            return fn(*args, **kwargs)

        return wrapped

    @property
    def peak_bytes(self) -> int:
        return self._meter.peak_bytes


class _Stopwatch:
    """Total wall time spent in the functions it wraps."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


class _StepTimer:
    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self._start = device, [], 0.0

    def begin(self) -> None:
        harness.synchronize(self.device)
        self._start = time.perf_counter()

    def end(self) -> None:
        harness.synchronize(self.device)
        self.seconds.append(time.perf_counter() - self._start)


def _result(case, step_s: list[float], tokens: list[float], precompute_s: float, peak: int):
    if len(step_s) != len(tokens) or not step_s:
        raise RuntimeError(f"timed {len(step_s)} steps but counted tokens of {len(tokens)}")
    row = {"peak_mib": peak / 2**20, "precompute_s": precompute_s}
    if case["mode"] == "longest":
        return {**row, "step_s": step_s[0]}
    pairs_per_step = case["pairs_per_step"]
    total_s = sum(step_s)
    pairs_per_s = pairs_per_step * len(step_s) / total_s
    epoch_s = case["pairs"] / pairs_per_s
    ms = [s * 1e3 for s in step_s]
    return {
        **row,
        "timed_steps": len(step_s),
        "median_ms": harness.percentile(ms, 50),
        "p20_ms": harness.percentile(ms, 20),
        "p80_ms": harness.percentile(ms, 80),
        "pairs_per_s": pairs_per_s,
        "tokens_per_s": sum(tokens) / total_s,
        "real_tokens_per_pair": sum(tokens) / (pairs_per_step * len(step_s)),
        "epoch_s": epoch_s,
        "pairs_per_s_amortized": case["pairs"] / (epoch_s + precompute_s),
    }


# --------------------------------------------------------------------------------------------
# the parent: cases, search, table


def trl_python(args: argparse.Namespace) -> str | None:
    """The interpreter for TRL cases: --trl-python, $FASTDPO_TRL_PYTHON, or this one if it has
    trl; None when there is none."""
    chosen = args.trl_python or os.environ.get("FASTDPO_TRL_PYTHON")
    if chosen:
        return chosen
    return sys.executable if util.find_spec("trl") is not None else None


def run_one(python: str | None, case: dict, timeout_s: float) -> dict:
    """`harness.run_with_python` for this script (TRL may live in another venv)."""
    trl_case = case["impl"] != "fastdpo"
    return harness.run_with_python(python, SCRIPT, case, timeout_s=timeout_s, trl_case=trl_case)


def find_longest(python, base: dict, args, limit_mib: float, log) -> dict:
    """Doubling from --longest-start, then bisection: the longest pair under `limit_mib`."""
    probes: dict[int, dict] = {}

    def fits(total: int) -> bool:
        row = run_one(python, {**base, "mode": "longest", "pair_tokens": total}, args.timeout)
        probes[total] = row
        ok = row["status"] == "ok" and row["peak_mib"] <= limit_mib
        peak = harness.fmt(row.get("peak_mib"), ",.0f")
        log(f"    {base['impl']} pair of {total} tokens: {row['status']}, peak {peak} MiB")
        return ok

    low, high = 0, args.longest_start  # low fits (0: nothing yet), high is the next to try
    while fits(high):
        low = high
        if high * 2 > args.longest_max:
            high = None  # everything up to the cap fits
            break
        high *= 2
    if high is not None and probes[high]["status"] != "ok" and low == 0:
        # The first length already failed for another reason than memory: report that.
        return {**probes[high], "mode": "longest", "memory_limit_mib": limit_mib}
    while high is not None and high - low > args.longest_resolution:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    best = probes.get(low, {})
    return {
        **base,
        "mode": "longest",
        "status": "ok",
        "longest_pair_tokens": low,
        "peak_mib": best.get("peak_mib"),
        "step_s": best.get("step_s"),
        "memory_limit_mib": limit_mib,
        "first_failure": high,
        "probes": len(probes),
        "note": "" if high is not None else f"reached --longest-max {args.longest_max}",
    }


def render(rows: list[dict]) -> str:
    base = next((r for r in rows if r["impl"] == "trl" and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] == "ok" and base is not None and row is not base:
            row["speedup_amortized"] = row["pairs_per_s_amortized"] / base["pairs_per_s_amortized"]
            row["memory_vs_trl"] = row["peak_mib"] / base["peak_mib"]
    fastdpo = next((r for r in rows if r["impl"] == "fastdpo"), None)
    if fastdpo is not None and fastdpo.get("speedup_amortized") is not None:
        fastdpo["meets_targets"] = (
            f"speed {'met' if fastdpo['speedup_amortized'] >= 3 else 'missed'}, memory "
            f"{'met' if fastdpo['memory_vs_trl'] <= 0.25 else 'missed'}"
        )
    columns: list[harness.Column] = [
        ("trainer", lambda r: r["impl"]),
        ("pairs/s", lambda r: harness.fmt(r.get("pairs_per_s"), ".2f")),
        ("real tokens/s", lambda r: harness.fmt(r.get("tokens_per_s"), ",.0f")),
        ("step ms (p20-p80)", _step_cell),
        ("precompute s", lambda r: harness.fmt(r.get("precompute_s"), ".1f")),
        (
            "pairs/s, precompute over 1 epoch",
            lambda r: harness.fmt(r.get("pairs_per_s_amortized"), ".2f"),
        ),
        ("vs trl", lambda r: _ratio(r.get("speedup_amortized"))),
        ("peak MiB", lambda r: harness.fmt(r.get("peak_mib"), ",.0f")),
        ("memory vs trl", lambda r: _ratio(r.get("memory_vs_trl"))),
        ("targets (>= 3x, <= 1/4)", lambda r: r.get("meets_targets", "")),
        ("note", lambda r: "" if r["status"] == "ok" else f"{r['status']}: {r.get('note', '')}"),
    ]
    return harness.markdown_table(rows, columns)


def render_longest(rows: list[dict]) -> str:
    columns: list[harness.Column] = [
        ("trainer", lambda r: r["impl"]),
        ("longest pair (tokens)", lambda r: harness.fmt(r.get("longest_pair_tokens"), ",")),
        ("peak MiB there", lambda r: harness.fmt(r.get("peak_mib"), ",.0f")),
        ("step s there", lambda r: harness.fmt(r.get("step_s"), ".1f")),
        ("over the limit at", lambda r: harness.fmt(r.get("first_failure"), ",")),
        ("limit MiB", lambda r: harness.fmt(r.get("memory_limit_mib"), ",.0f")),
        ("note", lambda r: "" if r["status"] == "ok" else f"{r['status']}: {r.get('note', '')}"),
    ]
    return harness.markdown_table(rows, columns)


def _step_cell(row: dict) -> str:
    if row.get("median_ms") is None:
        return "-"
    return f"{row['median_ms']:,.0f} ({row['p20_ms']:,.0f}-{row['p80_ms']:,.0f})"


def _fmt2(value) -> str:
    return harness.fmt(value, ".2f")


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_arguments(parser, default_csv=harness.RESULTS_DIR / "train.csv")
    parser.set_defaults(warmup=1, repeats=1)
    parser.description += " (--warmup: untimed steps; --repeats: timed epochs)"
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help="comma-separated")
    parser.add_argument("--trl-python", help="interpreter with trl installed (default: this one)")
    parser.add_argument("--budget", type=int, help="fastdpo's max_tokens_per_batch")
    parser.add_argument("--longest", action="store_true", help="also search the longest pair")
    parser.add_argument("--longest-only", action="store_true", help="only the --longest search")
    parser.add_argument("--memory-limit", type=float, help="MiB for --longest (preset default)")
    parser.add_argument("--longest-start", type=int, help="first pair length tried")
    parser.add_argument("--longest-max", type=int, default=1 << 17, help="stop doubling here")
    parser.add_argument("--longest-resolution", type=int, default=256, help="bisection stop")
    parser.add_argument("--workdir", type=Path, help="keep model and data here (default: temp)")
    args = parser.parse_args(argv)
    if args.worker is not None:
        harness.worker_main(run_case, args.worker)
        return

    if args.rounds != 1:
        parser.error("--rounds: bench_train runs each case once (use --repeats for more epochs)")
    impls = [name.strip() for name in args.impls.split(",")]
    for name in impls:
        if name not in IMPLS:
            parser.error(f"unknown impl {name!r}: choose from {', '.join(IMPLS)}")
    preset = PRESETS[args.preset]
    args.longest_start = args.longest_start or preset["longest_start"]
    limit = args.memory_limit or preset["memory_limit_mib"]
    python_for_trl = trl_python(args)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_train_data_"))
    root.mkdir(parents=True, exist_ok=True)
    searching = args.longest or args.longest_only
    max_positions = max(MAX_LENGTH, args.longest_max if searching else 0) + 16
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    try:
        paths = make_workdir(root, args.preset, args.seed, max_positions)
        base = {
            "preset": args.preset,
            "precision": preset["precision"],
            "pairs": preset["pairs"],
            "pairs_per_step": preset["pairs_per_step"],
            "budget": args.budget or preset["budget"],
            "workdir": str(root),
            **paths,
            **harness.run_settings(args),
        }
        rows = []
        if not args.longest_only:
            for name in impls:
                log(f"[{name}] {args.preset}, {preset['pairs']} pairs, {args.device}")
                python = sys.executable if name == "fastdpo" else python_for_trl
                row = run_one(python, {**base, "impl": name, "mode": "train"}, args.timeout)
                log(f"    {row['status']}: {row.get('pairs_per_s', row.get('note'))}")
                rows.append(row)
        longest_rows = []
        if args.longest or args.longest_only:
            for name in impls:
                log(f"[{name}] longest pair under {limit:,.0f} MiB")
                python = sys.executable if name == "fastdpo" else python_for_trl
                longest_rows.append(find_longest(python, {**base, "impl": name}, args, limit, log))
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    tables = []
    if rows:
        tables.append(render(rows))
    if longest_rows:
        tables.append(render_longest(longest_rows))
    harness.finish(
        rows + longest_rows,
        bench="train",
        args=args,
        device=torch.device(args.device),
        table="\n\n".join(tables),
    )


if __name__ == "__main__":
    main()
