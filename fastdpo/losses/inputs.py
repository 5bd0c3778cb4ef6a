"""`LossInputs`: the per-sequence tensors every registered loss function receives."""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True, kw_only=True)
class LossInputs:
    """Per-sequence inputs of a loss. Tensors are 1-D, one float dtype, one device.

    For paired losses all are [P]. For unpaired losses (KTO) the chosen tensors are the
    desirable completions [P_d] and the rejected tensors the undesirable ones [P_u].
    Lengths are completion token counts in the log-probs' dtype. Per-token averages divide by
    max(length, 1): a completion left empty by masking has log-prob 0 and average 0.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    beta: float = 0.1

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
