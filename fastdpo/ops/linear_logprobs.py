"""Fused language-model head + log-softmax + gather: per-token log-probs of target tokens.

    z_raw[i, v] = h[i] @ W[v] + b[v]                 (fp32 accumulation)
    z[i, v]     = softcap(z_raw[i, v]) / temperature   softcap(x) = c * tanh(x / c), or x if off
    lse[i]      = logsumexp_v z[i, v]
    logp[i]     = z[i, t[i]] - lse[i]                  (0 where t[i] == ignore_index)

The order is bias, then soft-capping, then temperature, as in Gemma-2 (the cap applies to the
head's final logits, sampling temperature divides what comes out of it). Neither implementation
ever holds the `[N, V]` logits: the "triton" impl works tile by tile on the GPU (see
`fastdpo.kernels.linear_logprobs`), the "torch" impl walks blocks of rows x vocabulary columns
whose fp32 logits stay under a byte budget, with an online log-sum-exp over vocabulary blocks.
Both recompute logits in backward and save only the inputs and the per-row log-sum-exp.

Backward, with g = dL/dlogp and g_lse = dL/dlse (when `return_lse=True`), p = softmax(z):

    dL/dz[i, v]     = g[i] * ([v == t[i]] - p[i, v]) + g_lse[i] * p[i, v]
    dL/dz_raw[i, v] = dL/dz[i, v] / temperature * (1 - tanh(z_raw[i, v] / c) ** 2)
    dH = G @ W,  dW = G.T @ H,  db = G.sum(0)       with G = dL/dz_raw   (ignored rows: G = 0)

Per-token statistics (`return_stats`), in the same pass over the vocabulary and only when asked,
all of the final (capped, tempered) logits z and p = softmax(z):

    entropy[i]    = -sum_v p log p = lse - sum_v p z            dH/dz_j = -p_j (z_j - sum_v p_v z_v)
    log_sum_p2[i] = log sum_v p[i, v]^2 = logsumexp_v(2 z) - 2 lse          (no gradient)
    mean_logit[i] = (1 / V) sum_v z[i, v]                                   (no gradient)
    is_top1[i]    = argmax_v z[i, v] == t[i], the first index among ties (torch.argmax) (bool)

Online, as the log-sum-exp: with the running max m and s = sum exp(z - m), also
u = sum exp(z - m) (z - m) (entropy = log s - u / s), q = sum exp(z - m)^2
(log_sum_p2 = log q - 2 log s), sum z, and the running argmax. The entropy's gradient joins G:
dL/dz[i, v] += g_H[i] * -p[i, v] (log p[i, v] + entropy[i]).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

logger = logging.getLogger(__name__)

Impl = Literal["auto", "triton", "torch", "cublas"]
IMPLS: tuple[str, ...] = ("auto", "triton", "torch", "cublas")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

STATS: tuple[str, ...] = ("entropy", "log_sum_p2", "mean_logit", "is_top1")
"""Per-token statistics `linear_logprobs(return_stats=...)` computes (module docstring)."""
DIFFERENTIABLE_STATS: tuple[str, ...] = ("entropy",)
"""The statistics with a gradient; the others are returned detached."""

LOGITS_BLOCK_BYTES = 32 * 2**20
"""Byte budget of one block's fp32 logits in the torch impl (read at each call).

Peak extra memory is one such buffer (two in a soft-capped backward) plus the gradients, and for
bf16/fp16 inputs the fp32 block copies and accumulators (see `_torch_backward`)."""

INPUT_BLOCK_BYTES = 8 * 2**20
"""fp32 bytes of one block of W rows (and of hidden rows) in the torch impl, on the CPU.

A vocabulary block of W is reused by the block's three products (logits, dW, dH) and by every
row block, so it should stay in the CPU's caches; blocks of [2048 rows, 4096 columns] ran the
backward's products at 165 GFLOP/s against 134 for [256, 32768] at the same 32 MiB of logits
(H=512, 2-core AMD EPYC, torch 2.13, 2026-11-23, median of 4)."""


@dataclass(frozen=True, kw_only=True)
class LinearLogprobsOptions:
    """Non-tensor options of one `linear_logprobs` call (travel through autograd as one object)."""

    softcap: float | None = None
    """Soft-capping constant c (logits -> c * tanh(logits / c)), or None for no capping."""
    temperature: float = 1.0
    """Logits are divided by this after soft-capping."""
    ignore_index: int = -100
    """Rows whose target equals this give 0 and receive no gradient."""
    impl: Literal["triton", "torch", "cublas"] = "torch"
    """The resolved implementation (never "auto" here)."""
    logits_block_bytes: int = LOGITS_BLOCK_BYTES
    """torch impl: byte budget of one block's fp32 logits."""
    stats: tuple[str, ...] = ()
    """Per-token statistics to compute (names from STATS, in STATS order)."""


