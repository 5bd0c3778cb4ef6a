"""TRL's reward metrics of a batch (implicit rewards, accuracies, margins, log-probs)."""

from __future__ import annotations

import torch

from fastdpo.losses.inputs import LossInputs
from fastdpo.losses.registry import LossSpec

Tensor = torch.Tensor


def _safe_mean(values: Tensor) -> Tensor:
    """Mean that is 0 (not NaN) for an empty tensor."""
    return values.sum() / max(values.numel(), 1)


def reward_metrics(x: LossInputs, spec: LossSpec) -> dict[str, Tensor]:
    """TRL's metrics, detached device tensors (no host sync). Means over the batch of:

    rewards/chosen, rewards/rejected  implicit rewards beta * (pi - ref), detached; per-token
        averages if `spec` is length-normalized (as TRL does for IPO and SimPO), and without
        the reference term if `spec` is reference-free (SimPO, ORPO, SFT: beta * pi)
    rewards/accuracies                fraction of pairs whose chosen reward beats the rejected
    rewards/margins                   chosen reward - rejected reward
    logps/chosen, logps/rejected      policy log-probs summed over completion tokens

    For unpaired losses (KTO) rewards/accuracies is left out (there are no pairs), margins is
    the difference of the two means, means of an empty group are 0, and count/chosen,
    count/rejected give the group sizes.
    """
    with torch.no_grad():
        pi_c, pi_r = x.policy(normalized=spec.length_normalized)
        if spec.needs_reference:
            ref_c, ref_r = x.reference(normalized=spec.length_normalized)
            pi_c, pi_r = pi_c - ref_c, pi_r - ref_r
        chosen, rejected = x.beta * pi_c, x.beta * pi_r
        metrics = {
            "rewards/chosen": _safe_mean(chosen),
            "rewards/rejected": _safe_mean(rejected),
        }
        if spec.paired:
            metrics["rewards/accuracies"] = (chosen > rejected).to(chosen.dtype).mean()
            metrics["rewards/margins"] = (chosen - rejected).mean()
        else:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
            for group, values in (("chosen", chosen), ("rejected", rejected)):
                metrics[f"count/{group}"] = torch.full(
                    (), float(values.numel()), device=chosen.device
                )
        metrics["logps/chosen"] = _safe_mean(x.policy_chosen.detach())
        metrics["logps/rejected"] = _safe_mean(x.policy_rejected.detach())
    return metrics


HEAD_METRIC_STATS: dict[str, tuple[str, ...]] = {
    "entropy": ("entropy",),
    "logits/chosen": ("mean_logit",),
    "logits/rejected": ("mean_logit",),
    "mean_token_accuracy": ("is_top1",),
}
"""TRL's metrics from the fused head's per-token statistics, and the statistics each reads."""


def head_metrics(token_stats: dict[str, Tensor], target_cu: Tensor) -> dict[str, Tensor]:
    """TRL 1.16's head metrics of one paired batch, detached device scalars (no host sync):

    entropy              mean over every completion token (chosen and rejected) of the
                         entropy of the model's token distribution
    logits/chosen        mean over chosen tokens of the mean logit (over the vocabulary)
    logits/rejected      the same over rejected tokens
    mean_token_accuracy  fraction of chosen tokens whose target is the top-1 token

    token_stats: per-token statistics [M] in target order ("entropy", "mean_logit", "is_top1";
    those present give their metrics); target_cu: [2P + 1] offsets, sequence 2p chosen and
    2p + 1 rejected. A mean over no tokens is 0, as in TRL.
    """
    offsets = target_cu.to(torch.int64)
    counts = offsets[1:] - offsets[:-1]
    num_tokens = int(next(iter(token_stats.values())).shape[0]) if token_stats else 0
    is_chosen = torch.repeat_interleave(
        (torch.arange(counts.shape[0], device=counts.device) % 2 == 0),
        counts,
        output_size=num_tokens,
    )
    chosen_count = counts[0::2].sum().clamp(min=1).to(torch.float64)
    rejected_count = counts[1::2].sum().clamp(min=1).to(torch.float64)
    metrics: dict[str, Tensor] = {}
    with torch.no_grad():
        if "entropy" in token_stats:
            entropy = token_stats["entropy"].detach().to(torch.float64)
            metrics["entropy"] = (entropy.sum() / counts.sum().clamp(min=1)).float()
        if "mean_logit" in token_stats:
            logits = token_stats["mean_logit"].detach().to(torch.float64)
            chosen = torch.where(is_chosen, logits, 0.0).sum()
            metrics["logits/chosen"] = (chosen / chosen_count).float()
            metrics["logits/rejected"] = ((logits.sum() - chosen) / rejected_count).float()
        if "is_top1" in token_stats:
            top1 = token_stats["is_top1"].detach().to(torch.bool) & is_chosen
            metrics["mean_token_accuracy"] = (top1.sum() / chosen_count).float()
    return metrics
