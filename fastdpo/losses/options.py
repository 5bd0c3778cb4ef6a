"""TRL's loss options beyond the loss type: f-divergences, LD-DPO and WPO, with their checks.

    f_divergence_type, f_alpha_divergence_coef   f-DPO (Wang et al. 2023, "Beyond Reverse KL:
        Generalizing Direct Preference Optimization with Diverse Divergence Constraints",
        arXiv 2309.16240): the chosen and rejected scores are f'(pi / ref) of the log-ratios
        instead of the log-ratios; "reverse_kl" (f'(t) = log t) is DPO.
    ld_alpha   LD-DPO (Liu et al. 2024, "Length Desensitization in Directed Preference
        Optimization", arXiv 2409.06411): per pair, the tokens up to the shorter completion's
        length count fully, the longer completion's tail counts ld_alpha times, for policy and
        reference alike.
    use_weighting   WPO (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference
        Optimization", arXiv 2406.11827, eq. 2): each pair's loss is multiplied by
        exp(mean_t (log p(t) - log sum_v p(v)^2)) of its chosen times that of its rejected
        completion (the policy's, without gradient).

The meanings, names and defaults are TRL 1.16's (`DPOConfig`, `DPOTrainer._compute_loss`);
`LossOptions.check` refuses an option for a loss where TRL does (f-divergences with losses not
built on the chosen-rejected score difference, WPO with the sorting AOT losses) and where it
has no meaning here (LD-DPO and WPO with SimPO, ORPO and the unpaired KTO, which TRL's
DPOTrainer does not have).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdpo.losses.registry import LOSSES, LossSpec

Tensor = torch.Tensor

F_DIVERGENCE_TYPES: tuple[str, ...] = (
    "reverse_kl",
    "forward_kl",
    "js_divergence",
    "alpha_divergence",
)
"""TRL's `f_divergence_type` values; "reverse_kl" is DPO's."""

LOSS_OPTIONS: tuple[str, ...] = (
    "f_divergence_type",
    "f_alpha_divergence_coef",
    "ld_alpha",
    "use_weighting",
)
"""The options' names (keyword arguments of `preference_loss`, keys of the training config)."""

_ALPHA_LIMIT = 1e-6
"""|alpha - 1| below which the alpha-divergence is its limit, the reverse KL (TRL's cut-off)."""

_EXP_CAP = {torch.float16: 11.0}
"""Largest exponent of the alpha-divergence's exp per dtype (TRL's: exp(11) fits fp16, exp(80)
fits fp32 and bf16 after the cast back); 80 for every other dtype."""


@dataclass(frozen=True, kw_only=True)
class LossOptions:
    """TRL's loss options, validated: build with keyword arguments, then `check(specs)`."""

    f_divergence_type: str = "reverse_kl"
    """One of `F_DIVERGENCE_TYPES`."""
    f_alpha_divergence_coef: float = 0.5
    """alpha of the alpha-divergence (read only with f_divergence_type="alpha_divergence")."""
    ld_alpha: float | None = None
    """LD-DPO's weight of the longer completion's tail, in [0, 1]; None: plain sums."""
    use_weighting: bool = False
    """WPO's per-pair weights."""

    def __post_init__(self) -> None:
        if self.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise ValueError(
                f"f_divergence_type: got {self.f_divergence_type!r}; allowed: "
                f"{', '.join(F_DIVERGENCE_TYPES)}"
            )
        coef = self.f_alpha_divergence_coef
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef):
            raise ValueError(f"f_alpha_divergence_coef: got {coef!r}; allowed: a finite number")
        alpha = self.ld_alpha
        if alpha is not None and (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not 0.0 <= alpha <= 1.0
        ):
            raise ValueError(
                f"ld_alpha: got {alpha!r}; allowed: a number in [0, 1] (1: plain sums, 0: the "
                "tokens past the shorter completion's length are dropped), or None"
            )
        if not isinstance(self.use_weighting, bool):
            raise ValueError(f"use_weighting: got {self.use_weighting!r}; allowed: true or false")

    @property
    def is_default(self) -> bool:
        """True if no option changes the loss (what the Triton kernel computes)."""
        plain_scores = self.f_divergence_type == "reverse_kl"
        return plain_scores and self.ld_alpha is None and not self.use_weighting

    def check(self, specs: Iterable[LossSpec]) -> None:
        """ValueError naming the option and the loss if an option does not apply to a loss."""
        for spec in specs:
            if self.f_divergence_type != "reverse_kl" and not spec.f_divergence:
                raise ValueError(
                    f"f_divergence_type={self.f_divergence_type!r} applies only to losses built "
                    "on the chosen-rejected score difference "
                    f"({', '.join(_names(lambda s: s.f_divergence))}), as in TRL: the f-DPO "
                    f"reparameterization leaves a log Z(x) term that only that difference "
                    f"cancels. Use f_divergence_type='reverse_kl' with loss {spec.name!r}"
                )
            if self.use_weighting and not spec.pair_weighting:
                why = (
                    "it sorts the batch's margins, which would misalign the per-pair weights "
                    "(TRL refuses it too)"
                    if spec.name in ("aot", "aot_unpaired")
                    else "its per-pair losses are not reduced through LossInputs.reduce"
                )
                raise ValueError(
                    f"use_weighting (WPO) does not apply to loss {spec.name!r}: {why}; it "
                    f"applies to {', '.join(_names(lambda s: s.pair_weighting))}"
                )
            if self.ld_alpha is not None and not spec.ld_alpha:
                raise ValueError(
                    f"ld_alpha (LD-DPO) does not apply to loss {spec.name!r}: it reweights the "
                    "summed log-probs of paired completions for the losses of TRL's DPOTrainer "
                    f"({', '.join(_names(lambda s: s.ld_alpha))})"
                )


