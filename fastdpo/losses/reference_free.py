"""Reference-free losses: SimPO, ORPO and the supervised NLL term (SFT, RPO's second part)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdpo.losses.inputs import LossInputs
from fastdpo.losses.registry import check_finite, register_loss

Tensor = torch.Tensor


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012); x is clamped below 0
    by one ulp-sized step so that a log-prob of exactly 0 gives a finite value."""
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@register_loss("simpo", needs_reference=False, length_normalized=True)
def simpo(x: LossInputs, *, gamma: float = 0.5) -> Tensor:
    """SimPO, Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward" (arXiv 2405.14734), eq. 6: reference-free, on per-token averages, target margin gamma,

        softplus(-(beta (avg(pi_c) - avg(pi_r)) - gamma)).

    The paper tunes beta in [2, 2.5] and gamma / beta around 0.5; gamma here is absolute.
    """
    gamma = check_finite("simpo", "gamma", gamma)
    avg_c, avg_r = x.policy(normalized=True)
    return F.softplus(-(x.beta * (avg_c - avg_r) - gamma)).mean()


def _chosen_nll(x: LossInputs, denominator: float | Tensor | None) -> Tensor:
    """Mean negative log-likelihood per chosen token over the batch: -sum(pi_c) / sum(L_c),
    or -sum(pi_c) / denominator when one is given (see `nll_denominator` of sft / orpo)."""
    if denominator is None:
        return -x.chosen_plain().sum() / x.chosen_lengths.sum().clamp(min=1.0)
    if not isinstance(denominator, Tensor):
        denominator = check_finite("nll", "nll_denominator", denominator)
        if denominator <= 0:
            raise ValueError(f"nll_denominator must be > 0, got {denominator}")
    return -x.chosen_plain().sum() / denominator


@register_loss("orpo", needs_reference=False, needs_lengths=True, length_normalized=True)
def orpo(x: LossInputs, *, nll_denominator: float | Tensor | None = None) -> tuple[Tensor, dict]:
    """ORPO, Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model" (arXiv 2403.07691): the chosen NLL plus an odds-ratio term weighted by lambda = beta,

        log odds(y) = avg(pi) - log(1 - exp(avg(pi)))
        loss = NLL_chosen - beta * mean(log sigma(log odds(y_c) - log odds(y_r))),

    NLL_chosen = -sum(pi_c) / sum(L_c) (the token-mean cross-entropy over the batch's chosen
    tokens). Metrics as in TRL: nll_loss, log_odds_ratio (the mean log sigma term) and
    log_odds_chosen (the mean log-odds difference). `nll_denominator`: see `sft`.
    """
    avg_c, avg_r = x.policy(normalized=True)
    log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
    ratio = F.logsigmoid(log_odds)
    nll = _chosen_nll(x, nll_denominator)
    metrics = {
        "nll_loss": nll.detach(),
        "log_odds_ratio": ratio.detach().mean(),
        "log_odds_chosen": log_odds.detach().mean(),
    }
    return nll - x.beta * ratio.mean(), metrics


@register_loss(
    "sft",
    needs_reference=False,
    needs_lengths=True,
    f_divergence=True,
    pair_weighting=True,
    ld_alpha=True,
)
def sft(x: LossInputs, *, nll_denominator: float | Tensor | None = None) -> tuple[Tensor, dict]:
    """Supervised NLL on the chosen completions: -sum(pi_c) / sum(L_c), the token-mean cross
    entropy over the batch's chosen tokens. Combined with a DPO loss it is RPO (Pang et al. 2024,
    "Iterative Reasoning Preference Optimization", arXiv 2404.19733): loss={"sigmoid": 1.0,
    "sft": alpha}. Reported as the metric "nll_loss" (TRL's name).

    `nll_denominator` replaces sum(L_c) (default: this batch's chosen tokens). Gradient
    accumulation passes it so that micro-batches weighted by their share of the step's pairs
    add up to the step's token mean: step_chosen_tokens * batch_pairs / step_pairs.

    TRL's options: the NLL reads plain log-probs under `ld_alpha`, ignores f-divergences (it
    has no log-ratio), and under `use_weighting` is multiplied by the batch's mean WPO weight
    (TRL weights its per-pair copies of the batch NLL); "nll_loss" stays the plain NLL."""
    nll = _chosen_nll(x, nll_denominator)
    loss = nll if x.pair_weights is None else nll * x.pair_weights.mean()
    return loss, {"nll_loss": nll.detach()}
