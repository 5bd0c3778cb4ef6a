"""Triton kernels of the fused linear log-prob op (imports nothing from fastdpo).

Math (per row i, vocabulary column v; the op's docstring in fastdpo.ops.linear_logprobs is the
reference):

    z_raw = h[i] @ W[v] + b[v];  z = softcap(z_raw) / temperature;  lse[i] = logsumexp_v z
    G[i, v] = (grad_target[i] * [v == t[i]] + grad_softmax[i] * exp(z - lse[i])) * dz/dz_raw

Tiling. Every kernel computes logit tiles [BLOCK_N rows, BLOCK_V columns] as a loop over H in
BLOCK_H chunks (`tl.dot`, fp32 accumulator), so nothing vocabulary-sized per row ever leaves the
registers.

- `_linear_logprobs_fwd_kernel`, grid (row tiles, V splits): each program walks the vocabulary
  tiles of its split with an online log-sum-exp in fp32 and writes one partial lse and the target
  logit (0 if the target is in another split) per row. With one split these are the results;
  otherwise a fixed-order `logsumexp` over the [splits, N] partials combines them. Splitting V
  gives small-N calls enough programs to fill the GPU.
  With constexpr flags (ENTROPY, SUM_P2, MEAN_LOGIT, TOP1) it also folds per-token statistics
  into the same walk (fastdpo.ops.linear_logprobs defines them): u = sum exp(z - m) (z - m),
  q = sum exp(z - m)^2, sum z and the first index of the running max, rescaled with m; each
  split writes its own entropy / log sum p^2 (of its own softmax), sum of logits, max and
  argmax, combined in a fixed order (`_combine_split_stats`). With every flag off the compiled
  kernel is the one without statistics (five unused pointer arguments aside).
- `_linear_logprobs_bwd_hidden_kernel`, grid (row tiles, V splits): dH = G @ W. A program owns
  its rows' [BLOCK_N, H] slice of an fp32 accumulator in global memory and, per vocabulary tile,
  recomputes the logit tile, forms G and adds G @ W_tile chunk by chunk over H. Splits write
  separate partial buffers that are summed in a fixed order.
- `_linear_logprobs_bwd_weight_kernel`, grid (vocabulary tiles of one slab): dW = G.T @ H and
  db = sum_i G. A program owns a [BLOCK_V, H] slice of an fp32 dW accumulator and walks all row
  tiles. fp32 weights accumulate straight into dW; bf16/fp16 ones go slab by slab (two
  programs per SM worth of vocabulary tiles per launch) through one reused fp32 [slab, H]
  buffer, so the extra memory is bounded by the slab, not by V.

Loop bounds are kernel arguments (H, N, `tiles_per_split`), never values computed from
`tl.program_id`: triton 3.6's interpreter holds every runtime scalar as a 1-element array, which
`range()` cannot take under numpy >= 2.4, so under the interpreter the launchers pass integer
arguments as constants (`_scalars`), and a bound derived from a program id would still be an
array. Every split therefore walks `tiles_per_split` tiles; the last split's tiles past V are
fully masked, which adds exact zeros and leaves the critical path as it was (that program does
no more tiles than the others).

Both backward kernels take the entropy's gradient behind HAS_ENTROPY_GRAD: G gains
grad_entropy * -p (log p + entropy), from the forward's entropy; nothing more is recomputed.

No atomics: every output element is written by one program in a fixed order, so results are
bitwise reproducible. The price is one extra logit recompute (10NHV FLOPs with both gradients
versus 8NHV with atomics); each backward kernel runs only when its gradient is needed, so a frozen
head (LoRA) costs 6NHV and no dW work at all.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# --------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _tanh(x):
    # tanh via exp: the interpreter has no libdevice. exp(-2|x|) never overflows.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logit_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    offs_n,
    row_mask,
    offs_v,
    col_mask,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    softcap,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Final logits [BLOCK_N, BLOCK_V] fp32 (-inf in columns >= V) and tanh(z_raw / softcap)
    (the raw logits when soft-capping is off; only used by the chain rule)."""
    offs_h = tl.arange(0, BLOCK_H)
    h_rows = hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
    w_rows = weight_ptr + offs_v.to(tl.int64)[:, None] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        k = h0 + offs_h
        k_mask = k < H
        h = tl.load(
            h_rows + k[None, :] * stride_hh, mask=row_mask[:, None] & k_mask[None, :], other=0.0
        )
        w = tl.load(
            w_rows + k[None, :] * stride_wh, mask=col_mask[:, None] & k_mask[None, :], other=0.0
        )
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        tanh = _tanh(acc / softcap)
        z = tanh * (softcap * inv_temperature)
    else:
        tanh = acc
        z = acc * inv_temperature
    z = tl.where(col_mask[None, :], z, float("-inf"))
    return z, tanh


