"""fastdpo.linear_logprobs on adversarial inputs, both implementations ("triton" under
TRITON_INTERPRET=1 on the CPU, tests/conftest.py): log-probs are never positive, and a vocabulary
masked with a -inf bias gives the float64 answer, forward and backward.

A fused log-prob kernel elsewhere returned positive log-probs in bf16 (target logit and
log-sum-exp rounded differently), and its users' rewards collapsed; the Triton kernel here
returned NaN for every row once a whole vocabulary tile was masked (exp(-inf - -inf) in the
online log-sum-exp).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from fastdpo.kernels import linear_logprobs as kernels

from fastdpo.ops import linear_logprobs as op_module
from fastdpo.ops.linear_logprobs import linear_logprobs

IMPLS = ("torch", "triton")
F64 = torch.float64
TILE = kernels.INTERPRETER_CONFIG.block_v
"""Vocabulary columns per Triton tile under the interpreter; the torch impl's blocks are set to
the same width here, so one mask covers a whole tile (block) in both impls."""
ROWS, WIDTH, VOCAB = 10, 32, 5 * TILE - 4
"""Tiny shapes (the interpreter is slow) with 5 vocabulary tiles, the last one partial: the
forward splits them over 3 programs per row tile (2 + 2 + 1 tiles). The torch impl's
`_even_block` keeps TILE-wide blocks only for a last block longer than 4/5 of TILE."""
FP32_TOL = 2e-5
"""Scaled error bound of fp32 results against float64 (max |x - ref| / max |ref|), as in
tests/test_linear_logprobs.py."""
NONPOSITIVE_SLACK = 1e-6
"""logp may exceed 0 by rounding at most this much."""


@dataclasses.dataclass(frozen=True)
class Head:
    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    targets: torch.Tensor  # [N] int64
    softcap: float | None = None
    temperature: float = 1.0


def final_logits(head: Head) -> torch.Tensor:
    """float64 [N, V] final logits of the head's (possibly low-precision) inputs."""
    logits = head.hidden.double() @ head.weight.double().T
    if head.bias is not None:
        logits = logits + head.bias.double()
    if head.softcap is not None:
        logits = head.softcap * torch.tanh(logits / head.softcap)
    return logits / head.temperature


def reference(head: Head, grad_logp: torch.Tensor):
    """float64 log-probs [N] and the gradients of sum(grad_logp * logp), by autograd through
    full logits (PyTorch's log_softmax: its backward is finite at a -inf target)."""
    leaves = {"hidden": head.hidden, "weight": head.weight, "bias": head.bias}
    leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items() if v is not None}
    logp = final_logits(dataclasses.replace(head, **leaves)).log_softmax(-1)
    logp = logp.gather(1, head.targets[:, None]).squeeze(1)
    grads = torch.autograd.grad((logp * grad_logp.double()).sum(), list(leaves.values()))
    return logp.detach(), dict(zip(leaves, grads, strict=True))


def fused(head: Head, grad_logp: torch.Tensor, impl: str):
    """The op's log-probs [N] fp32 and the gradients of sum(grad_logp * logp)."""
    leaves = {"hidden": head.hidden, "weight": head.weight, "bias": head.bias}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items() if v is not None}
    logp = linear_logprobs(
        leaves["hidden"],
        leaves["weight"],
        head.targets,
        bias=leaves.get("bias"),
        softcap=head.softcap,
        temperature=head.temperature,
        impl=impl,
    )
    grads = torch.autograd.grad((logp * grad_logp).sum(), list(leaves.values()))
    return logp.detach(), dict(zip(leaves, grads, strict=True))


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """Non-finite entries equal (-inf where the reference has -inf); finite ones within `tol`
    of the reference's largest finite magnitude."""
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f"{what}: non-finite at other entries"
    assert torch.equal(actual[~finite].double(), expected[~finite]), f"{what}: non-finite values"
    scale = expected[finite].abs().max().clamp_min(1e-30)
    error = ((actual[finite].double() - expected[finite]).abs().max() / scale).item()
    assert error <= tol, f"{what}: scaled error {error:.2e} > {tol:.0e}"


