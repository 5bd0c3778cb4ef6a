"""Benchmark: the packed policy forward + backward against the padded batch with full logits.

Same data for every implementation: random preference pairs (prompt and completion lengths
drawn uniformly from the ranges below) until a token budget is filled. Per case, one forward
+ backward of a DPO-style objective (sum of chosen minus rejected log-probs) through a model
with random weights, median and p20/p80 time, real (unpadded) tokens per second and peak
memory over the resident weights. Implementations:

  packed-<backend>  fastdpo.sequence_logps on the packed stream (`collate_pairs`), attention
                    backend "flash", "torch", "flex" or "sdpa" (see fastdpo.attention)
  padded            the usual way: the 2P sequences right-padded to the longest one, a 2D
                    attention mask, SDPA, full [2P, L, V] logits, fp32 log-softmax, gather,
                    masked sums

Backends that cannot run on the device are skipped with the reason. Models:

  llama-1b   Llama-3.2-1B shape (hidden 2048, 16 layers, 32/8 heads, vocab 128256, tied head)
  small      hidden 256, 4 layers, 4/2 heads, vocab 8192 (the --small CPU mode)

    python benchmarks/bench_forward.py                         # CUDA, bf16, llama-1b
    python benchmarks/bench_forward.py --device cpu --small    # CPU, fp32, small model
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import harness
import torch

SCRIPT = Path(__file__).resolve()

MODELS = {
    "llama-1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
    },
    "small": {
        "vocab_size": 8192,
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
}
# (prompt range, completion range) of the synthetic pairs, per model
LENGTHS = {"llama-1b": ((64, 1024), (32, 1024)), "small": ((8, 64), (4, 96))}
GPU_BUDGETS = [4096, 8192, 16384, 32768]
SMALL_BUDGETS = [512, 1024, 2048]
IMPLS = ("packed-flash", "packed-torch", "packed-flex", "packed-sdpa", "padded")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# data and model


def make_pairs(budget: int, model: str, vocab: int, seed: int) -> list:
    """Random pairs whose packed stream fills `budget` tokens as far as whole pairs fit
    (at least one pair)."""
    from fastdpo.data.types import TokenizedPair

    rng = random.Random(seed)
    (p_lo, p_hi), (c_lo, c_hi) = LENGTHS[model]
    pairs, used = [], 0
    while True:
        prompt = rng.randint(p_lo, p_hi)
        chosen, rejected = rng.randint(c_lo, c_hi), rng.randint(c_lo, c_hi)
        size = 2 * prompt + chosen + rejected
        if pairs and used + size > budget:
            return pairs
        pairs.append(
            TokenizedPair(
                example_id=f"pair{len(pairs)}",
                prompt_ids=[rng.randrange(3, vocab) for _ in range(prompt)],
                chosen_ids=[rng.randrange(3, vocab) for _ in range(chosen)],
                rejected_ids=[rng.randrange(3, vocab) for _ in range(rejected)],
            )
        )
        used += size


def build_model(name: str, dtype: torch.dtype, device: torch.device, checkpointing: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODELS[name], max_position_embeddings=8192)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    if checkpointing:
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    return model.train()  # dropout is 0 in this config; train() turns checkpointing on


# --------------------------------------------------------------------------------------------
# the two ways of getting per-sequence log-probs


def packed_objective(model, pairs, backend: str, device: torch.device):
    """() -> scalar (sum of chosen - rejected log-probs) through fastdpo's packed forward."""
    from fastdpo.data.collate import collate_pairs
    from fastdpo.model import sequence_logps

    batch = collate_pairs(pairs, pad_to_multiple=8).to(device)
    _check_backend(backend, model, device)
    notes = set()

    def objective() -> torch.Tensor:
        result = sequence_logps(model, batch, attention=backend)
        notes.update(result.attention_backends)
        return (result.chosen - result.rejected).sum()

    return objective, notes


def _check_backend(backend: str, model, device: torch.device) -> None:
    """Raises harness.Unavailable (with the reason) if `backend` cannot train this model here."""
    from fastdpo.attention import CallFeatures, unavailable_reason

    features = CallFeatures(device_type=device.type, dtype=model.dtype, needs_grad=True)
    reason = unavailable_reason(backend, features)
    if reason is not None:
        raise harness.Unavailable(reason)


