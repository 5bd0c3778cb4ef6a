"""Per-token statistics of the fused head (`linear_logprobs(return_stats=...)`) against float64
full logits, values and the entropy's gradient, for the torch and triton impls (the latter under
TRITON_INTERPRET=1 on the CPU: tiny shapes)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastdpo.ops import linear_logprobs as op_module
from fastdpo.ops.linear_logprobs import STATS, linear_logprobs

IGNORE = -100
IMPLS = ["torch", "triton"]


@dataclasses.dataclass(frozen=True)
class Case:
    rows: int
    width: int
    vocab: int
    bias: bool = False
    softcap: float | None = None
    temperature: float = 1.0


# Awkward sizes: no multiple of any block (the interpreter's tiles are 16 x 64 x 32), several
# vocabulary tiles and splits, one row tile with a masked tail.
CASES = [
    Case(rows=21, width=40, vocab=301),
    Case(rows=21, width=40, vocab=301, bias=True, softcap=4.0, temperature=0.7),
    Case(rows=37, width=48, vocab=1001, bias=True),
    Case(rows=5, width=16, vocab=130, softcap=2.5, temperature=1.3),
]


def case_id(case: Case) -> str:
    parts = [f"{case.rows}x{case.width}x{case.vocab}"]
    if case.bias:
        parts.append("bias")
    if case.softcap is not None:
        parts.append(f"cap{case.softcap}")
    if case.temperature != 1.0:
        parts.append(f"T{case.temperature}")
    return "-".join(parts)


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    """hidden [N, H], weight [V, H], bias [V] | None in `dtype`; targets [N] (1 in 5 ignored)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(case.rows, case.width, generator=gen)
    weight = torch.randn(case.vocab, case.width, generator=gen) * (3.0 / case.width**0.5)
    bias = torch.randn(case.vocab, generator=gen) if case.bias else None
    targets = torch.randint(0, case.vocab, (case.rows,), generator=gen)
    targets[2::5] = IGNORE
    targets[0] = case.vocab - 1  # the last column, in the last (partial) vocabulary tile
    # Rows whose target is the top-1 token, so that is_top1 is tested both ways.
    logits = hidden @ weight.T + (0 if bias is None else bias)
    targets[1::4] = logits[1::4].argmax(dim=1)
    to = {"dtype": dtype, "device": device}
    bias = None if bias is None else bias.to(**to)
    return hidden.to(**to), weight.to(**to), bias, targets.to(device)


def reference_stats(hidden, weight, bias, targets, case: Case) -> dict[str, torch.Tensor]:
    """The statistics from float64 full logits, written out from their definitions (0 / False on
    ignored rows); differentiable in float64 leaves."""
    logits = torch.nn.functional.linear(
        hidden.double(), weight.double(), None if bias is None else bias.double()
    )
    if case.softcap is not None:
        logits = case.softcap * torch.tanh(logits / case.softcap)
    logits = logits / case.temperature
    log_p = logits.log_softmax(dim=-1)
    p = log_p.exp()
    valid = targets != IGNORE
    values = {
        "entropy": -(p * log_p).sum(dim=-1),
        "log_sum_p2": torch.log((p * p).sum(dim=-1)),
        "mean_logit": logits.mean(dim=-1),
    }
    zero = torch.zeros((), dtype=torch.float64, device=logits.device)
    stats = {name: torch.where(valid, value, zero) for name, value in values.items()}
    stats["is_top1"] = valid & (logits.argmax(dim=-1) == targets)
    return stats


def leaves(hidden, weight, bias, dtype):
    """Detached copies in `dtype` that require grad (None stays None)."""
    tensors = (hidden, weight, bias)
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]


