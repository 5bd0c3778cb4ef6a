"""fused_linear_preference_loss: hidden states -> loss against a float64 reference that builds
the full logits, for both implementations (Triton interpreted on the CPU, tiny shapes)."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastdpo import fused_linear_preference_loss

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
F64 = torch.float64
IGNORE = -100


def make_case(*, hidden_size=24, vocab=37, seed=0, bias=False):
    """3 pairs whose completions have 1, 0, 4, 5, 3, 7 tokens; a few targets ignored, and the
    5-token sequence ignored entirely (empty after masking)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 0, 4, 5, 3, 7]
    segments = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    num_tokens = sum(lengths)
    targets = torch.randint(0, vocab, (num_tokens,), generator=g)
    targets[segments[3] : segments[4]] = IGNORE
    targets[num_tokens - 2] = IGNORE
    case = dict(
        hidden=torch.randn(num_tokens, hidden_size, generator=g),
        weight=torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5,
        bias=torch.randn(vocab, generator=g) * 0.1 if bias else None,
        targets=targets,
        segments=segments,
        ref_chosen=-20 * torch.rand(3, generator=g),
        ref_rejected=-20 * torch.rand(3, generator=g),
    )
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def reference(case, *, loss, beta, softcap=None, temperature=1.0, gamma=0.5):
    """Loss and chosen reward metric from full float64 logits and the papers' formulas."""
    hidden, weight = case["hidden"].double(), case["weight"].double()
    logits = hidden @ weight.T
    if case["bias"] is not None:
        logits = logits + case["bias"].double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    targets = case["targets"]
    valid = targets != IGNORE
    token_logps = logp_all.gather(1, targets.clamp(min=0)[:, None]).squeeze(1) * valid
    cu = case["segments"].tolist()
    sums = torch.stack([token_logps[a:b].sum() for a, b in itertools.pairwise(cu)])
    counts = torch.tensor([int(valid[a:b].sum()) for a, b in itertools.pairwise(cu)], dtype=F64)
    counts = counts.to(sums.device).clamp(min=1)
    ref_c, ref_r = case["ref_chosen"].double(), case["ref_rejected"].double()
    if loss == "sigmoid":
        rho_c, rho_r = sums[0::2] - ref_c, sums[1::2] - ref_r
        value = -torch.log(torch.sigmoid(beta * (rho_c - rho_r))).mean()
    elif loss == "ipo":
        rho_c = (sums[0::2] - ref_c) / counts[0::2]
        rho_r = (sums[1::2] - ref_r) / counts[1::2]
        value = ((rho_c - rho_r - 1 / (2 * beta)) ** 2).mean()
    elif loss == "simpo":
        rho_c, rho_r = sums[0::2] / counts[0::2], sums[1::2] / counts[1::2]
        value = -torch.log(torch.sigmoid(beta * (rho_c - rho_r) - gamma)).mean()
    elif loss == "nca_pair":
        r_c, r_r = beta * (sums[0::2] - ref_c), beta * (sums[1::2] - ref_r)
        logsig = torch.nn.functional.logsigmoid
        value = (-logsig(r_c) - 0.5 * logsig(-r_c) - 0.5 * logsig(-r_r)).mean()
        rho_c = r_c / beta
    else:
        raise KeyError(loss)
    return value, (beta * rho_c).mean()


CASES = [
    # (loss, head options, bias)
    ("sigmoid", {}, False),
    ("ipo", {"softcap": 3.0}, True),
    ("simpo", {"temperature": 0.7}, False),
    ("nca_pair", {}, True),  # no kernel: the torch loss path under either head impl
]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize(("loss", "head", "bias"), CASES)
def test_fused_matches_full_logits_reference(loss, head, bias, impl):
    case = make_case(bias=bias)
    beta = 0.4
    leaves = {k: case[k].clone().requires_grad_(True) for k in ("hidden", "weight")}
    if bias:
        leaves["bias"] = case["bias"].clone().requires_grad_(True)
    # nca_pair has no kernel: its loss runs on the torch path whatever the head's impl.
    loss_impl = "auto" if loss == "nca_pair" else None
    value, metrics = fused_linear_preference_loss(
        leaves["hidden"],
        leaves["weight"],
        case["targets"],
        case["segments"],
        case["ref_chosen"],
        case["ref_rejected"],
        loss=loss,
        beta=beta,
        bias=leaves.get("bias"),
        impl=impl,
        loss_impl=loss_impl,
        **head,
    )
    value.backward()

    ref_leaves = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
    ref_case = dict(case, **ref_leaves)
    if not bias:
        ref_case["bias"] = None
    expected, expected_reward = reference(ref_case, loss=loss, beta=beta, **head)
    expected.backward()

    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        metrics["rewards/chosen"].double(), expected_reward.detach(), rtol=1e-5, atol=1e-5
    )
    for name, leaf in leaves.items():
        torch.testing.assert_close(
            leaf.grad.double(), ref_leaves[name].grad, rtol=1e-4, atol=1e-6, msg=name
        )


def test_ignored_tokens_get_no_gradient_and_do_not_count():
    case = make_case()
    hidden = case["hidden"].clone().requires_grad_(True)
    value, _ = fused_linear_preference_loss(
        hidden,
        case["weight"],
        case["targets"],
        case["segments"],
        case["ref_chosen"],
        case["ref_rejected"],
        loss="ipo",
        impl="torch",
    )
    value.backward()
    ignored = case["targets"] == IGNORE
    assert (hidden.grad[ignored] == 0).all()
    assert (hidden.grad[~ignored].abs().sum(-1) > 0).all()


def test_bad_arguments():
    case = make_case()
    args = (case["hidden"], case["weight"], case["targets"], case["segments"])
    refs = (case["ref_chosen"], case["ref_rejected"])
    with pytest.raises(ValueError, match=r"hidden must be \[M, H\] and targets \[M\]"):
        fused_linear_preference_loss(case["hidden"][None], *args[1:], *refs)
    with pytest.raises(ValueError, match="end at M"):
        fused_linear_preference_loss(*args[:3], case["segments"] + 1, *refs)
    with pytest.raises(ValueError, match="loss 'sigmoid' needs reference log-probs"):
        fused_linear_preference_loss(*args, impl="torch")
    with pytest.raises(ValueError, match="unknown loss 'dpo'"):
        fused_linear_preference_loss(*args, *refs, loss="dpo", impl="torch")
    with pytest.raises(RuntimeError, match="'kto' has no kernel"):
        fused_linear_preference_loss(*args, *refs, loss="kto", impl="triton", kl=0.0)
