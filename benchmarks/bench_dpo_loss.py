"""Benchmark: the DPO loss from hidden states, forward + backward, fastdpo against baselines.

The issue's CPU target, measured side by side in one run. Inputs per case: hidden states
[2 x pairs, T, H] (chosen sequences first, then rejected, as Liger lays them out), a head
[V, H], targets [2 x pairs, T] whose first quarter of every sequence is prompt (ignore_index),
and reference log-probs [pairs] from a cache (computed once in set-up, outside the timing).
Every implementation computes the sigmoid DPO loss (beta 0.1) and the gradients of hidden and
head:

  fastdpo        prompt positions dropped (index_select of the completion positions, as the
                 packed data pipeline gives them), linear_logprobs(impl="torch"), per-sequence
                 sums, fastdpo.preference_loss
  cce            cut-cross-entropy's torch_compile impl, reduction="none", per-sequence sums
                 (it drops ignore_index rows itself; it keeps logits for backward)
  naive          full [2P, T, V] logits, fp32 log-softmax, gather, masked sums
  liger          LigerFusedLinearDPOLoss (chunked, torch.compile'd, one pair per chunk) with
                 use_ref_model=False: it cannot take cached reference log-probs, so its loss
                 uses zeros instead (same head work; the loss value differs from the others)
  fastdpo-triton linear_logprobs(impl="triton") in place of the torch impl (CUDA only)
  fastdpo-ignored the input cce gets: hidden [2P, T, H] and targets [2P, T] with the prompt
                 quarter as ignore_index, straight to linear_logprobs (impl "auto": torch on
                 the CPU, triton on CUDA), which drops the ignored rows itself; sums over T

Targets: fastdpo's peak memory <= 2x the input gradients (hidden.grad + head.grad) and its
time within 1.4x of cce's torch_compile impl. Each case runs in a fresh subprocess.

    python benchmarks/bench_dpo_loss.py                        # CPU, the issue's two shapes
    python benchmarks/bench_dpo_loss.py --device cpu --small   # CPU, small shapes (smoke)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import harness
import torch
import torch.nn.functional as F

SCRIPT = Path(__file__).resolve()

# (pairs, T, H, V)
TARGET_SHAPES = [(1, 8192, 512, 32000), (4, 512, 512, 32000)]
SMALL_SHAPES = [(1, 1024, 128, 4096), (4, 128, 128, 4096)]
IMPLS = ("fastdpo", "cce", "naive", "liger", "fastdpo-triton", "fastdpo-ignored")
DEFAULT_IMPLS = ("fastdpo", "cce", "naive", "liger")
BETA = 0.1
IGNORE_INDEX = -100
MEMORY_TARGET = 2.0  # peak memory / input gradients
TIME_TARGET = 1.4  # fastdpo time / cce torch_compile time


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> torch.Tensor:
    """Sigmoid DPO loss (mean over pairs) of [P] per-sequence log-probs; fastdpo's if present."""
    try:
        from fastdpo.losses import preference_loss
    except ImportError:
        margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
        return -F.logsigmoid(BETA * margin).mean()
    loss, _ = preference_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss="sigmoid", beta=BETA
    )
    return loss


# --------------------------------------------------------------------------------------------
# implementations: each returns loss_fn(hidden [2P, T, H], weight [V, H]) -> scalar loss


