"""Preference losses over per-sequence log-probs, a registry of them by name, and their metrics.

Every loss is a small pure function of per-sequence tensors: summed completion log-probs of the
policy (and of the reference model, for losses that need one), completion token counts, and
`beta`. The same functions serve the pure-PyTorch path of `fastdpo.ops.preference_loss` (which
first sums packed per-token log-probs per sequence); the Triton kernel re-implements the common
few, and the tests tie both to one float64 formula each.

Notation in the docstrings, per pair p (all [P]):

    pi_c, pi_r    policy log-probs of the chosen / rejected completion, summed over its tokens
    ref_c, ref_r  the same under the reference model
    L_c, L_r      completion token counts; avg(.) divides a sum by its count
    rho_c = pi_c - ref_c, rho_r = pi_r - ref_r        log-ratios ("implicit rewards" / beta)
    m = rho_c - rho_r                                  the DPO margin (logits in TRL's code)
    sigma = logistic sigmoid, softplus(x) = log(1 + e^x) = -log sigma(-x)

Unless a docstring says otherwise the batch loss is the mean of the per-pair losses.

Public entry point: `preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
*, loss="sigmoid", beta=0.1, ...) -> (loss, metrics)`. `loss` is a registered name, or a mapping
{name: weight} whose weighted sum is the loss (RPO = {"sigmoid": 1.0, "sft": alpha}). Add a loss
with the `register_loss` decorator.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
LossFn = Callable[..., "Tensor | tuple[Tensor, dict[str, Tensor]]"]


# ------------------------------------------------------------------------------------------------
# Inputs every loss function receives


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


# ------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True, kw_only=True)
class LossSpec:
    """A registered loss: its function and what it needs."""

    name: str
    fn: LossFn
    """fn(inputs: LossInputs, **params) -> scalar loss, or (scalar loss, extra metrics)."""
    needs_reference: bool
    """True if the loss reads reference log-probs (error when they are missing)."""
    needs_lengths: bool
    """True if the loss reads completion token counts (error when they are missing)."""
    length_normalized: bool
    """True if the loss compares per-token averages: the reward metrics then do too."""
    paired: bool
    """False for losses over unpaired desirable/undesirable completions (chosen and rejected
    may then differ in size)."""
    params: tuple[str, ...] = field(default=())
    """Keyword parameters the function accepts (read from its signature)."""


LOSSES: dict[str, LossSpec] = {}
"""Every registered loss by name."""


def register_loss(
    name: str,
    *,
    needs_reference: bool = True,
    needs_lengths: bool = False,
    length_normalized: bool = False,
    paired: bool = True,
    replace: bool = False,
) -> Callable[[LossFn], LossFn]:
    """Decorator that registers `fn(inputs: LossInputs, *, param=default, ...)` under `name`.

    The function returns the scalar batch loss, or (loss, metrics) to add metrics of its own
    (device tensors, detached). Its keyword-only parameters become `preference_loss` keyword
    arguments. Example::

        @register_loss("my_dpo")
        def my_dpo(x: LossInputs, *, margin: float = 0.0) -> torch.Tensor:
            return -F.logsigmoid(x.beta * x.margin() - margin).mean()

        loss, metrics = preference_loss(pc, pr, rc, rr, loss="my_dpo", margin=0.5)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a loss name must be a non-empty string, got {name!r}")

    def decorator(fn: LossFn) -> LossFn:
        if name in LOSSES and not replace:
            raise ValueError(
                f"a loss named {name!r} is already registered; pick another name or pass "
                "replace=True"
            )
        signature = inspect.signature(fn)
        params = tuple(
            p.name
            for p in signature.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        )
        LOSSES[name] = LossSpec(
            name=name,
            fn=fn,
            needs_reference=needs_reference,
            needs_lengths=needs_lengths or length_normalized,
            length_normalized=length_normalized,
            paired=paired,
            params=params,
        )
        return fn

    return decorator


def check_label_smoothing(loss: str, label_smoothing: float, *, allow_zero: bool = True) -> float:
    """`label_smoothing` as a float if it lies in [0, 0.5) (or (0, 0.5)); ValueError otherwise."""
    eps = float(label_smoothing)
    low_ok = eps >= 0.0 if allow_zero else eps > 0.0
    if not (low_ok and eps < 0.5):
        interval = "[0, 0.5)" if allow_zero else "(0, 0.5)"
        raise ValueError(f"loss {loss!r}: label_smoothing must be in {interval}, got {eps}")
    return eps


