"""Benchmark: the reference pass (`ReferenceCache.build`) against training, in tokens per second.

All modes run the same model over the same tokenized pairs, each case in a fresh subprocess:

  reference  `ReferenceCache.build` end to end: weight digest and fingerprint, packed batches
             of --ref-budget tokens under inference_mode through `sequence_logps` (no logits),
             shards written and checksummed. One call = one whole pass over the data.
  ref-pass   the compute of that pass alone (`reference_build.compute_columns` over the data:
             packing, forward, results to the host), without fingerprint and files: on a small
             model the fixed costs of the build weigh more than they would on a real one.
  train      one epoch of DPO training steps on micro-batches of --train-budget tokens:
             `sequence_logps` with gradients, sigmoid loss against the cached reference values
             (`cache.for_batch`), backward, AdamW step. One call = one epoch.

tokens/s counts real (unpadded) tokens of every sequence. The issue's target on a GPU: the
reference pass at >= 2.5x the training throughput. The reference row also reports how long
`weights_digest` (the model part of the fingerprint) takes and at what rate it reads weights.

    python benchmarks/bench_precompute.py                       # CUDA, bf16, a 1.1B Llama
    python benchmarks/bench_precompute.py --device cpu --small  # CPU, fp32, a 19M Llama
    python benchmarks/bench_precompute.py --device cpu --preset tiny --repeats 1   # smoke test
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import harness
import torch

SCRIPT = Path(__file__).resolve()

# Model shapes (Llama configs, random weights) and data sizes of each preset.
PRESETS = {
    # TinyLlama-1.1B's shape.
    "gpu": {
        "model": dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
        ),
        "pairs": 256,
        "prompt": (128, 512),
        "completion": (64, 512),
        "train_budget": 8192,
        "ref_budget": 32768,
    },
    "small": {
        "model": dict(
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=32000,
        ),
        "pairs": 32,
        "prompt": (32, 128),
        "completion": (16, 128),
        "train_budget": 1024,
        # Only 2x on the CPU: there packed attention uses a dense [T, T] mask, whose cost grows
        # with the square of the batch budget (on CUDA it grows with each sequence's length).
        "ref_budget": 2048,
    },
    # For smoke tests: seconds, numbers meaningless.
    "tiny": {
        "model": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
        ),
        "pairs": 8,
        "prompt": (4, 16),
        "completion": (2, 16),
        "train_budget": 128,
        "ref_budget": 256,
    },
}
MODES = ("reference", "ref-pass", "train")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_model(preset: dict, dtype: torch.dtype, device: torch.device, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastdpo.attention import use_packed_attention

    config = LlamaConfig(**preset["model"], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    use_packed_attention(model)
    return model


def make_pairs(preset: dict, seed: int):
    """Random token ids with uniform prompt / completion lengths (deterministic per seed)."""
    from fastdpo.data.types import TokenizedPair

    rng = random.Random(seed)
    vocab = preset["model"]["vocab_size"]

    def ids(bounds: tuple[int, int]) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(rng.randint(*bounds))]

    return [
        TokenizedPair(
            example_id=f"bench-{i}",
            prompt_ids=ids(preset["prompt"]),
            chosen_ids=ids(preset["completion"]),
            rejected_ids=ids(preset["completion"]),
        )
        for i in range(preset["pairs"])
    ]


def run_case(case: dict) -> dict:
    """Measures one (mode, preset, dtype, device) case; returns the measured fields."""
    from fastdpo.reference import ReferenceCache
    from fastdpo.reference_fingerprint import weights_digest

    device = torch.device(case["device"])
    preset = PRESETS[case["preset"]]
    model = make_model(preset, DTYPES[case["dtype"]], device, case["seed"])
    pairs = make_pairs(preset, case["seed"])
    tokens = sum(p.num_tokens for p in pairs)
    workdir = Path(tempfile.mkdtemp(prefix="bench_precompute_"))
    build_options = dict(
        tokenizer=None,
        tokenization={"synthetic": True},
        max_tokens_per_batch=case["ref_budget"],
        examples_per_shard=1024,  # the default: one shard here, packed like ref-pass
        progress=False,
    )
    extra: dict = {}
    try:
        if case["mode"] == "reference":
            cache_dir = workdir / "cache"

            def call() -> None:
                shutil.rmtree(cache_dir, ignore_errors=True)
                ReferenceCache.build(model, pairs, cache_dir, **build_options)

            weights_digest(model)  # warm
            harness.synchronize(device)
            started = time.perf_counter()
            weights_digest(model)
            digest_s = time.perf_counter() - started
            weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            extra = {"digest_ms": digest_s * 1e3, "digest_gb_s": weight_bytes / digest_s / 1e9}
        elif case["mode"] == "ref-pass":
            call = _reference_pass(model, pairs, case["ref_budget"], device)
        else:
            cache = ReferenceCache.build(model, pairs, workdir / "cache", **build_options)
            call = _train_epoch(model, pairs, cache, case["train_budget"], device)
        peak, timing = harness.measure(
            call, device=device, warmup=case["warmup"], repeats=case["repeats"]
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "tokens": tokens,
        "median_ms": timing.median_ms,
        "p20_ms": timing.p20_ms,
        "p80_ms": timing.p80_ms,
        "tokens_per_s": tokens / (timing.median_ms * 1e-3),
        "peak_mib": peak / 2**20,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        **extra,
    }


def _reference_pass(model, pairs, budget: int, device: torch.device):
    """The compute of the reference pass over `pairs` (no fingerprint, no files) as a callable."""
    from fastdpo.reference_build import compute_columns
    from fastdpo.reference_fingerprint import example_digest

    digests = [example_digest(p) for p in pairs]
    model.eval()

    def run_pass() -> None:
        compute_columns(
            model, pairs, digests, max_tokens_per_batch=budget, per_token=False, device=device
        )

    return run_pass


def _train_epoch(model, pairs, cache, budget: int, device: torch.device):
    """One epoch of DPO steps (one optimizer step per micro-batch) as a callable."""
    from fastdpo.data.packing import pack_pairs
    from fastdpo.losses import preference_loss
    from fastdpo.model import sequence_logps

    batches = list(pack_pairs(pairs, max_tokens_per_batch=budget, seed=0))
    if device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()

    def epoch() -> None:
        for batch in batches:
            on_device = batch.to(device, non_blocking=True)
            ref = cache.for_batch(batch, device=device)
            policy = sequence_logps(model, on_device)
            loss, _ = preference_loss(
                policy.chosen, policy.rejected, ref.chosen, ref.rejected, beta=0.1
            )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return epoch


def render(rows: list[dict]) -> str:
    train_rate = {
        (r["preset"], r["dtype"]): r["tokens_per_s"]
        for r in rows
        if r["mode"] == "train" and r["status"] == "ok"
    }
    for row in rows:
        rate = train_rate.get((row["preset"], row["dtype"]))
        if row["mode"] != "train" and row["status"] == "ok" and rate:
            row["vs_train"] = row["tokens_per_s"] / rate
    columns: list[harness.Column] = [
        ("preset", lambda r: f"{r['preset']} ({harness.fmt(r.get('params_m'), '.1f')}M params)"),
        ("dtype", lambda r: r["dtype"]),
        ("mode", lambda r: r["mode"]),
        (
            "tokens/batch",
            lambda r: r["train_budget"] if r["mode"] == "train" else r["ref_budget"],
        ),
        ("tokens", lambda r: harness.fmt(r.get("tokens"), ",")),
        ("median ms / pass", lambda r: harness.fmt(r.get("median_ms"))),
        ("tokens/s", lambda r: harness.fmt(r.get("tokens_per_s"), ",.0f")),
        (
            "vs train",
            lambda r: harness.fmt(r.get("vs_train"), ".2f") + "x" if r.get("vs_train") else "-",
        ),
        ("peak MiB", lambda r: harness.fmt(r.get("peak_mib"), ",.0f")),
        ("weights digest", lambda r: _digest(r)),
        ("note", lambda r: "" if r["status"] == "ok" else f"{r['status']}: {r.get('note', '')}"),
    ]
    return harness.markdown_table(rows, columns)


def _digest(row: dict) -> str:
    if row.get("digest_ms") is None:
        return "-"
    return f"{row['digest_ms']:.0f} ms ({row['digest_gb_s']:.1f} GB/s)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_arguments(parser, default_csv=harness.RESULTS_DIR / "precompute.csv")
    # One call is a whole pass over the data: a few repeats suffice.
    parser.set_defaults(warmup=1, repeats=3)
    parser.add_argument("--preset", choices=list(PRESETS), help="model and data sizes")
    parser.add_argument("--small", action="store_true", help="same as --preset small")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--train-budget", type=int, help="tokens per training micro-batch")
    parser.add_argument("--ref-budget", type=int, help="tokens per reference-pass micro-batch")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset")
    args = parser.parse_args(argv)
    if args.worker is not None:
        harness.worker_main(run_case, args.worker)
        return

    preset_name = args.preset or ("small" if args.small else "gpu")
    preset = PRESETS[preset_name]
    modes = [m.strip() for m in args.modes.split(",")]
    for mode in modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
    cases = [
        {
            "mode": mode,
            "preset": preset_name,
            "dtype": args.dtype or ("bf16" if args.device == "cuda" else "fp32"),
            "train_budget": args.train_budget or preset["train_budget"],
            "ref_budget": args.ref_budget or preset["ref_budget"],
            **harness.run_settings(args),
        }
        for mode in modes
    ]
    rows = harness.run_cases(SCRIPT, cases, timeout_s=args.timeout, rounds=args.rounds)
    harness.finish(
        rows, bench="precompute", args=args, device=torch.device(args.device), table=render(rows)
    )


if __name__ == "__main__":
    main()