def _fastdpo(impl: str, targets: torch.Tensor, refs: tuple[torch.Tensor, torch.Tensor]):
    from fastdpo.ops.linear_logprobs import linear_logprobs

    sequences, length = targets.shape
    flat_targets = targets.reshape(-1)
    # What the data pipeline hands over: flat positions of completion tokens, their targets and
    # the sequence each belongs to (built once per batch, not in the timed region).
    positions = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
    completion_targets = flat_targets[positions]
    sequence_of_token = positions // length
    pairs = sequences // 2

    def loss_fn(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        completion_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        logp = linear_logprobs(completion_hidden, weight, completion_targets, impl=impl)
        sums = logp.new_zeros(sequences).index_add(0, sequence_of_token, logp)
        return dpo_loss(sums[:pairs], sums[pairs:], *refs)

    return loss_fn


def _fastdpo_ignored(targets: torch.Tensor, refs: tuple[torch.Tensor, torch.Tensor]):
    """The whole [2P, T] labels, prompt positions marked ignore_index: the op drops them."""
    from fastdpo.ops.linear_logprobs import linear_logprobs

    pairs = targets.shape[0] // 2

    def loss_fn(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        token_logp = linear_logprobs(hidden, weight, targets, ignore_index=IGNORE_INDEX)
        sums = token_logp.sum(-1)  # ignored positions are 0
        return dpo_loss(sums[:pairs], sums[pairs:], *refs)

    return loss_fn


def _cce(targets: torch.Tensor, refs: tuple[torch.Tensor, torch.Tensor]):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as error:
        raise harness.Unavailable(f"cut-cross-entropy not installed ({error})") from error
    pairs = targets.shape[0] // 2

    def loss_fn(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        token_nll = linear_cross_entropy(
            hidden, weight, targets, reduction="none", impl="torch_compile"
        )
        sums = -token_nll.float().sum(-1)
        return dpo_loss(sums[:pairs], sums[pairs:], *refs)

    return loss_fn


def _naive(targets: torch.Tensor, refs: tuple[torch.Tensor, torch.Tensor]):
    pairs = targets.shape[0] // 2
    completion = targets != IGNORE_INDEX
    safe_targets = targets.clamp(min=0)

    def loss_fn(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        logprobs = (hidden @ weight.T).float().log_softmax(-1)
        token_logp = logprobs.gather(-1, safe_targets[..., None]).squeeze(-1)
        sums = (token_logp * completion).sum(-1)
        return dpo_loss(sums[:pairs], sums[pairs:], *refs)

    return loss_fn


def _liger(targets: torch.Tensor):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError as error:
        raise harness.Unavailable(f"liger-kernel not installed ({error})") from error
    liger_loss = LigerFusedLinearDPOLoss(beta=BETA, ignore_index=IGNORE_INDEX, use_ref_model=False)

    def loss_fn(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        loss, _ = liger_loss(weight, hidden, targets)
        return loss

    return loss_fn


def build_loss(
    name: str, targets: torch.Tensor, refs: tuple[torch.Tensor, torch.Tensor], device
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str]:
    """The loss function called `name` and a note; raises harness.Unavailable if it cannot run."""
    if name == "fastdpo":
        return _fastdpo("torch", targets, refs), "linear_logprobs impl=torch"
    if name == "fastdpo-triton":
        if device.type != "cuda":
            raise harness.Unavailable("Triton kernels benchmarked on CUDA only (CPU interpreter)")
        return _fastdpo("triton", targets, refs), "linear_logprobs impl=triton"
    if name == "fastdpo-ignored":
        impl = "triton" if device.type == "cuda" else "torch"
        return _fastdpo_ignored(targets, refs), f"[2P, T] labels, ignored rows dropped, {impl}"
    if name == "cce":
        return _cce(targets, refs), "impl=torch_compile"
    if name == "naive":
        return _naive(targets, refs), "full logits, fp32 log-softmax"
    if name == "liger":
        return _liger(targets), "chunk_size=1, use_ref_model=False (reference log-probs = 0)"
    raise ValueError(f"unknown impl {name!r}; choose from {IMPLS}")


# --------------------------------------------------------------------------------------------
# one case (runs in the worker subprocess)


def make_inputs(case: dict, device: torch.device):
    """hidden [2P, T, H] fp32, weight [V, H] fp32, targets [2P, T] int64 (prompt quarter =
    ignore_index) and cached reference log-probs (chosen [P], rejected [P]) fp32."""
    from fastdpo.ops.linear_logprobs import linear_logprobs

    pairs, length, h, v = case["pairs"], case["t"], case["h"], case["v"]
    generator = torch.Generator().manual_seed(case["seed"])
    hidden = torch.randn(2 * pairs, length, h, generator=generator).to(device)
    weight = (torch.randn(v, h, generator=generator) * h**-0.5).to(device)
    targets = torch.randint(0, v, (2 * pairs, length), generator=generator).to(device)
    targets[:, : length // 4] = IGNORE_INDEX
    # The reference is the starting policy, plus noise so that the loss is not exactly log 2.
    with torch.no_grad():
        token_logp = linear_logprobs(hidden, weight, targets, impl="torch")
    ref = token_logp.sum(-1) + torch.randn(2 * pairs, generator=generator).to(device)
    return hidden, weight, targets, (ref[:pairs].clone(), ref[pairs:].clone())


def run_case(case: dict) -> dict:
    """Measures one (impl, shape) case of the DPO loss, forward + backward."""
    device = torch.device(case["device"])
    hidden, weight, targets, refs = make_inputs(case, device)
    loss_fn, note = build_loss(case["impl"], targets, refs, device)
    hidden.requires_grad_()
    weight.requires_grad_()

    def call() -> None:
        loss_fn(hidden, weight).backward()
        # Dropped at the end of the call: the measured call starts without gradients and its
        # peak includes them.
        hidden.grad = None
        weight.grad = None

    peak, timing = harness.measure(
        call, device=device, warmup=case["warmup"], repeats=case["repeats"]
    )
    with torch.no_grad():
        loss_value = loss_fn(hidden, weight).item()

    grad_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
    completion_tokens = int((targets != IGNORE_INDEX).sum())
    return {
        "median_ms": timing.median_ms,
        "p20_ms": timing.p20_ms,
        "p80_ms": timing.p80_ms,
        "cpu_median_ms": timing.cpu_median_ms,
        "peak_mib": peak / 2**20,
        "grads_mib": grad_bytes / 2**20,
        "peak_over_grads": peak / grad_bytes,
        "completion_tokens": completion_tokens,
        # 8 N H V over the completion tokens: the work the fused op does (recompute included).
        "tflops": harness.tflops(8 * completion_tokens * case["h"] * case["v"], timing.median_ms),
        "loss": loss_value,
        "note": note,
    }


# --------------------------------------------------------------------------------------------
# command line


def add_targets(rows: list[dict]) -> None:
    """Sets 'time_over_cce' (wall and CPU time) on fastdpo rows and 'meets_targets' (wall time)."""
    cce_rows = {
        (r["pairs"], r["t"], r["h"], r["v"]): r
        for r in rows
        if r["impl"] == "cce" and r["status"] == "ok"
    }
    for row in rows:
        if row["status"] != "ok" or not row["impl"].startswith("fastdpo"):
            continue
        verdicts = [f"memory {'met' if row['peak_over_grads'] <= MEMORY_TARGET else 'MISSED'}"]
        reference = cce_rows.get((row["pairs"], row["t"], row["h"], row["v"]))
        if reference is not None:
            row["time_over_cce"] = harness.paired_ratio(row, reference)
            # In process CPU time (steadier when other processes share the cores): the ratio of
            # the two reported rounds, not paired round by round.
            row["cpu_time_over_cce"] = row["cpu_median_ms"] / reference["cpu_median_ms"]
            verdicts.append(f"time {'met' if row['time_over_cce'] <= TIME_TARGET else 'MISSED'}")
        row["meets_targets"] = ", ".join(verdicts)


def render(rows: list[dict]) -> str:
    """The markdown table of one run."""
    columns: list[harness.Column] = [
        ("pairs x T, H, V", lambda r: f"{r['pairs']} x {r['t']}, {r['h']}, {r['v']}"),
        ("impl", lambda r: r["impl"]),
        ("median ms", lambda r: harness.fmt(r.get("median_ms"), ",.0f")),
        ("p20-p80 ms", lambda r: _range(r)),
        ("CPU-time ms", lambda r: harness.fmt(r.get("cpu_median_ms"), ",.0f")),
        ("peak MiB", lambda r: harness.fmt(r.get("peak_mib"), ",.0f")),
        ("peak / grads", lambda r: harness.fmt(r.get("peak_over_grads"), ".2f")),
        ("time / cce", lambda r: harness.fmt(r.get("time_over_cce"), ".2f")),
        ("CPU time / cce", lambda r: harness.fmt(r.get("cpu_time_over_cce"), ".2f")),
        ("targets (<= 2x grads, <= 1.4x cce)", lambda r: r.get("meets_targets", "")),
        ("loss", lambda r: harness.fmt(r.get("loss"), ".6f")),
        ("note", lambda r: r["note"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"),
    ]
    return harness.markdown_table(rows, columns)


def _range(row: dict) -> str:
    if row.get("p20_ms") is None:
        return "-"
    return f"{row['p20_ms']:,.0f}-{row['p80_ms']:,.0f}"


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    """'P,T,H,V;P,T,H,V' -> [(pairs, T, H, V), ...]."""
    shapes = []
    for item in text.split(";"):
        parts = item.split(",")
        if len(parts) != 4 or not all(part.strip().isdigit() for part in parts):
            raise argparse.ArgumentTypeError(f"shape {item!r} is not P,T,H,V (four integers)")
        pairs, length, h, v = (int(part) for part in parts)
        shapes.append((pairs, length, h, v))
    return shapes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_arguments(parser, default_csv=harness.RESULTS_DIR / "dpo_loss.csv")
    parser.set_defaults(device="cpu")  # this is the CPU target; --device cuda also works
    parser.add_argument("--small", action="store_true", help=f"shapes {SMALL_SHAPES}")
    parser.add_argument("--shapes", type=parse_shapes, help="'P,T,H,V;...' (overrides --small)")
    parser.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help=f"subset of {IMPLS}")
    args = parser.parse_args(argv)
    if args.worker is not None:
        harness.worker_main(run_case, args.worker)
        return

    impls = [name.strip() for name in args.impls.split(",")]
    for name in impls:
        if name not in IMPLS:
            parser.error(f"unknown impl {name!r}: choose from {', '.join(IMPLS)}")
    shapes = args.shapes or (SMALL_SHAPES if args.small else TARGET_SHAPES)
    cases = [
        {
            "impl": impl,
            "pairs": pairs,
            "t": length,
            "h": h,
            "v": v,
            "dtype": "fp32",
            **harness.run_settings(args),
        }
        for pairs, length, h, v in shapes
        for impl in impls
    ]
    rows = harness.run_cases(SCRIPT, cases, timeout_s=args.timeout, rounds=args.rounds)
    add_targets(rows)
    harness.finish(
        rows, bench="dpo_loss", args=args, device=torch.device(args.device), table=render(rows)
    )


if __name__ == "__main__":
    main()
