"""KTO: a loss over unpaired desirable and undesirable completions."""

from __future__ import annotations

import torch

from fastdpo.losses.inputs import LossInputs
from fastdpo.losses.registry import register_loss

Tensor = torch.Tensor


@register_loss("kto", paired=False)
def kto(
    x: LossInputs,
    *,
    kl: float | Tensor | None = None,
    kl_policy_logps: Tensor | None = None,
    kl_ref_logps: Tensor | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict]:
    """KTO, Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
    (arXiv 2402.01306), on unpaired completions: the chosen tensors hold the desirable ones
    [P_d], the rejected tensors the undesirable ones [P_u] (either may be empty). With the
    reference point z (the batch KL estimate),

        desirable:    w_d (1 - sigma(beta (rho - z)))
        undesirable:  w_u (1 - sigma(beta (z - rho)))

    averaged over all P_d + P_u completions.

    The KL term z = max(0, mean(kl_policy_logps - kl_ref_logps)), detached (no gradient flows
    through the reference point, as in the paper). Provide exactly one of:
      - `kl_policy_logps`, `kl_ref_logps` [K]: summed log-probs of mismatched completions (the
        completion of one example under another example's prompt), from policy and reference;
      - `kl`: an estimate computed elsewhere (a float or scalar tensor; e.g. averaged across
        processes), clamped at 0 here; pass kl=0.0 to run without a reference point.
    Metric "kl" reports z; "count/chosen", "count/rejected" the group sizes.
    """
    if (kl is None) == (kl_policy_logps is None or kl_ref_logps is None):
        raise ValueError(
            "loss 'kto' needs its KL reference point: pass kl_policy_logps and kl_ref_logps "
            "(log-probs of mismatched prompt/completion pairs under policy and reference), or "
            "kl= (a precomputed estimate; 0.0 for none), not both"
        )
    if kl is None:
        if kl_policy_logps.shape != kl_ref_logps.shape or kl_policy_logps.dim() != 1:
            raise ValueError(
                "loss 'kto': kl_policy_logps and kl_ref_logps must both be [K], got "
                f"{tuple(kl_policy_logps.shape)} and {tuple(kl_ref_logps.shape)}"
            )
        z = (kl_policy_logps - kl_ref_logps).mean()
    else:
        # torch.full for a Python number: a fill kernel, not a host-to-device copy.
        like = x.policy_chosen
        z = kl if isinstance(kl, Tensor) else torch.full((), float(kl), device=like.device)
    z = z.detach().to(x.policy_chosen.dtype).clamp(min=0.0)
    rho_d, rho_u = x.logratios()
    desirable = desirable_weight * (1.0 - torch.sigmoid(x.beta * (rho_d - z)))
    undesirable = undesirable_weight * (1.0 - torch.sigmoid(x.beta * (z - rho_u)))
    loss = torch.cat([desirable, undesirable]).mean()
    return loss, {"kl": z}