@triton.jit
def _entropy_rows(entropy_ptr, grad_entropy_ptr, offs_n, row_mask, placeholder, LOAD: tl.constexpr):
    """(entropy, dL/dentropy) [BLOCK_N] fp32 of the rows; `placeholder` twice (never read)
    without LOAD."""
    if LOAD:
        entropy = tl.load(entropy_ptr + offs_n, mask=row_mask, other=0.0)
        grad_entropy = tl.load(grad_entropy_ptr + offs_n, mask=row_mask, other=0.0)
    else:
        entropy = placeholder
        grad_entropy = placeholder
    return entropy, grad_entropy


@triton.jit
def _grad_logit_tile(
    z,
    tanh,
    offs_v,
    targets,
    lse,
    grad_target,
    grad_softmax,
    entropy,
    grad_entropy,
    valid,
    inv_temperature,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
):
    """dL/dz_raw [BLOCK_N, BLOCK_V] fp32; zero outside `valid` (rows < N and columns < V).

    With HAS_ENTROPY_GRAD, dL/dz also gets grad_entropy * -p (log p + entropy)."""
    if HAS_ENTROPY_GRAD:
        # log p floored: p = exp(log p) is 0 there either way, and 0 * -1000 = 0 where
        # 0 * -inf = NaN. One expression, so that no second [BLOCK_N, BLOCK_V] tile stays live.
        log_p = tl.maximum(z - lse[:, None], -1000.0)
        coefficient = grad_softmax - grad_entropy * entropy
        g = tl.exp(log_p) * (coefficient[:, None] - grad_entropy[:, None] * log_p)
    else:
        g = grad_softmax[:, None] * tl.exp(z - lse[:, None])
    g = g + tl.where(offs_v[None, :] == targets[:, None], grad_target[:, None], 0.0)
    g = g * inv_temperature
    if HAS_SOFTCAP:  # d(c * tanh(x / c))/dx = 1 - tanh(x / c)^2
        g = g * (1.0 - tanh * tanh)
    # Masked rows may hold inf * 0; never let them reach a dot product.
    return tl.where(valid, g, 0.0)


