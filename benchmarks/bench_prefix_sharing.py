"""Benchmark: a DPO training step with each pair's prompt computed once (shared-prompt packing)
against the plain packed form, over the same pairs and the same token budget per micro-batch.

Per length distribution, the same synthetic pairs (random token ids, lengths drawn as below)
are packed twice with `pack_pairs(..., max_tokens_per_batch=budget)`: `share_prompt=False`
(the plain form: the prompt once per sequence, twice per pair) and `share_prompt=True` (once
per pair). One timed call is one optimizer step over all the pairs: for every micro-batch,
`sequence_logps` forward, the sigmoid DPO loss against fixed reference log-probs (random,
drawn once per pair: no reference model runs), backward (gradients accumulate), then one
AdamW step and `zero_grad`. Collation happens before timing (a DataLoader worker's job in
training) and the batches are on the device. Each mode runs in its own subprocess
(`harness.run_isolated`); `--rounds K` alternates them and pairs the ratios per round.

Reported per distribution:
  prompt share     prompts / the plain form's tokens (`fastdpo.data.shared_prompt.prompt_share`),
                   what sharing removes from the stream
  ideal            stream tokens without sharing / with (= 1 / (1 - prompt share) for pairs)
  speedup          step time without sharing / with (same pairs: the per-pair ratio); with
                   --rounds, the median of the per-round ratios (`harness.paired_ratio`)
  of ideal         speedup / ideal
  tokens/s         the pairs' tokens as the plain form counts them (prompt twice) per second,
                   and stream tokens (what the model actually ran) per second
  auto             what `share_prompt="auto"` picks for these pairs (AUTO_MIN_PROMPT_SHARE)
  peak MiB         memory one step adds above the resident model and optimizer state
  loss rel diff    the step's loss with sharing against without, at the same initial weights
                   (the two forms compute the same thing; fp32 ~1e-6)

Distributions (prompt and completion lengths drawn log-normally around the medians; the
sequence total prompt + completion and the prompt / completion ratio are the targets):

  hh-rlhf        median total ~186 per sequence, prompt / completion ~2.2
  ultrafeedback  ~409, ~0.4
  metamath       ~872, ~3.9 (MetaMath-DPO)
  long-4k        a 4096-token shared context, 512-token completions (fixed lengths)
  short-15 .. short-02   ~400 tokens per sequence with prompt shares 0.15, 0.10, 0.05, 0.02:
                 where sharing stops paying (the break-even for AUTO_MIN_PROMPT_SHARE)
  anchor-4k-4k   4096-token prompt, 4096-token completions, and anchor-16k, a 16384-token
  anchor-16k     prefix with 512-token completions: the lengths of the published GPU figures
                 (flash-preference: 1.27x at 4k/4k, 1.88x at a 16k prefix); not run by default

Presets (random Llama configs from transformers, nothing downloaded):

  cpu      hidden 512, 8 layers, 8/4 heads (head dim 64), MLP 1536, vocabulary 8192, fp32.
           Sized so the body dominates the head as in real models: sharing removes prompt
           tokens from the body (every layer) but cannot speed up the head, which runs only on
           completion tokens, and those are the same with and without sharing. Here the head is
           8192 x 512 = 4.2M of ~29M parameters per completion token (~14%; Llama-3-8B ~7%,
           Llama-3.2-1B ~21%), so a head-dominated toy model does not understate sharing.
  gpu-1b   Llama-3.2-1B's shape (hidden 2048, 16 layers, 32/8 heads, vocabulary 128256, tied),
           bf16 weights and AdamW state (a timing model, not a recipe)
  tiny     smoke tests: seconds, numbers meaningless (lengths scaled down 8x)

    python benchmarks/bench_prefix_sharing.py --device cpu --preset cpu --rounds 3
    python benchmarks/bench_prefix_sharing.py --device cuda --preset gpu-1b --attention flash
    python benchmarks/bench_prefix_sharing.py --device cuda --preset gpu-1b --dists anchor-16k
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import harness
import torch

SCRIPT = Path(__file__).resolve()

# name -> (prompt median, completion median, log-normal sigma); sigma 0 means fixed lengths.
DISTRIBUTIONS = {
    "hh-rlhf": (122, 55, 0.6),
    "ultrafeedback": (107, 268, 0.6),
    "metamath": (686, 176, 0.4),
    "long-4k": (4096, 512, 0.0),
    "short-15": (120, 280, 0.3),
    "short-10": (80, 320, 0.3),
    "short-05": (40, 360, 0.3),
    "short-02": (16, 384, 0.3),
    # GPU anchors' lengths (not in the default list: minutes per step on the CPU)
    "anchor-4k-4k": (4096, 4096, 0.0),
    "anchor-16k": (16384, 512, 0.0),
}
DEFAULT_DISTS = tuple(name for name in DISTRIBUTIONS if not name.startswith("anchor-"))

PRESETS = {
    "cpu": {
        "model": dict(
            hidden_size=512,
            intermediate_size=1536,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
            vocab_size=8192,
        ),
        "dtype": "fp32",
        "budget": 2048,
        "step_tokens": 4096,
        "length_scale": 1.0,
    },
    "gpu-1b": {
        "model": dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=128256,
            rope_theta=500000.0,
            tie_word_embeddings=True,
        ),
        "dtype": "bf16",
        "budget": 16384,
        "step_tokens": 65536,
        "length_scale": 1.0,
    },
    "tiny": {
        "model": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=512,
        ),
        "dtype": "fp32",
        "budget": 256,
        "step_tokens": 512,
        "length_scale": 0.125,
    },
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("plain", "shared")


# --------------------------------------------------------------------------------------------
# data


def draw_length(rng: random.Random, median: float, sigma: float) -> int:
    """A log-normal length around `median` (clipped to [1, 4 x median]); `median` if sigma 0."""
    if sigma == 0:
        return max(1, round(median))
    return max(1, min(round(4 * median), round(median * math.exp(rng.gauss(0.0, sigma)))))


def make_pairs(dist: str, preset: dict, vocab: int, seed: int) -> list:
    """Pairs of `dist` until their plain-form tokens reach the preset's `step_tokens` (at least
    one pair): the same pairs for both modes, since both draw them from the same seed."""
    from fastdpo.data.types import TokenizedPair

    prompt_median, completion_median, sigma = DISTRIBUTIONS[dist]
    scale = preset["length_scale"]
    rng = random.Random(f"{dist}-{seed}")
    pairs, plain_tokens = [], 0
    while not pairs or plain_tokens < preset["step_tokens"]:
        prompt = draw_length(rng, prompt_median * scale, sigma)
        chosen = draw_length(rng, completion_median * scale, sigma)
        rejected = draw_length(rng, completion_median * scale, sigma)
        pairs.append(
            TokenizedPair(
                example_id=f"{dist}-{len(pairs)}",
                prompt_ids=[rng.randrange(3, vocab) for _ in range(prompt)],
                chosen_ids=[rng.randrange(3, vocab) for _ in range(chosen)],
                rejected_ids=[rng.randrange(3, vocab) for _ in range(rejected)],
            )
        )
        plain_tokens += pairs[-1].num_tokens
    return pairs


def budget_for(pairs: list, preset: dict) -> int:
    """The token budget per micro-batch, the same in both modes: the preset's, raised to the
    longest plain-form pair (pairs are never split, so a 4k-prompt pair needs 9216 tokens)."""
    return max(preset["budget"], max(p.num_tokens for p in pairs))


# --------------------------------------------------------------------------------------------
# model and step


def build_model(preset: dict, dtype: torch.dtype, device: torch.device, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**preset["model"], max_position_embeddings=max_positions)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.train()  # dropout is 0 in this config


def run_case(case: dict) -> dict:
    from fastdpo import pack_pairs, preference_loss, sequence_logps
    from fastdpo.attention import CallFeatures, unavailable_reason
    from fastdpo.data.shared_prompt import prompt_share, resolve_share_prompt

    if case["threads"]:
        torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise harness.Unavailable("CUDA is not available")
    dtype = DTYPES[case["dtype"]]
    preset = PRESETS[case["preset"]]
    if case["attention"] != "auto":
        features = CallFeatures(device_type=device.type, dtype=dtype, needs_grad=True)
        reason = unavailable_reason(case["attention"], features)
        if reason is not None:
            raise harness.Unavailable(reason)

    pairs = make_pairs(case["dist"], preset, preset["model"]["vocab_size"], case["seed"])
    budget = budget_for(pairs, preset)
    shared = case["mode"] == "shared"
    packed = pack_pairs(pairs, max_tokens_per_batch=budget, shuffle=False, share_prompt=shared)
    batches = [(batch.to(device), packed.plan[i]) for i, batch in enumerate(packed)]
    longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    torch.manual_seed(case["seed"])
    model = build_model(preset, dtype, device, max_positions=max(longest, 128))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    # Fixed reference log-probs, one per completion: about the policy's at random init
    # (-log V per token), so the margins and the loss are of a realistic size.
    rng = torch.Generator().manual_seed(case["seed"])
    per_token = -math.log(preset["model"]["vocab_size"])
    ref = {
        role: torch.tensor(
            [per_token * len(getattr(p, f"{role}_ids")) for p in pairs], dtype=torch.float32
        )
        + torch.randn(len(pairs), generator=rng)
        for role in ("chosen", "rejected")
    }
    ref = {role: values.to(device) for role, values in ref.items()}
    backends: set[str] = set()
    losses: list[float] = []

    def step() -> None:
        total = torch.zeros((), device=device)
        for batch, indices in batches:
            out = sequence_logps(model, batch, attention=case["attention"])
            backends.update(out.attention_backends)
            index = torch.tensor(indices, device=device)
            loss, _ = preference_loss(
                out.chosen,
                out.rejected,
                ref["chosen"][index],
                ref["rejected"][index],
                loss="sigmoid",
                beta=0.1,
            )
            # The step's loss is the mean over all its pairs: weight each micro-batch's mean.
            weighted = loss * (len(indices) / len(pairs))
            weighted.backward()
            total += weighted.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # inside the call: the peak includes gradients
        losses.append(total.item())

    try:
        peak, timing = harness.measure(
            step, device=device, warmup=case["warmup"], repeats=case["repeats"]
        )
    except torch.OutOfMemoryError as error:
        raise harness.Unavailable(f"out of memory: {str(error).splitlines()[0]}") from error

    plain_tokens = sum(p.num_tokens for p in pairs)
    stream_tokens = sum(p.tokens_in_stream(True) for p in pairs)
    seconds = timing.median_ms * 1e-3
    return {
        "pairs": len(pairs),
        "budget": budget,
        "micro_batches": len(batches),
        "plain_tokens": plain_tokens,
        "stream_tokens": stream_tokens if shared else plain_tokens,
        "prompt_share": prompt_share(pairs),
        "ideal": plain_tokens / stream_tokens,
        "auto_shares": resolve_share_prompt("auto", pairs),
        "median_ms": timing.median_ms,
        "p20_ms": timing.p20_ms,
        "p80_ms": timing.p80_ms,
        "cpu_median_ms": timing.cpu_median_ms,
        "pairs_per_s": len(pairs) / seconds,
        "tokens_per_s": plain_tokens / seconds,
        "stream_tokens_per_s": (stream_tokens if shared else plain_tokens) / seconds,
        "peak_mib": peak / 2**20,
        "loss": losses[0],  # the first step, at the initial weights: comparable across modes
        "note": f"attention {','.join(sorted(backends))}",
    }


# --------------------------------------------------------------------------------------------
# summary: one line per distribution


def summarize(rows: list[dict]) -> list[dict]:
    """Adds the comparison to each ok "shared" row that has an ok "plain" partner, and returns
    one summary dict per distribution (the shared row, or the failed one)."""
    by_dist: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_dist.setdefault(row["dist"], {})[row["mode"]] = row
    summary = []
    for modes in by_dist.values():
        plain, shared = modes.get("plain"), modes.get("shared")
        if plain is None or shared is None:
            summary.append(plain or shared)
            continue
        if plain["status"] == "ok" and shared["status"] == "ok":
            speedup = harness.paired_ratio(plain, shared)
            shared["speedup"] = speedup
            shared["of_ideal"] = speedup / shared["ideal"]
            shared["plain_median_ms"] = plain["median_ms"]
            shared["plain_peak_mib"] = plain["peak_mib"]
            shared["plain_tokens_per_s"] = plain["tokens_per_s"]
            shared["loss_rel_diff"] = abs(shared["loss"] - plain["loss"]) / max(
                abs(plain["loss"]), 1e-30
            )
            summary.append(shared)
        else:
            summary.append(shared if shared["status"] != "ok" else plain)
    return summary


def render(summary: list[dict]) -> str:
    def ok(row: dict, key: str, spec: str = ".2f") -> str:
        return harness.fmt(row.get(key), spec) if row["status"] == "ok" else "-"

    columns: list[harness.Column] = [
        ("distribution", lambda r: r["dist"]),
        ("pairs", lambda r: r.get("pairs", "-")),
        ("prompt share", lambda r: ok(r, "prompt_share", ".3f")),
        ("ideal", lambda r: ok(r, "ideal")),
        ("speedup", lambda r: ok(r, "speedup")),
        ("of ideal", lambda r: ok(r, "of_ideal", ".0%")),
        ("plain ms", lambda r: _plain_ms(r)),
        ("shared ms (p20-p80)", lambda r: _shared_ms(r)),
        ("tokens/s plain -> shared", lambda r: _tokens(r)),
        ("stream tokens/s", lambda r: ok(r, "stream_tokens_per_s", ",.0f")),
        ("auto", lambda r: ("on" if r["auto_shares"] else "off") if "auto_shares" in r else "-"),
        ("peak MiB plain / shared", lambda r: _peaks(r)),
        ("loss rel diff", lambda r: ok(r, "loss_rel_diff", ".1e")),
        ("note", lambda r: r["note"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"),
    ]
    return harness.markdown_table(summary, columns)


def _plain_ms(row: dict) -> str:
    if row.get("speedup") is None:
        return "-"
    return f"{row['plain_median_ms']:.0f}"


def _shared_ms(row: dict) -> str:
    if row.get("speedup") is None:
        return "-"
    return f"{row['median_ms']:.0f} ({row['p20_ms']:.0f}-{row['p80_ms']:.0f})"


def _tokens(row: dict) -> str:
    if row.get("speedup") is None:
        return "-"
    return f"{row['plain_tokens_per_s']:,.0f} -> {row['tokens_per_s']:,.0f}"


def _peaks(row: dict) -> str:
    if row.get("speedup") is None:
        return "-"
    return f"{row['plain_peak_mib']:,.0f} / {row['peak_mib']:,.0f}"


# --------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_arguments(parser, default_csv=harness.RESULTS_DIR / "prefix_sharing.csv")
    # A cpu-preset step takes seconds: fewer calls than the harness's defaults keep a round of
    # all eight distributions near 10 minutes on 2 cores.
    parser.set_defaults(warmup=1, repeats=3)
    parser.add_argument("--preset", choices=list(PRESETS), help="default: gpu-1b on CUDA, else cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: the preset's")
    parser.add_argument(
        "--dists",
        default=",".join(DEFAULT_DISTS),
        help=f"comma-separated, from {', '.join(DISTRIBUTIONS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "flash", "torch", "flex", "sdpa"],
        help="packed-attention backend (fastdpo.attention); auto: sdpa on the CPU",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads per case (0: torch's default)",
    )
    args = parser.parse_args(argv)
    if args.worker is not None:
        harness.worker_main(run_case, args.worker)
        return

    dists = [name.strip() for name in args.dists.split(",")]
    for name in dists:
        if name not in DISTRIBUTIONS:
            parser.error(f"unknown distribution {name!r}: choose from {', '.join(DISTRIBUTIONS)}")
    preset = args.preset or ("gpu-1b" if args.device == "cuda" else "cpu")
    cases = [
        {
            "dist": dist,
            "mode": mode,
            "preset": preset,
            "dtype": args.dtype or PRESETS[preset]["dtype"],
            "attention": args.attention,
            "threads": args.threads,
            **harness.run_settings(args),
        }
        for dist in dists
        for mode in MODES
    ]
    rows = harness.run_cases(SCRIPT, cases, timeout_s=args.timeout, rounds=args.rounds)
    summary = summarize(rows)
    harness.finish(
        rows,
        bench="prefix_sharing",
        args=args,
        device=torch.device(args.device),
        table=render(summary),
    )


if __name__ == "__main__":
    main()
