"""Triton kernels that fold one logits tile of the cuBLAS-based head (imports nothing from fastdpo).

The "cublas" implementation of the fused head (fastdpo.ops.linear_logprobs_cublas) computes the
projections as large GEMMs on [rows, columns] tiles of the logits, one vocabulary chunk at a
time; these kernels do the element-wise work on each tile where it lies:

    z_raw = tile[i, c] + b[c];  z = softcap(z_raw) / temperature     softcap(x) = s * tanh(x / s)

- `_logits_fold_fwd_kernel`, grid (row blocks): folds the tile's columns into each row's running
  statistics in fp32, read and written in place across the vocabulary chunks: an online
  log-sum-exp (running max m, sum of exp(z - m)) and the target logit, written when the target
  falls in this chunk. After the last chunk, lse = m + log(sum).
- `_logits_fold_bwd_kernel`, grid (row blocks, column blocks): overwrites (or writes beside) the
  tile with the logits gradient dL/dz_raw, the left operand of the dH and dW GEMMs:

      G[i, c] = (grad_target[i] * [c == t[i]] + grad_softmax[i] * exp(z - lse[i]))
                / temperature * (1 - tanh(z_raw / s) ** 2)

The tile is fp32 (a GEMM with fp32 output) or the inputs' dtype where torch cannot give an fp32
output from bf16/fp16 inputs; either way it is read and cast to fp32 right after loading (the
interpreter treats bf16 as raw bits otherwise). G is stored in the gradient tile's dtype, which
may be the same memory: each element is read and written by the same program.

Loop bounds are plain kernel arguments (`columns`), never values derived from `tl.program_id`:
the triton 3.6 interpreter fails on those under numpy >= 2.4. No atomics: every element and every
row statistic is written by one program, so results are bitwise reproducible.
"""