def padded_objective(model, pairs, device: torch.device):
    """() -> the same scalar through a padded batch with full logits (the usual DPO code)."""
    sequences, completion_starts = [], []
    for pair in pairs:
        for completion in (pair.chosen_ids, pair.rejected_ids):
            sequences.append(pair.prompt_ids + completion)
            completion_starts.append(len(pair.prompt_ids))
    longest = max(len(s) for s in sequences)
    input_ids = torch.zeros(len(sequences), longest, dtype=torch.long)
    attention_mask = torch.zeros(len(sequences), longest, dtype=torch.long)
    loss_mask = torch.zeros(len(sequences), longest - 1, dtype=torch.bool)
    for row, (tokens, start) in enumerate(zip(sequences, completion_starts, strict=True)):
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        attention_mask[row, : len(tokens)] = 1
        loss_mask[row, start - 1 : len(tokens) - 1] = True  # rows predicting completion tokens
    input_ids, attention_mask, loss_mask = (
        t.to(device) for t in (input_ids, attention_mask, loss_mask)
    )
    sign = torch.tensor([1.0, -1.0], device=device).repeat(len(pairs))
    model.set_attn_implementation("sdpa")

    def objective() -> torch.Tensor:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        logp = logits.float().log_softmax(-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
        per_sequence = (logp * loss_mask).sum(1)
        return (per_sequence * sign).sum()

    return objective, {"sdpa"}


# --------------------------------------------------------------------------------------------
# one case (runs in the worker subprocess)


def run_case(case: dict) -> dict:
    if case["threads"]:
        torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    dtype = DTYPES[case["dtype"]]
    torch.manual_seed(case["seed"])
    model = build_model(case["model"], dtype, device, case["checkpointing"])
    pairs = make_pairs(case["budget"], case["model"], model.config.vocab_size, case["seed"])
    if case["impl"] == "padded":
        objective, backends = padded_objective(model, pairs, device)
    else:
        backend = case["impl"].removeprefix("packed-")
        objective, backends = packed_objective(model, pairs, backend, device)

    def call() -> None:
        objective().backward()
        for parameter in model.parameters():  # dropped inside the call: its peak includes them
            parameter.grad = None

    try:
        peak, timing = harness.measure(
            call, device=device, warmup=case["warmup"], repeats=case["repeats"]
        )
    except torch.OutOfMemoryError as error:
        raise harness.Unavailable(f"out of memory: {str(error).splitlines()[0]}") from error
    with torch.no_grad():
        value = objective().double().item()

    real_tokens = sum(p.num_tokens for p in pairs)
    longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    return {
        "pairs": len(pairs),
        "tokens": real_tokens,
        "padded_tokens": 2 * len(pairs) * longest,
        "median_ms": timing.median_ms,
        "p20_ms": timing.p20_ms,
        "p80_ms": timing.p80_ms,
        "tokens_per_s": real_tokens / (timing.median_ms * 1e-3),
        "peak_mib": peak / 2**20,
        "objective": value,
        "note": f"attention {','.join(sorted(backends))}",
    }


# --------------------------------------------------------------------------------------------
# command line


def add_value_check(rows: list[dict]) -> None:
    """'objective_rel_diff': each ok row's objective against the padded row of its budget."""
    reference = {
        row["budget"]: row["objective"]
        for row in rows
        if row["impl"] == "padded" and row["status"] == "ok"
    }
    for row in rows:
        ref = reference.get(row["budget"])
        if row["status"] == "ok" and ref is not None:
            row["objective_rel_diff"] = abs(row["objective"] - ref) / max(abs(ref), 1e-30)


def render(rows: list[dict]) -> str:
    columns: list[harness.Column] = [
        ("model", lambda r: r["model"]),
        ("budget", lambda r: r["budget"]),
        ("pairs", lambda r: r.get("pairs", "-")),
        ("impl", lambda r: r["impl"]),
        ("median ms", lambda r: harness.fmt(r.get("median_ms"))),
        ("p20-p80 ms", lambda r: _range(r)),
        ("tokens/s", lambda r: harness.fmt(r.get("tokens_per_s"), ",.0f")),
        ("peak MiB", lambda r: harness.fmt(r.get("peak_mib"), ",.0f")),
        ("padded/real tokens", lambda r: _padding_ratio(r)),
        ("objective vs padded", lambda r: harness.fmt(r.get("objective_rel_diff"), ".1e")),
        ("note", lambda r: r["note"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"),
    ]
    return harness.markdown_table(rows, columns)


def _range(row: dict) -> str:
    if row.get("p20_ms") is None:
        return "-"
    return f"{row['p20_ms']:.1f}-{row['p80_ms']:.1f}"


def _padding_ratio(row: dict) -> str:
    if row.get("tokens") is None or row["impl"] != "padded":
        return "-"
    return f"{row['padded_tokens'] / row['tokens']:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_arguments(parser, default_csv=harness.RESULTS_DIR / "forward.csv")
    parser.add_argument("--small", action="store_true", help="the small model, small budgets")
    parser.add_argument(
        "--model", choices=list(MODELS), help="default: llama-1b (small w/ --small)"
    )
    parser.add_argument("--budgets", help="comma-separated token budgets per micro-batch")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads per case (0: torch's default); 1 keeps CPU timings stable on a "
        "shared machine, where idle OpenMP threads spin while their partners wait for a core",
    )
    args = parser.parse_args(argv)
    if args.worker is not None:
        harness.worker_main(run_case, args.worker)
        return

    impls = [name.strip() for name in args.impls.split(",")]
    for name in impls:
        if name not in IMPLS:
            parser.error(f"unknown impl {name!r}: choose from {', '.join(IMPLS)}")
    model = args.model or ("small" if args.small else "llama-1b")
    if args.budgets:
        budgets = [int(b) for b in args.budgets.split(",")]
    else:
        budgets = SMALL_BUDGETS if args.small else GPU_BUDGETS
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    cases = [
        {
            "impl": impl,
            "model": model,
            "budget": budget,
            "dtype": dtype,
            "checkpointing": args.checkpointing,
            "threads": args.threads,
            **harness.run_settings(args),
        }
        for budget in budgets
        for impl in impls
    ]
    rows = harness.run_cases(SCRIPT, cases, timeout_s=args.timeout, rounds=args.rounds)
    add_value_check(rows)
    harness.finish(
        rows, bench="forward", args=args, device=torch.device(args.device), table=render(rows)
    )


if __name__ == "__main__":
    main()
