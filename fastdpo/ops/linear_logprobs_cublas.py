"""The "cublas" implementation of `linear_logprobs`: GEMMs on logits tiles, Triton folds between.

The projections run as large GEMMs (`torch.mm` / `torch.addmm`, cuBLAS on CUDA) over tiles of
[rows x vocabulary columns]; a Triton kernel (`fastdpo.kernels.logits_fold`) does the element-wise
work on each tile where it lies. Loops: vocabulary chunks outside, row chunks inside.

    forward   tile = h_rows @ W_chunk.T                        2NHV in all
              fold: bias, softcap, temperature; online log-sum-exp and target logit per row
    backward  tile = h_rows @ W_chunk.T (recompute)            2NHV
              fold: G = dL/dz_raw, in place (or beside the tile, in the inputs' dtype)
              dH[rows]  += G @ W_chunk   (fp32 accumulator)    2NHV, when hidden needs a grad
              dW[chunk] (+)= G.T @ h_rows                      2NHV, when weight needs a grad
              db[chunk] += G.sum(0)                            (fp32)

8NHV in all with both gradients (2 forward + 6 backward, counting the recompute and one
multiply-add as 2 FLOPs): logits are never stored, so backward recomputes them. A frozen head
(LoRA: no dW) costs 6NHV.

Accumulation is fp32 everywhere:
- fp32 inputs: every GEMM is fp32 (torch's default, no TF32 unless the caller enabled it).
- bf16/fp16 inputs on CUDA, where torch can write an fp32 output from bf16/fp16 inputs
  (`torch.mm(..., out_dtype=torch.float32)`; probed once per device, see `fp32_products`): the
  logits tile is fp32 and G is written beside it in the inputs' dtype (the GEMMs' operand); dH
  accumulates in an fp32 [N, H] buffer. dW of a vocabulary chunk is one GEMM over all rows when
  they fit one row chunk (cuBLAS accumulates in fp32 and rounds once into the [V, H] gradient);
  otherwise it accumulates over row chunks in one reused fp32 [chunk columns, H] slab. There is
  no fp32 [V, H] buffer beside the weight gradient.
- elsewhere (the CPU, or a torch without `out_dtype`): the tile is in the inputs' dtype, G
  overwrites it, and the accumulating products take fp32 copies of their operands.

Tile sizes come from a byte budget (`TILE_BYTES`: the tile's logits plus the gradient beside
them): as many rows as allow `MIN_TILE_COLUMNS` columns, then as many columns as fit. TRL 1.16's
chunked head uses [4096 tokens x 32768 vocabulary] tiles in bf16 (256 MiB); here, at (16384,
4096, 128256) bf16, the default gives one row chunk of 16384 rows and vocabulary chunks of 4008
columns in forward (fp32 logits, 32 chunks) and 2729 in backward (fp32 logits + bf16 G, 47
chunks), 256 MiB each. Neither number has been measured on a GPU yet: the GPU check runs the
defaults; `TILE_BYTES` / `MIN_TILE_COLUMNS` are the knobs to sweep.

On the CPU the same code runs with torch's CPU GEMMs and the fold kernels under the Triton
interpreter (TRITON_INTERPRET=1 set before fastdpo is imported): slow, for tests.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

TILE_BYTES = 256 * 2**20
"""Byte budget of one tile: its logits (fp32, or the inputs' dtype) plus, in backward, the
gradient written beside them (read at each call)."""

MIN_TILE_COLUMNS = 2048
"""Row chunks are sized so that a tile keeps at least this many vocabulary columns (read at each
call): narrower GEMMs than [rows, H] x [H, 2048] start to waste a GPU's tensor cores."""


def unavailable_reason(device: torch.device) -> str | None:
    """Why the "cublas" impl cannot run on `device`, or None if it can."""
    try:
        from fastdpo.kernels import logits_fold
    except ImportError as error:  # no triton on this platform
        return f"triton cannot be imported ({error}); install triton or use impl='torch'"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if logits_fold.is_interpreted():
            return None
        return (
            "its fold kernels need a CUDA device (hidden is on the CPU); use impl='torch' or "
            "'auto', or set TRITON_INTERPRET=1 before importing fastdpo to run them (slowly) on "
            "the CPU"
        )
    return f"its fold kernels do not run on {device.type}; use impl='torch' or 'auto'"


# ------------------------------------------------------------------------------------------------
# GEMMs with fp32 output


@functools.cache
def _probe_fp32_products(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch writes fp32 products of `dtype` inputs on `device` (both call forms
    used here, on a transposed operand as the head's GEMMs have)."""
    try:
        a = torch.ones(2, 3, dtype=dtype, device=device)
        b = torch.ones(4, 3, dtype=dtype, device=device)
        out = torch.empty(2, 4, dtype=torch.float32, device=device)
        torch.mm(a, b.T, out_dtype=torch.float32, out=out)
        torch.addmm(out, a, b.T, out_dtype=torch.float32, out=out)
        return bool((out == 6.0).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def fp32_products(device: torch.device, dtype: torch.dtype) -> bool:
    """True when GEMMs of `dtype` inputs on `device` can write fp32 outputs: always for fp32; for
    bf16/fp16 only on CUDA with a torch that has `out_dtype` (2.8+; not on the CPU)."""
    if dtype == torch.float32:
        return True
    if device.type != "cuda":
        return False
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _probe_fp32_products(device, dtype)


def _mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, direct: bool) -> None:
    """out = a @ b. An fp32 `out` of bf16/fp16 operands comes from the GEMM itself where
    `direct` (`fp32_products`) on CUDA, else from fp32 copies of the operands (the CPU, where
    tests force the fp32-tile layout to cover it)."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    elif direct and out.device.type == "cuda":
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:
        torch.mm(a.float(), b.float(), out=out)


def _project(
    tile: torch.Tensor,
    hidden_chunk: torch.Tensor,
    weight_chunk: torch.Tensor,
    bias_chunk: torch.Tensor | None,
    direct: bool,
) -> torch.Tensor | None:
    """tile = hidden_chunk @ weight_chunk.T [+ bias]; returns the bias the fold must still add.

    A tile in the inputs' dtype takes the bias inside the GEMM (`addmm`), rounded once as a plain
    PyTorch head's logits are; an fp32 tile of bf16/fp16 inputs gets it in the fold, in fp32."""
    if bias_chunk is not None and tile.dtype == hidden_chunk.dtype:
        torch.addmm(bias_chunk, hidden_chunk, weight_chunk.T, out=tile)
        return None
    _mm(tile, hidden_chunk, weight_chunk.T, direct)
    return bias_chunk


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, direct: bool) -> None:
    """acc += a @ b for an fp32 `acc`, never rounding a @ b to the operands' dtype: with an fp32
    GEMM output where `direct` on CUDA, else on fp32 copies of the operands."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif direct and acc.device.type == "cuda":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


# ------------------------------------------------------------------------------------------------
# Tiles


@dataclass(frozen=True)
class TilePlan:
    """[N, V] is walked in tiles of `rows` x `columns` (the last ones may be smaller)."""

    rows: int
    columns: int


def _even_block(total: int, most: int) -> int:
    """Block size <= `most` covering `total` in as few blocks as `most` does, all but the last
    equal (no tiny tail block)."""
    count = max(1, math.ceil(total / most))
    return max(1, math.ceil(total / count))


def tile_plan(rows: int, vocab: int, element_bytes: int, tile_bytes: int) -> TilePlan:
    """Tile shape for [rows, vocab] logits at `element_bytes` per logit within `tile_bytes`."""
    least_columns = min(vocab, MIN_TILE_COLUMNS)
    tile_rows = min(max(rows, 1), max(1, tile_bytes // (element_bytes * least_columns)))
    tile_rows = _even_block(max(rows, 1), tile_rows)
    columns = min(vocab, max(least_columns, tile_bytes // (element_bytes * tile_rows)))
    return TilePlan(tile_rows, _even_block(vocab, columns))


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    return [(begin, min(begin + size, total)) for begin in range(0, total, size)]


def _kernels():
    from fastdpo.kernels import logits_fold

    return logits_fold


# ------------------------------------------------------------------------------------------------
# Forward and backward (the contracts of fastdpo.ops.linear_logprobs._torch_forward / _backward)


def linear_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    safe_targets: torch.Tensor,
    *,
    softcap: float | None,
    temperature: float,
    logits_block_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target logits [N] fp32 and log-sum-exp [N] fp32 of the final logits (unmasked).

    hidden [N, H], weight [V, H], bias [V] or None (one float dtype); safe_targets [N] int, all
    in [0, V). `logits_block_bytes` overrides `TILE_BYTES`.
    """
    fold = _kernels()
    (rows, _), vocab = hidden.shape, weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    direct = fp32_products(device, dtype)
    tile_dtype = torch.float32 if direct else dtype
    element_bytes = tile_dtype.itemsize
    budget = TILE_BYTES if logits_block_bytes is None else logits_block_bytes
    plan = tile_plan(rows, vocab, element_bytes, budget)
    fp32 = {"dtype": torch.float32, "device": device}
    running_max = torch.full((rows,), -math.inf, **fp32)
    sum_exp = torch.zeros(rows, **fp32)
    target_logit = torch.zeros(rows, **fp32)
    targets = safe_targets.contiguous()
    buffer = torch.empty(min(rows, plan.rows) * plan.columns, dtype=tile_dtype, device=device)
    bias = None if bias is None else bias.contiguous()
    for begin, end in _chunks(vocab, plan.columns):
        weight_chunk = weight[begin:end]
        bias_chunk = None if bias is None else bias[begin:end]
        for start, stop in _chunks(rows, plan.rows):
            tile = buffer[: (stop - start) * (end - begin)].view(stop - start, end - begin)
            fold.fold_forward(
                tile,
                _project(tile, hidden[start:stop], weight_chunk, bias_chunk, direct),
                targets[start:stop],
                running_max[start:stop],
                sum_exp[start:stop],
                target_logit[start:stop],
                column_offset=begin,
                softcap=softcap,
                temperature=temperature,
            )
    return target_logit, running_max.add_(sum_exp.log_())


def linear_logprobs_backward(
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
    logits_block_bytes: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dH [N, H], dW [V, H], db [V]) in the inputs' dtype, each None unless asked for.

    lse [N] fp32 is the forward's (unmasked) log-sum-exp; dL/dz[i, v] = grad_target[i] *
    [v == t[i]] + grad_softmax[i] * softmax(z)[i, v], both [N] fp32 and zero on ignored rows.
    """
    fold = _kernels()
    (rows, width), vocab = hidden.shape, weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    direct = fp32_products(device, dtype)
    low = dtype != torch.float32
    # fp32 logits with a low-precision gradient beside them, or one tile G overwrites.
    tile_dtype = torch.float32 if direct else dtype
    separate_grad = direct and low
    element_bytes = tile_dtype.itemsize + (dtype.itemsize if separate_grad else 0)
    budget = TILE_BYTES if logits_block_bytes is None else logits_block_bytes
    plan = tile_plan(rows, vocab, element_bytes, budget)
    row_chunks = _chunks(rows, plan.rows)
    size = min(rows, plan.rows) * plan.columns
    buffer = torch.empty(size, dtype=tile_dtype, device=device)
    grad_buffer = torch.empty(size, dtype=dtype, device=device) if separate_grad else buffer
    fp32 = {"dtype": torch.float32, "device": device}

    grad_hidden = torch.zeros(rows, width, **fp32) if need_hidden else None
    grad_weight = slab = None
    if need_weight:
        allocate = torch.zeros if rows == 0 else torch.empty  # no row chunk writes it then
        grad_weight = allocate(vocab, width, dtype=dtype, device=device)
        if low and len(row_chunks) > 1:  # dW sums over row chunks: in fp32, one chunk at a time
            slab = torch.empty(plan.columns, width, **fp32)
    grad_bias = torch.zeros(vocab, **fp32) if need_bias else None
    targets, lse = safe_targets.contiguous(), lse.contiguous()
    grad_target, grad_softmax = grad_target.contiguous(), grad_softmax.contiguous()
    bias = None if bias is None else bias.contiguous()

    for begin, end in _chunks(vocab, plan.columns):
        weight_chunk = weight[begin:end]
        bias_chunk = None if bias is None else bias[begin:end]
        chunk_dw = None
        if grad_weight is not None:
            chunk_dw = grad_weight[begin:end] if slab is None else slab[: end - begin]
        for index, (start, stop) in enumerate(row_chunks):
            shape = (stop - start, end - begin)
            tile = buffer[: shape[0] * shape[1]].view(shape)
            grad = grad_buffer[: shape[0] * shape[1]].view(shape)
            hidden_chunk = hidden[start:stop]
            fold.fold_backward(
                tile,
                grad,
                _project(tile, hidden_chunk, weight_chunk, bias_chunk, direct),
                targets[start:stop],
                lse[start:stop],
                grad_target[start:stop],
                grad_softmax[start:stop],
                column_offset=begin,
                softcap=softcap,
                temperature=temperature,
            )
            if grad_bias is not None:
                grad_bias[begin:end] += grad.sum(0, dtype=torch.float32)
            if chunk_dw is not None:
                if index == 0:  # one GEMM over all rows (one rounding) when they fit a chunk
                    _mm(chunk_dw, grad.T, hidden_chunk, direct)
                else:
                    _addmm_fp32(chunk_dw, grad.T, hidden_chunk, direct)
            if grad_hidden is not None:
                _addmm_fp32(grad_hidden[start:stop], grad, weight_chunk, direct)
        if slab is not None and rows > 0:
            grad_weight[begin:end].copy_(chunk_dw)
    grads = (grad_hidden, grad_weight, grad_bias)
    return tuple(None if grad is None else grad.to(dtype) for grad in grads)
