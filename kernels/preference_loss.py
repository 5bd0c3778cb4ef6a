"""Fused sequence-level preference loss over packed per-token log-probs (Triton).

Layout (fastdpo's PackedBatch contract): the completion tokens of sequence s are the contiguous
range `target_cu[s]:target_cu[s + 1]` of `token_logps`; pair p owns sequence 2p (chosen) and
2p + 1 (rejected), so S = 2P. An optional `valid` mask drops tokens (they count nowhere and get
zero gradient); a sequence may be empty.

Three launches, all deterministic (fixed reduction order, no atomics):

    forward   grid (P,)  per pair: segment sums and valid-token counts of both sequences, the
                         pair's loss, rewards, and d loss_p / d seq_sum for both sequences
    finalize  grid (1,)  means over pairs -> metrics [NUM_METRICS] (METRIC_NAMES order)
    backward  grid (S,)  every valid token of sequence s gets grad_loss * seq_grad[s] / P

Loop bounds. Every loop whose trip count is known only at run time (a sequence's token range,
read from `target_cu` on the device; the number of pairs) is a `while offset < end` loop, not
`range(start, end, BLOCK)`: triton 3.6's interpreter holds every runtime scalar, kernel
arguments included, as a 1-element array, and under numpy >= 2.4 `range()` over one fails ("only
0-dimensional arrays can be converted to Python scalars"; triton 3.9's interpreter squeezes it
first), while a truth test of it works. Compiled, the while loop is the same loop with no extra
work; a bound from the host instead would cost a device-to-host sync (the longest sequence) or
a trip count over all M tokens in every program.

With m the margin (policy - reference, chosen - rejected, of sums, or of per-token averages for
the length-normalized losses; no reference term for SimPO), z = beta * m, eps the label
smoothing and softplus(x) = log(1 + e^x):

    sigmoid  (1 - eps) softplus(-z) + eps softplus(z)
    robust   ((1 - eps) softplus(-z) - eps softplus(z)) / (1 - 2 eps)
    hinge    relu(1 - z)
    ipo      (m - 1 / (2 beta))^2                        (averages)
    simpo    softplus(-(z - gamma))                      (averages, no reference)

Rewards are beta * (policy - reference) on the same sums or averages. This module imports
nothing from fastdpo; `fastdpo.losses` holds the same formulas in PyTorch and the tests tie
the two together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Loss codes (constexpr LOSS in the kernels).
_LOSS_CODES = {"sigmoid": 0, "robust": 1, "hinge": 2, "ipo": 3, "simpo": 4}
KERNEL_LOSSES: tuple[str, ...] = tuple(_LOSS_CODES)
"""Losses the kernel implements; every other loss runs on the PyTorch path."""
LENGTH_NORMALIZED: frozenset[str] = frozenset({"ipo", "simpo"})
"""Kernel losses on per-token averages instead of sums."""
REFERENCE_FREE: frozenset[str] = frozenset({"simpo"})
"""Kernel losses that read no reference log-probs."""

METRIC_NAMES: tuple[str, ...] = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
"""Order of the finalize kernel's output vector (all means over pairs)."""
NUM_METRICS = len(METRIC_NAMES)

_BLOCK_TOKENS = 1024
_BLOCK_PAIRS = 1024

