"""Every metric of every registered loss, by value: `preference_loss`, `packed_preference_loss`
(both impls) and `fused_linear_preference_loss` (both impls) against float64 formulas written
out here, on inputs where the sign and size of every value are unambiguous.

`FORMULAS` holds one entry per registered loss (the loss, its own metrics, which rewards it
reports, and its cases); a loss registered without an entry here fails
`test_every_registered_loss_has_a_formula` and its own parametrized case. The expected metric
names are the formulas' keys, so a metric added or dropped without a formula fails too.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import pytest
import torch
from fastdpo.kernels.preference_loss import KERNEL_LOSSES

from fastdpo import fused_linear_preference_loss
from fastdpo.losses import LOSSES, RunningMean, preference_loss
from fastdpo.ops.preference_loss import packed_preference_loss

F64 = torch.float64
BETA = 0.3
IGNORE = -100
UNAMBIGUOUS = 1e-3
"""Every expected metric is at least this far from 0 (unless a case says it is 0 by
definition), so a sign flip, a dropped term or a zeroed metric cannot pass."""


@dataclasses.dataclass(frozen=True)
class Batch:
    """Per-sequence float64 log-probs (summed over completion tokens) and token counts."""

    pc: torch.Tensor
    pr: torch.Tensor
    rc: torch.Tensor
    rr: torch.Tensor
    lc: torch.Tensor
    lr: torch.Tensor


def _t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# Three pairs. Log-ratios rho_c = pc - rc = [2, -1, 1.5], rho_r = pr - rr = [-3, 0.5, -1]:
# margins [5, -1.5, 2.5] (two of three pairs right), chosen rewards up on average, rejected down.
# Per-token averages order the pairs differently (pc / lc = [-3, -3, -2.5], pr / lr =
# [-2.5, -4, -3.2]), so a length-normalized reward cannot pass for a summed one. Every value is
# a binary fraction: exact in fp32 too.
PAIRED = Batch(
    pc=_t(-12.0, -30.0, -7.5),
    pr=_t(-20.0, -24.0, -16.0),
    rc=_t(-14.0, -29.0, -9.0),
    rr=_t(-17.0, -24.5, -15.0),
    lc=torch.tensor([4, 10, 3]),
    lr=torch.tensor([8, 6, 5]),
)
# Unpaired (KTO): 3 desirable completions (the "chosen" tensors), 2 undesirable ones.
UNPAIRED = Batch(
    pc=PAIRED.pc, rc=PAIRED.rc, lc=PAIRED.lc, pr=PAIRED.pr[:2], rr=PAIRED.rr[:2], lr=PAIRED.lr[:2]
)
DESIRABLE_ONLY = dataclasses.replace(
    UNPAIRED, pr=_t(), rr=_t(), lr=torch.zeros(0, dtype=torch.long)
)
BATCHES = {"paired": PAIRED, "unpaired": UNPAIRED, "desirable_only": DESIRABLE_ONLY}


# ------------------------------------------------------------------------------------------------
# Float64 formulas


def softplus(x):
    return torch.log1p(torch.exp(x))


def sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


def logsigmoid(x):
    return -softplus(-x)


def averages(b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    return b.pc / b.lc.double().clamp(min=1), b.pr / b.lr.double().clamp(min=1)


def logratios(b: Batch, *, averaged: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    rho_c, rho_r = b.pc - b.rc, b.pr - b.rr
    if averaged:
        rho_c, rho_r = rho_c / b.lc.double().clamp(min=1), rho_r / b.lr.double().clamp(min=1)
    return rho_c, rho_r


def margin(b: Batch, *, averaged: bool = False) -> torch.Tensor:
    rho_c, rho_r = logratios(b, averaged=averaged)
    return rho_c - rho_r


def mean(x: torch.Tensor) -> torch.Tensor:
    """Mean, 0 for an empty group (the library's convention for unpaired groups)."""
    return x.sum() / max(x.numel(), 1)


def nll_chosen(b: Batch) -> torch.Tensor:
    return -b.pc.sum() / b.lc.double().sum()


def reward_metrics(b: Batch, beta: float, *, averaged: bool, reference: bool, paired: bool):
    """TRL's metrics: rewards beta * (policy - reference), of sums or per-token averages, or
    beta * policy for reference-free losses; logps are always the summed policy log-probs."""
    chosen, rejected = averages(b) if averaged else (b.pc, b.pr)
    if reference:
        chosen, rejected = logratios(b, averaged=averaged)
    chosen, rejected = beta * chosen, beta * rejected
    metrics = {"rewards/chosen": mean(chosen), "rewards/rejected": mean(rejected)}
    if paired:
        metrics["rewards/accuracies"] = (chosen > rejected).double().mean()
        metrics["rewards/margins"] = (chosen - rejected).mean()
    else:
        metrics["rewards/margins"] = mean(chosen) - mean(rejected)
        metrics["count/chosen"] = torch.tensor(float(b.pc.numel()), dtype=F64)
        metrics["count/rejected"] = torch.tensor(float(b.pr.numel()), dtype=F64)
    metrics["logps/chosen"] = mean(b.pc)
    metrics["logps/rejected"] = mean(b.pr)
    return metrics


LossFormula = Callable[..., "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def f_sigmoid(b, beta, label_smoothing=0.0):
    z, eps = beta * margin(b), label_smoothing
    return ((1 - eps) * softplus(-z) + eps * softplus(z)).mean(), {}


def f_sigmoid_norm(b, beta):
    rho_c, rho_r = b.pc - b.rc, b.pr - b.rr  # TRL: summed log-ratios / completion lengths
    return softplus(-beta * (rho_c / b.lc.clamp(min=1) - rho_r / b.lr.clamp(min=1))).mean(), {}


def f_robust(b, beta, label_smoothing=0.0):
    z, eps = beta * margin(b), label_smoothing
    return (((1 - eps) * softplus(-z) - eps * softplus(z)) / (1 - 2 * eps)).mean(), {}


def f_hinge(b, beta):
    return torch.clamp(1 - beta * margin(b), min=0).mean(), {}


def f_ipo(b, beta):
    return ((margin(b, averaged=True) - 1 / (2 * beta)) ** 2).mean(), {}


def f_exo_pair(b, beta, label_smoothing=1e-3):
    z, eps = beta * margin(b), label_smoothing
    value = sigmoid(z) * (logsigmoid(z) - math.log(1 - eps)) + sigmoid(-z) * (
        logsigmoid(-z) - math.log(eps)
    )
    return value.mean(), {}


def f_nca_pair(b, beta):
    rho_c, rho_r = logratios(b)
    r_c, r_r = beta * rho_c, beta * rho_r
    return (softplus(-r_c) + 0.5 * softplus(r_c) + 0.5 * softplus(r_r)).mean(), {}


def f_bco_pair(b, beta, bco_state=None):
    rho_c, rho_r = logratios(b)
    rewards = beta * torch.cat([rho_c, rho_r])
    old_mean, old_count = (0.0, 0.0) if bco_state is None else (
        float(bco_state.mean), float(bco_state.count)
    )  # fmt: skip
    count = old_count + rewards.numel()
    delta = (old_mean * old_count + rewards.sum()) / count
    loss = (softplus(-(beta * rho_c - delta)) + softplus(beta * rho_r - delta)).mean()
    return loss, {"bco/reward_mean": delta, "bco/reward_count": torch.tensor(count, dtype=F64)}


def f_sppo_hard(b, beta):
    rho_c, rho_r = logratios(b)
    return ((rho_c - 1 / (2 * beta)) ** 2 + (rho_r + 1 / (2 * beta)) ** 2).mean(), {}


def _aot(delta, beta, eps):
    return ((1 - eps) * softplus(-beta * delta) + eps * softplus(beta * delta)).mean(), {}


def f_aot(b, beta, label_smoothing=0.0):
    delta = (b.pc - b.pr).sort().values - (b.rc - b.rr).sort().values
    return _aot(delta, beta, label_smoothing)


def f_aot_unpaired(b, beta, label_smoothing=0.0):
    rho_c, rho_r = logratios(b)
    return _aot(rho_c.sort().values - rho_r.sort().values, beta, label_smoothing)


def f_apo_zero(b, beta):
    rho_c, rho_r = logratios(b)
    return (1 - sigmoid(beta * rho_c) + sigmoid(beta * rho_r)).mean(), {}


def f_apo_down(b, beta):
    rho_c, rho_r = logratios(b)
    return (sigmoid(beta * rho_c) + 1 - sigmoid(beta * (rho_c - rho_r))).mean(), {}


def f_discopop(b, beta, tau=0.05):
    z = beta * margin(b)
    w = sigmoid(z / tau)
    return ((1 - w) * softplus(-z) + w * torch.exp(-z)).mean(), {}


def f_simpo(b, beta, gamma=0.5):
    avg_c, avg_r = averages(b)
    return softplus(-(beta * (avg_c - avg_r) - gamma)).mean(), {}


def f_orpo(b, beta):
    avg_c, avg_r = averages(b)
    log_odds = (avg_c - torch.log(1 - torch.exp(avg_c))) - (avg_r - torch.log(1 - torch.exp(avg_r)))
    ratio = logsigmoid(log_odds)
    nll = nll_chosen(b)
    metrics = {"nll_loss": nll, "log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean()}
    return nll - beta * ratio.mean(), metrics


def f_sft(b, beta):
    nll = nll_chosen(b)
    return nll, {"nll_loss": nll}


def f_kto(
    b,
    beta,
    kl=None,
    kl_policy_logps=None,
    kl_ref_logps=None,
    desirable_weight=1.0,
    undesirable_weight=1.0,
):
    z = kl if kl is not None else (kl_policy_logps - kl_ref_logps).mean()
    z = torch.clamp(torch.as_tensor(z, dtype=F64), min=0.0)
    rho_d, rho_u = logratios(b)
    desirable = desirable_weight * (1 - sigmoid(beta * (rho_d - z)))
    undesirable = undesirable_weight * (1 - sigmoid(beta * (z - rho_u)))
    return torch.cat([desirable, undesirable]).mean(), {"kl": z}


@dataclasses.dataclass(frozen=True)
class Case:
    params: dict = dataclasses.field(default_factory=dict)
    batch: str = "paired"
    zero: tuple[str, ...] = ()
    """Metrics that are 0 by definition in this case."""


@dataclasses.dataclass(frozen=True)
class Formula:
    loss: LossFormula
    """(batch, beta, **params) -> (loss, the loss's own metrics), float64."""
    averaged: bool
    """Rewards of per-token averages."""
    reference: bool
    """Rewards relative to the reference."""
    cases: tuple[Case, ...] = (Case(),)
    paired: bool = True


SMOOTHED = (Case(), Case({"label_smoothing": 0.2}))
FORMULAS: dict[str, Formula] = {
    "sigmoid": Formula(f_sigmoid, averaged=False, reference=True, cases=SMOOTHED),
    "sigmoid_norm": Formula(f_sigmoid_norm, averaged=False, reference=True),
    "robust": Formula(f_robust, averaged=False, reference=True, cases=SMOOTHED),
    "hinge": Formula(f_hinge, averaged=False, reference=True),
    "ipo": Formula(f_ipo, averaged=True, reference=True),
    "exo_pair": Formula(
        f_exo_pair, averaged=False, reference=True, cases=(Case(), Case({"label_smoothing": 0.1}))
    ),
    "nca_pair": Formula(f_nca_pair, averaged=False, reference=True),
    "bco_pair": Formula(
        f_bco_pair,
        averaged=False,
        reference=True,
        cases=(
            Case(),
            Case({"bco_state": RunningMean(mean=_t(0.2)[0], count=_t(10.0)[0])}),
        ),
    ),
    "sppo_hard": Formula(f_sppo_hard, averaged=False, reference=True),
    "aot": Formula(f_aot, averaged=False, reference=True, cases=SMOOTHED),
    "aot_unpaired": Formula(f_aot_unpaired, averaged=False, reference=True, cases=SMOOTHED),
    "apo_zero": Formula(f_apo_zero, averaged=False, reference=True),
    "apo_down": Formula(f_apo_down, averaged=False, reference=True),
    "discopop": Formula(
        f_discopop, averaged=False, reference=True, cases=(Case(), Case({"tau": 0.5}))
    ),
    "simpo": Formula(
        f_simpo, averaged=True, reference=False, cases=(Case(), Case({"gamma": 1.25}))
    ),
    "orpo": Formula(f_orpo, averaged=True, reference=False),
    "sft": Formula(f_sft, averaged=False, reference=False),
    "kto": Formula(
        f_kto,
        averaged=False,
        reference=True,
        paired=False,
        cases=(
            Case(
                {
                    "kl_policy_logps": _t(-10.0, -20.0, -5.0, -8.0),
                    "kl_ref_logps": _t(-11.0, -20.5, -5.25, -8.0),  # mean diff 0.6875
                    "desirable_weight": 1.5,
                    "undesirable_weight": 0.75,
                },
                batch="unpaired",
            ),
            Case({"kl": 0.625}, batch="unpaired"),
            Case({"kl": -0.5}, batch="unpaired", zero=("kl",)),  # clamped at 0
            Case(
                {"kl": 0.625},
                batch="desirable_only",
                zero=("rewards/rejected", "logps/rejected", "count/rejected"),
            ),
        ),
    ),
}


def expected_metrics(name: str, b: Batch, params: dict, beta: float = BETA):
    """(loss, {metric: value}) of loss `name` on `b`, all float64, from the formulas above."""
    formula = FORMULAS[name]
    loss, own = formula.loss(b, beta, **params)
    metrics = reward_metrics(
        b, beta, averaged=formula.averaged, reference=formula.reference, paired=formula.paired
    )
    metrics.update(own)
    metrics[f"loss/{name}"] = loss
    return loss, metrics


def assert_metrics(actual: dict, expected: dict, *, rtol: float, atol: float, what: str) -> None:
    assert set(actual) == set(expected), (
        f"{what}: metric names differ: only in the library {sorted(set(actual) - set(expected))},"
        f" only in the formulas {sorted(set(expected) - set(actual))}"
    )
    for key, value in expected.items():
        got = actual[key]
        assert got.dim() == 0 and not got.requires_grad, f"{what}: {key} is not a detached scalar"
        assert math.isclose(float(got), float(value), rel_tol=rtol, abs_tol=atol), (
            f"{what}: {key} = {float(got)!r}, formula {float(value)!r}"
        )


# ------------------------------------------------------------------------------------------------
# preference_loss


def test_every_registered_loss_has_a_formula():
    assert set(FORMULAS) == set(LOSSES)
    for name, formula in FORMULAS.items():
        spec = LOSSES[name]
        assert (spec.paired, spec.needs_reference, spec.length_normalized) == (
            formula.paired,
            formula.reference,
            formula.averaged,
        ), f"{name}: the registry's flags differ from what the formula table says"


def call(name: str, b: Batch, params: dict, beta: float = BETA, loss=None):
    return preference_loss(
        b.pc,
        b.pr,
        b.rc,
        b.rr,
        loss=loss or name,
        beta=beta,
        chosen_lengths=b.lc,
        rejected_lengths=b.lr,
        **params,
    )


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_metric_matches_its_formula(name):
    assert name in FORMULAS, f"loss {name!r} has no formula in FORMULAS: add one"
    for case in FORMULAS[name].cases:
        b = BATCHES[case.batch]
        loss, metrics = call(name, b, case.params)
        expected_loss, expected = expected_metrics(name, b, case.params)
        what = f"{name} {case.params} ({case.batch})"
        for key, value in expected.items():
            if key not in case.zero:
                assert abs(float(value)) > UNAMBIGUOUS, f"{what}: {key} = {float(value)} is ~0"
            else:
                assert float(value) == 0.0, f"{what}: {key} should be 0 by definition"
        assert loss.dtype == F64 and loss.requires_grad is False
        assert math.isclose(float(loss), float(expected_loss), rel_tol=1e-12, abs_tol=1e-12), (
            f"{what}: loss {float(loss)!r}, formula {float(expected_loss)!r}"
        )
        assert_metrics(metrics, expected, rtol=1e-12, atol=1e-12, what=what)


@pytest.mark.parametrize(
    ("components", "main"),
    [({"sigmoid": 1.0, "sft": 0.7}, "sigmoid"), ({"sft": 0.7, "sigmoid": 1.0}, "sft")],
    ids=["rpo", "rpo-sft-first"],
)
def test_rpo_combination_metrics(components, main):
    """RPO = {"sigmoid": 1, "sft": alpha}: the loss is the weighted sum, each component reports
    its unweighted value and own metrics, and the rewards follow the first component."""
    loss, metrics = call("", PAIRED, {}, loss=components)
    expected = {}
    total = 0.0
    for name, weight in components.items():
        value, own = expected_metrics(name, PAIRED, {})
        expected.update(own)
        total = total + weight * value
    expected.update(
        reward_metrics(
            PAIRED,
            BETA,
            averaged=FORMULAS[main].averaged,
            reference=FORMULAS[main].reference,
            paired=True,
        )
    )
    assert math.isclose(float(loss), float(total), rel_tol=1e-12)
    assert_metrics(metrics, expected, rtol=1e-12, atol=1e-12, what=str(components))


# ------------------------------------------------------------------------------------------------
# The packed and fused paths (fp32), against the same formulas

PAIRED_LOSSES = sorted(name for name, formula in FORMULAS.items() if formula.paired)
FP32_RTOL, FP32_ATOL = 2e-6, 2e-6
"""The packed path sums exact binary fractions: only the losses' fp32 arithmetic rounds."""
HEAD_RTOL, HEAD_ATOL = 1e-5, 1e-5
"""The fused path also runs the fp32 head (log-probs ~1e-6 relative from float64)."""


def _tokens_of(total: float, count: int) -> list[float]:
    """`count` log-probs (binary fractions, all negative) summing exactly to `total`."""
    base = math.floor(total / count * 2) / 2  # a multiple of 0.5 at or below the mean
    return [base] * (count - 1) + [total - base * (count - 1)]


def packed_layout(b: Batch, masked_per_sequence: int = 2):
    """Sequences in PackedBatch order (chosen p, rejected p, ...). Each holds its valid tokens
    and `masked_per_sequence` masked ones (value -1000, valid False) in front.

    Returns token_logps fp32 [M] (valid tokens sum exactly to b's log-probs), target_cu int32
    [2P + 1], valid bool [M].
    """
    values, valid, cu = [], [], [0]
    for p in range(b.pc.numel()):
        for total, count in ((b.pc[p], b.lc[p]), (b.pr[p], b.lr[p])):
            values += [-1000.0] * masked_per_sequence + _tokens_of(float(total), int(count))
            valid += [False] * masked_per_sequence + [True] * int(count)
            cu.append(len(values))
    return (
        torch.tensor(values, dtype=torch.float32),
        torch.tensor(cu, dtype=torch.int32),
        torch.tensor(valid),
    )


def _packed_cases():
    for name in PAIRED_LOSSES:
        for case in FORMULAS[name].cases:
            yield pytest.param(name, case, "torch", id=f"{name}-{case.params}-torch")
            if name in KERNEL_LOSSES:
                yield pytest.param(name, case, "triton", id=f"{name}-{case.params}-triton")


def test_kernel_losses_are_paired_losses_with_formulas():
    assert set(KERNEL_LOSSES) <= set(PAIRED_LOSSES)


@pytest.mark.parametrize(("name", "case", "impl"), list(_packed_cases()))
def test_packed_metrics_match_formulas(name, case, impl):
    token_logps, target_cu, valid = packed_layout(PAIRED)
    assert torch.equal(token_logps[valid].sum().double(), PAIRED.pc.sum() + PAIRED.pr.sum())
    loss, metrics = packed_preference_loss(
        token_logps,
        target_cu,
        PAIRED.rc.float(),
        PAIRED.rr.float(),
        loss=name,
        beta=BETA,
        valid=valid,
        impl=impl,
        **case.params,
    )
    expected_loss, expected = expected_metrics(name, PAIRED, case.params)
    what = f"packed {impl} {name} {case.params}"
    assert math.isclose(float(loss), float(expected_loss), rel_tol=FP32_RTOL, abs_tol=FP32_ATOL)
    assert_metrics(metrics, expected, rtol=FP32_RTOL, atol=FP32_ATOL, what=what)


def _fused_cases():
    for name in PAIRED_LOSSES:
        case = FORMULAS[name].cases[-1]
        yield pytest.param(name, case, "torch", id=f"{name}-torch")
        if name in KERNEL_LOSSES:
            yield pytest.param(name, case, "triton", id=f"{name}-triton")


@pytest.mark.parametrize(("name", "case", "impl"), list(_fused_cases()))
def test_fused_metrics_match_formulas(name, case, impl):
    """Hidden states -> loss. The expected values come from float64 full-logit sums of the same
    tokens, with reference log-probs chosen so the log-ratios are PAIRED's (unambiguous)."""
    _, target_cu, valid = packed_layout(PAIRED)
    rows, width, vocab = int(target_cu[-1]), 16, 40
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(rows, width, generator=g)
    weight = torch.randn(vocab, width, generator=g) / width**0.5
    targets = torch.randint(0, vocab, (rows,), generator=g).masked_fill(~valid, IGNORE)
    logp = (hidden.double() @ weight.double().T).log_softmax(-1)
    token_logp = logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1) * valid
    sums = torch.stack([token_logp[a:c].sum() for a, c in itertools.pairwise(target_cu.tolist())])
    rho_c, rho_r = logratios(PAIRED)
    b = dataclasses.replace(
        PAIRED, pc=sums[0::2], pr=sums[1::2], rc=sums[0::2] - rho_c, rr=sums[1::2] - rho_r
    )
    loss, metrics = fused_linear_preference_loss(
        hidden,
        weight,
        targets,
        target_cu,
        b.rc.float(),
        b.rr.float(),
        loss=name,
        beta=BETA,
        ignore_index=IGNORE,
        impl=impl,
        **case.params,
    )
    expected_loss, expected = expected_metrics(name, b, case.params)
    what = f"fused {impl} {name} {case.params}"
    assert math.isclose(float(loss), float(expected_loss), rel_tol=HEAD_RTOL, abs_tol=HEAD_ATOL)
    assert_metrics(metrics, expected, rtol=HEAD_RTOL, atol=HEAD_ATOL, what=what)