# ------------------------------------------------------------------------------------------------
# Validation


def check_targets(targets: torch.Tensor, vocab_size: int, ignore_index: int = -100) -> None:
    """Raise ValueError if any target is outside [0, vocab_size) and not `ignore_index`.

    Synchronizes with the device: call it once per batch where the data is built, not in the
    hot loop (`linear_logprobs` itself checks on the device without a sync).
    """
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    bad = ((targets < 0) | (targets >= vocab_size)) & (targets != ignore_index)
    bad_positions = bad.reshape(-1).nonzero()
    if bad_positions.numel() > 0:
        first = int(bad_positions[0, 0])
        value = int(targets.reshape(-1)[first])
        raise ValueError(
            f"targets: {bad_positions.numel()} value(s) outside [0, {vocab_size}) and not "
            f"ignore_index={ignore_index}; first at flat position {first}: {value}. "
            "Check the tokenizer's vocabulary against the model's head, or mark the position "
            "with ignore_index."
        )


def _assert_targets_on_device(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Range check without a host sync on accelerators (the error surfaces at the next sync)."""
    if targets.device.type == "cpu":
        # CPU work is synchronous anyway: give the precise message.
        check_targets(targets, vocab_size, ignore_index)
        return
    ok = (((targets >= 0) & (targets < vocab_size)) | (targets == ignore_index)).all()
    torch._assert_async(
        ok,
        f"linear_logprobs: a target is outside [0, {vocab_size}) and not ignore_index="
        f"{ignore_index}; call fastdpo.ops.linear_logprobs.check_targets on the batch to find it",
    )


def _validate(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
    temperature: float,
) -> None:
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    vocab, width = weight.shape
    if hidden.shape[-1] != width:
        raise ValueError(
            f"hidden's last dim ({hidden.shape[-1]}) must equal weight's H ({width}): "
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} (weight is [V, H])"
        )
    if vocab == 0 or width == 0:
        raise ValueError(f"weight must be non-empty, got {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"targets must be an integer tensor (int64 or int32), got {targets.dtype}: "
            "pass targets.long()"
        )
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias must have shape [V] = [{vocab}], got {tuple(bias.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be bfloat16, float16 or float32, got {hidden.dtype}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype != hidden.dtype:
            raise TypeError(
                f"{name} dtype {tensor.dtype} differs from hidden's {hidden.dtype}: cast them to "
                "one dtype (the head's compute dtype)"
            )
    for name, tensor in (("weight", weight), ("targets", targets), ("bias", bias)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(
                f"{name} is on {tensor.device} but hidden is on {hidden.device}: move them to "
                "one device"
            )
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")


def _check_stats(return_stats: Sequence[str], impl: str) -> tuple[str, ...]:
    """The asked statistics in STATS order, duplicates dropped. Every statistics request of
    `linear_logprobs` passes here: an impl that cannot compute them refuses here."""
    if isinstance(return_stats, str):
        raise TypeError(
            f"return_stats takes a sequence of names, got the string {return_stats!r}: pass "
            f"({return_stats!r},)"
        )
    asked = tuple(return_stats)
    unknown = [name for name in asked if name not in STATS]
    if unknown:
        raise ValueError(f"return_stats: unknown statistic(s) {unknown}; known: {STATS}")
    stats = tuple(name for name in STATS if name in asked)
    if stats and impl == "cublas":
        raise ValueError(
            "return_stats: impl='cublas' does not compute per-token statistics yet; use "
            "impl='triton' or 'torch' for them"
        )
    return stats


# ------------------------------------------------------------------------------------------------
# Implementation choice


def _triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device`, or None if they can."""
    try:
        from fastdpo.kernels import linear_logprobs as kernels
    except ImportError as error:  # no triton on this platform
        return f"triton cannot be imported ({error}); install triton or use impl='torch'"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if kernels.is_interpreted():
            return None
        if os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on"):
            return (
                "TRITON_INTERPRET=1 was set after fastdpo.kernels was imported; set it before "
                "the first import, or use impl='torch'"
            )
        return (
            "the Triton kernels need a CUDA device (hidden is on the CPU); use impl='torch' "
            "or 'auto', or set TRITON_INTERPRET=1 before importing fastdpo to run them "
            "(slowly) on the CPU"
        )
    return f"the Triton kernels do not run on {device.type}; use impl='torch' or 'auto'"


def _resolve_impl(impl: str, device: torch.device) -> Literal["triton", "torch", "cublas"]:
    """The impl that runs. "auto": "triton" on CUDA (when triton imports), else "torch"; the
    "cublas" impl (fastdpo.ops.linear_logprobs_cublas) runs only when asked for, until a GPU
    measurement of the head benchmark (benchmarks/bench_linear_logprobs.py) shows it ahead."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    if impl == "cublas":
        from fastdpo.ops import linear_logprobs_cublas

        reason = linear_logprobs_cublas.unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"linear_logprobs(impl='cublas'): {reason}")
        return "cublas"
    if impl == "triton":
        reason = _triton_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"linear_logprobs(impl='triton'): {reason}")
        return "triton"
    # auto: the kernels on CUDA; the interpreter is far too slow to be picked on its own.
    if device.type == "cuda" and _triton_unavailable_reason(device) is None:
        return "triton"
    return "torch"


# ------------------------------------------------------------------------------------------------
# Pure-PyTorch implementation, in blocks of rows x vocabulary columns


@dataclass(frozen=True)
class _BlockPlan:
    """The torch impl walks [N, V] in blocks of `rows` x `columns`, vocabulary block by block."""

    rows: int
    columns: int


def _even_block(total: int, most: int) -> int:
    """Block size <= `most` that covers `total` in as few blocks as `most` does, all but the last
    equal and the last no smaller than needed (no tiny tail block)."""
    count = max(1, math.ceil(total / most))
    return max(1, math.ceil(total / count))


def _block_plan(
    rows: int, vocab: int, width: int, logits_block_bytes: int, device: torch.device
) -> _BlockPlan:
    """On the CPU, blocks whose W rows (and hidden rows) take at most INPUT_BLOCK_BYTES in fp32;
    elsewhere whole-vocabulary row chunks (small blocks would make a GPU launch-bound). Rows are
    then as many as fit `logits_block_bytes` of fp32 logits, at least one."""
    most = max(1, INPUT_BLOCK_BYTES // (4 * width)) if device.type == "cpu" else max(rows, vocab)
    columns = min(vocab, most)
    block_rows = min(max(rows, 1), most, max(1, logits_block_bytes // (4 * columns)))
    return _BlockPlan(_even_block(rows, block_rows), _even_block(vocab, columns))


class _BlockWorkspace:
    """Buffers of one call, allocated once and reused by every block.

    Allocating per block instead lets glibc's heap keep and fragment the freed blocks: a loop of
    24 [262, 32000] fp32 matmuls peaked at 269 MiB RSS with fresh outputs and at 45 MiB with one
    reused output (this 2-core CPU, torch 2.13, 2026-11-23).

    bf16/fp16 inputs: the logits and dH products run in the inputs' dtype, as a plain PyTorch
    head's do (on a CPU with AVX512-BF16 a bf16 product ran the whole op 1.7x faster than fp32
    copies did: 2.5 s against 4.3 s at N=4096, H=512, V=32000, 2026-11-23); the softmax, dW and
    the accumulations are fp32, but each vocabulary block's share of dH is rounded to the
    inputs' dtype before it is added (scaled dH error 5.5e-3 against 4.2e-3 with one rounding,
    N=256, H=256, V=32000 bf16 with soft-capping).
    """

    def __init__(
        self,
        plan: _BlockPlan,
        weight: torch.Tensor,
        *,
        with_tanh: bool = False,
        for_weight_grad: bool = False,
        for_hidden_grad: bool = False,
        with_scratch: bool = False,
    ) -> None:
        size, width, device = plan.rows * plan.columns, weight.shape[1], weight.device
        fp32 = {"dtype": torch.float32, "device": device}
        self.logits = torch.empty(size, **fp32)
        """fp32 logits, then softmax, then dL/dlogits (flat: every block shape is a contiguous
        view)."""
        self.capped = torch.empty(size, **fp32) if with_tanh else None
        """Backward with soft-capping: the final logits while `logits` holds tanh."""
        self.scratch = torch.empty(size, **fp32) if with_scratch else None
        """Statistics (forward) and the entropy's gradient (backward): exp(z - m) beside z - m."""
        low = weight.dtype != torch.float32
        self.low_precision = torch.empty(size, dtype=weight.dtype, device=device) if low else None
        """bf16/fp16: a product's output, then dL/dlogits cast for the dH product."""
        self.hidden = None
        if low and for_weight_grad:
            self.hidden = torch.empty(plan.rows, width, **fp32)
        """bf16/fp16: the fp32 copy of the current hidden block (the dW product's operand)."""
        self.partial = None
        if low and for_hidden_grad:
            self.partial = torch.empty(plan.rows, width, dtype=weight.dtype, device=device)
        """bf16/fp16: one vocabulary block's share of dH, before it is added in fp32."""

    def hidden_fp32(self, block: torch.Tensor) -> torch.Tensor:
        return block if self.hidden is None else self.hidden[: block.shape[0]].copy_(block)