def check_beta(beta: float) -> float:
    """`beta` as a float if it is a positive finite number; TypeError / ValueError otherwise."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a number, got {beta!r}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive finite number, got {beta}")
    return float(beta)


def check_finite(loss: str, name: str, value: float) -> float:
    """`value` (parameter `name` of `loss`) as a float if it is finite; ValueError otherwise."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"loss {loss!r}: {name} must be a finite number, got {value}")
    return value


def check_reference_given(loss: str, ref_chosen: Tensor | None, ref_rejected: Tensor | None):
    """ValueError saying what to pass if `loss` (which reads reference log-probs) lacks them."""
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(
            f"loss {loss!r} needs reference log-probs: pass ref_chosen and ref_rejected (e.g. "
            "from fastdpo.ReferenceCache), or pick a reference-free loss (simpo, orpo, sft)"
        )


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012); x is clamped below 0
    by one ulp-sized step so that a log-prob of exactly 0 gives a finite value."""
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ------------------------------------------------------------------------------------------------
# The losses. Each is registered at import; the kernel path implements sigmoid, robust, hinge,
# ipo and simpo again in Triton (kernels/preference_loss.py).


@register_loss("sigmoid")
def sigmoid(x: LossInputs, *, label_smoothing: float = 0.0) -> Tensor:
    """DPO: -log sigma(beta * m), Rafailov et al. 2023, "Direct Preference Optimization: Your
    Language Model is Secretly a Reward Model" (arXiv 2305.18290).

    With label_smoothing eps in [0, 0.5) this is conservative DPO (cDPO; Mitchell 2023, "A note
    on DPO with noisy preferences"): (1 - eps) * softplus(-beta m) + eps * softplus(beta m).
    """
    eps = check_label_smoothing("sigmoid", label_smoothing)
    z = x.beta * x.margin()
    return ((1.0 - eps) * F.softplus(-z) + eps * F.softplus(z)).mean()


@register_loss("robust")
def robust(x: LossInputs, *, label_smoothing: float = 0.0) -> Tensor:
    """Robust DPO (rDPO), Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models
    with Noisy Feedback" (arXiv 2403.00409): an unbiased loss under label flips with rate eps,

        ((1 - eps) * softplus(-beta m) - eps * softplus(beta m)) / (1 - 2 eps),  eps in [0, 0.5).

    eps = 0 is DPO.
    """
    eps = check_label_smoothing("robust", label_smoothing)
    z = x.beta * x.margin()
    return (((1.0 - eps) * F.softplus(-z) - eps * F.softplus(z)) / (1.0 - 2.0 * eps)).mean()


@register_loss("hinge")
def hinge(x: LossInputs) -> Tensor:
    """SLiC-style hinge: relu(1 - beta * m). Zhao et al. 2023, "SLiC-HF: Sequence Likelihood
    Calibration with Human Feedback" (arXiv 2305.10425), with the reference-normalized margin
    of Liu et al. 2023, "Statistical Rejection Sampling Improves Preference Optimization"
    (RSO, arXiv 2309.06657); 1/beta is the margin in log-ratio units."""
    return torch.relu(1.0 - x.beta * x.margin()).mean()


@register_loss("ipo", length_normalized=True)
def ipo(x: LossInputs) -> Tensor:
    """IPO: (m_avg - 1 / (2 beta))^2, Azar et al. 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences" (arXiv 2310.12036), eq. 17 with tau = beta.

    m_avg is the margin of per-token average log-probs (policy and reference both divided by
    the completion length), as in TRL's implementation.
    """
    return (x.margin(normalized=True) - 1.0 / (2.0 * x.beta)).square().mean()


@register_loss("exo_pair")
def exo_pair(x: LossInputs, *, label_smoothing: float = 1e-3) -> Tensor:
    """EXO for pairs, Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model
    Alignment" (arXiv 2402.00856), eq. 16 with K = 2: the reverse KL from the policy's
    preference distribution (sigma(beta m), sigma(-beta m)) to the smoothed labels (1-eps, eps),

        sigma(z) (log sigma(z) - log(1 - eps)) + sigma(-z) (log sigma(-z) - log eps),  z = beta m.

    eps must be in (0, 0.5): with eps = 0 the target has a zero and the KL is infinite.
    """
    eps = check_label_smoothing("exo_pair", label_smoothing, allow_zero=False)
    z = x.beta * x.margin()
    return (
        torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
        + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))
    ).mean()


@register_loss("nca_pair")
def nca_pair(x: LossInputs) -> Tensor:
    """NCA for pairs, Chen et al. 2024, "Noise Contrastive Alignment of Language Models with
    Explicit Rewards" (arXiv 2402.05369): with r = beta * rho,

        -log sigma(r_c) - 0.5 log sigma(-r_c) - 0.5 log sigma(-r_r).

    Unlike DPO it anchors each reward, not only their difference, so chosen log-probs rise.
    """
    rho_c, rho_r = x.logratios()
    r_c, r_r = x.beta * rho_c, x.beta * rho_r
    return (F.softplus(-r_c) + 0.5 * F.softplus(r_c) + 0.5 * F.softplus(r_r)).mean()


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


@register_loss("bco_pair")
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
    loss = (F.softplus(-(r_c - delta)) + F.softplus(r_r - delta)).mean()
    return loss, {"bco/reward_mean": state.mean, "bco/reward_count": state.count}


@register_loss("sppo_hard")
def sppo_hard(x: LossInputs) -> Tensor:
    """SPPO with hard labels, Wu et al. 2024, "Self-Play Preference Optimization for Language
    Model Alignment" (arXiv 2405.00675), eq. 4.7 with P(chosen wins) = 1, P(rejected wins) = 0:

        (rho_c - 1 / (2 beta))^2 + (rho_r + 1 / (2 beta))^2.
    """
    rho_c, rho_r = x.logratios()
    half = 0.5 / x.beta
    return ((rho_c - half).square() + (rho_r + half).square()).mean()


def _aot(delta: Tensor, beta: float, eps: float) -> Tensor:
    z = beta * delta
    return ((1.0 - eps) * F.softplus(-z) + eps * F.softplus(z)).mean()


@register_loss("aot")
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


@register_loss("aot_unpaired")
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


@register_loss("apo_zero")
def apo_zero(x: LossInputs) -> Tensor:
    """APO-zero, D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions" (arXiv 2408.06266), eq. 7: push the chosen reward up and the rejected one down,

        (1 - sigma(beta rho_c)) + sigma(beta rho_r).

    For chosen completions better than the model's own outputs (the paper's constant offset of
    1 keeps the loss non-negative).
    """
    rho_c, rho_r = x.logratios()
    return (1.0 - torch.sigmoid(x.beta * rho_c) + torch.sigmoid(x.beta * rho_r)).mean()


@register_loss("apo_down")
def apo_down(x: LossInputs) -> Tensor:
    """APO-down, D'Oosterlinck et al. 2024 (arXiv 2408.06266), eq. 8: both likelihoods go down,
    the rejected one more,

        sigma(beta rho_c) + (1 - sigma(beta (rho_c - rho_r))).

    For chosen completions worse than the model's own outputs.
    """
    rho_c, rho_r = x.logratios()
    z_c = x.beta * rho_c
    return (torch.sigmoid(z_c) + 1.0 - torch.sigmoid(z_c - x.beta * rho_r)).mean()


@register_loss("discopop")
def discopop(x: LossInputs, *, tau: float = 0.05) -> Tensor:
    """DiscoPOP (log-ratio modulated loss), Lu et al. 2024, "Discovering Preference Optimization
    Algorithms with and for Large Language Models" (arXiv 2406.08414), eq. 5: with z = beta m
    and w = sigma(z / tau), a blend of the logistic and the exponential loss,

        (1 - w) softplus(-z) + w exp(-z).
    """
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"loss 'discopop': tau must be a positive number, got {tau}")
    z = x.beta * x.margin()
    w = torch.sigmoid(z / tau)
    return ((1.0 - w) * F.softplus(-z) + w * torch.exp(-z)).mean()


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
        return -x.policy_chosen.sum() / x.chosen_lengths.sum().clamp(min=1.0)
    if not isinstance(denominator, Tensor):
        denominator = check_finite("nll", "nll_denominator", denominator)
        if denominator <= 0:
            raise ValueError(f"nll_denominator must be > 0, got {denominator}")
    return -x.policy_chosen.sum() / denominator


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


@register_loss("sft", needs_reference=False, needs_lengths=True)
def sft(x: LossInputs, *, nll_denominator: float | Tensor | None = None) -> tuple[Tensor, dict]:
    """Supervised NLL on the chosen completions: -sum(pi_c) / sum(L_c), the token-mean cross
    entropy over the batch's chosen tokens. Combined with a DPO loss it is RPO (Pang et al. 2024,
    "Iterative Reasoning Preference Optimization", arXiv 2404.19733): loss={"sigmoid": 1.0,
    "sft": alpha}. Reported as the metric "nll_loss" (TRL's name).

    `nll_denominator` replaces sum(L_c) (default: this batch's chosen tokens). Gradient
    accumulation passes it so that micro-batches weighted by their share of the step's pairs
    add up to the step's token mean: step_chosen_tokens * batch_pairs / step_pairs."""
    nll = _chosen_nll(x, nll_denominator)
    return nll, {"nll_loss": nll.detach()}


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


# ------------------------------------------------------------------------------------------------
# Public function


def _resolve_components(loss: str | Mapping[str, float]) -> list[tuple[LossSpec, float]]:
    """[(spec, weight)] in the order given; validates names and weights."""
    if isinstance(loss, str):
        components = {loss: 1.0}
    elif isinstance(loss, Mapping):
        components = dict(loss)
        if not components:
            raise ValueError("loss: the mapping of losses to weights is empty")
    else:
        raise TypeError(
            f"loss must be a loss name or a mapping {{name: weight}}, got {type(loss).__name__}"
        )
    resolved = []
    for name, weight in components.items():
        spec = LOSSES.get(name)
        if spec is None:
            raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"loss {name!r}: weight must be a number, got {weight!r}")
        if not math.isfinite(weight):
            raise ValueError(f"loss {name!r}: weight must be finite, got {weight}")
        resolved.append((spec, float(weight)))
    paired = {spec.paired for spec, _ in resolved}
    if len(paired) > 1:
        raise ValueError(
            "loss: cannot combine paired losses with unpaired ones "
            f"({', '.join(s.name for s, _ in resolved if not s.paired)})"
        )
    return resolved


def _route_params(
    components: list[tuple[LossSpec, float]], loss_params: dict
) -> dict[str, dict[str, object]]:
    """Each keyword goes to every component whose function accepts it."""
    routed: dict[str, dict[str, object]] = {spec.name: {} for spec, _ in components}
    for key, value in loss_params.items():
        takers = [spec for spec, _ in components if key in spec.params]
        if not takers:
            accepted = {spec.name: list(spec.params) for spec, _ in components}
            raise TypeError(f"unknown loss parameter {key!r}; the parameters per loss: {accepted}")
        for spec in takers:
            routed[spec.name][key] = value
    return routed


def _check_tensor(name: str, tensor: Tensor, like: Tensor | None = None) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one value per sequence), got {tuple(tensor.shape)}")
    if like is not None:
        if tensor.shape != like.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected {tuple(like.shape)} "
                "(one value per completion, like the policy log-probs)"
            )
        if tensor.device != like.device:
            raise ValueError(f"{name} is on {tensor.device}, the policy log-probs on {like.device}")


