"""The reference-based paired losses: DPO and its variants over log-ratios of a pair.

Each is registered at import; the kernel path implements sigmoid, robust, hinge, ipo and simpo
again in Triton (kernels/preference_loss.py). The losses built on the chosen-rejected score
difference read `x.score_margin()` (DPO's margin m, or the difference of f'(ratio) under an
f-divergence); every per-pair loss but AOT's is reduced by `x.reduce` (WPO weights apply).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdpo.losses.inputs import LossInputs
from fastdpo.losses.registry import check_label_smoothing, register_loss

Tensor = torch.Tensor

_EVERY_OPTION = {"f_divergence": True, "pair_weighting": True, "ld_alpha": True}
"""The losses on the score difference take all of TRL's options (fastdpo.losses.options)."""


@register_loss("sigmoid", **_EVERY_OPTION)
def sigmoid(x: LossInputs, *, label_smoothing: float = 0.0) -> Tensor:
    """DPO: -log sigma(beta * m), Rafailov et al. 2023, "Direct Preference Optimization: Your
    Language Model is Secretly a Reward Model" (arXiv 2305.18290).

    With label_smoothing eps in [0, 0.5) this is conservative DPO (cDPO; Mitchell 2023, "A note
    on DPO with noisy preferences"): (1 - eps) * softplus(-beta m) + eps * softplus(beta m).
    """
    eps = check_label_smoothing("sigmoid", label_smoothing)
    z = x.beta * x.score_margin()
    return x.reduce((1.0 - eps) * F.softplus(-z) + eps * F.softplus(z))


@register_loss("sigmoid_norm", needs_lengths=True, **_EVERY_OPTION)
def sigmoid_norm(x: LossInputs) -> Tensor:
    """DPO on length-normalized log-ratios (TRL's "sigmoid_norm"): -log sigma(beta * m_avg),
    m_avg = rho_c / L_c - rho_r / L_r, each side's summed log-ratio (its score, under an
    f-divergence) divided by its completion length.

    Only the loss is normalized: the reward metrics stay beta * rho on sums, as TRL 1.16 logs
    them.
    """
    return x.reduce(F.softplus(-x.beta * x.score_margin(normalized=True)))


@register_loss("robust", **_EVERY_OPTION)
def robust(x: LossInputs, *, label_smoothing: float = 0.0) -> Tensor:
    """Robust DPO (rDPO), Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models
    with Noisy Feedback" (arXiv 2403.00409): an unbiased loss under label flips with rate eps,

        ((1 - eps) * softplus(-beta m) - eps * softplus(beta m)) / (1 - 2 eps),  eps in [0, 0.5).

    eps = 0 is DPO.
    """
    eps = check_label_smoothing("robust", label_smoothing)
    z = x.beta * x.score_margin()
    return x.reduce(((1.0 - eps) * F.softplus(-z) - eps * F.softplus(z)) / (1.0 - 2.0 * eps))


@register_loss("hinge", **_EVERY_OPTION)
def hinge(x: LossInputs) -> Tensor:
    """SLiC-style hinge: relu(1 - beta * m). Zhao et al. 2023, "SLiC-HF: Sequence Likelihood
    Calibration with Human Feedback" (arXiv 2305.10425), with the reference-normalized margin
    of Liu et al. 2023, "Statistical Rejection Sampling Improves Preference Optimization"
    (RSO, arXiv 2309.06657); 1/beta is the margin in log-ratio units."""
    return x.reduce(torch.relu(1.0 - x.beta * x.score_margin()))


@register_loss("ipo", length_normalized=True, **_EVERY_OPTION)
def ipo(x: LossInputs) -> Tensor:
    """IPO: (m_avg - 1 / (2 beta))^2, Azar et al. 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences" (arXiv 2310.12036), eq. 17 with tau = beta.

    m_avg is the margin of per-token average log-probs (policy and reference both divided by
    the completion length), as in TRL's implementation.
    """
    return x.reduce((x.score_margin(normalized=True) - 1.0 / (2.0 * x.beta)).square())


