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
