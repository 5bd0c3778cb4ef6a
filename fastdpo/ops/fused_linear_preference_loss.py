"""From completion hidden states to the preference loss, never building [tokens, vocab] logits.

    token_logps = linear_logprobs(hidden, weight, targets)     fused head + log-softmax + gather
    loss, metrics = packed_preference_loss(token_logps, segments, ref_chosen, ref_rejected, ...)

The first op works tile by tile over the vocabulary; the second sums per sequence and applies
the loss. Backward runs through both: d loss / d token_logp per token (from the sequence loss),
then dH, dW (and db) from the head op, which recomputes logits instead of storing them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fastdpo.ops.linear_logprobs import linear_logprobs
from fastdpo.ops.preference_loss import Impl, packed_preference_loss


def fused_linear_preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    segments: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    *,
    loss: str | Mapping[str, float] = "sigmoid",
    beta: float = 0.1,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    impl: Impl = "auto",
    loss_impl: Impl | None = None,
    **loss_params,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Preference loss and metrics from the hidden states of completion tokens.

    Args:
        hidden: [M, H] bf16/fp16/fp32 hidden states that predict the completion tokens
            (`PackedBatch.target_positions` rows of the model's last hidden state).
        weight: [V, H] language-model head, same dtype and device as `hidden`.
        targets: [M] int64/int32 completion token ids (`PackedBatch.target_ids`);
            `ignore_index` drops a token from the loss (it counts in no sum or length).
        segments: [2P + 1] int32 offsets (`PackedBatch.target_cu`): sequence s owns rows
            segments[s]:segments[s + 1]; sequence 2p is pair p's chosen completion, 2p + 1 its
            rejected one.
        ref_chosen, ref_rejected: [P] reference log-probs summed per completion (e.g. from
            `fastdpo.ReferenceCache`); needed unless the loss is reference-free.
        loss, beta, **loss_params: as in `fastdpo.preference_loss` (a name or {name: weight}).
        bias, softcap, temperature, ignore_index: the head's options, as in
            `fastdpo.linear_logprobs`.
        impl: "auto" | "triton" | "torch" for the head (`linear_logprobs`), and for the loss
            unless `loss_impl` is given.
        loss_impl: the sequence loss's impl (`packed_preference_loss`); defaults to `impl`.
            Its "triton" needs a loss with a kernel (sigmoid, robust, hinge, ipo, simpo): pass
            loss_impl="auto" to run the head's kernel with any other loss.

    Returns:
        (loss, metrics) as `fastdpo.preference_loss`: a scalar fp32 loss differentiable in
        hidden, weight and bias; metrics are detached device tensors.
    """
    if targets.dim() != 1 or hidden.dim() != 2:
        raise ValueError(
            f"hidden must be [M, H] and targets [M], got {tuple(hidden.shape)} and "
            f"{tuple(targets.shape)}"
        )
    token_logps = linear_logprobs(
        hidden,
        weight,
        targets,
        bias=bias,
        softcap=softcap,
        temperature=temperature,
        ignore_index=ignore_index,
        impl=impl,
    )
    return packed_preference_loss(
        token_logps,
        segments,
        ref_chosen,
        ref_rejected,
        loss=loss,
        beta=beta,
        valid=targets != ignore_index,
        impl=impl if loss_impl is None else loss_impl,
        **loss_params,
    )
