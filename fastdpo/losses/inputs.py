"""`LossInputs`: the per-sequence tensors every registered loss function receives."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastdpo.losses.options import f_divergence_scores

Tensor = torch.Tensor


@dataclass(frozen=True, kw_only=True)
class LossInputs:
    """Per-sequence inputs of a loss. Tensors are 1-D, one float dtype, one device.

    For paired losses all are [P]. For unpaired losses (KTO) the chosen tensors are the
    desirable completions [P_d] and the rejected tensors the undesirable ones [P_u].
    Lengths are completion token counts in the log-probs' dtype. Per-token averages divide by
    max(length, 1): a completion left empty by masking has log-prob 0 and average 0.

    TRL's loss options (`fastdpo.losses.options`) arrive here already applied where they change
    inputs: with `ld_alpha` the policy and reference sums are LD-DPO's reweighted sums (the
    plain chosen sums stay in `policy_chosen_plain` for NLL terms); with `use_weighting`,
    `pair_weights` holds WPO's weights, which `reduce` applies; `f_divergence_type` is read by
    `scores` and `score_margin`.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    beta: float = 0.1
    f_divergence_type: str = "reverse_kl"
    """How the losses built on the score difference score a log-ratio (`scores`)."""
    f_alpha_divergence_coef: float = 0.5
    pair_weights: Tensor | None = None
    """[P] WPO weights (no gradient) that `reduce` applies; None: a plain mean."""
    policy_chosen_plain: Tensor | None = None
    """[P] plain summed chosen log-probs when `policy_chosen` is LD-weighted; None otherwise."""

    def policy(self, *, normalized: bool = False) -> tuple[Tensor, Tensor]:
        """Policy log-probs (chosen, rejected): sums, or per-token averages if `normalized`."""
        return self._per_sequence(self.policy_chosen, self.policy_rejected, normalized)

    def reference(self, *, normalized: bool = False) -> tuple[Tensor, Tensor]:
        """Reference log-probs (chosen, rejected), as `policy`; an error if there are none."""
        if self.ref_chosen is None or self.ref_rejected is None:
            raise ValueError("this loss needs reference log-probs (ref_chosen, ref_rejected)")
        return self._per_sequence(self.ref_chosen, self.ref_rejected, normalized)

    def _per_sequence(
        self, chosen: Tensor, rejected: Tensor, normalized: bool
    ) -> tuple[Tensor, Tensor]:
        if not normalized:
            return chosen, rejected
        if self.chosen_lengths is None or self.rejected_lengths is None:
            raise ValueError("per-token averages need chosen_lengths and rejected_lengths")
        return (
            chosen / self.chosen_lengths.clamp(min=1.0),
            rejected / self.rejected_lengths.clamp(min=1.0),
        )

    def logratios(self, *, normalized: bool = False) -> tuple[Tensor, Tensor]:
        """(rho_c, rho_r) = policy - reference, per sequence."""
        pi_c, pi_r = self.policy(normalized=normalized)
        ref_c, ref_r = self.reference(normalized=normalized)
        return pi_c - ref_c, pi_r - ref_r

    def margin(self, *, normalized: bool = False) -> Tensor:
        """m = rho_c - rho_r = (pi_c - pi_r) - (ref_c - ref_r), per pair."""
        rho_c, rho_r = self.logratios(normalized=normalized)
        return rho_c - rho_r

    def scores(self, *, normalized: bool = False) -> tuple[Tensor, Tensor]:
        """(f'(rho_c), f'(rho_r)): the log-ratios scored by `f_divergence_type` (the log-ratios
        themselves for the default "reverse_kl"). `normalized` divides each score by its
        completion length, as TRL's IPO and sigmoid_norm do (for "reverse_kl" that is the
        margin of per-token averages, `logratios(normalized=True)`)."""
        if self.f_divergence_type == "reverse_kl":
            return self.logratios(normalized=normalized)
        rho_c, rho_r = self.logratios()
        scored = (
            f_divergence_scores(rho, self.f_divergence_type, self.f_alpha_divergence_coef)
            for rho in (rho_c, rho_r)
        )
        return self._per_sequence(*scored, normalized)

    def score_margin(self, *, normalized: bool = False) -> Tensor:
        """f'(rho_c) - f'(rho_r), per pair (TRL's `delta_score`); `margin` for reverse_kl."""
        score_c, score_r = self.scores(normalized=normalized)
        return score_c - score_r

    def reduce(self, per_pair: Tensor) -> Tensor:
        """The batch loss from per-pair losses [P]: their mean, each weighted by `pair_weights`
        when WPO weighting is on (weights are not normalized, as in TRL)."""
        if self.pair_weights is None:
            return per_pair.mean()
        return (per_pair * self.pair_weights).mean()

    def chosen_plain(self) -> Tensor:
        """[P] summed chosen log-probs without LD-DPO's reweighting (what NLL terms read)."""
        return self.policy_chosen if self.policy_chosen_plain is None else self.policy_chosen_plain