@register_loss("exo_pair", **_EVERY_OPTION)
def exo_pair(x: LossInputs, *, label_smoothing: float = 1e-3) -> Tensor:
    """EXO for pairs, Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model
    Alignment" (arXiv 2402.00856), eq. 16 with K = 2: the reverse KL from the policy's
    preference distribution (sigma(beta m), sigma(-beta m)) to the smoothed labels (1-eps, eps),

        sigma(z) (log sigma(z) - log(1 - eps)) + sigma(-z) (log sigma(-z) - log eps),  z = beta m.

    eps must be in (0, 0.5): with eps = 0 the target has a zero and the KL is infinite.
    """
    eps = check_label_smoothing("exo_pair", label_smoothing, allow_zero=False)
    z = x.beta * x.score_margin()
    return x.reduce(
        torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
        + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))
    )


@register_loss("nca_pair", pair_weighting=True, ld_alpha=True)
def nca_pair(x: LossInputs) -> Tensor:
    """NCA for pairs, Chen et al. 2024, "Noise Contrastive Alignment of Language Models with
    Explicit Rewards" (arXiv 2402.05369): with r = beta * rho,

        -log sigma(r_c) - 0.5 log sigma(-r_c) - 0.5 log sigma(-r_r).

    Unlike DPO it anchors each reward, not only their difference, so chosen log-probs rise.
    """
    rho_c, rho_r = x.logratios()
    r_c, r_r = x.beta * rho_c, x.beta * rho_r
    return x.reduce(F.softplus(-r_c) + 0.5 * F.softplus(r_c) + 0.5 * F.softplus(r_r))


@dataclass(frozen=True)
class RunningMean:
    """The running mean of BCO's rewards, as explicit state (device tensors, no host sync).

    `mean` is the average of every reward seen so far (chosen and rejected alike), `count` how
    many that is; both float64 scalars, so the count stays exact over long runs. Start with
    `RunningMean.zero()`; after each step read the new state back with
    `RunningMean.from_metrics(metrics)` and pass it to the next call as `bco_state=`.
    Under data parallelism each process keeps its own mean (TRL averages across processes).
    """

    mean: Tensor
    count: Tensor

    @classmethod
    def zero(cls, device: torch.device | str | None = None) -> RunningMean:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return cls(mean=zero, count=zero.clone())

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Tensor]) -> RunningMean:
        """The state after a `bco_pair` step, from that step's metrics."""
        return cls(mean=metrics["bco/reward_mean"], count=metrics["bco/reward_count"])

    def update(self, values: Tensor) -> RunningMean:
        """The state after also seeing `values` (any shape; detached)."""
        values = values.detach().to(torch.float64).reshape(-1)
        count = self.count.to(values.device) + values.numel()
        mean = self.mean.to(values.device)
        mean = mean + (values.sum() - values.numel() * mean) / count.clamp(min=1.0)
        return RunningMean(mean=mean, count=count)


@register_loss("bco_pair", pair_weighting=True, ld_alpha=True)
def bco_pair(x: LossInputs, *, bco_state: RunningMean | None = None) -> tuple[Tensor, dict]:
    """BCO for pairs, Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
    Alignment" (arXiv 2404.04656): a binary classifier on rewards r = beta * rho, shifted by
    delta, the running mean of all rewards seen so far (this batch included, detached):

        -log sigma(r_c - delta) - log sigma(-(r_r - delta)).

    State: pass the previous `RunningMean` as `bco_state` (None starts from zero); the new
    mean and count come back in the metrics as "bco/reward_mean" and "bco/reward_count"
    (`RunningMean.from_metrics(metrics)` rebuilds it).
    """
    rho_c, rho_r = x.logratios()
    r_c, r_r = x.beta * rho_c, x.beta * rho_r
    state = bco_state if bco_state is not None else RunningMean.zero(r_c.device)
    state = state.update(torch.cat([r_c, r_r]))
    delta = state.mean.to(r_c.dtype)
    loss = x.reduce(F.softplus(-(r_c - delta)) + F.softplus(r_r - delta))
    return loss, {"bco/reward_mean": state.mean, "bco/reward_count": state.count}


