"""Preference loss straight from packed per-token log-probs: segment sums + loss + metrics.

    seq_logps[s] = sum of token_logps over target_cu[s]:target_cu[s + 1] (valid tokens only)
    pair p = (sequence 2p chosen, sequence 2p + 1 rejected)       (the PackedBatch layout)
    loss, metrics = fastdpo.preference_loss(seq_logps[0::2], seq_logps[1::2], ref_chosen,
                                            ref_rejected, chosen_lengths=..., ...)

Two implementations:
- "triton": one fused kernel (`fastdpo.kernels.preference_loss`) for the common losses
  (sigmoid, robust, hinge, ipo, simpo): sums, loss and metrics in one pass, and a backward that
  writes every token's gradient d loss / d seq_sum (divided by the length for the
  length-normalized losses). Reference log-probs are constants on this path.
- "torch": `torch.segment_reduce` sums, then `fastdpo.losses`; autograd gives the per-token
  gradient. It runs every registered paired loss.
"auto" picks the kernel on CUDA when the loss has one, and PyTorch otherwise.

TRL's loss options (`f_divergence_type`, `ld_alpha`, `use_weighting`; see
`fastdpo.losses.options`) run on the PyTorch path: "auto" takes it when one is set, and
"triton" refuses them. LD-DPO's tails and WPO's sums come from per-token values here
(`ref_token_logps`, `token_log_sum_p2`), so nothing is recomputed from hidden states.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from fastdpo import losses
from fastdpo.losses.options import LOSS_OPTIONS, LossOptions, TailLogps
from fastdpo.ops.segments import segment_sums

logger = logging.getLogger(__name__)

Impl = Literal["auto", "triton", "torch"]
IMPLS: tuple[str, ...] = ("auto", "triton", "torch")

# The kernel's losses and the registry functions whose formulas it re-implements: if a user
# re-registers one of these names, the kernel no longer matches and is not used. The kernel takes
# the same keyword parameters as these functions, with their defaults.
_KERNEL_FORMULAS = {
    "sigmoid": losses.sigmoid,
    "robust": losses.robust,
    "hinge": losses.hinge,
    "ipo": losses.ipo,
    "simpo": losses.simpo,
}


@dataclass(frozen=True, kw_only=True)
class PackedLossOptions:
    """Non-tensor options of the kernel path (travel through autograd as one object)."""

    loss: str
    """One of the kernel's losses."""
    beta: float
    label_smoothing: float = 0.0
    """eps of sigmoid (cDPO) and robust."""
    gamma: float = 0.0
    """SimPO's target margin (its default comes from `fastdpo.losses.simpo`)."""


# ------------------------------------------------------------------------------------------------
# Validation


def _validate(
    token_logps: torch.Tensor,
    target_cu: torch.Tensor,
    valid: torch.Tensor | None,
) -> int:
    """Check the packed layout (without a host sync on accelerators); returns P."""
    if token_logps.dim() != 1 or not token_logps.is_floating_point():
        raise ValueError(
            f"token_logps must be a float [M] tensor, got {token_logps.dtype} "
            f"{tuple(token_logps.shape)}"
        )
    if target_cu.dim() != 1 or target_cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"target_cu must be int32 [S + 1] sequence offsets, got {target_cu.dtype} "
            f"{tuple(target_cu.shape)}"
        )
    num_sequences = target_cu.shape[0] - 1
    if num_sequences < 2 or num_sequences % 2:
        raise ValueError(
            f"target_cu describes {max(num_sequences, 0)} sequences; a paired batch has an even "
            "number >= 2 (sequence 2p is pair p's chosen completion, 2p + 1 its rejected one)"
        )
    if target_cu.device != token_logps.device:
        raise ValueError(
            f"target_cu is on {target_cu.device}, token_logps on {token_logps.device}: move them "
            "to one device"
        )
    if valid is not None:
        if valid.dtype != torch.bool or valid.shape != token_logps.shape:
            raise ValueError(
                f"valid must be a bool mask shaped like token_logps {tuple(token_logps.shape)}, "
                f"got {valid.dtype} {tuple(valid.shape)}"
            )
        if valid.device != token_logps.device:
            raise ValueError(
                f"valid is on {valid.device}, token_logps on {token_logps.device}: move them to "
                "one device"
            )
    num_tokens = token_logps.shape[0]
    ok = (
        (target_cu[0] == 0)
        & (target_cu[-1] == num_tokens)
        & (target_cu[1:] >= target_cu[:-1]).all()
    )
    message = (
        f"target_cu must start at 0, never decrease and end at M = {num_tokens} "
        "(the number of token log-probs)"
    )
    if target_cu.device.type == "cpu":
        if not bool(ok):
            raise ValueError(f"{message}; got {target_cu.tolist()}")
    else:
        torch._assert_async(ok, message)
    return num_sequences // 2