def _vocab_blocks(
    weight: torch.Tensor, bias: torch.Tensor | None, plan: _BlockPlan
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """(first column, weight block [columns, H], bias block [columns] or None)."""
    vocab = weight.shape[0]
    for begin in range(0, vocab, plan.columns):
        end = min(begin + plan.columns, vocab)
        yield begin, weight[begin:end], None if bias is None else bias[begin:end]


def _block_logits(
    hidden_block: torch.Tensor,
    weight_block: torch.Tensor,
    bias_block: torch.Tensor | None,
    softcap: float | None,
    temperature: float,
    work: _BlockWorkspace,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits [rows, columns] of one block after bias, soft-capping and temperature.

    When `work` has a `capped` buffer (backward with soft-capping), also returns tanh(z_raw / c)
    for the chain rule; otherwise the second value is None. Both are views of the workspace,
    overwritten by the next block.
    """
    shape = (hidden_block.shape[0], weight_block.shape[0])
    size = shape[0] * shape[1]
    logits = work.logits[:size].view(shape)
    product = logits if work.low_precision is None else work.low_precision[:size].view(shape)
    if bias_block is None:
        torch.mm(hidden_block, weight_block.T, out=product)
    else:
        torch.addmm(bias_block, hidden_block, weight_block.T, out=product)
    if product is not logits:
        logits.copy_(product)
    scale = 1.0 / temperature
    if softcap is None:
        if scale != 1.0:
            logits.mul_(scale)
        return logits, None
    tanh = logits.div_(softcap).tanh_()
    if work.capped is None:
        return tanh.mul_(softcap * scale), None
    return torch.mul(tanh, softcap * scale, out=work.capped[:size].view(shape)), tanh


def _targets_in_block(
    targets: torch.Tensor, begin: int, columns: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(column index [rows, 1] clamped into the block, whether the target is in it [rows])."""
    local = targets - begin
    inside = (local >= 0) & (local < columns)
    return local.clamp_(0, columns - 1)[:, None], inside


def _torch_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    safe_targets: torch.Tensor,
    *,
    softcap: float | None,
    temperature: float,
    logits_block_bytes: int,
    stats: tuple[str, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, dict]:
    """Target logits [N] fp32 and log-sum-exp [N] fp32 (unmasked), block by block with an online
    log-sum-exp; the same contract as `fastdpo.kernels.linear_logprobs.linear_logprobs_forward`.
    With `stats`, also {name: [N]} of those statistics (`_torch_forward_stats`)."""
    if stats:
        return _torch_forward_stats(
            hidden, weight, bias, safe_targets, softcap=softcap, temperature=temperature,
            logits_block_bytes=logits_block_bytes, stats=stats,
        )  # fmt: skip
    rows, width = hidden.shape
    plan = _block_plan(rows, weight.shape[0], width, logits_block_bytes, hidden.device)
    work = _BlockWorkspace(plan, weight)
    fp32 = {"dtype": torch.float32, "device": hidden.device}
    target_logits = torch.zeros(rows, **fp32)
    running_max = torch.full((rows,), -math.inf, **fp32)
    sum_exp = torch.zeros(rows, **fp32)
    for begin, weight_block, bias_block in _vocab_blocks(weight, bias, plan):
        for start in range(0, rows, plan.rows):
            end = min(start + plan.rows, rows)
            logits, _ = _block_logits(
                hidden[start:end], weight_block, bias_block, softcap, temperature, work
            )
            index, inside = _targets_in_block(safe_targets[start:end], begin, logits.shape[1])
            found = target_logits[start:end]
            torch.where(inside, logits.gather(1, index)[:, 0], found, out=found)
            old_max = running_max[start:end]
            new_max = torch.maximum(old_max, logits.amax(dim=1))
            # Rows whose logits so far are all -inf (a -inf bias masking tokens) shift by 0, not
            # by -inf: -inf - -inf would be NaN.
            shift = torch.where(new_max == -math.inf, 0.0, new_max)
            block_sum = logits.sub_(shift[:, None]).exp_().sum(dim=1)
            sum_exp[start:end].mul_((old_max - shift).exp_()).add_(block_sum)
            old_max.copy_(new_max)
    return target_logits, running_max.add_(sum_exp.log_())


EXP_FLOOR = -1000.0
"""z - m (or log p) is clamped here before it multiplies exp(z - m) (or p): exp of it is 0 in
fp32 as exp(-inf) is, but 0 * -1000 is 0 where 0 * -inf would be NaN (a -inf bias column)."""


def _torch_forward_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    safe_targets: torch.Tensor,
    *,
    softcap: float | None,
    temperature: float,
    logits_block_bytes: int,
    stats: tuple[str, ...],
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """`_torch_forward` plus the per-token statistics named in `stats` ({name: [N]}: fp32, bool
    for is_top1), in the same pass: the online sums of the module docstring, block by block.

    A separate loop so that the plain forward stays exactly what it was (no stats, no cost)."""
    rows, width = hidden.shape
    vocab = weight.shape[0]
    plan = _block_plan(rows, vocab, width, logits_block_bytes, hidden.device)
    work = _BlockWorkspace(plan, weight, with_scratch=True)
    fp32 = {"dtype": torch.float32, "device": hidden.device}
    target_logits = torch.zeros(rows, **fp32)
    running_max = torch.full((rows,), -math.inf, **fp32)
    sum_exp = torch.zeros(rows, **fp32)
    sum_shifted = torch.zeros(rows, **fp32)  # u = sum exp(z - m) (z - m)
    sum_exp2 = torch.zeros(rows, **fp32)  # q = sum exp(z - m)^2
    sum_logits = torch.zeros(rows, **fp32)
    argmax = torch.zeros(rows, dtype=torch.int64, device=hidden.device)
    for begin, weight_block, bias_block in _vocab_blocks(weight, bias, plan):
        for start in range(0, rows, plan.rows):
            end = min(start + plan.rows, rows)
            logits, _ = _block_logits(
                hidden[start:end], weight_block, bias_block, softcap, temperature, work
            )
            index, inside = _targets_in_block(safe_targets[start:end], begin, logits.shape[1])
            found = target_logits[start:end]
            torch.where(inside, logits.gather(1, index)[:, 0], found, out=found)
            if "mean_logit" in stats:
                sum_logits[start:end] += logits.sum(dim=1)
            block_max, block_argmax = logits.max(dim=1)  # the first index among ties
            old_max = running_max[start:end]
            if "is_top1" in stats:  # strictly greater: an earlier block keeps a tie
                best = argmax[start:end]
                torch.where(block_max > old_max, block_argmax + begin, best, out=best)
            new_max = torch.maximum(old_max, block_max)
            shift = torch.where(new_max == -math.inf, 0.0, new_max)
            rescale = (old_max - shift).exp_()
            shifted = logits.sub_(shift[:, None]).clamp_(min=EXP_FLOOR)  # z - m
            exp = torch.exp(shifted, out=work.scratch[: shifted.numel()].view(shifted.shape))
            old_sum = sum_exp[start:end]
            if "entropy" in stats:  # u' = r (u + (m_old - m_new) s) + sum exp(z - m) (z - m)
                moved = torch.where(old_max == -math.inf, 0.0, old_max - shift)
                block_u = shifted.mul_(exp).sum(dim=1)
                u = sum_shifted[start:end]
                u.add_(moved * old_sum).mul_(rescale).add_(block_u)
            block_sum = exp.sum(dim=1)
            if "log_sum_p2" in stats:
                sum_exp2[start:end].mul_(rescale.square()).add_(exp.square_().sum(dim=1))
            old_sum.mul_(rescale).add_(block_sum)
            old_max.copy_(new_max)
    log_sum = sum_exp.log()
    values = {
        "entropy": log_sum - sum_shifted / sum_exp,
        "log_sum_p2": sum_exp2.log() - 2 * log_sum,
        "mean_logit": sum_logits / vocab,
        "is_top1": argmax == safe_targets,
    }
    return target_logits, running_max.add_(log_sum), {name: values[name] for name in stats}


def _torch_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    safe_targets: torch.Tensor,
    lse: torch.Tensor,
    grad_target: torch.Tensor,
    grad_softmax: torch.Tensor,
    *,
    softcap: float | None,
    temperature: float,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    logits_block_bytes: int,
    entropy: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dH, dW, db) in the inputs' dtype, each None unless asked for; the same contract as
    `fastdpo.kernels.linear_logprobs.linear_logprobs_backward`.

    With `entropy` and `grad_entropy` ([N] fp32, the forward's entropy and dL/dentropy, zero on
    ignored rows), dL/dz also gets grad_entropy[i] * -p[i, v] (log p[i, v] + entropy[i]).

    dL/dz[i, v] = grad_target[i] * [v == t[i]] + grad_softmax[i] * p[i, v]; both [N] fp32 and
    zero on ignored rows. Accumulation is fp32: dH over vocabulary blocks (in place for fp32
    inputs, else in an fp32 [N, H] buffer), each [columns, H] block of dW over row blocks.
    """
    (rows, width), dtype, device = hidden.shape, hidden.dtype, hidden.device
    vocab = weight.shape[0]
    in_place = dtype == torch.float32
    plan = _block_plan(rows, vocab, width, logits_block_bytes, device)
    work = _BlockWorkspace(
        plan,
        weight,
        with_tanh=softcap is not None,
        for_weight_grad=need_weight,
        for_hidden_grad=need_hidden,
        with_scratch=grad_entropy is not None,
    )
    fp32 = {"dtype": torch.float32, "device": device}
    grad_hidden = torch.zeros(rows, width, **fp32) if need_hidden else None
    grad_weight = grad_weight_block = None
    if need_weight:
        allocate = torch.zeros if rows == 0 else torch.empty  # no row block writes it then
        grad_weight = allocate(vocab, width, dtype=dtype, device=device)
        if not in_place:
            grad_weight_block = torch.empty(plan.columns, width, **fp32)
    grad_bias = torch.zeros(vocab, **fp32) if need_bias else None
    # The temperature's 1/T factor of the chain rule, folded into the per-row coefficients.
    scale = 1.0 / temperature
    grad_target = grad_target * scale
    grad_softmax = grad_softmax * scale
    if grad_entropy is not None:
        grad_entropy = grad_entropy * scale
        # G = p (g_softmax - g_H H) - g_H p log p: the first factor per row
        grad_softmax = grad_softmax - grad_entropy * entropy
    for begin, weight_block, bias_block in _vocab_blocks(weight, bias, plan):
        end_column = begin + weight_block.shape[0]
        block_dw = None
        if grad_weight is not None:
            block_dw = grad_weight[begin:end_column] if in_place else grad_weight_block
            block_dw = block_dw[: weight_block.shape[0]]
        for start in range(0, rows, plan.rows):
            end = min(start + plan.rows, rows)
            logits, tanh = _block_logits(
                hidden[start:end], weight_block, bias_block, softcap, temperature, work
            )
            if grad_entropy is None:
                grad_logits = logits.sub_(lse[start:end, None]).exp_()  # softmax p, in place
                grad_logits.mul_(grad_softmax[start:end, None])
            else:
                log_p = logits.sub_(lse[start:end, None]).clamp_(min=EXP_FLOOR)
                p = torch.exp(log_p, out=work.scratch[: log_p.numel()].view(log_p.shape))
                grad_logits = log_p.mul_(p).mul_(-grad_entropy[start:end, None])
                grad_logits.addcmul_(p, grad_softmax[start:end, None])
            index, inside = _targets_in_block(safe_targets[start:end], begin, logits.shape[1])
            grad_logits.scatter_add_(1, index, (grad_target[start:end] * inside)[:, None])
            if tanh is not None:  # d(c * tanh(x / c))/dx = 1 - tanh^2: G -= G * tanh^2
                grad_logits.addcmul_(grad_logits, tanh.square_(), value=-1.0)
            if grad_bias is not None:
                grad_bias[begin:end_column] += grad_logits.sum(0)
            if block_dw is not None:
                hidden_block = work.hidden_fp32(hidden[start:end])
                if start == 0:
                    torch.mm(grad_logits.T, hidden_block, out=block_dw)
                else:
                    block_dw.addmm_(grad_logits.T, hidden_block)
            if grad_hidden is not None:
                if work.low_precision is None:
                    grad_hidden[start:end].addmm_(grad_logits, weight_block)
                else:  # the product in the inputs' dtype, its sum over blocks in fp32
                    cast = work.low_precision[: grad_logits.numel()].view(grad_logits.shape)
                    partial = work.partial[: end - start]
                    torch.mm(cast.copy_(grad_logits), weight_block, out=partial)
                    grad_hidden[start:end] += partial
        if block_dw is not None and not in_place and rows > 0:
            grad_weight[begin:end_column].copy_(block_dw)
    grads = (grad_hidden, grad_weight, grad_bias)
    return tuple(None if grad is None else grad.to(dtype) for grad in grads)


# ------------------------------------------------------------------------------------------------
# Autograd


def _implementation(options: LinearLogprobsOptions) -> tuple[Callable, Callable]:
    """(forward, backward) of the resolved impl; both take the kernel launchers' arguments
    (`fastdpo.kernels.linear_logprobs.linear_logprobs_forward` / `_backward`)."""
    if options.impl == "triton":
        from fastdpo.kernels import linear_logprobs as kernels

        return kernels.linear_logprobs_forward, kernels.linear_logprobs_backward
    if options.impl == "cublas":  # its own tile budget (linear_logprobs_cublas.TILE_BYTES)
        from fastdpo.ops import linear_logprobs_cublas as cublas

        return cublas.linear_logprobs_forward, cublas.linear_logprobs_backward
    return (
        functools.partial(_torch_forward, logits_block_bytes=options.logits_block_bytes),
        functools.partial(_torch_backward, logits_block_bytes=options.logits_block_bytes),
    )


class LinearLogprobsFunction(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V] | None, targets [N], options) ->
    (logp, lse, *stats).

    `logp` and `lse` are [N] fp32 and 0 on ignored rows; `lse` is the log-sum-exp of the final
    (capped, tempered) logits. Then one [N] tensor per name in `options.stats` (STATS order; 0 /
    False on ignored rows), only `entropy` differentiable. Saves the inputs, the unmasked lse
    (and entropy when asked); recomputes logits in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, options: LinearLogprobsOptions):
        valid = targets != options.ignore_index
        # Clamped so that a bad target that slipped past the async check never indexes out of
        # bounds (the check still reports it).
        safe_targets = torch.where(valid, targets, 0).clamp_(0, weight.shape[0] - 1)
        forward, _ = _implementation(options)
        stats = options.stats
        outputs = forward(
            hidden,
            weight,
            bias,
            safe_targets,
            softcap=options.softcap,
            temperature=options.temperature,
            **({"stats": stats} if stats else {}),  # impls without stats never see the keyword
        )
        target_logits, lse = outputs[0], outputs[1]
        values = outputs[2] if stats else {}
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        logp = torch.where(valid, target_logits - lse, zero)
        masked_lse = torch.where(valid, lse, zero)
        masked = [
            valid & values[name] if name == "is_top1" else torch.where(valid, values[name], zero)
            for name in stats
        ]
        named = zip(stats, masked, strict=True)
        detached = [out for name, out in named if name not in DIFFERENTIABLE_STATS]
        ctx.mark_non_differentiable(*detached)
        # Unused outputs give None in backward, not zeros: no entropy term unless it is used.
        ctx.set_materialize_grads(False)
        entropy = values.get("entropy")
        ctx.save_for_backward(hidden, weight, bias, safe_targets, valid, lse, entropy)
        ctx.options = options
        return (logp, masked_lse, *masked)

    @staticmethod
    def backward(ctx, grad_logp, grad_lse, *grad_stats):
        hidden, weight, bias, safe_targets, valid, lse, entropy = ctx.saved_tensors
        options: LinearLogprobsOptions = ctx.options
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        nothing = (None,) * 5
        grad_entropy = None
        if entropy is not None:
            grad_entropy = grad_stats[options.stats.index("entropy")]
        if not (need_hidden or need_weight or need_bias):
            return nothing
        if grad_logp is None and grad_lse is None and grad_entropy is None:
            return nothing
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_logp = zero if grad_logp is None else grad_logp.float()
        grad_lse = zero if grad_lse is None else grad_lse.float()
        grad_target = torch.where(valid, grad_logp, zero)
        grad_softmax = torch.where(valid, grad_lse - grad_logp, zero)
        entropy_args = {}
        if grad_entropy is not None:
            entropy_args = {
                "entropy": torch.where(valid, entropy, zero),
                "grad_entropy": torch.where(valid, grad_entropy.float(), zero),
            }
        _, backward = _implementation(options)
        grad_hidden, grad_weight, grad_bias = backward(
            hidden,
            weight,
            bias,
            safe_targets,
            lse,
            grad_target,
            grad_softmax,
            softcap=options.softcap,
            temperature=options.temperature,
            need_hidden=need_hidden,
            need_weight=need_weight,
            need_bias=need_bias,
            **entropy_args,
        )
        return grad_hidden, grad_weight, grad_bias, None, None


# ------------------------------------------------------------------------------------------------
# Public function


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    temperature: float = 1.0,
    ignore_index: int | None = -100,
    return_lse: bool = False,
    return_stats: Sequence[str] = (),
    impl: Impl = "auto",
) -> (
    torch.Tensor
    | tuple[torch.Tensor, torch.Tensor]
    | tuple[torch.Tensor, dict[str, torch.Tensor]]
    | tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]
):
    """Log-probabilities of `targets` under the head `weight` (and `bias`), never building logits.

    Args:
        hidden: [..., H] bf16/fp16/fp32 hidden states (usually [N, H], completion tokens only).
        weight: [V, H] head weight, same dtype and device as `hidden`.
        targets: [...] int64/int32 target ids in [0, V), or `ignore_index`.
        bias: optional [V] head bias, same dtype as `hidden`.
        softcap: Gemma-2 style soft-capping constant c (logits -> c * tanh(logits / c)) applied
            after the bias and before the temperature; None for none.
        temperature: the (capped) logits are divided by it before the softmax.
        ignore_index: rows with this target give 0 (logp and lse) and receive no gradient.
            None: no row is ignored (every target is a vocabulary id), which skips the host
            sync that counting ignored rows costs (`sequence_logps` passes None).
        return_lse: also return the log-sum-exp of the final logits.
        return_stats: names from STATS ("entropy", "log_sum_p2", "mean_logit", "is_top1") of
            per-token statistics of the final (capped, tempered) logits to compute in the same
            pass (definitions in the module docstring); () computes none and costs nothing.
        impl: "triton" (CUDA, or the CPU under TRITON_INTERPRET=1), "torch" (pure PyTorch,
            in blocks of rows x vocabulary) or "auto" (triton on CUDA, torch elsewhere).

    Returns:
        logp: [...] fp32; with `return_lse`, also lse: [...] fp32; with `return_stats`, last a
        dict {name: [...]} in the order of STATS: fp32 values (bool for "is_top1"), 0 (False) on
        ignored rows. Only "entropy" carries a gradient (to hidden, weight and bias, through
        the soft-cap and temperature); the others are detached. So `logp, stats = ...` or
        `logp, lse, stats = ...`.

    Ignored rows cost no matmul work: they are dropped before the head (an index_select of the
    other rows, as cut-cross-entropy does) and their zeros scattered back, so `[B, T]` labels
    with the prompt marked `ignore_index` may be passed whole. Counting the kept rows is one
    host sync on accelerators. Target ids outside [0, V) are checked on the device (no further
    sync: a CUDA error surfaces at the next one); `check_targets` gives a precise message where
    data is built.

    A target whose final logit is -inf (a -inf bias masking that token, without soft-capping)
    has log-prob -inf, and the limit gradient that PyTorch's log_softmax also gives: dL/dz =
    g * ([v == t] - softmax(z)), finite (the target column gets g). A row whose every logit is
    -inf has no softmax: its log-prob and gradients are NaN.
    """
    _validate(hidden, weight, targets, bias, softcap, temperature)
    resolved = _resolve_impl(impl, hidden.device)
    stats = _check_stats(return_stats, resolved)
    logger.debug(
        "linear_logprobs: impl=%s (asked %s), hidden %s %s, vocab %d",
        resolved,
        impl,
        tuple(hidden.shape),
        hidden.dtype,
        weight.shape[0],
    )
    vocab, width = weight.shape
    drop_ignored = ignore_index is not None
    if ignore_index is None:  # no target may equal it: the checks below then reject negatives
        ignore_index = -(2**62)
    _assert_targets_on_device(targets, vocab, ignore_index)
    options = LinearLogprobsOptions(
        softcap=None if softcap is None else float(softcap),
        temperature=float(temperature),
        ignore_index=int(ignore_index),
        impl=resolved,
        logits_block_bytes=LOGITS_BLOCK_BYTES,  # read at call time so it can be tuned per process
        stats=stats,
    )
    lead_shape = targets.shape
    flat_hidden, flat_targets = hidden.reshape(-1, width), targets.reshape(-1)
    kept = _kept_rows(flat_targets, ignore_index) if drop_ignored else None
    if kept is not None:  # no matmul work for ignored rows: run on the others, scatter back
        flat_hidden = flat_hidden.index_select(0, kept)
        flat_targets = flat_targets.index_select(0, kept)
    outputs = LinearLogprobsFunction.apply(flat_hidden, weight, bias, flat_targets, options)
    if kept is not None:
        outputs = [_scatter_rows(values, kept, targets.numel()) for values in outputs]
    logp, lse, *stat_values = (values.reshape(lead_shape) for values in outputs)
    results = (logp, lse) if return_lse else (logp,)
    if stats:
        results += (dict(zip(stats, stat_values, strict=True)),)
    return results if len(results) > 1 else logp


def _kept_rows(targets: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices [K] int64 of the rows whose target is not `ignore_index`, or None if that is all
    of them (nothing to drop). Synchronizes with the device: K sizes the work."""
    kept = (targets != ignore_index).nonzero().squeeze(1)
    return None if kept.numel() == targets.numel() else kept


def _scatter_rows(values: torch.Tensor, kept: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows] in `values`' dtype: `values` [K] at the `kept` rows, 0 (False) elsewhere
    (differentiable in `values`)."""
    return values.new_zeros(rows).index_copy(0, kept, values)
