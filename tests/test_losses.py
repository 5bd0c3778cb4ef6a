"""fastdpo.losses: every loss against its formula written out here in float64, gradients,
known values, TRL's metric semantics, the registry, and error messages."""

from __future__ import annotations

import math

import pytest
import torch

from fastdpo import losses
from fastdpo.losses import LOSSES, RunningMean, preference_loss, register_loss

F64 = torch.float64
BETA = 0.3


def _sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


def _logsig(x):
    return torch.log(_sig(x))


def make_batch(num_pairs: int = 6, *, requires_grad: bool = False, seed: int = 0):
    """Random summed log-probs (negative, typical magnitudes) and completion lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths_c = torch.randint(1, 30, (num_pairs,), generator=g)
    lengths_r = torch.randint(1, 30, (num_pairs,), generator=g)
    per_token = lambda n: -(0.2 + 2.0 * torch.rand(num_pairs, generator=g, dtype=F64)) * n  # noqa: E731
    pc, pr = per_token(lengths_c), per_token(lengths_r)
    rc = pc + torch.randn(num_pairs, generator=g, dtype=F64) * 3
    rr = pr + torch.randn(num_pairs, generator=g, dtype=F64) * 3
    if requires_grad:
        pc.requires_grad_(True)
        pr.requires_grad_(True)
    return dict(pc=pc, pr=pr, rc=rc, rr=rr, lc=lengths_c, lr=lengths_r)


# ------------------------------------------------------------------------------------------------
# Reference formulas, float64, written from the papers (per pair, then the batch mean)


def ref_loss(name: str, b: dict, beta: float, **p) -> torch.Tensor:
    pc, pr, rc, rr = b["pc"], b["pr"], b["rc"], b["rr"]
    lc, lr = b["lc"].to(F64).clamp(min=1), b["lr"].to(F64).clamp(min=1)
    rho_c, rho_r = pc - rc, pr - rr
    m = rho_c - rho_r
    z = beta * m
    eps = p.get("label_smoothing", 0.0)
    if name == "sigmoid":
        return (-(1 - eps) * _logsig(z) - eps * _logsig(-z)).mean()
    if name == "sigmoid_norm":
        return -_logsig(beta * (rho_c / lc - rho_r / lr)).mean()
    if name == "robust":
        return ((-(1 - eps) * _logsig(z) + eps * _logsig(-z)) / (1 - 2 * eps)).mean()
    if name == "hinge":
        return torch.clamp(1 - z, min=0).mean()
    if name == "ipo":
        m_avg = (pc / lc - pr / lr) - (rc / lc - rr / lr)
        return ((m_avg - 1 / (2 * beta)) ** 2).mean()
    if name == "exo_pair":
        eps = p.get("label_smoothing", 1e-3)
        p_w, p_l = _sig(z), _sig(-z)
        return (p_w * torch.log(p_w / (1 - eps)) + p_l * torch.log(p_l / eps)).mean()
    if name == "nca_pair":
        r_c, r_r = beta * rho_c, beta * rho_r
        return (-_logsig(r_c) - 0.5 * _logsig(-r_c) - 0.5 * _logsig(-r_r)).mean()
    if name == "bco_pair":
        delta = beta * torch.cat([rho_c, rho_r]).mean()  # first step: mean of this batch
        return (-_logsig(beta * rho_c - delta) - _logsig(-(beta * rho_r - delta))).mean()
    if name == "sppo_hard":
        return ((rho_c - 1 / (2 * beta)) ** 2 + (rho_r + 1 / (2 * beta)) ** 2).mean()
    if name in ("aot", "aot_unpaired"):
        if name == "aot":
            a, c = sorted((pc - pr).tolist()), sorted((rc - rr).tolist())
        else:
            a, c = sorted(rho_c.tolist()), sorted(rho_r.tolist())
        d = beta * (torch.tensor(a, dtype=F64) - torch.tensor(c, dtype=F64))
        return (-(1 - eps) * _logsig(d) - eps * _logsig(-d)).mean()
    if name == "apo_zero":
        return (1 - _sig(beta * rho_c) + _sig(beta * rho_r)).mean()
    if name == "apo_down":
        return (_sig(beta * rho_c) + 1 - _sig(beta * (rho_c - rho_r))).mean()
    if name == "discopop":
        tau = p.get("tau", 0.05)
        w = _sig(z / tau)
        return ((1 - w) * -_logsig(z) + w * torch.exp(-z)).mean()
    if name == "simpo":
        gamma = p.get("gamma", 0.5)
        return (-_logsig(beta * (pc / lc - pr / lr) - gamma)).mean()
    if name == "orpo":
        ac, ar = pc / lc, pr / lr
        odds = lambda a: torch.log(torch.exp(a) / (1 - torch.exp(a)))  # noqa: E731
        nll = -pc.sum() / b["lc"].sum()
        return nll - beta * _logsig(odds(ac) - odds(ar)).mean()
    if name == "sft":
        return -pc.sum() / b["lc"].sum()
    raise KeyError(name)


PAIRED_CASES = [
    ("sigmoid", {}),
    ("sigmoid", {"label_smoothing": 0.2}),
    ("sigmoid_norm", {}),
    ("robust", {"label_smoothing": 0.1}),
    ("hinge", {}),
    ("ipo", {}),
    ("exo_pair", {}),
    ("exo_pair", {"label_smoothing": 0.05}),
    ("nca_pair", {}),
    ("bco_pair", {}),
    ("sppo_hard", {}),
    ("aot", {}),
    ("aot", {"label_smoothing": 0.1}),
    ("aot_unpaired", {}),
    ("apo_zero", {}),
    ("apo_down", {}),
    ("discopop", {}),
    ("discopop", {"tau": 0.5}),
    ("simpo", {}),
    ("simpo", {"gamma": 1.3}),
    ("orpo", {}),
    ("sft", {}),
]


def _call(name, b, beta=BETA, **params):
    return preference_loss(
        b["pc"],
        b["pr"],
        b["rc"],
        b["rr"],
        loss=name,
        beta=beta,
        chosen_lengths=b["lc"],
        rejected_lengths=b["lr"],
        **params,
    )


def test_every_registered_builtin_is_covered():
    covered = {name for name, _ in PAIRED_CASES} | {"kto"}
    assert covered == set(LOSSES)


@pytest.mark.parametrize(("name", "params"), PAIRED_CASES)
def test_loss_matches_float64_formula(name, params):
    b = make_batch()
    # The hinge is flat beyond its margin: a small beta keeps every pair on the sloped side.
    beta = 0.01 if name == "hinge" else BETA
    loss, metrics = _call(name, b, beta=beta, **params)
    expected = ref_loss(name, b, beta, **params)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(metrics[f"loss/{name}"], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("name", "params"), PAIRED_CASES)
def test_loss_gradcheck_float64(name, params):
    b = make_batch(num_pairs=4, requires_grad=True, seed=1)
    beta = 0.01 if name == "hinge" else BETA
    if name == "bco_pair":
        # delta is detached by design, but the batch moves it, which finite differences would
        # see: a state holding ~1e15 earlier rewards pins it.
        big = torch.tensor(1e15, dtype=F64)
        params = {"bco_state": RunningMean(mean=torch.tensor(0.3, dtype=F64), count=big)}

    def fn(pc, pr):
        return _call(name, dict(b, pc=pc, pr=pr), beta=beta, **params)[0]

    assert torch.autograd.gradcheck(fn, (b["pc"], b["pr"]))


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    b = make_batch()
    loss, metrics = preference_loss(b["pc"], b["pr"], b["pc"].clone(), b["pr"].clone())
    torch.testing.assert_close(loss, torch.tensor(math.log(2.0), dtype=F64))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[key].item() == 0.0, key


def test_robust_with_zero_smoothing_is_sigmoid():
    b = make_batch()
    torch.testing.assert_close(_call("robust", b)[0], _call("sigmoid", b)[0], rtol=0, atol=0)


def test_simpo_gamma_zero_and_length_normalization():
    b = make_batch()
    loss, _ = _call("simpo", b, gamma=0.0)
    expected = -_logsig(BETA * (b["pc"] / b["lc"] - b["pr"] / b["lr"])).mean()
    torch.testing.assert_close(loss, expected)
    # Doubling a completion (twice the tokens, twice the summed log-prob) keeps its average.
    doubled = dict(b, pc=2 * b["pc"], lc=2 * b["lc"])
    torch.testing.assert_close(_call("simpo", doubled, gamma=0.0)[0], loss)
    # ...which the sum-based DPO loss does not.
    assert not torch.allclose(_call("sigmoid", doubled)[0], _call("sigmoid", b)[0])


def test_aot_with_one_pair_is_sigmoid():
    b = make_batch(num_pairs=1)
    torch.testing.assert_close(_call("aot", b)[0], _call("sigmoid", b)[0])
    torch.testing.assert_close(_call("aot_unpaired", b)[0], _call("sigmoid", b)[0])


def test_combination_weights_add_up():
    b = make_batch()
    loss, metrics = _call({"sigmoid": 1.0, "sft": 0.25, "hinge": 2.0}, b)
    parts = {name: _call(name, b)[0] for name in ("sigmoid", "sft", "hinge")}
    expected = parts["sigmoid"] + 0.25 * parts["sft"] + 2.0 * parts["hinge"]
    torch.testing.assert_close(loss, expected)
    for name, value in parts.items():
        torch.testing.assert_close(metrics[f"loss/{name}"], value)
    torch.testing.assert_close(metrics["nll_loss"], parts["sft"])
    # The first entry defines the rewards: sigmoid's, not sft's (which has no reference term).
    torch.testing.assert_close(metrics["rewards/chosen"], _call("sigmoid", b)[1]["rewards/chosen"])


def test_parameters_route_to_the_losses_that_take_them():
    b = make_batch()
    loss, _ = _call({"robust": 1.0, "simpo": 0.5}, b, label_smoothing=0.2, gamma=0.7)
    expected = _call("robust", b, label_smoothing=0.2)[0] + 0.5 * _call("simpo", b, gamma=0.7)[0]
    torch.testing.assert_close(loss, expected)


# ------------------------------------------------------------------------------------------------
# Metrics


def test_metrics_follow_trl_definitions():
    b = make_batch(requires_grad=True)
    _, metrics = _call("sigmoid", b)
    with torch.no_grad():
        chosen = BETA * (b["pc"] - b["rc"])
        rejected = BETA * (b["pr"] - b["rr"])
        expected = {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/accuracies": (chosen > rejected).to(F64).mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "logps/chosen": b["pc"].mean(),
            "logps/rejected": b["pr"].mean(),
        }
    for key, value in expected.items():
        torch.testing.assert_close(metrics[key], value, msg=key)
    for key, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, key
        assert not value.requires_grad, key


def test_metrics_of_length_normalized_and_reference_free_losses():
    b = make_batch()
    _, ipo_metrics = _call("ipo", b)
    torch.testing.assert_close(
        ipo_metrics["rewards/chosen"], (BETA * (b["pc"] - b["rc"]) / b["lc"]).mean()
    )
    _, simpo_metrics = _call("simpo", b)
    torch.testing.assert_close(simpo_metrics["rewards/rejected"], (BETA * b["pr"] / b["lr"]).mean())
    # logps/* stay summed over tokens whatever the loss.
    torch.testing.assert_close(simpo_metrics["logps/chosen"], b["pc"].mean())


def test_orpo_metrics_and_reference_free_call():
    b = make_batch()
    loss, metrics = preference_loss(
        b["pc"], b["pr"], loss="orpo", beta=BETA, chosen_lengths=b["lc"], rejected_lengths=b["lr"]
    )
    torch.testing.assert_close(loss, ref_loss("orpo", b, BETA))
    torch.testing.assert_close(metrics["nll_loss"], -b["pc"].sum() / b["lc"].sum())
    assert {"log_odds_ratio", "log_odds_chosen"} <= set(metrics)


def test_empty_completion_is_finite():
    b = make_batch()
    b["lc"][0] = 0
    b["pc"][0] = 0.0
    for name in ("ipo", "simpo", "orpo", "sft"):
        loss, metrics = _call(name, b)
        assert torch.isfinite(loss), name
        assert all(torch.isfinite(v) for v in metrics.values()), name


# ------------------------------------------------------------------------------------------------
# Stateful and unpaired losses


def test_bco_running_mean_is_explicit_state():
    b1, b2 = make_batch(seed=3), make_batch(num_pairs=4, seed=4)
    _, m1 = _call("bco_pair", b1)
    state = RunningMean.from_metrics(m1)
    loss2, m2 = _call("bco_pair", b2, bco_state=state)
    rewards = [BETA * torch.cat([b["pc"] - b["rc"], b["pr"] - b["rr"]]) for b in (b1, b2)]
    all_rewards = torch.cat(rewards)
    torch.testing.assert_close(m2["bco/reward_mean"], all_rewards.mean())
    assert m2["bco/reward_count"].item() == all_rewards.numel()
    delta = m2["bco/reward_mean"].to(F64)
    rho_c, rho_r = b2["pc"] - b2["rc"], b2["pr"] - b2["rr"]
    expected = (-_logsig(BETA * rho_c - delta) - _logsig(-(BETA * rho_r - delta))).mean()
    torch.testing.assert_close(loss2, expected)


def _kto_reference(pd, pu, rd, ru, z, beta, wd=1.0, wu=1.0):
    z = max(z, 0.0)
    desirable = wd * (1 - _sig(beta * ((pd - rd) - z)))
    undesirable = wu * (1 - _sig(beta * (z - (pu - ru))))
    return torch.cat([desirable, undesirable]).mean()


def test_kto_unpaired_with_batch_kl_estimate():
    g = torch.Generator().manual_seed(5)
    pd, rd = (
        -10 * torch.rand(5, generator=g, dtype=F64),
        -10 * torch.rand(5, generator=g, dtype=F64),
    )
    pu, ru = (
        -10 * torch.rand(3, generator=g, dtype=F64),
        -10 * torch.rand(3, generator=g, dtype=F64),
    )
    kl_policy = (-10 * torch.rand(4, generator=g, dtype=F64)).requires_grad_(True)
    kl_ref = kl_policy.detach() - 0.7  # mean KL 0.7
    pd.requires_grad_(True)
    loss, metrics = preference_loss(
        pd,
        pu,
        rd,
        ru,
        loss="kto",
        beta=BETA,
        kl_policy_logps=kl_policy,
        kl_ref_logps=kl_ref,
        desirable_weight=1.5,
        undesirable_weight=0.5,
    )
    expected = _kto_reference(pd, pu, rd, ru, 0.7, BETA, 1.5, 0.5)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["kl"], torch.tensor(0.7, dtype=F64))
    assert metrics["count/chosen"].item() == 5 and metrics["count/rejected"].item() == 3
    assert "rewards/accuracies" not in metrics
    loss.backward()
    assert kl_policy.grad is None  # the reference point is detached
    # A negative estimate is clamped at zero; kl= takes a precomputed value.
    loss_neg, m_neg = preference_loss(pd, pu, rd, ru, loss="kto", beta=BETA, kl=-1.0)
    torch.testing.assert_close(loss_neg, _kto_reference(pd, pu, rd, ru, 0.0, BETA))
    assert m_neg["kl"].item() == 0.0
    # An empty group is fine.
    empty = torch.zeros(0, dtype=F64)
    loss_d, m_d = preference_loss(pd, empty, rd, empty, loss="kto", beta=BETA, kl=0.2)
    torch.testing.assert_close(loss_d, _kto_reference(pd, empty, rd, empty, 0.2, BETA))
    assert m_d["rewards/rejected"].item() == 0.0


def test_kto_gradcheck_float64():
    g = torch.Generator().manual_seed(6)
    pd = (-5 * torch.rand(4, generator=g, dtype=F64)).requires_grad_(True)
    pu = (-5 * torch.rand(3, generator=g, dtype=F64)).requires_grad_(True)
    rd, ru = -5 * torch.rand(4, generator=g, dtype=F64), -5 * torch.rand(3, generator=g, dtype=F64)

    def fn(a, b):
        return preference_loss(a, b, rd, ru, loss="kto", beta=BETA, kl=0.3)[0]

    assert torch.autograd.gradcheck(fn, (pd, pu))


# ------------------------------------------------------------------------------------------------
# Registry


@pytest.fixture
def scratch_registry():
    saved = dict(LOSSES)
    yield
    LOSSES.clear()
    LOSSES.update(saved)


def test_register_own_loss(scratch_registry):
    @register_loss("shifted_dpo")
    def shifted_dpo(x: losses.LossInputs, *, shift: float = 0.0) -> torch.Tensor:
        return -_logsig(x.beta * x.margin() - shift).mean()

    b = make_batch()
    loss, metrics = _call("shifted_dpo", b, shift=0.0)
    torch.testing.assert_close(loss, _call("sigmoid", b)[0])
    assert "loss/shifted_dpo" in metrics
    assert LOSSES["shifted_dpo"].params == ("shift",)
    with pytest.raises(ValueError, match="already registered"):
        register_loss("shifted_dpo")(shifted_dpo)


# ------------------------------------------------------------------------------------------------
# Errors


def test_unknown_loss_lists_known_ones():
    b = make_batch()
    with pytest.raises(ValueError, match=r"unknown loss 'dop'; known losses: .*sigmoid"):
        _call("dop", b)
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        _call({"sigmoid": 1.0, "nope": 1.0}, b)


@pytest.mark.parametrize("eps", [-0.1, 0.5, 0.7])
@pytest.mark.parametrize("name", ["robust", "sigmoid", "aot"])
def test_label_smoothing_outside_range(name, eps):
    with pytest.raises(ValueError, match=rf"{name}.*label_smoothing must be in \[0, 0.5\)"):
        _call(name, make_batch(), label_smoothing=eps)


def test_exo_needs_positive_smoothing():
    with pytest.raises(ValueError, match=r"exo_pair.*\(0, 0.5\)"):
        _call("exo_pair", make_batch(), label_smoothing=0.0)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "kto", "bco_pair"])
def test_missing_reference(name):
    b = make_batch()
    with pytest.raises(ValueError, match=rf"loss '{name}' needs reference log-probs"):
        preference_loss(
            b["pc"], b["pr"], loss=name, chosen_lengths=b["lc"], rejected_lengths=b["lr"]
        )


def test_missing_lengths():
    b = make_batch()
    with pytest.raises(ValueError, match="loss 'ipo' needs completion token counts"):
        preference_loss(b["pc"], b["pr"], b["rc"], b["rr"], loss="ipo")


def test_mismatched_shapes():
    b = make_batch()
    with pytest.raises(ValueError, match="one value per pair"):
        preference_loss(b["pc"], b["pr"][:-1], b["rc"], b["rr"])
    with pytest.raises(ValueError, match=r"ref_chosen has shape \(5,\), expected \(6,\)"):
        preference_loss(b["pc"], b["pr"], b["rc"][:-1], b["rr"])
    with pytest.raises(ValueError, match="must be 1-D"):
        preference_loss(b["pc"][:, None], b["pr"][:, None], b["rc"], b["rr"])


def test_other_bad_arguments():
    b = make_batch()
    with pytest.raises(TypeError, match=r"unknown loss parameter 'gama'.*'simpo': \['gamma'\]"):
        _call("simpo", b, gama=1.0)
    with pytest.raises(ValueError, match="beta must be a positive"):
        _call("sigmoid", b, beta=0.0)
    with pytest.raises(ValueError, match="mapping of losses to weights is empty"):
        _call({}, b)
    with pytest.raises(ValueError, match="loss 'kto' needs its KL reference point"):
        _call("kto", b)
    with pytest.raises(ValueError, match="cannot combine paired losses with unpaired"):
        _call({"sigmoid": 1.0, "kto": 1.0}, b, kl=0.0)
    with pytest.raises(ValueError, match="tau must be a positive"):
        _call("discopop", b, tau=0.0)


# ------------------------------------------------------------------------------------------------
# Input checks and edge values (survivors of `make mutate`, see tests/MUTATION.md)


def _bad_call(change: dict) -> dict:
    """Arguments of a valid sigmoid call with `change` applied (None removes an argument)."""
    b = make_batch()
    args = dict(
        policy_chosen=b["pc"],
        policy_rejected=b["pr"],
        ref_chosen=b["rc"],
        ref_rejected=b["rr"],
        loss="sigmoid",
        beta=BETA,
        chosen_lengths=b["lc"],
        rejected_lengths=b["lr"],
    )
    args.update(change)
    return {k: v for k, v in args.items() if v is not None}


_P6 = torch.zeros(6, dtype=F64)
_BAD_INPUTS = {
    "chosen_not_a_tensor": (
        {"policy_chosen": [0.0] * 6},
        TypeError,
        "policy_chosen must be a tensor, got list",
    ),
    "rejected_not_a_tensor": (
        {"policy_rejected": (0.0,) * 6},
        TypeError,
        "policy_rejected must be a tensor, got tuple",
    ),
    "integer_logps": (
        {"policy_chosen": torch.zeros(6, dtype=torch.long), "policy_rejected": torch.zeros(6)},
        TypeError,
        "policy_chosen and policy_rejected must share one floating dtype, got torch.int64 and "
        "torch.float32",
    ),
    "integer_logps_both": (
        {"policy_chosen": torch.zeros(6, dtype=torch.long), "policy_rejected": _P6.long()},
        TypeError,
        "policy_chosen and policy_rejected must share one floating dtype, got torch.int64 and "
        "torch.int64",
    ),
    "rejected_on_another_device": (
        {"policy_rejected": _P6.to("meta")},
        ValueError,
        "policy_chosen is on cpu, policy_rejected on meta: move them to one device",
    ),
    "no_pairs": (
        {"policy_chosen": _P6[:0], "policy_rejected": _P6[:0], "ref_chosen": _P6[:0]}
        | {"ref_rejected": _P6[:0], "chosen_lengths": None, "rejected_lengths": None},
        ValueError,
        r"the batch has no pairs \(policy_chosen is empty\)",
    ),
    "no_completions_unpaired": (
        {"policy_chosen": _P6[:0], "policy_rejected": _P6[:0], "ref_chosen": _P6[:0]}
        | {"ref_rejected": _P6[:0], "loss": "kto", "kl": 0.0}
        | {"chosen_lengths": None, "rejected_lengths": None},
        ValueError,
        r"the batch has no completions \(policy_chosen and policy_rejected empty\)",
    ),
    "one_reference_missing": (
        {"ref_rejected": None},
        ValueError,
        r"loss 'sigmoid' needs reference log-probs: pass ref_chosen and ref_rejected \(e\.g\. "
        r"from fastdpo\.ReferenceCache\), or pick a reference-free loss \(simpo, orpo, sft\)",
    ),
    "one_reference_given_to_a_reference_free_loss": (
        {"ref_rejected": None, "loss": "simpo"},
        ValueError,
        "pass both ref_chosen and ref_rejected, or neither",
    ),
    "reference_rejected_shape": (
        {"ref_rejected": _P6[:5]},
        ValueError,
        r"ref_rejected has shape \(5,\), expected \(6,\) \(one value per completion, like the "
        r"policy log-probs\)",
    ),
    "reference_rejected_device": (
        {"ref_rejected": _P6.to("meta")},
        ValueError,
        "ref_rejected is on meta, the policy log-probs on cpu",
    ),
    "lengths_missing": (
        {"rejected_lengths": None, "loss": "ipo"},
        ValueError,
        r"loss 'ipo' needs completion token counts: pass chosen_lengths and rejected_lengths "
        r"\(\[P\] each\)",
    ),
    "rejected_lengths_shape": (
        {"rejected_lengths": torch.ones(5, dtype=torch.long)},
        ValueError,
        r"rejected_lengths has shape \(5,\), expected \(6,\)",
    ),
    "chosen_lengths_shape": (
        {"chosen_lengths": torch.ones(4, dtype=torch.long)},
        ValueError,
        r"chosen_lengths has shape \(4,\), expected \(6,\)",
    ),
    "beta_string": ({"beta": "0.1"}, TypeError, "beta must be a number, got '0.1'"),
    "beta_bool": ({"beta": True}, TypeError, "beta must be a number, got True"),
    "weight_string": (
        {"loss": {"sigmoid": "1"}},
        TypeError,
        "loss 'sigmoid': weight must be a number, got '1'",
    ),
    "weight_nan": (
        {"loss": {"sigmoid": math.nan}},
        ValueError,
        "loss 'sigmoid': weight must be finite, got nan",
    ),
    "no_losses": ({"loss": {}}, ValueError, "loss: the mapping of losses to weights is empty"),
    "loss_of_another_type": (
        {"loss": 3},
        TypeError,
        r"loss must be a loss name or a mapping \{name: weight\}, got int",
    ),
    "paired_with_unpaired": (
        {"loss": {"sigmoid": 1.0, "kto": 1.0}},
        ValueError,
        r"loss: cannot combine paired losses with unpaired ones \(kto\)",
    ),
    "gamma_nan": (
        {"loss": "simpo", "gamma": math.nan},
        ValueError,
        "loss 'simpo': gamma must be a finite number, got nan",
    ),
    "exo_smoothing_zero": (
        {"loss": "exo_pair", "label_smoothing": 0.0},
        ValueError,
        r"loss 'exo_pair': label_smoothing must be in \(0, 0\.5\), got 0\.0",
    ),
}


@pytest.mark.parametrize("case", list(_BAD_INPUTS))
def test_bad_inputs_are_errors_that_name_them(case):
    change, error, message = _BAD_INPUTS[case]
    args = _bad_call(change)
    with pytest.raises(error, match=f"^{message}"):
        preference_loss(args.pop("policy_chosen"), args.pop("policy_rejected"), **args)


def test_unknown_loss_lists_every_known_loss():
    with pytest.raises(ValueError) as info:
        preference_loss(torch.zeros(2), torch.zeros(2), loss="nope")
    assert str(info.value).endswith(f"known losses: {', '.join(sorted(LOSSES))}")


def test_register_loss_defaults_and_checks(scratch_registry):
    def plain(x: losses.LossInputs) -> torch.Tensor:
        return x.margin().mean()

    register_loss("plain")(plain)
    register_loss("averaged", length_normalized=True)(plain)
    spec, averaged = LOSSES["plain"], LOSSES["averaged"]
    assert (spec.needs_reference, spec.needs_lengths, spec.length_normalized, spec.paired) == (
        True,
        False,
        False,
        True,
    )
    assert averaged.length_normalized and averaged.needs_lengths  # averages need the counts
    for name in ("", 3):
        with pytest.raises(
            ValueError, match=f"a loss name must be a non-empty string, got {name!r}"
        ):
            register_loss(name)
    with pytest.raises(
        ValueError, match=r"'plain' is already registered; pick another name or pass replace=True$"
    ):
        register_loss("plain")(plain)


def test_custom_losses_that_read_what_was_not_given(scratch_registry):
    """A loss registered as reference-free (or without lengths) that reads them anyway gets an
    error naming what is missing, not a TypeError from None."""

    @register_loss("reads_reference", needs_reference=False)
    def reads_reference(x: losses.LossInputs) -> torch.Tensor:
        return x.reference()[0].mean()

    @register_loss("reads_lengths", needs_reference=False)
    def reads_lengths(x: losses.LossInputs) -> torch.Tensor:
        return x.policy(normalized=True)[0].mean()

    b = make_batch()
    with pytest.raises(
        ValueError, match=r"^this loss needs reference log-probs \(ref_chosen, ref_rejected\)$"
    ):
        preference_loss(b["pc"], b["pr"], loss="reads_reference")
    with pytest.raises(
        ValueError, match=r"^per-token averages need chosen_lengths and rejected_lengths$"
    ):
        preference_loss(b["pc"], b["pr"], loss="reads_lengths")


def test_default_beta_is_a_tenth():
    b = make_batch()
    default, _ = preference_loss(b["pc"], b["pr"], b["rc"], b["rr"])
    assert torch.equal(default, preference_loss(b["pc"], b["pr"], b["rc"], b["rr"], beta=0.1)[0])
    assert not torch.equal(
        default, preference_loss(b["pc"], b["pr"], b["rc"], b["rr"], beta=0.2)[0]
    )


def test_reference_and_lengths_take_the_policy_dtype():
    """fp32 policy, fp64 reference: the loss is computed in fp32, as if the reference had been
    cast first."""
    b = make_batch()
    pc, pr = b["pc"].float(), b["pr"].float()
    loss, _ = preference_loss(
        pc, pr, b["rc"], b["rr"], loss="ipo", chosen_lengths=b["lc"], rejected_lengths=b["lr"]
    )
    cast, _ = preference_loss(
        pc,
        pr,
        b["rc"].float(),
        b["rr"].float(),
        loss="ipo",
        chosen_lengths=b["lc"].float(),
        rejected_lengths=b["lr"].float(),
    )
    assert loss.dtype == torch.float32 and torch.equal(loss, cast)


def test_means_over_one_element():
    """Batch means over a single value are that value (KTO groups of one, ORPO's NLL over one
    token)."""
    pd, pu, rd, ru = (torch.tensor([v], dtype=F64) for v in (-2.0, -3.0, -2.5, -1.0))
    _, metrics = preference_loss(pd, pu, rd, ru, loss="kto", beta=BETA, kl=0.0)
    torch.testing.assert_close(metrics["rewards/chosen"], BETA * (pd - rd)[0], rtol=0, atol=0)
    torch.testing.assert_close(metrics["rewards/rejected"], BETA * (pu - ru)[0], rtol=0, atol=0)
    assert metrics["count/chosen"].item() == 1 and metrics["count/rejected"].item() == 1
    one = torch.ones(1, dtype=torch.long)
    _, metrics = preference_loss(
        pd, pu, loss="orpo", beta=BETA, chosen_lengths=one, rejected_lengths=one
    )
    assert metrics["nll_loss"].item() == 2.0


def test_running_mean_is_float64_and_exact_from_one_value():
    state = RunningMean.zero()
    assert state.mean.dtype == torch.float64 and state.count.dtype == torch.float64
    after = state.update(torch.tensor([0.1], dtype=torch.float32))
    assert after.mean.dtype == torch.float64
    assert (
        after.mean.item() == float(torch.tensor(0.1, dtype=torch.float32))
        and after.count.item() == 1
    )


def test_log1mexp_is_accurate_in_float32_at_both_ends():
    """log(1 - e^x) near x = 0 (a completion the policy is sure of: ORPO's odds) and far below."""
    x = torch.tensor([-1e-6, -1e-4, -0.01, -0.5, -0.7, -1.0, -5.0, -30.0], dtype=torch.float32)
    truth = torch.log(-torch.expm1(x.double()))
    torch.testing.assert_close(losses._log1mexp(x).double(), truth, rtol=2e-6, atol=1e-12)


def test_running_mean_sums_in_float64():
    """fp32 rewards whose fp32 sum loses the small one: the state sums in float64."""
    after = RunningMean.zero().update(torch.tensor([1e8, 1.0, -1e8], dtype=torch.float32))
    assert after.mean.item() == 1 / 3 and after.count.item() == 3


def test_loss_inputs_built_by_hand_with_one_side_missing():
    """LossInputs is public: one reference (or length) tensor without the other is an error."""
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        losses.LossInputs(policy_chosen=x, policy_rejected=x, ref_chosen=x).reference()
    inputs = losses.LossInputs(policy_chosen=x, policy_rejected=x, rejected_lengths=x)
    with pytest.raises(ValueError, match="per-token averages need chosen_lengths"):
        inputs.policy(normalized=True)


def test_mixing_names_every_unpaired_loss(scratch_registry):
    register_loss("kto_copy", paired=False)(LOSSES["kto"].fn)
    with pytest.raises(ValueError, match=r"unpaired ones \(kto, kto_copy\)$"):
        preference_loss(
            torch.zeros(2), torch.zeros(2), loss={"sigmoid": 1, "kto": 1, "kto_copy": 1}
        )