def check_values(stats, expected, rtol):
    for name in ("entropy", "log_sum_p2", "mean_logit"):
        got, want = stats[name].double(), expected[name].detach()
        assert stats[name].dtype == torch.float32
        scale = want.abs().max().clamp(min=1.0)
        assert (got - want).abs().max() <= rtol * scale, name
    assert stats["is_top1"].dtype == torch.bool
    assert torch.equal(stats["is_top1"], expected["is_top1"])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_stats_and_entropy_gradient_match_float64(case, impl):
    hidden, weight, bias, targets = make_inputs(case, torch.float32)
    ours = leaves(hidden, weight, bias, torch.float32)
    logp, stats = linear_logprobs(
        ours[0], ours[1], targets, bias=ours[2], softcap=case.softcap,
        temperature=case.temperature, return_stats=STATS, impl=impl,
    )  # fmt: skip
    assert list(stats) == list(STATS)
    ref = leaves(hidden, weight, bias, torch.float64)
    expected = reference_stats(ref[0], ref[1], ref[2], targets, case)
    check_values(stats, expected, rtol=2e-6)

    # The entropy alone, and together with the log-probs (entropy regularization).
    gen = torch.Generator().manual_seed(1)
    grad_entropy = torch.randn(case.rows, generator=gen)
    grad_logp = torch.randn(case.rows, generator=gen)
    logp_ref = _reference_logp(ref, targets, case)
    for with_logp in (False, True):
        loss = (stats["entropy"] * grad_entropy).sum()
        loss_ref = (expected["entropy"] * grad_entropy.double()).sum()
        if with_logp:
            loss = loss + (logp * grad_logp).sum()
            loss_ref = loss_ref + (logp_ref * grad_logp.double()).sum()
        inputs = [t for t in ours if t is not None]
        inputs_ref = [t for t in ref if t is not None]
        grads = torch.autograd.grad(loss, inputs, retain_graph=True)
        grads_ref = torch.autograd.grad(loss_ref, inputs_ref, retain_graph=True)
        for got, want in zip(grads, grads_ref, strict=True):
            scale = want.abs().max()
            assert (got.double() - want).abs().max() <= 1e-5 * scale