# ------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _softplus(x):
    # log(1 + e^x) without overflow; libdevice's log1p is unavailable in the interpreter.
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _segment_sum(logps_ptr, valid_ptr, start, end, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """(sum of valid log-probs, count of valid tokens) over tokens [start, end)."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    # A while loop, not range(start, end, BLOCK): see "Loop bounds" in the module docstring.
    offset = start
    while offset < end:
        index = offset + tl.arange(0, BLOCK)
        keep = index < end
        if HAS_MASK:
            keep = keep & (tl.load(valid_ptr + index, mask=keep, other=0) != 0)
        acc += tl.load(logps_ptr + index, mask=keep, other=0.0)
        count += keep.to(tl.int32)
        offset += BLOCK
    return tl.sum(acc, axis=0), tl.sum(count, axis=0)


@triton.jit
def _preference_loss_fwd_kernel(
    logps_ptr,  # fp32 [M]
    valid_ptr,  # int8 [M] (read only if HAS_MASK)
    cu_ptr,  # int32 [2P + 1]
    ref_chosen_ptr,  # fp32 [P] (read only if HAS_REF)
    ref_rejected_ptr,  # fp32 [P]
    seq_logps_ptr,  # out fp32 [2P]
    seq_lengths_ptr,  # out int32 [2P]
    seq_grad_ptr,  # out fp32 [2P]: d loss_p / d seq_sum
    pair_stats_ptr,  # out fp32 [3, P]: loss_p, chosen reward, rejected reward
    num_pairs,
    beta,
    label_smoothing,
    gamma,
    LOSS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pair = tl.program_id(0)
    chosen_start = tl.load(cu_ptr + 2 * pair)
    rejected_start = tl.load(cu_ptr + 2 * pair + 1)
    rejected_end = tl.load(cu_ptr + 2 * pair + 2)
    sum_c, len_c = _segment_sum(logps_ptr, valid_ptr, chosen_start, rejected_start, HAS_MASK, BLOCK)
    sum_r, len_r = _segment_sum(logps_ptr, valid_ptr, rejected_start, rejected_end, HAS_MASK, BLOCK)
    tl.store(seq_logps_ptr + 2 * pair, sum_c)
    tl.store(seq_logps_ptr + 2 * pair + 1, sum_r)
    tl.store(seq_lengths_ptr + 2 * pair, len_c)
    tl.store(seq_lengths_ptr + 2 * pair + 1, len_r)

    # d(sequence value)/d(sequence sum): 1, or 1 / max(length, 1) for per-token averages.
    scale_c = 1.0
    scale_r = 1.0
    if NORMALIZE:
        scale_c = 1.0 / tl.maximum(len_c, 1).to(tl.float32)
        scale_r = 1.0 / tl.maximum(len_r, 1).to(tl.float32)
    value_c = sum_c * scale_c
    value_r = sum_r * scale_r
    if HAS_REF:
        value_c -= tl.load(ref_chosen_ptr + pair).to(tl.float32) * scale_c
        value_r -= tl.load(ref_rejected_ptr + pair).to(tl.float32) * scale_r
    margin = value_c - value_r
    z = beta * margin

    if LOSS == 0:  # sigmoid (cDPO with label smoothing)
        loss = (1.0 - label_smoothing) * _softplus(-z) + label_smoothing * _softplus(z)
        dloss_dmargin = beta * (
            label_smoothing * _sigmoid(z) - (1.0 - label_smoothing) * _sigmoid(-z)
        )
    elif LOSS == 1:  # robust
        inv = 1.0 / (1.0 - 2.0 * label_smoothing)
        loss = ((1.0 - label_smoothing) * _softplus(-z) - label_smoothing * _softplus(z)) * inv
        dloss_dmargin = (
            -beta * inv * ((1.0 - label_smoothing) * _sigmoid(-z) + label_smoothing * _sigmoid(z))
        )
    elif LOSS == 2:  # hinge; relu'(0) = 0 as in torch
        slack = 1.0 - z
        loss = tl.maximum(slack, 0.0)
        dloss_dmargin = tl.where(slack > 0.0, -beta, 0.0)
    elif LOSS == 3:  # ipo
        diff = margin - 0.5 / beta
        loss = diff * diff
        dloss_dmargin = 2.0 * diff
    else:  # simpo
        loss = _softplus(gamma - z)
        dloss_dmargin = -beta * _sigmoid(gamma - z)

    tl.store(seq_grad_ptr + 2 * pair, dloss_dmargin * scale_c)
    tl.store(seq_grad_ptr + 2 * pair + 1, -dloss_dmargin * scale_r)
    tl.store(pair_stats_ptr + pair, loss)
    tl.store(pair_stats_ptr + num_pairs + pair, beta * value_c)
    tl.store(pair_stats_ptr + 2 * num_pairs + pair, beta * value_r)


@triton.jit
def _preference_loss_finalize_kernel(
    pair_stats_ptr,  # fp32 [3, P]
    seq_logps_ptr,  # fp32 [2P]
    metrics_ptr,  # out fp32 [NUM_METRICS]
    num_pairs,
    inv_num_pairs,
    BLOCK: tl.constexpr,
):
    loss = tl.zeros([BLOCK], dtype=tl.float32)
    reward_c = tl.zeros([BLOCK], dtype=tl.float32)
    reward_r = tl.zeros([BLOCK], dtype=tl.float32)
    correct = tl.zeros([BLOCK], dtype=tl.float32)
    margin = tl.zeros([BLOCK], dtype=tl.float32)
    logps_c = tl.zeros([BLOCK], dtype=tl.float32)
    logps_r = tl.zeros([BLOCK], dtype=tl.float32)
    offset = 0  # a while loop: see "Loop bounds" in the module docstring
    while offset < num_pairs:
        pair = offset + tl.arange(0, BLOCK)
        keep = pair < num_pairs
        loss += tl.load(pair_stats_ptr + pair, mask=keep, other=0.0)
        r_c = tl.load(pair_stats_ptr + num_pairs + pair, mask=keep, other=0.0)
        r_r = tl.load(pair_stats_ptr + 2 * num_pairs + pair, mask=keep, other=0.0)
        reward_c += r_c
        reward_r += r_r
        correct += tl.where(keep & (r_c > r_r), 1.0, 0.0)
        margin += r_c - r_r
        logps_c += tl.load(seq_logps_ptr + 2 * pair, mask=keep, other=0.0)
        logps_r += tl.load(seq_logps_ptr + 2 * pair + 1, mask=keep, other=0.0)
        offset += BLOCK
    inv = inv_num_pairs
    tl.store(metrics_ptr + 0, tl.sum(loss, axis=0) * inv)
    tl.store(metrics_ptr + 1, tl.sum(reward_c, axis=0) * inv)
    tl.store(metrics_ptr + 2, tl.sum(reward_r, axis=0) * inv)
    tl.store(metrics_ptr + 3, tl.sum(correct, axis=0) * inv)
    tl.store(metrics_ptr + 4, tl.sum(margin, axis=0) * inv)
    tl.store(metrics_ptr + 5, tl.sum(logps_c, axis=0) * inv)
    tl.store(metrics_ptr + 6, tl.sum(logps_r, axis=0) * inv)


@triton.jit
def _preference_loss_bwd_kernel(
    grad_loss_ptr,  # fp32 [] (d L / d loss)
    seq_grad_ptr,  # fp32 [S]
    cu_ptr,  # int32 [S + 1]
    valid_ptr,  # int8 [M] (read only if HAS_MASK)
    grad_logps_ptr,  # out fp32 [M], zero-initialized
    inv_num_pairs,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    seq = tl.program_id(0)
    start = tl.load(cu_ptr + seq)
    end = tl.load(cu_ptr + seq + 1)
    grad = tl.load(grad_loss_ptr).to(tl.float32) * tl.load(seq_grad_ptr + seq) * inv_num_pairs
    offset = start  # a while loop: see "Loop bounds" in the module docstring
    while offset < end:
        index = offset + tl.arange(0, BLOCK)
        inside = index < end
        value = tl.zeros([BLOCK], dtype=tl.float32) + grad
        if HAS_MASK:
            valid = tl.load(valid_ptr + index, mask=inside, other=0) != 0
            value = tl.where(valid, value, 0.0)
        tl.store(grad_logps_ptr + index, value, mask=inside)
        offset += BLOCK


# ------------------------------------------------------------------------------------------------
# Launchers


def is_interpreted() -> bool:
    """True if these kernels were built for the Triton interpreter (TRITON_INTERPRET set before
    import, in any spelling Triton accepts); they then run on the CPU."""
    return type(_preference_loss_fwd_kernel).__name__ == "InterpretedFunction"


@dataclass(frozen=True)
class ForwardResult:
    """What the forward launch returns (all on the inputs' device)."""

    metrics: torch.Tensor
    """fp32 [NUM_METRICS], in METRIC_NAMES order (means over pairs)."""
    seq_logps: torch.Tensor
    """fp32 [S]: summed log-probs of each sequence's valid tokens."""
    seq_lengths: torch.Tensor
    """int32 [S]: valid tokens per sequence."""
    seq_grad: torch.Tensor
    """fp32 [S]: d loss_p / d seq_sum of the pair's own loss (not yet divided by P)."""


def _check_inputs(
    token_logps: torch.Tensor,
    target_cu: torch.Tensor,
    valid: torch.Tensor | None,
) -> int:
    """Validate the packed layout; returns P."""
    if token_logps.dim() != 1 or token_logps.dtype != torch.float32:
        raise ValueError(
            f"token_logps must be fp32 [M], got {token_logps.dtype} {tuple(token_logps.shape)}"
        )
    if not token_logps.is_contiguous():
        raise ValueError("token_logps must be contiguous: pass token_logps.contiguous()")
    if target_cu.dim() != 1 or target_cu.dtype != torch.int32 or not target_cu.is_contiguous():
        raise ValueError(
            f"target_cu must be contiguous int32 [S + 1], got {target_cu.dtype} "
            f"{tuple(target_cu.shape)}"
        )
    num_sequences = target_cu.shape[0] - 1
    if num_sequences < 2 or num_sequences % 2:
        raise ValueError(
            f"target_cu describes {num_sequences} sequences; pairs need an even number >= 2 "
            "(sequence 2p chosen, 2p + 1 rejected)"
        )
    if target_cu.device != token_logps.device:
        raise ValueError(
            f"target_cu is on {target_cu.device}, token_logps on {token_logps.device}: move "
            "them to one device"
        )
    if valid is not None and (
        valid.shape != token_logps.shape
        or valid.dtype not in (torch.int8, torch.uint8)
        or valid.device != token_logps.device
        or not valid.is_contiguous()
    ):
        raise ValueError(
            f"valid must be a contiguous int8/uint8 [M] mask on token_logps' device, got "
            f"{valid.dtype} {tuple(valid.shape)}"
        )
    return num_sequences // 2


def preference_loss_forward(
    token_logps: torch.Tensor,
    target_cu: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    valid: torch.Tensor | None = None,
    *,
    loss: str,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
) -> ForwardResult:
    """Run the forward and finalize kernels (see the module docstring for the math).

    Args:
        token_logps: fp32 [M] per-token log-probs, contiguous.
        target_cu: int32 [2P + 1] segment offsets (sequence 2p chosen, 2p + 1 rejected).
        ref_chosen, ref_rejected: fp32 [P] reference log-probs summed per sequence; None for a
            reference-free loss.
        valid: optional int8/uint8 [M]; tokens where it is 0 are left out.
        loss: one of KERNEL_LOSSES. label_smoothing: sigmoid/robust eps. gamma: SimPO margin.
    """
    if loss not in _LOSS_CODES:
        raise ValueError(f"the kernel implements {KERNEL_LOSSES}, not {loss!r}")
    num_pairs = _check_inputs(token_logps, target_cu, valid)
    has_ref = loss not in REFERENCE_FREE
    if has_ref:
        for name, ref in (("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
            if ref is None:
                raise ValueError(f"loss {loss!r} needs {name}")
            if ref.shape != (num_pairs,) or ref.dtype != torch.float32 or not ref.is_contiguous():
                raise ValueError(
                    f"{name} must be contiguous fp32 [{num_pairs}], got {ref.dtype} "
                    f"{tuple(ref.shape)}"
                )
            if ref.device != token_logps.device:
                raise ValueError(f"{name} is on {ref.device}, token_logps on {token_logps.device}")
    device = token_logps.device
    num_sequences = 2 * num_pairs
    seq_logps = torch.empty(num_sequences, dtype=torch.float32, device=device)
    seq_lengths = torch.empty(num_sequences, dtype=torch.int32, device=device)
    seq_grad = torch.empty(num_sequences, dtype=torch.float32, device=device)
    pair_stats = torch.empty(3, num_pairs, dtype=torch.float32, device=device)
    metrics = torch.empty(NUM_METRICS, dtype=torch.float32, device=device)
    _preference_loss_fwd_kernel[(num_pairs,)](
        token_logps,
        valid if valid is not None else token_logps,
        target_cu,
        ref_chosen if has_ref else token_logps,
        ref_rejected if has_ref else token_logps,
        seq_logps,
        seq_lengths,
        seq_grad,
        pair_stats,
        num_pairs,
        float(beta),
        float(label_smoothing),
        float(gamma),
        LOSS=_LOSS_CODES[loss],
        NORMALIZE=loss in LENGTH_NORMALIZED,
        HAS_REF=has_ref,
        HAS_MASK=valid is not None,
        BLOCK=_BLOCK_TOKENS,
    )
    _preference_loss_finalize_kernel[(1,)](
        pair_stats, seq_logps, metrics, num_pairs, 1.0 / num_pairs, BLOCK=_BLOCK_PAIRS
    )
    return ForwardResult(
        metrics=metrics, seq_logps=seq_logps, seq_lengths=seq_lengths, seq_grad=seq_grad
    )


def preference_loss_backward(
    grad_loss: torch.Tensor,
    seq_grad: torch.Tensor,
    target_cu: torch.Tensor,
    valid: torch.Tensor | None,
    num_tokens: int,
) -> torch.Tensor:
    """Per-token gradient fp32 [num_tokens]: grad_loss * seq_grad[s] / P on the valid tokens of
    sequence s, 0 on masked tokens and tokens outside every segment.

    Args:
        grad_loss: fp32 scalar tensor, d L / d loss (read on the device, no host sync).
        seq_grad: fp32 [S] from `ForwardResult.seq_grad`.
        target_cu: int32 [S + 1]. valid: as in the forward.
    """
    num_sequences = seq_grad.shape[0]
    if target_cu.shape != (num_sequences + 1,):
        raise ValueError(
            f"target_cu has {target_cu.shape[0]} entries, expected {num_sequences + 1}"
        )
    grad_loss = grad_loss.reshape(()).to(torch.float32).contiguous()
    grad_logps = torch.zeros(num_tokens, dtype=torch.float32, device=seq_grad.device)
    _preference_loss_bwd_kernel[(num_sequences,)](
        grad_loss,
        seq_grad,
        target_cu,
        valid if valid is not None else grad_logps,
        grad_logps,
        2.0 / num_sequences,
        HAS_MASK=valid is not None,
        BLOCK=_BLOCK_TOKENS,
    )
    return grad_logps