from __future__ import annotations

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
def _final_logits(z_raw, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """(z, tanh(z_raw / softcap)); the second is z_raw when soft-capping is off (unused then)."""
    if HAS_SOFTCAP:
        tanh = _tanh(z_raw / softcap)
        z = tanh * (softcap * inv_temperature)
    else:
        tanh = z_raw
        z = z_raw * inv_temperature
    return z, tanh


@triton.jit
def _logits_fold_fwd_kernel(
    tile_ptr,  # [rows, columns] raw logits h @ W_chunk.T, fp32 or the inputs' dtype
    stride_tile,
    bias_ptr,  # [columns] the chunk's bias, or a dummy
    targets_ptr,  # [rows] int, vocabulary ids in [0, V)
    running_max_ptr,  # [rows] fp32, in/out
    sum_exp_ptr,  # [rows] fp32, in/out: sum of exp(z - running_max)
    target_logit_ptr,  # [rows] fp32, in/out: written where the target is in this chunk
    rows,
    columns,
    column_offset,  # vocabulary id of the tile's first column
    softcap,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = offs_r < rows
    running_max = tl.load(running_max_ptr + offs_r, mask=row_mask, other=float("-inf"))
    sum_exp = tl.load(sum_exp_ptr + offs_r, mask=row_mask, other=0.0)
    target_logit = tl.load(target_logit_ptr + offs_r, mask=row_mask, other=0.0)
    local_target = tl.load(targets_ptr + offs_r, mask=row_mask, other=0) - column_offset
    row_ptrs = tile_ptr + offs_r.to(tl.int64)[:, None] * stride_tile
    for c0 in range(0, columns, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        col_mask = offs_c < columns
        mask = row_mask[:, None] & col_mask[None, :]
        z_raw = tl.load(row_ptrs + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z_raw += tl.load(bias_ptr + offs_c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        z, _ = _final_logits(z_raw, softcap, inv_temperature, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        # A row whose logits so far are all -inf (a -inf bias masking whole chunks) shifts by 0,
        # not by -inf: exp(-inf - -inf) would be NaN and poison the row's sum for good.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        sum_exp = sum_exp * tl.exp(running_max - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        running_max = new_max
        # A target in a later chunk can equal a masked column past this tile's end.
        is_target = (offs_c[None, :] == local_target[:, None]) & col_mask[None, :]
        target_logit += tl.sum(tl.where(is_target, z, 0.0), axis=1)
    tl.store(running_max_ptr + offs_r, running_max, mask=row_mask)
    tl.store(sum_exp_ptr + offs_r, sum_exp, mask=row_mask)
    tl.store(target_logit_ptr + offs_r, target_logit, mask=row_mask)


@triton.jit
def _logits_fold_bwd_kernel(
    tile_ptr,  # [rows, columns] raw logits h @ W_chunk.T, fp32 or the inputs' dtype
    stride_tile,
    grad_ptr,  # [rows, columns] out: dL/dz_raw in its own dtype (may be tile_ptr itself)
    stride_grad,
    bias_ptr,  # [columns] the chunk's bias, or a dummy
    targets_ptr,  # [rows] int, vocabulary ids in [0, V)
    lse_ptr,  # [rows] fp32: the forward's log-sum-exp of the final logits
    grad_target_ptr,  # [rows] fp32: dL/dlogp (0 on ignored rows)
    grad_softmax_ptr,  # [rows] fp32: dL/dlse - dL/dlogp (0 on ignored rows)
    rows,
    columns,
    column_offset,
    softcap,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,  # interpreter only (see fold_backward)
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = offs_r < rows
    col_mask = offs_c < columns
    mask = row_mask[:, None] & col_mask[None, :]
    offs_r64 = offs_r.to(tl.int64)[:, None]
    z_raw = tl.load(tile_ptr + offs_r64 * stride_tile + offs_c[None, :], mask=mask, other=0.0)
    z_raw = z_raw.to(tl.float32)
    if HAS_BIAS:
        z_raw += tl.load(bias_ptr + offs_c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    z, tanh = _final_logits(z_raw, softcap, inv_temperature, HAS_SOFTCAP)
    lse = tl.load(lse_ptr + offs_r, mask=row_mask, other=0.0)
    grad_target = tl.load(grad_target_ptr + offs_r, mask=row_mask, other=0.0)
    grad_softmax = tl.load(grad_softmax_ptr + offs_r, mask=row_mask, other=0.0)
    local_target = tl.load(targets_ptr + offs_r, mask=row_mask, other=0) - column_offset
    p = tl.exp(z - lse[:, None])
    g = grad_softmax[:, None] * p + tl.where(
        offs_c[None, :] == local_target[:, None], grad_target[:, None], 0.0
    )
    g = g * inv_temperature
    if HAS_SOFTCAP:  # d(s * tanh(x / s))/dx = 1 - tanh(x / s)^2
        g = g * (1.0 - tanh * tanh)
    grad_ptrs = grad_ptr + offs_r64 * stride_grad + offs_c[None, :]
    if BF16_BY_BITS:
        # Round to nearest even by hand: the interpreter's fp32 -> bf16 cast truncates.
        bits = g.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(grad_ptrs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(grad_ptrs, g.to(grad_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers


@dataclass(frozen=True, kw_only=True)
class FoldConfig:
    """Block shape and warps of one fold kernel."""

    block_rows: int
    """Rows per program (a power of two)."""
    block_columns: int
    """Columns per block (a power of two): per loop step in forward, per program in backward."""
    num_warps: int


# GPU: one row per program and 1024-column blocks, as TRL 1.16's fold kernels (trl/kernels/
# chunked_logprob.py) use; not tuned here (no GPU measurement yet).
GPU_FORWARD_CONFIG = FoldConfig(block_rows=1, block_columns=1024, num_warps=4)
GPU_BACKWARD_CONFIG = FoldConfig(block_rows=1, block_columns=1024, num_warps=4)
# The interpreter runs programs one after another with numpy: blocks small enough that test
# shapes cover several row blocks, column blocks and masked edges.
INTERPRETER_CONFIG = FoldConfig(block_rows=8, block_columns=32, num_warps=1)


def is_interpreted() -> bool:
    """True when these kernels were built for the Triton interpreter (TRITON_INTERPRET=1)."""
    return type(_logits_fold_fwd_kernel).__name__ == "InterpretedFunction"


def default_config(*, backward: bool) -> FoldConfig:
    if is_interpreted():
        return INTERPRETER_CONFIG
    return GPU_BACKWARD_CONFIG if backward else GPU_FORWARD_CONFIG


def _scalars(**values: int | float) -> dict[str, int | float | tl.constexpr]:
    """A launch's runtime scalar arguments, as the kernels get them on either path.

    Compiled, they are plain Python numbers. Triton 3.6's interpreter wraps a Python int in a
    1-element array, which `range()` cannot take under numpy >= 2.4 ("only 0-dimensional arrays
    can be converted to Python scalars"): there ints go as `tl.constexpr`, which the interpreter
    leaves a Python int (only the compiler would specialize on them, and this path never
    compiles). The same helper as fastdpo.kernels.linear_logprobs's (kernels share no code).
    """
    if not is_interpreted():
        return values
    return {name: tl.constexpr(v) if type(v) is int else v for name, v in values.items()}


def _launch_scalars(tile, rows, columns, column_offset, softcap, temperature):
    return _scalars(
        stride_tile=tile.stride(0),
        rows=rows,
        columns=columns,
        column_offset=column_offset,
        softcap=float(softcap) if softcap is not None else 1.0,
        inv_temperature=1.0 / float(temperature),
    )


def _check_tile(name: str, tile: torch.Tensor) -> None:
    if tile.dim() != 2 or (tile.shape[1] > 1 and tile.stride(1) != 1):
        raise ValueError(
            f"{name} must be a 2-D tile with contiguous rows, got shape {tuple(tile.shape)} "
            f"stride {tile.stride()}"
        )
    if tile.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name} must be fp32, bf16 or fp16, got {tile.dtype}")
    if tile.device.type != "cuda" and not is_interpreted():
        raise ValueError(
            f"{name} is on {tile.device}: the fold kernels need CUDA, or TRITON_INTERPRET=1 set "
            "before this module is imported"
        )


def _check_vectors(rows: int, device: torch.device, vectors: dict[str, torch.Tensor]) -> None:
    for name, vector in vectors.items():
        if vector.shape != (rows,) or vector.stride(0) != 1 or vector.device != device:
            raise ValueError(
                f"{name} must be a contiguous [rows={rows}] tensor on {device}, got "
                f"{tuple(vector.shape)} stride {vector.stride()} on {vector.device}"
            )
        if name == "targets":
            if vector.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"targets must be int32/int64, got {vector.dtype}")
        elif vector.dtype != torch.float32:
            raise TypeError(f"{name} must be fp32, got {vector.dtype}")


def _check_bias(bias: torch.Tensor | None, columns: int) -> None:
    if bias is not None and (bias.shape != (columns,) or bias.stride(0) != 1):
        raise ValueError(
            f"bias must be the chunk's contiguous [{columns}] slice, got {tuple(bias.shape)} "
            f"stride {bias.stride()}"
        )


def fold_forward(
    tile: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    running_max: torch.Tensor,
    sum_exp: torch.Tensor,
    target_logit: torch.Tensor,
    *,
    column_offset: int,
    softcap: float | None,
    temperature: float,
    config: FoldConfig | None = None,
) -> None:
    """Folds one tile into the rows' running statistics, in place.

    tile [rows, columns] raw logits (fp32/bf16/fp16) of the vocabulary ids column_offset ...
    column_offset + columns - 1; bias [columns] (the chunk's slice) or None; targets [rows]
    int32/int64; running_max, sum_exp, target_logit [rows] fp32, updated in place (start them at
    -inf, 0, 0).
    """
    config = config or default_config(backward=False)
    _check_tile("tile", tile)
    rows, columns = tile.shape
    vectors = {"targets": targets, "running_max": running_max, "sum_exp": sum_exp}
    _check_vectors(rows, tile.device, {**vectors, "target_logit": target_logit})
    _check_bias(bias, columns)
    if rows == 0 or columns == 0:
        return
    _logits_fold_fwd_kernel[(triton.cdiv(rows, config.block_rows),)](
        tile_ptr=tile, bias_ptr=bias if bias is not None else tile, targets_ptr=targets,
        running_max_ptr=running_max, sum_exp_ptr=sum_exp, target_logit_ptr=target_logit,
        **_launch_scalars(tile, rows, columns, column_offset, softcap, temperature),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        BLOCK_R=config.block_rows, BLOCK_C=config.block_columns, num_warps=config.num_warps,
    )  # fmt: skip


def fold_backward(
    tile: torch.Tensor,
    grad: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_target: torch.Tensor,
    grad_softmax: torch.Tensor,
    *,
    column_offset: int,
    softcap: float | None,
    temperature: float,
    config: FoldConfig | None = None,
) -> None:
    """Writes dL/dz_raw of one tile into `grad` (which may be `tile` itself).

    tile [rows, columns] raw logits; grad [rows, columns] out, in its own dtype; bias, targets as
    in `fold_forward`; lse, grad_target, grad_softmax [rows] fp32 (the last two zero on ignored
    rows).

    bf16 gradients are rounded to nearest even, as a compiled kernel's cast does; under the
    interpreter (triton 3.6 and 3.9) that cast truncates, doubling the rounding error (seen
    here: mean |error| 2.2e-3 against torch's 1.1e-3 on randn values), so the interpreted kernel
    rounds by hand on the bits instead.
    """
    config = config or default_config(backward=True)
    _check_tile("tile", tile)
    _check_tile("grad", grad)
    if grad.shape != tile.shape or grad.device != tile.device:
        raise ValueError(f"grad {tuple(grad.shape)} must match tile {tuple(tile.shape)}")
    rows, columns = tile.shape
    vectors = {"targets": targets, "lse": lse, "grad_target": grad_target}
    _check_vectors(rows, tile.device, {**vectors, "grad_softmax": grad_softmax})
    _check_bias(bias, columns)
    if rows == 0 or columns == 0:
        return
    grid = (triton.cdiv(rows, config.block_rows), triton.cdiv(columns, config.block_columns))
    _logits_fold_bwd_kernel[grid](
        tile_ptr=tile, grad_ptr=grad, bias_ptr=bias if bias is not None else tile,
        targets_ptr=targets, lse_ptr=lse, grad_target_ptr=grad_target,
        grad_softmax_ptr=grad_softmax, **_scalars(stride_grad=grad.stride(0)),
        **_launch_scalars(tile, rows, columns, column_offset, softcap, temperature),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        BLOCK_R=config.block_rows, BLOCK_C=config.block_columns, num_warps=config.num_warps,
        BF16_BY_BITS=is_interpreted() and grad.dtype == torch.bfloat16,
    )  # fmt: skip