def _reference_logp(ref, targets, case: Case) -> torch.Tensor:
    hidden, weight, bias = ref
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if case.softcap is not None:
        logits = case.softcap * torch.tanh(logits / case.softcap)
    log_p = (logits / case.temperature).log_softmax(dim=-1)
    valid = targets != IGNORE
    picked = log_p.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0]
    return torch.where(valid, picked, torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize(
    ("impl", "dtype"),
    [("torch", torch.float16), ("torch", torch.bfloat16), ("triton", torch.float16)],
)
def test_low_precision_stats_within_the_plain_pytorch_error(impl, dtype):
    # bf16 is garbage in the interpreter's tl.dot (raw bits): the gpu test covers triton bf16.
    check_low_precision(CASES[1], impl, dtype, "cpu")


def check_low_precision(case: Case, impl: str, dtype: torch.dtype, device: str) -> None:
    """bf16/fp16 inputs: each statistic's error against float64 at most twice that of the same
    statistic from the plain PyTorch head in that dtype (full logits in fp32 from a bf16/fp16
    matmul); is_top1 equal to the plain head's wherever its top two logits are apart."""
    hidden, weight, bias, targets = make_inputs(case, dtype, device=device)
    _, stats = linear_logprobs(
        hidden, weight, targets, bias=bias, softcap=case.softcap, temperature=case.temperature,
        return_stats=STATS, impl=impl,
    )  # fmt: skip
    expected = reference_stats(hidden, weight, bias, targets, case)
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if case.softcap is not None:
        logits = case.softcap * torch.tanh(logits / case.softcap)
    logits = logits / case.temperature
    log_p = logits.log_softmax(dim=-1)
    plain = {
        "entropy": -(log_p.exp() * log_p).sum(-1),
        "log_sum_p2": torch.logsumexp(2 * log_p, dim=-1),
        "mean_logit": logits.mean(-1),
    }
    valid = targets != IGNORE
    for name, value in plain.items():
        ours_error = (stats[name].double() - expected[name])[valid].abs().max()
        plain_error = (value.double() - expected[name])[valid].abs().max()
        assert ours_error <= 2 * plain_error + 1e-6, name
    top2 = logits.topk(2, dim=-1).values
    apart = (top2[:, 0] - top2[:, 1]) > 1e-2
    plain_top1 = valid & (logits.argmax(-1) == targets)
    assert torch.equal(stats["is_top1"][apart], plain_top1[apart])


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_rows_and_dropped_rows(impl):
    """Ignored rows give 0 / False and no gradient; a leading shape is kept."""
    case = CASES[0]
    hidden, weight, _, targets = make_inputs(case, torch.float32)
    hidden = hidden.requires_grad_()
    logp, lse, stats = linear_logprobs(
        hidden[:20].reshape(4, 5, -1), weight, targets[:20].reshape(4, 5), return_lse=True,
        return_stats=("is_top1", "entropy"), impl=impl,
    )  # fmt: skip
    assert list(stats) == ["entropy", "is_top1"]  # STATS order
    assert logp.shape == lse.shape == stats["entropy"].shape == (4, 5)
    ignored = targets[:20].reshape(4, 5) == IGNORE
    assert (stats["entropy"][ignored] == 0).all() and not stats["is_top1"][ignored].any()
    assert (stats["entropy"][~ignored] > 0).all()
    (grad,) = torch.autograd.grad(stats["entropy"].sum(), hidden)
    assert (grad[:20][ignored.reshape(-1)] == 0).all()
    assert (grad[:20][~ignored.reshape(-1)] != 0).any(dim=1).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_stats_do_not_change_logp_and_lse(impl):
    case = CASES[1]
    hidden, weight, bias, targets = make_inputs(case, torch.float32)
    kwargs = dict(bias=bias, softcap=case.softcap, temperature=case.temperature, impl=impl)
    logp, lse = linear_logprobs(hidden, weight, targets, return_lse=True, **kwargs)
    logp_s, lse_s, _ = linear_logprobs(
        hidden, weight, targets, return_lse=True, return_stats=STATS, **kwargs
    )
    assert torch.equal(logp, logp_s) and torch.equal(lse, lse_s)


@pytest.mark.parametrize("impl", IMPLS)
def test_only_entropy_is_differentiable(impl):
    case = CASES[0]
    hidden, weight, _, targets = make_inputs(case, torch.float32)
    _, stats = linear_logprobs(
        hidden.requires_grad_(), weight, targets, return_stats=STATS, impl=impl
    )
    assert stats["entropy"].requires_grad
    assert not any(stats[name].requires_grad for name in ("log_sum_p2", "mean_logit", "is_top1"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows", [6, 64])
def test_ties_and_minus_inf_bias(impl, rows, monkeypatch):
    """A -inf bias column has p = 0: finite entropy and gradient (0 * -inf must not become NaN),
    mean_logit -inf; a tie for the top logit counts for the first index only (torch.argmax).

    Columns 5 and 20 share a vocabulary tile (64 wide); 77 lies in another: of another split
    with 6 rows (the interpreter's kernels split V into 3 for one row tile), of the same split
    with 64 rows. The torch impl walks blocks of 64 columns."""
    vocab, width = 150, 16
    monkeypatch.setattr(op_module, "INPUT_BLOCK_BYTES", 4 * width * 64)
    hidden = torch.randn(rows, width)
    weight = torch.randn(vocab, width) * 0.1
    weight[[5, 20, 77]] = 0.0  # columns 5, 20 and 77 tie exactly in every row,
    bias = torch.zeros(vocab)
    bias[[5, 20, 77]] = 50.0  # as the top-1
    bias[128:] = -float("inf")  # a whole vocabulary tile (a split under the interpreter)
    targets = torch.tensor([5, 77, 3, 140, 20, 77]).repeat(rows // 6 + 1)[:rows]
    hidden.requires_grad_()
    _, stats = linear_logprobs(hidden, weight, targets, bias=bias, return_stats=STATS, impl=impl)
    assert torch.equal(stats["is_top1"], targets == 5)
    assert torch.isfinite(stats["entropy"]).all() and torch.isfinite(stats["log_sum_p2"]).all()
    assert (stats["mean_logit"] == -float("inf")).all()
    (grad,) = torch.autograd.grad(stats["entropy"].sum(), hidden)
    assert torch.isfinite(grad).all()
    finite = bias.clone()
    finite[128:] = -1e4  # the same distribution to fp32 precision, with finite columns
    ref = leaves(hidden, weight, finite, torch.float64)
    expected = reference_stats(ref[0], ref[1], ref[2], targets, Case(rows, width, vocab, bias=True))
    assert torch.allclose(stats["entropy"].double(), expected["entropy"], rtol=1e-5, atol=1e-6)
    (grad_ref,) = torch.autograd.grad(expected["entropy"].sum(), ref[0])
    assert torch.allclose(grad.double(), grad_ref, rtol=1e-4, atol=1e-6)


def test_torch_stats_over_several_blocks(monkeypatch):
    """The torch impl's online sums across vocabulary and row blocks (blocks of 5 x 64)."""
    case = CASES[2]
    monkeypatch.setattr(op_module, "INPUT_BLOCK_BYTES", 4 * case.width * 64)
    monkeypatch.setattr(op_module, "LOGITS_BLOCK_BYTES", 4 * 5 * 64)
    hidden, weight, bias, targets = make_inputs(case, torch.float32)
    _, stats = linear_logprobs(hidden, weight, targets, bias=bias, return_stats=STATS, impl="torch")
    check_values(stats, reference_stats(hidden, weight, bias, targets, case), rtol=2e-6)


def test_bad_return_stats_is_a_clear_error():
    hidden, weight, _, targets = make_inputs(CASES[0], torch.float32)
    with pytest.raises(TypeError, match=r"pass \('entropy',\)"):
        linear_logprobs(hidden, weight, targets, return_stats="entropy", impl="torch")
    with pytest.raises(ValueError, match=r"unknown statistic.*'perplexity'.*known"):
        linear_logprobs(hidden, weight, targets, return_stats=("perplexity",), impl="torch")


def test_no_stats_returns_what_it_always_did():
    hidden, weight, _, targets = make_inputs(CASES[0], torch.float32)
    assert isinstance(linear_logprobs(hidden, weight, targets, return_stats=()), torch.Tensor)
    assert len(linear_logprobs(hidden, weight, targets, return_lse=True, return_stats=())) == 2


def test_sequence_logps_passes_the_stats_through():
    """token_stats in target order equal the statistics of the model's own logits (gemma2: its
    final-logit soft-capping included), each sequence run alone through the eager forward."""
    import random

    from fastdpo.data.collate import collate_pairs
    from fastdpo.data.types import TokenizedPair
    from fastdpo.model import sequence_logps
    from fastdpo.testing.models import TINY_SIZES, tiny_model

    torch.manual_seed(0)
    model = tiny_model("gemma2")
    rng = random.Random(0)

    def ids(low, high):
        return [rng.randrange(3, TINY_SIZES["vocab_size"]) for _ in range(rng.randint(low, high))]

    pairs = [
        TokenizedPair(example_id=f"ex{i}", prompt_ids=ids(2, 6), chosen_ids=ids(1, 9),
                      rejected_ids=ids(1, 9))
        for i in range(3)
    ]  # fmt: skip
    batch = collate_pairs(pairs)
    out = sequence_logps(model, batch, stats=("entropy", "is_top1", "mean_logit"), impl="torch")
    assert set(out.token_stats) == {"entropy", "is_top1", "mean_logit"}
    assert out.token_logps is not None and out.token_logps.shape == batch.target_ids.shape

    model.set_attn_implementation("eager")
    rows = []
    for pair in pairs:
        for completion in (pair.chosen_ids, pair.rejected_ids):
            tokens = torch.tensor([pair.prompt_ids + completion])
            logits = model(tokens).logits[0].double()[len(pair.prompt_ids) - 1 : -1]
            rows.append(logits)
    logits = torch.cat(rows)
    targets = batch.target_ids
    log_p = logits.log_softmax(-1)
    expected_entropy = -(log_p.exp() * log_p).sum(-1)
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.token_stats["entropy"].double(), expected_entropy, **close)
    torch.testing.assert_close(out.token_stats["mean_logit"].double(), logits.mean(-1), **close)
    assert torch.equal(out.token_stats["is_top1"], logits.argmax(-1) == targets)
    torch.testing.assert_close(
        out.token_logps.double(), log_p.gather(1, targets[:, None])[:, 0], **close
    )
    # The entropy reaches the model's parameters.
    out.token_stats["entropy"].sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


GPU_CASES = [
    Case(rows=1000, width=512, vocab=32_000, bias=True),
    Case(rows=300, width=256, vocab=50_257, softcap=30.0, temperature=0.7),
]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_gpu_stats(case, impl):
    """Realistic shapes on CUDA: fp32 against float64 (values and entropy gradient), bf16 and
    fp16 against the plain PyTorch head's error."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    hidden, weight, bias, targets = make_inputs(case, torch.float32, device="cuda")
    ours = leaves(hidden, weight, bias, torch.float32)
    _, stats = linear_logprobs(
        ours[0], ours[1], targets, bias=ours[2], softcap=case.softcap,
        temperature=case.temperature, return_stats=STATS, impl=impl,
    )  # fmt: skip
    ref = leaves(hidden, weight, bias, torch.float64)
    expected = reference_stats(ref[0], ref[1], ref[2], targets, case)
    # Products of H=512 fp32 terms (tf32-free): logits to ~1e-6 relative.
    check_values(stats, expected, rtol=1e-5)
    grad_entropy = torch.randn(case.rows, device="cuda")
    grads = torch.autograd.grad((stats["entropy"] * grad_entropy).sum(), ours[0])
    grads_ref = torch.autograd.grad((expected["entropy"] * grad_entropy.double()).sum(), ref[0])
    assert (grads[0].double() - grads_ref[0]).abs().max() <= 1e-4 * grads_ref[0].abs().max()
    for dtype in (torch.bfloat16, torch.float16):
        check_low_precision(case, impl, dtype, "cuda")


def test_kernels_and_op_name_the_same_stats():
    from fastdpo.kernels import linear_logprobs as kernels

    assert kernels.STATS == STATS


def test_cublas_impl_refuses_stats_with_what_to_do():
    hidden, weight, _, targets = make_inputs(CASES[0], torch.float32)
    with pytest.raises(ValueError, match=r"impl='cublas' does not compute.*impl='triton' or"):
        linear_logprobs(hidden, weight, targets, return_stats=("entropy",), impl="cublas")