def _check_reference(name: str, ref: torch.Tensor | None, num_pairs: int, device) -> None:
    if ref is None:
        return
    if ref.shape != (num_pairs,):
        raise ValueError(
            f"{name} must have one value per pair, shape [{num_pairs}], got {tuple(ref.shape)}"
        )
    if ref.device != device:
        raise ValueError(f"{name} is on {ref.device}, token_logps on {device}")


def _check_per_token(name: str, values: torch.Tensor | None, token_logps: torch.Tensor) -> None:
    if values is None:
        return
    if values.shape != token_logps.shape or not values.is_floating_point():
        raise ValueError(
            f"{name} must be a float tensor shaped like token_logps {tuple(token_logps.shape)} "
            f"(one value per completion token, same order), got {values.dtype} "
            f"{tuple(values.shape)}"
        )
    if values.device != token_logps.device:
        raise ValueError(f"{name} is on {values.device}, token_logps on {token_logps.device}")


# ------------------------------------------------------------------------------------------------
# LD-DPO's tails


def ld_tail_sums(
    values: torch.Tensor, target_cu: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """[S] sums of each sequence's values past its pair's shared length (LD-DPO's tails).

    values: [M] float per-token values (log-probs) of paired sequences in the packed layout
    (sequence 2p chosen, 2p + 1 rejected; `target_cu` [2P + 1] offsets). The shared length of
    pair p is min(L_2p, L_2p+1), counting valid tokens only; a sequence's tail is its valid
    tokens after the first `shared` ones (the shorter sequence's tail is empty). As TRL's
    `comp_pos > shared_lens` mask. Differentiable w.r.t. `values`; no host sync.
    """
    offsets = target_cu.to(torch.int64)
    num_tokens = values.shape[0]
    starts, ends = offsets[:-1], offsets[1:]
    sequence_of = torch.repeat_interleave(
        torch.arange(starts.shape[0], device=values.device), ends - starts, output_size=num_tokens
    )
    if valid is None:
        position = torch.arange(num_tokens, device=values.device) - starts[sequence_of]
        counts = ends - starts
    else:
        prefix = torch.nn.functional.pad(valid.to(torch.int64).cumsum(0), (1, 0))
        position = prefix[1:] - 1 - prefix[starts][sequence_of]  # rank among the valid tokens
        counts = prefix[ends] - prefix[starts]
    shared = torch.minimum(counts[0::2], counts[1::2]).repeat_interleave(2)
    in_tail = position >= shared[sequence_of]
    if valid is not None:
        in_tail = in_tail & valid
    tails, _ = segment_sums(values, target_cu, in_tail)
    return tails


# ------------------------------------------------------------------------------------------------
# Implementation choice


def _triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the kernel cannot run on `device`, or None if it can."""
    try:
        from fastdpo.kernels import preference_loss as kernels
    except ImportError as error:
        return f"triton cannot be imported ({error}); use impl='torch'"
    if device.type == "cuda" or (device.type == "cpu" and kernels.is_interpreted()):
        return None
    if device.type == "cpu":
        return (
            "the kernel needs CUDA tensors (these are on the CPU); use impl='torch' or 'auto', "
            "or set TRITON_INTERPRET=1 before importing fastdpo to run it (slowly) on the CPU"
        )
    return f"the kernel does not run on {device.type}; use impl='torch' or 'auto'"


def _kernel_options(
    loss: str | Mapping[str, float],
    beta: float,
    loss_params: dict,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    trl_options: LossOptions,
) -> tuple[PackedLossOptions | None, str]:
    """(options, "") if the kernel computes this loss, else (None, why not)."""
    if not trl_options.is_default:
        return None, (
            "the kernel does not implement TRL's loss options (f_divergence_type="
            f"{trl_options.f_divergence_type!r}, ld_alpha={trl_options.ld_alpha}, "
            f"use_weighting={trl_options.use_weighting}); impl='torch' or 'auto' runs them"
        )
    if not isinstance(loss, str):
        return None, "the kernel computes a single loss given by name, not a combination"
    if loss not in _KERNEL_FORMULAS:
        return None, f"loss {loss!r} has no kernel (kernels: {', '.join(_KERNEL_FORMULAS)})"
    spec = losses.LOSSES.get(loss)
    if spec is None or spec.fn is not _KERNEL_FORMULAS[loss]:
        return None, f"loss {loss!r} was re-registered, so the kernel's formula no longer applies"
    unknown = sorted(set(loss_params) - set(spec.params))
    if unknown:
        return None, f"the kernel for {loss!r} takes no parameter(s) {unknown}"
    if any(ref is not None and ref.requires_grad for ref in (ref_chosen, ref_rejected)):
        return None, "the kernel treats reference log-probs as constants, but they require grad"
    # Missing parameters take the registered function's defaults, so both paths agree.
    signature = inspect.signature(spec.fn).parameters
    params = {name: loss_params.get(name, signature[name].default) for name in spec.params}
    if "label_smoothing" in params:
        params["label_smoothing"] = losses.check_label_smoothing(loss, params["label_smoothing"])
    if "gamma" in params:
        params["gamma"] = losses.check_finite(loss, "gamma", params["gamma"])
    return PackedLossOptions(loss=loss, beta=losses.check_beta(beta), **params), ""


def _resolve_impl(impl: str, device: torch.device, why_not: str) -> Literal["triton", "torch"]:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    reason = why_not or _triton_unavailable_reason(device)
    if impl == "triton":
        if reason:
            raise RuntimeError(f"packed_preference_loss(impl='triton'): {reason}")
        return "triton"
    # auto: the kernel on CUDA only; the interpreter is far too slow to be picked on its own.
    if device.type == "cuda" and not reason:
        return "triton"
    return "torch"


# ------------------------------------------------------------------------------------------------
# The two implementations


def _kernels():
    from fastdpo.kernels import preference_loss as kernels

    return kernels


class PackedPreferenceLossFunction(torch.autograd.Function):
    """(token_logps fp32 [M], target_cu int32 [2P + 1], ref_chosen fp32 [P] | None,
    ref_rejected fp32 [P] | None, valid int8 [M] | None, options) -> (loss fp32 [],
    metrics fp32 [NUM_METRICS]).

    Saves target_cu, valid and the per-sequence gradient seq_grad [2P] (nothing per token).
    """

    @staticmethod
    def forward(ctx, token_logps, target_cu, ref_chosen, ref_rejected, valid, options):
        result = _kernels().preference_loss_forward(
            token_logps,
            target_cu,
            ref_chosen,
            ref_rejected,
            valid,
            loss=options.loss,
            beta=options.beta,
            label_smoothing=options.label_smoothing,
            gamma=options.gamma,
        )
        ctx.save_for_backward(result.seq_grad, target_cu, valid)
        ctx.num_tokens = token_logps.shape[0]
        loss = result.metrics[0].clone()
        metrics = result.metrics[1:]
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_metrics):
        seq_grad, target_cu, valid = ctx.saved_tensors
        grad_logps = None
        if ctx.needs_input_grad[0]:
            grad_logps = _kernels().preference_loss_backward(
                grad_loss, seq_grad, target_cu, valid, ctx.num_tokens
            )
        return grad_logps, None, None, None, None, None


def _triton_path(
    token_logps: torch.Tensor,
    target_cu: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    valid: torch.Tensor | None,
    options: PackedLossOptions,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    kernels = _kernels()
    needs_ref = options.loss not in kernels.REFERENCE_FREE
    if needs_ref:
        losses.check_reference_given(options.loss, ref_chosen, ref_rejected)

    def as_kernel_ref(ref):
        return ref.detach().to(torch.float32).contiguous() if needs_ref else None

    loss, metric_values = PackedPreferenceLossFunction.apply(
        token_logps.to(torch.float32).contiguous(),
        target_cu.to(torch.int32).contiguous(),
        as_kernel_ref(ref_chosen),
        as_kernel_ref(ref_rejected),
        None if valid is None else valid.contiguous().view(torch.int8),
        options,
    )
    metrics = dict(zip(kernels.METRIC_NAMES[1:], metric_values.unbind(0), strict=True))
    metrics[f"loss/{options.loss}"] = loss.detach()
    return loss, metrics


def _torch_path(
    token_logps: torch.Tensor,
    target_cu: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    valid: torch.Tensor | None,
    loss: str | Mapping[str, float],
    beta: float,
    loss_params: dict,
    trl_options: LossOptions,
    ref_token_logps: torch.Tensor | None,
    token_log_sum_p2: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    sums, counts = segment_sums(token_logps, target_cu, valid)
    per_token: dict[str, object] = {}
    if ref_token_logps is not None and ref_chosen is None and ref_rejected is None:
        ref_sums, _ = segment_sums(ref_token_logps, target_cu, valid)
        ref_chosen, ref_rejected = ref_sums[0::2], ref_sums[1::2]
    if trl_options.ld_alpha is not None:
        tails = ld_tail_sums(token_logps, target_cu, valid)
        ref_tails = (
            ld_tail_sums(ref_token_logps, target_cu, valid) if ref_token_logps is not None else None
        )
        per_token["tail_logps"] = TailLogps(
            policy_chosen=tails[0::2],
            policy_rejected=tails[1::2],
            ref_chosen=None if ref_tails is None else ref_tails[0::2],
            ref_rejected=None if ref_tails is None else ref_tails[1::2],
        )
    if token_log_sum_p2 is not None:  # preference_loss refuses it without use_weighting
        log_sum_p2, _ = segment_sums(token_log_sum_p2.detach(), target_cu, valid)
        per_token["chosen_log_sum_p2"] = log_sum_p2[0::2]
        per_token["rejected_log_sum_p2"] = log_sum_p2[1::2]
    return losses.preference_loss(
        sums[0::2],
        sums[1::2],
        ref_chosen,
        ref_rejected,
        loss=loss,
        beta=beta,
        chosen_lengths=counts[0::2],
        rejected_lengths=counts[1::2],
        **per_token,
        **loss_params,
    )


# ------------------------------------------------------------------------------------------------
# Public function


def packed_preference_loss(
    token_logps: torch.Tensor,
    target_cu: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    *,
    loss: str | Mapping[str, float] = "sigmoid",
    beta: float = 0.1,
    valid: torch.Tensor | None = None,
    impl: Impl = "auto",
    ref_token_logps: torch.Tensor | None = None,
    token_log_sum_p2: torch.Tensor | None = None,
    **loss_params,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Preference loss and metrics from packed per-token log-probs of paired completions.

    Args:
        token_logps: [M] float per-token log-probs of the completion tokens, grouped by sequence
            (e.g. `fastdpo.linear_logprobs` over a PackedBatch's targets).
        target_cu: [2P + 1] int32 offsets (`PackedBatch.target_cu`): sequence s owns tokens
            target_cu[s]:target_cu[s + 1]; sequence 2p is pair p's chosen completion, 2p + 1 its
            rejected one. Starts at 0 and ends at M (checked; asynchronously on accelerators).
        ref_chosen, ref_rejected: [P] reference log-probs summed over the same tokens; needed
            unless the loss is reference-free.
        loss, beta, **loss_params: as in `fastdpo.preference_loss` (name or {name: weight}).
        valid: optional bool [M]; tokens where it is False count nowhere (sums, lengths) and
            get zero gradient. A sequence may end up empty.
        impl: "triton" (the fused kernel: CUDA, or the CPU under TRITON_INTERPRET=1; sigmoid,
            robust, hinge, ipo, simpo), "torch" (every registered paired loss), or "auto".
        ref_token_logps: [M] reference log-probs per completion token (a cache built with
            `fastdpo precompute-ref --per-token`): needed with ld_alpha by the losses that read
            the reference; ref_chosen / ref_rejected are their sums when not given.
        token_log_sum_p2: [M] log sum_v p_v^2 per token (the fused head's "log_sum_p2"; no
            gradient flows into it): needed with use_weighting.
        f_divergence_type, f_alpha_divergence_coef, ld_alpha, use_weighting (in loss_params):
            TRL's loss options, as in `fastdpo.preference_loss` (PyTorch path only).

    Returns:
        (loss, metrics) as `fastdpo.preference_loss`; metrics are device tensors (no host sync).
        Lengths for the length-normalized losses are the valid-token counts per sequence.
    """
    num_pairs = _validate(token_logps, target_cu, valid)
    _check_reference("ref_chosen", ref_chosen, num_pairs, token_logps.device)
    _check_reference("ref_rejected", ref_rejected, num_pairs, token_logps.device)
    _check_per_token("ref_token_logps", ref_token_logps, token_logps)
    _check_per_token("token_log_sum_p2", token_log_sum_p2, token_logps)
    trl_options = LossOptions(**{k: loss_params[k] for k in LOSS_OPTIONS if k in loss_params})
    kernel_params = {k: v for k, v in loss_params.items() if k not in LOSS_OPTIONS}
    options, why_not = _kernel_options(
        loss, beta, kernel_params, ref_chosen, ref_rejected, trl_options
    )
    resolved = _resolve_impl(impl, token_logps.device, why_not)
    logger.debug(
        "packed_preference_loss: impl=%s (asked %s), loss=%s, %d pairs, %d tokens%s",
        resolved,
        impl,
        loss,
        num_pairs,
        token_logps.shape[0],
        f" ({why_not})" if why_not else "",
    )
    if resolved == "triton":
        return _triton_path(token_logps, target_cu, ref_chosen, ref_rejected, valid, options)
    names = [loss] if isinstance(loss, str) else list(loss)
    unpaired = [n for n in names if n in losses.LOSSES and not losses.LOSSES[n].paired]
    if unpaired:
        raise ValueError(
            f"loss {unpaired[0]!r} takes unpaired completions, but packed_preference_loss reads "
            "pairs (sequence 2p chosen, 2p + 1 rejected): sum log-probs per sequence and call "
            "fastdpo.preference_loss with the desirable and undesirable groups"
        )
    return _torch_path(
        token_logps,
        target_cu,
        ref_chosen,
        ref_rejected,
        valid,
        loss,
        beta,
        loss_params,
        trl_options,
        ref_token_logps,
        token_log_sum_p2,
    )