def _build_inputs(
    components: list[tuple[LossSpec, float]],
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    chosen_lengths: Tensor | None,
    rejected_lengths: Tensor | None,
    beta: float,
) -> LossInputs:
    _check_tensor("policy_chosen", policy_chosen)
    _check_tensor("policy_rejected", policy_rejected)
    if not policy_chosen.is_floating_point() or policy_chosen.dtype != policy_rejected.dtype:
        raise TypeError(
            "policy_chosen and policy_rejected must share one floating dtype, got "
            f"{policy_chosen.dtype} and {policy_rejected.dtype}"
        )
    if policy_rejected.device != policy_chosen.device:
        raise ValueError(
            f"policy_chosen is on {policy_chosen.device}, policy_rejected on "
            f"{policy_rejected.device}: move them to one device"
        )
    paired = components[0][0].paired
    if paired and policy_chosen.shape != policy_rejected.shape:
        raise ValueError(
            f"policy_chosen {tuple(policy_chosen.shape)} and policy_rejected "
            f"{tuple(policy_rejected.shape)} must have one value per pair ([P] each)"
        )
    if paired and policy_chosen.numel() == 0:
        raise ValueError("the batch has no pairs (policy_chosen is empty)")
    if not paired and policy_chosen.numel() + policy_rejected.numel() == 0:
        raise ValueError("the batch has no completions (policy_chosen and policy_rejected empty)")
    beta = check_beta(beta)

    needs_reference = [spec.name for spec, _ in components if spec.needs_reference]
    if needs_reference:
        check_reference_given(needs_reference[0], ref_chosen, ref_rejected)
    ref_chosen, ref_rejected = _optional_pair(
        ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected), policy_chosen, policy_rejected
    )
    needs_lengths = [spec.name for spec, _ in components if spec.needs_lengths]
    if needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(
            f"loss {needs_lengths[0]!r} needs completion token counts: pass chosen_lengths and "
            "rejected_lengths ([P] each)"
        )
    chosen_lengths, rejected_lengths = _optional_pair(
        ("chosen_lengths", chosen_lengths),
        ("rejected_lengths", rejected_lengths),
        policy_chosen,
        policy_rejected,
    )

    return LossInputs(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        beta=beta,
    )