@register_loss("sppo_hard", pair_weighting=True, ld_alpha=True)
def sppo_hard(x: LossInputs) -> Tensor:
    """SPPO with hard labels, Wu et al. 2024, "Self-Play Preference Optimization for Language
    Model Alignment" (arXiv 2405.00675), eq. 4.7 with P(chosen wins) = 1, P(rejected wins) = 0:

        (rho_c - 1 / (2 beta))^2 + (rho_r + 1 / (2 beta))^2.
    """
    rho_c, rho_r = x.logratios()
    half = 0.5 / x.beta
    return x.reduce((rho_c - half).square() + (rho_r + half).square())


def _aot(delta: Tensor, beta: float, eps: float) -> Tensor:
    z = beta * delta
    return ((1.0 - eps) * F.softplus(-z) + eps * F.softplus(z)).mean()


@register_loss("aot", ld_alpha=True)
def aot(x: LossInputs, *, label_smoothing: float = 0.0) -> Tensor:
    """AOT (paired), Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via
    Optimal Transport" (arXiv 2406.05882): DPO's logistic loss on the batch's sorted margins,

        delta = sort(pi_c - pi_r) - sort(ref_c - ref_r)   (each sorted over the batch)
        (1 - eps) softplus(-beta delta) + eps softplus(beta delta),

    which asks for first-order stochastic dominance of the policy's log-ratio distribution over
    the reference's. With one pair per batch it equals (smoothed) DPO.
    """
    eps = check_label_smoothing("aot", label_smoothing)
    pi_c, pi_r = x.policy()
    ref_c, ref_r = x.reference()
    delta = torch.sort(pi_c - pi_r).values - torch.sort(ref_c - ref_r).values
    return _aot(delta, x.beta, eps)


@register_loss("aot_unpaired", ld_alpha=True)
def aot_unpaired(x: LossInputs, *, label_smoothing: float = 0.0) -> Tensor:
    """AOT for unpaired data (TRL's "aot_pair"), Melnyk et al. 2024 (arXiv 2406.05882): the
    chosen and rejected log-ratios are sorted separately, so the pairing in the batch does not
    matter (the counts must still be equal):

        delta = sort(rho_c) - sort(rho_r)
        (1 - eps) softplus(-beta delta) + eps softplus(beta delta).
    """
    eps = check_label_smoothing("aot_unpaired", label_smoothing)
    rho_c, rho_r = x.logratios()
    delta = torch.sort(rho_c).values - torch.sort(rho_r).values
    return _aot(delta, x.beta, eps)


@register_loss("apo_zero", pair_weighting=True, ld_alpha=True)
def apo_zero(x: LossInputs) -> Tensor:
    """APO-zero, D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions" (arXiv 2408.06266), eq. 7: push the chosen reward up and the rejected one down,

        (1 - sigma(beta rho_c)) + sigma(beta rho_r).

    For chosen completions better than the model's own outputs (the paper's constant offset of
    1 keeps the loss non-negative).
    """
    rho_c, rho_r = x.logratios()
    return x.reduce(1.0 - torch.sigmoid(x.beta * rho_c) + torch.sigmoid(x.beta * rho_r))


@register_loss("apo_down", pair_weighting=True, ld_alpha=True)
def apo_down(x: LossInputs) -> Tensor:
    """APO-down, D'Oosterlinck et al. 2024 (arXiv 2408.06266), eq. 8: both likelihoods go down,
    the rejected one more,

        sigma(beta rho_c) + (1 - sigma(beta (rho_c - rho_r))).

    For chosen completions worse than the model's own outputs.
    """
    rho_c, rho_r = x.logratios()
    z_c = x.beta * rho_c
    return x.reduce(torch.sigmoid(z_c) + 1.0 - torch.sigmoid(z_c - x.beta * rho_r))


@register_loss("discopop", **_EVERY_OPTION)
def discopop(x: LossInputs, *, tau: float = 0.05) -> Tensor:
    """DiscoPOP (log-ratio modulated loss), Lu et al. 2024, "Discovering Preference Optimization
    Algorithms with and for Large Language Models" (arXiv 2406.08414), eq. 5: with z = beta m
    and w = sigma(z / tau), a blend of the logistic and the exponential loss,

        (1 - w) softplus(-z) + w exp(-z).
    """
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"loss 'discopop': tau must be a positive number, got {tau}")
    z = x.beta * x.score_margin()
    w = torch.sigmoid(z / tau)
    return x.reduce((1.0 - w) * F.softplus(-z) + w * torch.exp(-z))