def _names(predicate) -> list[str]:
    return sorted(name for name, spec in LOSSES.items() if predicate(spec))


# ------------------------------------------------------------------------------------------------
# f-divergences


def f_divergence_scores(
    logratios: Tensor, f_divergence_type: str, f_alpha_divergence_coef: float = 0.5
) -> Tensor:
    """f'(t) at t = pi / ref, from the log-ratios log t (any shape, float; differentiable).

        reverse_kl        log t                       (DPO: the log-ratio itself)
        forward_kl        1 - 1/t = -expm1(-log t)
        js_divergence     log(2t / (t + 1)) = log 2 + log sigma(log t)
        alpha_divergence  (t^(a-1) - 1) / (a - 1) = expm1((a - 1) log t) / (a - 1),
                          the reverse KL when |a - 1| < 1e-6 (its limit)

    As in TRL, the alpha-divergence's exponent (a - 1) log t is clamped at 80 (11 in fp16) and
    computed in fp32 for fp16/bf16 inputs, so exp never overflows (and the gradient is 0 past
    the clamp). expm1 where TRL writes exp(.) - 1: equal to the rounding of exp near 1, exact
    near 0.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return -torch.expm1(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        a = float(f_alpha_divergence_coef)
        if abs(a - 1.0) < _ALPHA_LIMIT:
            return logratios
        dtype = logratios.dtype
        compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        exponent = ((a - 1.0) * logratios).to(compute).clamp(max=_EXP_CAP.get(dtype, 80.0))
        return torch.expm1(exponent).to(dtype) * (1.0 / (a - 1.0))
    raise ValueError(
        f"f_divergence_type: got {f_divergence_type!r}; allowed: {', '.join(F_DIVERGENCE_TYPES)}"
    )


# ------------------------------------------------------------------------------------------------
# LD-DPO


@dataclass(frozen=True, kw_only=True)
class TailLogps:
    """LD-DPO's tails: per pair, log-probs summed over the tokens of each completion past the
    pair's shared length min(L_c, L_r) (so the shorter completion's tail is 0). [P] each, like
    the summed log-probs they go with.

    From packed per-token log-probs: `fastdpo.ops.preference_loss.ld_tail_sums`.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor | None = None
    """Needed by the losses that read reference log-probs."""
    ref_rejected: Tensor | None = None


def ld_weighted(full: Tensor, tail: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO's sum: shared tokens count 1, tail tokens ld_alpha = full - (1 - ld_alpha) tail."""
    return full - (1.0 - ld_alpha) * tail


# ------------------------------------------------------------------------------------------------
# WPO


def wpo_weights(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_log_sum_p2: Tensor,
    rejected_log_sum_p2: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
) -> Tensor:
    """WPO's per-pair weights [P], detached: for each completion w = exp((sum_t log p(t) -
    sum_t log sum_v p_v(t)^2) / max(L, 1)), and the pair's weight w_chosen * w_rejected.

    chosen_logps, rejected_logps: [P] plain summed policy log-probs (not LD-weighted, as TRL);
    *_log_sum_p2: [P] sums over the same tokens of log sum_v p_v^2 (the head's "log_sum_p2").
    """
    with torch.no_grad():
        chosen = (chosen_logps - chosen_log_sum_p2) / chosen_lengths.clamp(min=1.0)
        rejected = (rejected_logps - rejected_log_sum_p2) / rejected_lengths.clamp(min=1.0)
        return torch.exp(chosen.detach()) * torch.exp(rejected.detach())