def _optional_pair(
    chosen: tuple[str, Tensor | None],
    rejected: tuple[str, Tensor | None],
    policy_chosen: Tensor,
    policy_rejected: Tensor,
) -> tuple[Tensor | None, Tensor | None]:
    """An optional (chosen, rejected) pair of per-sequence inputs, both or neither given, each
    shaped like its policy log-probs and cast to their dtype."""
    (chosen_name, chosen_value), (rejected_name, rejected_value) = chosen, rejected
    if (chosen_value is None) != (rejected_value is None):
        raise ValueError(f"pass both {chosen_name} and {rejected_name}, or neither")
    if chosen_value is None:
        return None, None
    _check_tensor(chosen_name, chosen_value, policy_chosen)
    _check_tensor(rejected_name, rejected_value, policy_rejected)
    dtype = policy_chosen.dtype
    return chosen_value.to(dtype), rejected_value.to(dtype)


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


def preference_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    *,
    loss: str | Mapping[str, float] = "sigmoid",
    beta: float = 0.1,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    **loss_params,
) -> tuple[Tensor, dict[str, Tensor]]:
    """A preference loss over per-sequence log-probs, and TRL-compatible metrics.

    Args:
        policy_chosen, policy_rejected: [P] float policy log-probs summed over each completion's
            tokens (for KTO: desirable [P_d] and undesirable [P_u] completions).
        ref_chosen, ref_rejected: the same under the reference model; required unless every
            loss is reference-free (simpo, orpo, sft). Treated like any input by autograd (pass
            them detached, as the reference cache does).
        loss: a registered name (see `LOSSES`), or a mapping {name: weight}: the loss is then
            sum(weight * loss_name), e.g. RPO = {"sigmoid": 1.0, "sft": 1.0}. The first entry is
            the main loss: the reward metrics follow its definition.
        beta: the losses' temperature / regularization strength (> 0).
        chosen_lengths, rejected_lengths: [P] completion token counts (int or float); required
            by ipo, simpo, orpo, sft. A per-token average divides by max(count, 1), so an
            empty completion (log-prob 0) averages 0.
        **loss_params: parameters of the losses (e.g. label_smoothing, gamma, tau, bco_state,
            kl); each goes to every component that accepts it, and one no component accepts is
            an error.

    Returns:
        (loss, metrics): the scalar loss in the log-probs' dtype; metrics are detached device
        tensors (no host sync) named as in TRL (see `reward_metrics`), plus "loss/<name>" for
        each component (unweighted) and the components' own (nll_loss, kl, ...).
    """
    components = _resolve_components(loss)
    routed = _route_params(components, loss_params)
    x = _build_inputs(
        components,
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        chosen_lengths,
        rejected_lengths,
        beta,
    )
    total = None
    extra: dict[str, Tensor] = {}
    for spec, weight in components:
        out = spec.fn(x, **routed[spec.name])
        value, metrics = out if isinstance(out, tuple) else (out, {})
        extra[f"loss/{spec.name}"] = value.detach()
        extra.update(metrics)
        total = weight * value if total is None else total + weight * value
    metrics = reward_metrics(x, components[0][0])
    metrics.update(extra)
    return total, metrics