@triton.jit
def _linear_logprobs_fwd_kernel(
    hidden_ptr,  # [N, H]
    weight_ptr,  # [V, H]
    bias_ptr,  # [V] or dummy
    targets_ptr,  # [N] int, in [0, V)
    target_logit_ptr,  # [SPLITS, N] fp32 out
    lse_ptr,  # [SPLITS, N] fp32 out
    entropy_ptr,  # [SPLITS, N] fp32 out: each split's own entropy (ENTROPY; else dummy)
    sum_p2_ptr,  # [SPLITS, N] fp32 out: each split's own log sum p^2 (SUM_P2; else dummy)
    sum_logits_ptr,  # [SPLITS, N] fp32 out: each split's sum of logits (MEAN_LOGIT; else dummy)
    max_ptr,  # [SPLITS, N] fp32 out: each split's max logit (TOP1; else dummy)
    argmax_ptr,  # [SPLITS, N] int32 out: its first index (TOP1; else dummy)
    N,
    V,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    softcap,
    inv_temperature,
    tiles_per_split,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    ENTROPY: tl.constexpr,
    SUM_P2: tl.constexpr,
    MEAN_LOGIT: tl.constexpr,
    TOP1: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < N
    targets = tl.load(targets_ptr + offs_n, mask=row_mask, other=0)
    v_begin = split * tiles_per_split * BLOCK_V

    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # Statistics (each only when asked): u = sum exp(z - m) (z - m), q = sum exp(z - m)^2, sum z,
    # the first index of the running max.
    if ENTROPY:
        sum_shifted = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if SUM_P2:
        sum_exp2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if MEAN_LOGIT:
        sum_logits = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if TOP1:
        best = tl.zeros((BLOCK_N,), dtype=tl.int32)
    # Host-computed trip count (module docstring, "Loop bounds"); tiles past V are masked.
    for tile in range(0, tiles_per_split):
        offs_v = v_begin + tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = offs_v < V
        z, _ = _logit_tile(
            hidden_ptr, weight_ptr, bias_ptr, offs_n, row_mask, offs_v, col_mask, H,
            stride_hn, stride_hh, stride_wv, stride_wh, softcap, inv_temperature,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
        )  # fmt: skip
        tile_max = tl.max(z, axis=1)
        new_max = tl.maximum(running_max, tile_max)
        # A row whose logits so far are all -inf (a -inf bias masking whole tiles) shifts by 0,
        # not by -inf: exp(-inf - -inf) would be NaN and poison the row's sum for good.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(running_max - shift)
        exp = tl.exp(z - shift[:, None])
        if ENTROPY:  # u' = r (u + (m_old - m_new) s) + sum exp(z - m) (z - m)
            moved = tl.where(running_max == float("-inf"), 0.0, running_max - shift)
            # z - m floored: exp of it is 0 either way, and 0 * -1000 = 0 where 0 * -inf = NaN.
            shifted = tl.maximum(z - shift[:, None], -1000.0)
            sum_shifted = rescale * (sum_shifted + moved * running_sum) + tl.sum(
                exp * shifted, axis=1
            )
        if SUM_P2:
            sum_exp2 = rescale * rescale * sum_exp2 + tl.sum(exp * exp, axis=1)
        if MEAN_LOGIT:
            sum_logits += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
        if TOP1:  # strictly greater: an earlier tile keeps a tie (torch.argmax's first index)
            # The first column holding the tile's max, as a min over int32 column ids: lighter
            # on registers than tl.argmax's (value, index) reduction.
            at_max = tl.where(z == tile_max[:, None], offs_v[None, :], 2147483647)
            best = tl.where(tile_max > running_max, tl.min(at_max, axis=1), best)
        running_sum = running_sum * rescale + tl.sum(exp, axis=1)
        running_max = new_max
        is_target = offs_v[None, :] == targets[:, None]
        target_logit += tl.sum(tl.where(is_target, z, 0.0), axis=1)

    out = split.to(tl.int64) * N + offs_n
    tl.store(lse_ptr + out, running_max + tl.log(running_sum), mask=row_mask)
    tl.store(target_logit_ptr + out, target_logit, mask=row_mask)
    if ENTROPY:  # -sum p log p = log s - u / s
        entropy = tl.log(running_sum) - sum_shifted / running_sum
        tl.store(entropy_ptr + out, entropy, mask=row_mask)
    if SUM_P2:  # log sum p^2 = log q - 2 log s
        tl.store(sum_p2_ptr + out, tl.log(sum_exp2) - 2.0 * tl.log(running_sum), mask=row_mask)
    if MEAN_LOGIT:
        tl.store(sum_logits_ptr + out, sum_logits, mask=row_mask)
    if TOP1:
        tl.store(max_ptr + out, running_max, mask=row_mask)
        tl.store(argmax_ptr + out, best, mask=row_mask)


@triton.jit
def _linear_logprobs_bwd_hidden_kernel(
    hidden_ptr,  # [N, H]
    weight_ptr,  # [V, H]
    bias_ptr,  # [V] or dummy
    targets_ptr,  # [N] int, in [0, V)
    lse_ptr,  # [N] fp32
    grad_target_ptr,  # [N] fp32
    grad_softmax_ptr,  # [N] fp32
    entropy_ptr,  # [N] fp32 (HAS_ENTROPY_GRAD; else dummy)
    grad_entropy_ptr,  # [N] fp32 (HAS_ENTROPY_GRAD; else dummy)
    grad_hidden_ptr,  # [SPLITS, N, H] fp32 out, contiguous
    N,
    V,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    softcap,
    inv_temperature,
    tiles_per_split,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < N
    targets = tl.load(targets_ptr + offs_n, mask=row_mask, other=0)
    lse = tl.load(lse_ptr + offs_n, mask=row_mask, other=0.0)
    grad_target = tl.load(grad_target_ptr + offs_n, mask=row_mask, other=0.0)
    grad_softmax = tl.load(grad_softmax_ptr + offs_n, mask=row_mask, other=0.0)
    entropy, grad_entropy = _entropy_rows(
        entropy_ptr, grad_entropy_ptr, offs_n, row_mask, grad_softmax, HAS_ENTROPY_GRAD
    )
    v_begin = split * tiles_per_split * BLOCK_V

    offs_h = tl.arange(0, BLOCK_H)
    out_rows = grad_hidden_ptr + (split.to(tl.int64) * N + offs_n.to(tl.int64))[:, None] * H
    w_dtype = weight_ptr.dtype.element_ty
    # Host-computed trip count (module docstring, "Loop bounds"); tiles past V are masked.
    for tile in range(0, tiles_per_split):
        offs_v = v_begin + tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = offs_v < V
        z, tanh = _logit_tile(
            hidden_ptr, weight_ptr, bias_ptr, offs_n, row_mask, offs_v, col_mask, H,
            stride_hn, stride_hh, stride_wv, stride_wh, softcap, inv_temperature,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
        )  # fmt: skip
        valid = row_mask[:, None] & col_mask[None, :]
        g = _grad_logit_tile(
            z, tanh, offs_v, targets, lse, grad_target, grad_softmax, entropy, grad_entropy, valid,
            inv_temperature, HAS_SOFTCAP, HAS_ENTROPY_GRAD,
        ).to(w_dtype)  # fmt: skip
        w_rows = weight_ptr + offs_v.to(tl.int64)[:, None] * stride_wv
        for h0 in range(0, H, BLOCK_H):
            k = h0 + offs_h
            k_mask = k < H
            out_mask = row_mask[:, None] & k_mask[None, :]
            w = tl.load(
                w_rows + k[None, :] * stride_wh, mask=col_mask[:, None] & k_mask[None, :], other=0.0
            )
            if tile == 0:
                acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
            else:
                acc = tl.load(out_rows + k[None, :], mask=out_mask, other=0.0)
            acc = tl.dot(g, w, acc, input_precision=DOT_PRECISION)
            tl.store(out_rows + k[None, :], acc, mask=out_mask)


@triton.jit
def _linear_logprobs_bwd_weight_kernel(
    hidden_ptr,  # [N, H]
    weight_ptr,  # [V, H]
    bias_ptr,  # [V] or dummy
    targets_ptr,  # [N] int, in [0, V)
    lse_ptr,  # [N] fp32
    grad_target_ptr,  # [N] fp32
    grad_softmax_ptr,  # [N] fp32
    entropy_ptr,  # [N] fp32 (HAS_ENTROPY_GRAD; else dummy)
    grad_entropy_ptr,  # [N] fp32 (HAS_ENTROPY_GRAD; else dummy)
    grad_weight_ptr,  # [v_end - v_begin, H] fp32 out, contiguous (dummy without HAS_DW)
    grad_bias_ptr,  # [V] fp32 out (dummy without HAS_DB)
    N,
    v_begin,
    v_end,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    softcap,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # This launch covers the vocabulary slab [v_begin, v_end); the softmax still uses the
    # full-vocabulary lse, so columns outside the slab simply do not matter here.
    pid_v = tl.program_id(0)
    offs_v = v_begin + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = offs_v < v_end
    offs_h = tl.arange(0, BLOCK_H)
    out_rows = grad_weight_ptr + (offs_v - v_begin).to(tl.int64)[:, None] * H
    h_dtype = hidden_ptr.dtype.element_ty
    grad_bias = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        row_mask = offs_n < N
        targets = tl.load(targets_ptr + offs_n, mask=row_mask, other=0)
        lse = tl.load(lse_ptr + offs_n, mask=row_mask, other=0.0)
        grad_target = tl.load(grad_target_ptr + offs_n, mask=row_mask, other=0.0)
        grad_softmax = tl.load(grad_softmax_ptr + offs_n, mask=row_mask, other=0.0)
        entropy, grad_entropy = _entropy_rows(
            entropy_ptr, grad_entropy_ptr, offs_n, row_mask, grad_softmax, HAS_ENTROPY_GRAD
        )
        z, tanh = _logit_tile(
            hidden_ptr, weight_ptr, bias_ptr, offs_n, row_mask, offs_v, col_mask, H,
            stride_hn, stride_hh, stride_wv, stride_wh, softcap, inv_temperature,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
        )  # fmt: skip
        valid = row_mask[:, None] & col_mask[None, :]
        g = _grad_logit_tile(
            z, tanh, offs_v, targets, lse, grad_target, grad_softmax, entropy, grad_entropy, valid,
            inv_temperature, HAS_SOFTCAP, HAS_ENTROPY_GRAD,
        )  # fmt: skip
        if HAS_DB:
            grad_bias += tl.sum(g, axis=0)
        if HAS_DW:
            g_t = tl.trans(g.to(h_dtype))
            h_rows = hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
            for h0 in range(0, H, BLOCK_H):
                k = h0 + offs_h
                k_mask = k < H
                out_mask = col_mask[:, None] & k_mask[None, :]
                h = tl.load(
                    h_rows + k[None, :] * stride_hh,
                    mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                if n0 == 0:
                    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
                else:
                    acc = tl.load(out_rows + k[None, :], mask=out_mask, other=0.0)
                acc = tl.dot(g_t, h, acc, input_precision=DOT_PRECISION)
                tl.store(out_rows + k[None, :], acc, mask=out_mask)
    if HAS_DB:
        tl.store(grad_bias_ptr + offs_v, grad_bias, mask=col_mask)


# --------------------------------------------------------------------------------------------
# Launchers


@dataclass(frozen=True, kw_only=True)
class TileConfig:
    """Tile sizes and launch options shared by the three kernels."""

    block_n: int = 128
    """Rows per tile (>= 16, a power of two)."""
    block_v: int = 128
    """Vocabulary columns per tile (>= 16, a power of two)."""
    block_h: int = 64
    """Hidden-dim chunk of each tl.dot (>= 16, a power of two)."""
    num_warps: int = 8
    num_stages: int = 3
    split_v: int | None = None
    """V splits of the forward / dH kernels; None picks enough to fill the device."""
    max_split_hidden_bytes: int = 256 << 20
    """dH kernel: cap on its [splits, N, H] fp32 partial buffers."""
    weight_slab_tiles: int | None = None
    """dW kernel, non-fp32 weights: vocabulary tiles per launch, whose fp32 [slab, H]
    accumulator is reused launch after launch (None: two programs per SM)."""


# GPU defaults, not autotuned. The forward holds one [128, 128] fp32 logit tile; the backward
# kernels hold three (logits, tanh, G), hence half the rows to stay clear of register spills.
# fp32 operands take twice the shared memory per stage, hence the narrower H chunk.
GPU_FORWARD_CONFIG = TileConfig(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3)
GPU_BACKWARD_CONFIG = TileConfig(block_n=64, block_v=128, block_h=64, num_warps=8, num_stages=2)
# The forward with statistics holds more than one tile too (logits, their exponentials, the
# column ids for the argmax): at 128 rows it spilled 144-184 B per thread on sm_80 (triton 3.6
# and 3.9; none on sm_90), at 64 none on either (benchmarks/kernel_compile_report.py).
GPU_FORWARD_STATS_CONFIG = dataclasses.replace(GPU_FORWARD_CONFIG, block_n=64)
# The interpreter runs programs one after another with numpy: small tiles keep test shapes
# covering several tiles, splits and masked edges while staying fast.
INTERPRETER_CONFIG = TileConfig(block_n=16, block_v=64, block_h=32, num_warps=1, num_stages=1)


def is_interpreted() -> bool:
    """True when these kernels were built for the Triton interpreter (TRITON_INTERPRET=1)."""
    return type(_linear_logprobs_fwd_kernel).__name__ == "InterpretedFunction"


def default_config(dtype: torch.dtype, *, backward: bool, stats: bool = False) -> TileConfig:
    """The tiles a launch uses when none is given (`stats`: a forward computing statistics)."""
    if is_interpreted():
        return INTERPRETER_CONFIG
    if backward:
        config = GPU_BACKWARD_CONFIG
    else:
        config = GPU_FORWARD_STATS_CONFIG if stats else GPU_FORWARD_CONFIG
    if dtype == torch.float32:
        config = dataclasses.replace(config, block_h=32)
    return config


def _num_programs_wanted(device: torch.device) -> int:
    """Two programs per SM; 4 under the interpreter (enough to exercise splits and slabs)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _v_splits(
    row_tiles: int, v_tiles: int, device: torch.device, config: TileConfig, max_splits: int
) -> tuple[int, int]:
    """(splits, vocabulary tiles per split) for a grid of `row_tiles` x splits; no split empty."""
    wanted = config.split_v
    if wanted is None:
        wanted = triton.cdiv(_num_programs_wanted(device), max(row_tiles, 1))  # N may be 0
    wanted = max(1, min(wanted, v_tiles, max_splits))
    tiles_per_split = triton.cdiv(v_tiles, wanted)
    return triton.cdiv(v_tiles, tiles_per_split), tiles_per_split


def _check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    row_vectors: dict[str, torch.Tensor],
) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"hidden must be fp16, bf16 or fp32, got {hidden.dtype}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(
            f"hidden ({hidden.dtype}), weight ({weight.dtype}) and bias "
            f"({None if bias is None else bias.dtype}) must share one dtype: cast them"
        )
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.stride(0) != 1):
        raise ValueError(
            f"bias must be a contiguous [V={weight.shape[0]}] tensor, got shape "
            f"{tuple(bias.shape)} stride {bias.stride()}: pass bias.contiguous()"
        )
    rows = hidden.shape[0]
    if targets.shape != (rows,) or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"targets must be int32/int64 [N={rows}], got {targets.dtype} {tuple(targets.shape)}"
        )
    if targets.stride(0) != 1:
        raise ValueError("targets must be contiguous: pass targets.contiguous()")
    for name, vector in row_vectors.items():
        if vector.shape != (rows,) or vector.dtype != torch.float32 or vector.stride(0) != 1:
            raise ValueError(
                f"{name} must be a contiguous fp32 [N={rows}] tensor, got {vector.dtype} "
                f"{tuple(vector.shape)}"
            )
    named = {"weight": weight, "targets": targets, "bias": bias, **row_vectors}
    for name, tensor in named.items():
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(
                f"{name} is on {tensor.device} but hidden is on {hidden.device}: move them to "
                "one device"
            )
    if hidden.device.type != "cuda" and not is_interpreted():
        raise ValueError(
            f"tensors are on {hidden.device}: the kernels need CUDA, or TRITON_INTERPRET=1 set "
            "before this module is imported"
        )


def _scalars(**values: int | float) -> dict[str, int | float | tl.constexpr]:
    """A launch's runtime scalar arguments, as the kernels get them on either path.

    Compiled, they are plain Python numbers. Triton 3.6's interpreter wraps a Python int in a
    1-element array, which `range()` cannot take under numpy >= 2.4 ("only 0-dimensional arrays
    can be converted to Python scalars"; triton 3.9's interpreter squeezes it first): there ints
    go as `tl.constexpr`, which the interpreter leaves a Python int (it does not specialize on
    them; only the compiler would, and this path never compiles).
    """
    if not is_interpreted():
        return values
    return {name: tl.constexpr(v) if type(v) is int else v for name, v in values.items()}


def _common_args(hidden, weight, softcap, temperature):
    return _scalars(
        stride_hn=hidden.stride(0),
        stride_hh=hidden.stride(1),
        stride_wv=weight.stride(0),
        stride_wh=weight.stride(1),
        softcap=float(softcap) if softcap is not None else 1.0,
        inv_temperature=1.0 / float(temperature),
    )


def _constexprs(hidden, bias, softcap, config: TileConfig):
    return dict(
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        BLOCK_N=config.block_n,
        BLOCK_V=config.block_v,
        BLOCK_H=config.block_h,
        # fp32 inputs: exact fp32 products, as torch's default (no TF32) matmul.
        DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


STATS = ("entropy", "log_sum_p2", "mean_logit", "is_top1")
"""The per-token statistics the forward kernel computes when asked."""
_PARTIAL_STATS = ("entropy", "log_sum_p2", "mean_logit", "max", "argmax")
"""The forward kernel's statistics outputs, in its argument order."""


def linear_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    softcap: float | None,
    temperature: float,
    config: TileConfig | None = None,
    stats: tuple[str, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, dict]:
    """Target logits and log-sum-exp of the final logits, both [N] fp32.

    hidden [N, H], weight [V, H], bias [V] or None (one float dtype); targets [N] int32/int64,
    every entry in [0, V) (the caller maps ignored rows to any valid id and masks the result).
    With `stats` (names from STATS), also {name: [N]} of those per-token statistics (fp32; bool
    for "is_top1"), computed in the same pass; definitions in fastdpo.ops.linear_logprobs.
    """
    unknown = set(stats) - set(STATS)
    if unknown:
        raise ValueError(f"stats: unknown {sorted(unknown)}; known: {STATS}")
    config = config or default_config(hidden.dtype, backward=False, stats=bool(stats))
    _check_inputs(hidden, weight, bias, targets, {})
    rows, width = hidden.shape
    vocab = weight.shape[0]
    row_tiles = triton.cdiv(rows, config.block_n)
    splits, tiles_per_split = _v_splits(
        row_tiles, triton.cdiv(vocab, config.block_v), hidden.device, config, max_splits=1 << 30
    )
    partial_target = torch.empty(splits, rows, dtype=torch.float32, device=hidden.device)
    partial_lse = torch.empty(splits, rows, dtype=torch.float32, device=hidden.device)
    partial = {
        name: torch.empty(splits, rows, dtype=torch.float32, device=hidden.device)
        for name in ("entropy", "log_sum_p2", "mean_logit")
        if name in stats
    }
    if "is_top1" in stats:
        partial["max"] = torch.empty(splits, rows, dtype=torch.float32, device=hidden.device)
        partial["argmax"] = torch.empty(splits, rows, dtype=torch.int32, device=hidden.device)
    if rows > 0:
        _linear_logprobs_fwd_kernel[(row_tiles, splits)](
            hidden, weight, bias if bias is not None else hidden, targets,
            partial_target, partial_lse,
            *(partial.get(name, partial_lse) for name in _PARTIAL_STATS),
            **_scalars(N=rows, V=vocab, H=width, tiles_per_split=tiles_per_split),
            **_common_args(hidden, weight, softcap, temperature),
            **_constexprs(hidden, bias, softcap, config),
            ENTROPY="entropy" in stats, SUM_P2="log_sum_p2" in stats,
            MEAN_LOGIT="mean_logit" in stats, TOP1="is_top1" in stats,
        )  # fmt: skip
    if splits == 1:
        target_logits, lse = partial_target[0], partial_lse[0]
    else:
        # Only the split holding the target wrote a non-zero target logit.
        target_logits, lse = partial_target.sum(0), torch.logsumexp(partial_lse, dim=0)
    if not stats:
        return target_logits, lse
    values = _combine_split_stats(partial, partial_lse, lse, vocab)
    if "is_top1" in stats:
        values["is_top1"] = values.pop("argmax") == targets
    return target_logits, lse, {name: values[name] for name in stats}


def _combine_split_stats(
    partial: dict[str, torch.Tensor], partial_lse: torch.Tensor, lse: torch.Tensor, vocab: int
) -> dict[str, torch.Tensor]:
    """[N] statistics from the kernel's [SPLITS, N] per-split ones (each of a split's own
    softmax), in a fixed order. With w_k = exp(lse_k - lse), the weight of split k:

        entropy    = sum_k w_k (entropy_k + lse - lse_k)
        log_sum_p2 = logsumexp_k (log_sum_p2_k + 2 (lse_k - lse))
        mean_logit = sum_k sum_logits_k / V;    argmax = the first split's holding the max

    A split whose logits are all -inf (a -inf bias) has w_k = 0 and NaN statistics: skipped."""
    splits = partial_lse.shape[0]
    values = {}
    if "mean_logit" in partial:
        values["mean_logit"] = partial["mean_logit"].sum(0) / vocab
    if "argmax" in partial:
        maxima = partial["max"]
        first = (maxima == maxima.amax(0)).to(torch.uint8).argmax(0)  # first index among ties
        values["argmax"] = partial["argmax"].gather(0, first[None])[0]
    if splits == 1:
        for name in ("entropy", "log_sum_p2"):
            if name in partial:
                values[name] = partial[name][0]
        return values
    empty = partial_lse == -math.inf
    if "entropy" in partial:
        weight = torch.exp(partial_lse - lse)
        terms = weight * (partial["entropy"] + (lse - partial_lse))
        values["entropy"] = torch.where(empty, 0.0, terms).sum(0)
    if "log_sum_p2" in partial:
        terms = partial["log_sum_p2"] + 2 * (partial_lse - lse)
        values["log_sum_p2"] = torch.logsumexp(torch.where(empty, -math.inf, terms), dim=0)
    return values


def linear_logprobs_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_target: torch.Tensor,
    grad_softmax: torch.Tensor,
    *,
    softcap: float | None,
    temperature: float,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    config: TileConfig | None = None,
    entropy: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dH [N, H], dW [V, H], db [V]) in the inputs' dtype, each None unless asked for.

    lse [N] fp32 is the forward's (unmasked) log-sum-exp; dL/dz[i, v] = grad_target[i] *
    [v == targets[i]] + grad_softmax[i] * softmax(z)[i, v], both [N] fp32 (zero on ignored rows).
    With `entropy` and `grad_entropy` (both [N] fp32: the forward's entropy and dL/dentropy, zero
    on ignored rows), dL/dz also gets grad_entropy[i] * -p[i, v] (log p[i, v] + entropy[i]).
    """
    config = config or default_config(hidden.dtype, backward=True)
    row_vectors = {"lse": lse, "grad_target": grad_target, "grad_softmax": grad_softmax}
    if (entropy is None) != (grad_entropy is None):
        raise ValueError("entropy and grad_entropy come together (or neither)")
    has_entropy_grad = entropy is not None
    if has_entropy_grad:
        row_vectors.update(entropy=entropy, grad_entropy=grad_entropy)
    _check_inputs(hidden, weight, bias, targets, row_vectors)
    if need_bias and bias is None:
        raise ValueError("need_bias=True without a bias")
    rows, width = hidden.shape
    vocab = weight.shape[0]
    dtype, device = hidden.dtype, hidden.device
    common = _common_args(hidden, weight, softcap, temperature)
    constexprs = _constexprs(hidden, bias, softcap, config)
    constexprs["HAS_ENTROPY_GRAD"] = has_entropy_grad
    bias_arg = bias if bias is not None else hidden
    entropy_args = (row_vectors.get("entropy", lse), row_vectors.get("grad_entropy", lse))

    grad_hidden = None
    if need_hidden:
        row_tiles = triton.cdiv(rows, config.block_n)
        v_tiles = triton.cdiv(vocab, config.block_v)
        max_splits = max(1, config.max_split_hidden_bytes // max(1, 4 * rows * width))
        splits, tiles_per_split = _v_splits(row_tiles, v_tiles, device, config, max_splits)
        partial = torch.empty(splits, rows, width, dtype=torch.float32, device=device)
        if rows > 0:
            _linear_logprobs_bwd_hidden_kernel[(row_tiles, splits)](
                hidden, weight, bias_arg, targets, lse, grad_target, grad_softmax,
                *entropy_args, partial,
                **_scalars(N=rows, V=vocab, H=width, tiles_per_split=tiles_per_split),
                **common, **constexprs,
            )  # fmt: skip
        grad_hidden = (partial[0] if splits == 1 else partial.sum(0)).to(dtype)

    grad_weight = grad_bias = None
    if need_weight or need_bias:
        grad_weight, grad_bias = _weight_grads(
            hidden, weight, bias_arg, targets, row_vectors, entropy_args, need_weight, need_bias,
            config, common, constexprs,
        )  # fmt: skip
    return grad_hidden, grad_weight, grad_bias


def _weight_grads(
    hidden,
    weight,
    bias_arg,
    targets,
    row_vectors,
    entropy_args,
    need_weight,
    need_bias,
    config,
    common,
    constexprs,
):
    """dW [V, H] and db [V] in the inputs' dtype (None where not needed), slab by slab.

    fp32 weights accumulate straight into dW in one launch. Other dtypes need an fp32
    accumulator: a [V, H] one would double dW's memory, so the vocabulary goes in slabs of
    `weight_slab_tiles` tiles that reuse one [slab, H] fp32 buffer, each slab rounded into dW.
    """
    rows, width = hidden.shape
    vocab, dtype, device = weight.shape[0], weight.dtype, weight.device
    grad_weight = torch.empty(vocab, width, dtype=dtype, device=device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_bias else None
    v_tiles = triton.cdiv(vocab, config.block_v)
    in_place = grad_weight is None or dtype == torch.float32
    slab_tiles = v_tiles if in_place else config.weight_slab_tiles
    if slab_tiles is None:
        slab_tiles = _num_programs_wanted(device)
    slab_tiles = max(1, min(slab_tiles, v_tiles))
    slab_columns = slab_tiles * config.block_v
    scratch = None
    if not in_place:
        scratch = torch.empty(min(slab_columns, vocab), width, dtype=torch.float32, device=device)
    dummy = row_vectors["lse"]
    for v_begin in range(0, vocab, slab_columns):
        v_end = min(v_begin + slab_columns, vocab)
        if grad_weight is None:
            out = dummy
        else:
            out = grad_weight[v_begin:v_end] if scratch is None else scratch[: v_end - v_begin]
        if rows == 0:
            if grad_weight is not None:
                out.zero_()
        else:
            _linear_logprobs_bwd_weight_kernel[(triton.cdiv(v_end - v_begin, config.block_v),)](
                hidden, weight, bias_arg, targets, row_vectors["lse"],
                row_vectors["grad_target"], row_vectors["grad_softmax"], *entropy_args, out,
                grad_bias if grad_bias is not None else dummy,
                **_scalars(N=rows, v_begin=v_begin, v_end=v_end, H=width),
                HAS_DW=need_weight, HAS_DB=need_bias, **common, **constexprs,
            )  # fmt: skip
        if scratch is not None and grad_weight is not None:
            grad_weight[v_begin:v_end].copy_(out)
    return grad_weight, None if grad_bias is None else grad_bias.to(dtype)
