"""`fastdpo demo --op`: the fused log-prob op against the naive full-logits path, on one shape.

It computes per-token log-probs of target tokens under a language-model head, forward and
backward, once through `fastdpo.linear_logprobs` and once the usual way (full `[N, V]` logits,
fp32 log-softmax, gather), and prints the time and peak memory of each and how far their values
and gradients differ. It exits non-zero if they disagree beyond the dtype's tolerance.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastdpo.demo.settings import DemoOptions
from fastdpo.memory import PeakMemoryMeter, limit_malloc_retention


@dataclass(kw_only=True)
class RunResult:
    """One path's outputs and costs: logp [N] fp32, grads in the inputs' dtype."""

    seconds: float
    peak_bytes: int
    logp: torch.Tensor
    grad_hidden: torch.Tensor
    grad_weight: torch.Tensor


def naive_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The usual path: full logits [N, V], fp32 log-softmax, gather. hidden [N, H] -> logp [N]."""
    logits = (hidden @ weight.T).float()
    return logits.log_softmax(dim=-1).gather(1, targets[:, None]).squeeze(1)


def _run_once(
    logprobs: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    grad_logp: torch.Tensor,
) -> RunResult:
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    with PeakMemoryMeter(hidden.device) as meter:
        start = time.perf_counter()
        logp = logprobs(hidden, weight, targets)
        logp.backward(grad_logp)
        if hidden.device.type == "cuda":
            torch.cuda.synchronize(hidden.device)
        seconds = time.perf_counter() - start
    return RunResult(
        seconds=seconds,
        peak_bytes=meter.peak_bytes,
        logp=logp.detach(),
        grad_hidden=hidden.grad,
        grad_weight=weight.grad,
    )


def _relative_max_diff(value: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max |value - reference|, that divided by max |reference|), computed in fp32."""
    diff = (value.float() - reference.float()).abs().max().item()
    scale = reference.float().abs().max().item()
    return diff, diff / max(scale, 1e-30)


def run_demo(options: DemoOptions, *, print_fn: Callable[[str], None] = print) -> int:
    """Runs the comparison and prints it; returns 0 if the two paths agree, 1 if not."""
    from fastdpo.ops.linear_logprobs import linear_logprobs

    if options.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(options.device)
    impl = options.impl
    if impl == "auto":
        impl = "triton" if device.type == "cuda" else "torch"
    # CPU: fp32, the dtype CPU training uses. CUDA: bf16, the dtype GPU training uses.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # Relative tolerance against the naive path: fp32 differs by summation order only; bf16
    # gradients are rounded once more by each path.
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4

    n, h, v = options.tokens, options.hidden, options.vocab
    generator = torch.Generator().manual_seed(options.seed)
    hidden = torch.randn(n, h, generator=generator).to(device, dtype)
    weight = (torch.randn(v, h, generator=generator) * h**-0.5).to(device, dtype)
    targets = torch.randint(0, v, (n,), generator=generator).to(device)
    grad_logp = torch.randn(n, generator=generator).to(device)

    def fused(hid: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return linear_logprobs(hid, w, t, impl=impl)

    paths = {"naive (full logits)": naive_logprobs, f"fastdpo ({impl})": fused}
    limit_malloc_retention()
    # One small warm-up call per path: kernel compilation and thread-pool start-up stay out of
    # the measured call.
    warm = min(n, 64)
    for logprobs in paths.values():
        _run_once(logprobs, hidden[:warm], weight, targets[:warm], grad_logp[:warm])

    results = {
        name: _run_once(fn, hidden, weight, targets, grad_logp) for name, fn in paths.items()
    }

    logits_mb = n * v * 4 / 2**20
    print_fn(
        "fastdpo demo --op: per-token log-probs through a language-model head, forward + backward"
    )
    print_fn(
        f"  device {device.type}, {str(dtype).removeprefix('torch.')}, "
        f"N={n} tokens, H={h}, V={v} (the naive path's fp32 logits alone: {logits_mb:,.0f} MiB)"
    )
    print_fn(f"  {'path':<22}{'time':>10}{'peak memory':>16}")
    for name, result in results.items():
        peak_mb = result.peak_bytes / 2**20
        print_fn(f"  {name:<22}{result.seconds:>9.2f}s{peak_mb:>12,.0f} MiB")
    naive, ours = results.values()
    grads_mb = (hidden.numel() + weight.numel()) * hidden.element_size() / 2**20
    print_fn(f"  (both peaks include the input gradients themselves: {grads_mb:,.0f} MiB)")
    if ours.peak_bytes > 0:
        print_fn(f"  peak memory: {naive.peak_bytes / ours.peak_bytes:.1f}x less with fastdpo")

    agree = True
    print_fn("  agreement (max |fastdpo - naive|, and relative to max |naive|):")
    for label, mine, reference in (
        ("logp", ours.logp, naive.logp),
        ("d hidden", ours.grad_hidden, naive.grad_hidden),
        ("d weight", ours.grad_weight, naive.grad_weight),
    ):
        diff, relative = _relative_max_diff(mine, reference)
        ok = relative <= tolerance
        agree &= ok
        verdict = "ok" if ok else f"MISMATCH (tolerance {tolerance:g})"
        print_fn(f"    {label:<10}{diff:>12.3e}{relative:>12.3e}  {verdict}")
    return 0 if agree else 1