@pytest.fixture
def tile_sized_blocks(monkeypatch):
    """The torch impl walks the vocabulary in blocks of TILE columns (and 4 rows), like the
    Triton kernels' tiles, so a mask aligned to TILE masks whole blocks in both impls."""
    monkeypatch.setattr(op_module, "INPUT_BLOCK_BYTES", TILE * 4 * WIDTH)
    monkeypatch.setattr(op_module, "LOGITS_BLOCK_BYTES", 4 * 4 * TILE)
    plan = op_module._block_plan(ROWS, VOCAB, WIDTH, 4 * 4 * TILE, torch.device("cpu"))
    assert plan.columns == TILE
    assert TILE * 4 < VOCAB < TILE * 5


# ------------------------------------------------------------------------------------------------
# Log-probs are never positive


def _scenario(name: str) -> Head:
    """Random heads where a wrongly rounded target logit would give logp > 0: rows whose target
    is the largest logit (all but rows 1 and 6, which keep random targets)."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(ROWS, WIDTH, generator=g, dtype=F64)
    weight = torch.randn(VOCAB, WIDTH, generator=g, dtype=F64) / WIDTH**0.5  # logits ~ N(0, 1)
    dtype, softcap, temperature = torch.float32, None, 1.0
    if name == "huge":  # logits ~ 1e6: fp32 spacing there is 0.06
        hidden, weight = hidden * 1e3, weight * 1e3
    elif name == "tiny":  # logits ~ 1e-30: the softmax is uniform, logp = -log V
        weight = weight * 1e-30
    elif name == "tied_max":  # 8 columns share every row's largest logit exactly
        weight = weight * 30
        weight[TILE - 3 : TILE + 4] = weight[7]  # 7 copies, across a tile (and split) boundary
        hidden = hidden.abs() * weight[7].sign()  # aligned with column 7: the largest logit
    elif name == "softcap":  # logits ~ 100 capped at 2: many columns at the cap
        weight, softcap = weight * 100, 2.0
    elif name == "cold":  # temperature 0.01: final logits ~ 100
        temperature = 0.01
    elif name == "hot":  # temperature 100: final logits ~ 0.01
        temperature = 100.0
    elif name == "fp16":  # fp16 inputs, logits ~ 20, products rounded to fp16 in the torch impl
        weight, dtype = weight * 20, torch.float16
    else:
        raise KeyError(name)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    head = Head(hidden, weight, None, torch.zeros(ROWS, dtype=torch.long), softcap, temperature)
    targets = final_logits(head).argmax(-1)
    targets[[1, 6]] = torch.randint(0, VOCAB, (2,), generator=g)
    return dataclasses.replace(head, targets=targets)


SCENARIOS = ("huge", "tiny", "tied_max", "softcap", "cold", "hot", "fp16")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", SCENARIOS)
def test_logprobs_are_never_positive(name, impl):
    head = _scenario(name)
    logits = final_logits(head)
    is_max = logits.gather(1, head.targets[:, None]).squeeze(1) == logits.max(-1).values
    # The scenario is the adversarial one it claims to be (with soft-capping, columns tie at
    # the cap and a random target may be one of them).
    assert is_max.sum() >= ROWS - 2
    logp, _ = fused(head, torch.ones(ROWS), impl)
    worst = logp.max().item()
    assert worst <= NONPOSITIVE_SLACK, f"{name} {impl}: logp {worst} > 0"
    expected, _ = reference(head, torch.ones(ROWS))
    # fp16 inputs: the torch impl rounds each product to fp16 (as a plain fp16 head does);
    # 4 fp16 epsilons of the largest log-prob bound it.
    tol = 4 * torch.finfo(torch.float16).eps if name == "fp16" else FP32_TOL
    assert_matches(logp, expected, tol, f"{name} {impl} logp")
    if name == "tiny":
        torch.testing.assert_close(logp.double(), torch.full((ROWS,), -math.log(VOCAB), dtype=F64))
    if name == "tied_max":
        ties = (logits == logits.max(-1, keepdim=True).values).sum(-1)
        assert (ties == 8).all()


# ------------------------------------------------------------------------------------------------
# A vocabulary masked with a -inf bias


def _masked_head(masked_columns: list[int], *, softcap: float | None = None) -> Head:
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(ROWS, WIDTH, generator=g)
    weight = torch.randn(VOCAB, WIDTH, generator=g) * (3.0 / WIDTH**0.5)
    bias = torch.randn(VOCAB, generator=g)
    bias[masked_columns] = -math.inf
    allowed = torch.ones(VOCAB, dtype=torch.bool)
    allowed[masked_columns] = False
    choices = allowed.nonzero().squeeze(1) if allowed.any() else torch.zeros(1, dtype=torch.long)
    targets = choices[torch.randint(0, len(choices), (ROWS,), generator=g)]
    return Head(hidden, weight, bias, targets, softcap=softcap)


MASKS = {
    # The first tile of the first split: its rows' running max is still -inf there.
    "first_tile": list(range(TILE)),
    # The second split's first tile (a later split starts from -inf as well).
    "later_split_first_tile": list(range(2 * TILE, 3 * TILE)),
    # A whole split (its partial log-sum-exp is -inf) and the last, partial tile.
    "whole_split_and_last_tile": [*range(2 * TILE), *range(4 * TILE, VOCAB)],
    # Scattered columns inside tiles that keep others.
    "part_of_tiles": [*range(TILE + 5, TILE + 20), 0, 3, VOCAB - 1],
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask", MASKS)
def test_masked_vocabulary_matches_float64(mask, impl, tile_sized_blocks):
    head = _masked_head(MASKS[mask])
    grad_logp = torch.randn(ROWS, generator=torch.Generator().manual_seed(3))
    logp, grads = fused(head, grad_logp, impl)
    expected, expected_grads = reference(head, grad_logp)
    assert torch.isfinite(expected).all()
    assert_matches(logp, expected, FP32_TOL, f"{mask} {impl} logp")
    for name, grad in grads.items():
        assert_matches(grad, expected_grads[name], FP32_TOL, f"{mask} {impl} d{name}")
    # Masked columns take no probability: their bias gradient is exactly 0.
    assert torch.equal(grads["bias"][MASKS[mask]], torch.zeros(len(MASKS[mask])))


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_target_is_minus_inf_with_finite_gradient(impl, tile_sized_blocks):
    """The documented contract: a target masked by a -inf bias has log-prob -inf (log 0), and
    the limit gradient PyTorch's log_softmax gives (finite: the target column gets g, the other
    columns -g * p), in both impls. The other rows are untouched."""
    masked = [*range(TILE), TILE + 9]
    head = _masked_head(masked)
    targets = head.targets.clone()
    targets[[2, 7]] = torch.tensor([5, TILE + 9])  # in the masked tile, and a lone masked column
    head = dataclasses.replace(head, targets=targets)
    grad_logp = torch.randn(ROWS, generator=torch.Generator().manual_seed(4))
    logp, grads = fused(head, grad_logp, impl)
    expected, expected_grads = reference(head, grad_logp)
    assert torch.equal(expected[[2, 7]], torch.full((2,), -math.inf, dtype=F64))
    assert_matches(logp, expected, FP32_TOL, f"{impl} logp")
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), f"{impl} d{name} is not finite"
        assert_matches(grad, expected_grads[name], FP32_TOL, f"{impl} d{name}")
    torch.testing.assert_close(grads["bias"][[5, TILE + 9]], grad_logp[[2, 7]])


@pytest.mark.parametrize("impl", IMPLS)
def test_softcap_turns_a_minus_inf_bias_into_the_cap(impl, tile_sized_blocks):
    """With soft-capping the bias comes first, so a -inf bias gives the logit -c, not a mask
    (as in Gemma-2): both impls agree with float64, and the capped columns get no gradient."""
    head = _masked_head(list(range(TILE)), softcap=3.0)
    grad_logp = torch.randn(ROWS, generator=torch.Generator().manual_seed(5))
    logp, grads = fused(head, grad_logp, impl)
    expected, expected_grads = reference(head, grad_logp)
    assert_matches(logp, expected, FP32_TOL, f"{impl} logp")
    for name, grad in grads.items():
        assert_matches(grad, expected_grads[name], FP32_TOL, f"{impl} d{name}")
    assert torch.equal(grads["bias"][:TILE], torch.zeros(TILE))


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_vocabulary_is_nan(impl):
    """A bias that is -inf everywhere leaves no softmax: the documented answer is NaN (loud,
    never a finite value that looks like a log-prob), in both impls."""
    head = _masked_head(list(range(VOCAB)))
    with torch.no_grad():
        logp = linear_logprobs(head.hidden, head.weight, head.targets, bias=head.bias, impl=impl)
    assert torch.isnan(logp).all()
