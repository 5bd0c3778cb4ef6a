"""linear_logprobs(impl="cublas") against the float64 full-logits reference of
tests/test_linear_logprobs.py: values and every gradient, several row and vocabulary chunks,
ignored rows, soft-capping, bias, temperature, partial requires_grad, determinism.

On the CPU the GEMMs are torch's CPU matmuls and the fold kernels run under TRITON_INTERPRET=1
(tests/conftest.py), so shapes stay small. bf16/fp16 there take the CPU layout (a tile in the
inputs' dtype, overwritten by the gradient); `fp32_tiles` forces the CUDA layout (fp32 logits,
the gradient beside them, dW through the fp32 slab) so that it runs here too.
"""

from __future__ import annotations

import math

import pytest
import torch
from fastdpo.kernels import logits_fold
from test_linear_logprobs import (
    GPU_CASES,
    IGNORE,
    TORCH_CASES,
    Case,
    case_id,
    check_fp32,
    check_low_precision,
    errors,
    fused,
    make_inputs,
    run,
)
from torch.utils._python_dispatch import TorchDispatchMode

from fastdpo.ops import linear_logprobs as op_module
from fastdpo.ops import linear_logprobs_cublas as cublas
from fastdpo.ops.linear_logprobs import linear_logprobs

CASES = [
    *TORCH_CASES,
    Case(20, 40, 203, temperature=1.5),  # temperature without soft-capping
    Case(3, 64, 130, bias=True, lse_grad=True),
]


def _set_tiles(monkeypatch, rows: int, columns: int, element_bytes: int) -> None:
    """Tiles of at most `rows` x `columns` for logits of `element_bytes` per element (4: fp32;
    6: fp32 logits + bf16 gradient in backward; 2: a bf16 tile)."""
    monkeypatch.setattr(cublas, "MIN_TILE_COLUMNS", columns)
    monkeypatch.setattr(cublas, "TILE_BYTES", rows * columns * element_bytes)


@pytest.fixture
def fp32_tiles(monkeypatch):
    """The CUDA layout for bf16/fp16 on the CPU: fp32 logits tiles, the gradient beside them."""
    monkeypatch.setattr(cublas, "fp32_products", lambda device, dtype: True)


# ------------------------------------------------------------------------------------------------
# Values and gradients


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_float64(case):
    check_fp32(case, "cublas")


@pytest.mark.parametrize(
    ("case", "rows", "columns"),
    [
        (TORCH_CASES[1], 16, 100),  # 3 row chunks of 13 (the last 11), 9 of 112 columns
        (TORCH_CASES[1], 5, 300),  # 8 row chunks of 5 (the last 2), 4 of 251 columns
        (TORCH_CASES[1], 1, 1001),  # one row per chunk, the whole vocabulary
        (CASES[-2], 3, 64),  # no soft-capping: 7 row chunks of 3, 4 of 51 columns
    ],
    ids=lambda value: case_id(value) if isinstance(value, Case) else str(value),
)
def test_several_chunks_match_float64(monkeypatch, case, rows, columns):
    """Several row and vocabulary chunks, the last ones partial: the online log-sum-exp across
    chunks, dH summed over vocabulary chunks, dW over row chunks."""
    _set_tiles(monkeypatch, rows, columns, 4)
    plan = cublas.tile_plan(case.rows, case.vocab, 4, cublas.TILE_BYTES)
    assert plan.rows <= rows < case.rows
    if plan.rows > 1:
        assert case.rows % plan.rows != 0  # a partial last row chunk
    if columns < case.vocab:
        assert plan.columns < case.vocab and case.vocab % plan.columns != 0
    check_fp32(case, "cublas")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", TORCH_CASES[:4], ids=case_id)
def test_low_precision(case, dtype):
    check_low_precision(case, dtype, "cublas")


@pytest.mark.parametrize("layout", ["input-dtype tile", "fp32 tile"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_several_chunks(monkeypatch, request, dtype, layout):
    """Both tile layouts over several chunks; with fp32 tiles, dW of a vocabulary chunk sums its
    row chunks in the fp32 slab."""
    if layout == "fp32 tile":
        request.getfixturevalue("fp32_tiles")
    _set_tiles(monkeypatch, 16, 128, 6 if layout == "fp32 tile" else 2)
    check_low_precision(TORCH_CASES[1], dtype, "cublas")


@pytest.mark.parametrize("case", TORCH_CASES[:4], ids=case_id)
def test_fp32_tile_layout_gives_better_logprobs(fp32_tiles, case):
    """fp32 logits (the CUDA layout) are not rounded to bf16 before the log-sum-exp: log-probs
    and lse at least 4x closer to float64 than the plain bf16 head's. (The gradients go through
    bf16 GEMM operands either way: `test_low_precision_several_chunks` bounds them.)"""
    errs = errors(case, torch.bfloat16, "cublas")
    for key in ("logp", "lse"):
        fused_err, naive_err = errs[key]
        assert fused_err <= naive_err / 4, f"{key}: {fused_err:.2e} vs naive {naive_err:.2e}"


@pytest.mark.parametrize(
    "requires", [(True, False, False), (False, True, False), (False, False, True)]
)
def test_partial_requires_grad(monkeypatch, requires):
    case = Case(21, 24, 150, bias=True, softcap=4.0, temperature=0.8)
    _set_tiles(monkeypatch, 4, 32, 4)
    errs = check_fp32(case, "cublas", requires=requires)
    wanted = {n for n, r in zip(("hidden", "weight", "bias"), requires, strict=True) if r}
    assert set(errs) - {"logp", "lse"} == wanted


def test_frozen_head_runs_no_weight_gemm(monkeypatch):
    """Only hidden requires grad (LoRA): backward runs the recompute and the dH GEMMs, no dW
    GEMM (6NHV, not 8NHV)."""
    products = []
    real_mm, real_addmm = cublas._mm, cublas._addmm_fp32

    def mm(out, a, b, direct):
        products.append(("mm", tuple(out.shape)))
        real_mm(out, a, b, direct)

    def addmm(acc, a, b, direct):
        products.append(("addmm", tuple(acc.shape)))
        real_addmm(acc, a, b, direct)

    monkeypatch.setattr(cublas, "_mm", mm)
    monkeypatch.setattr(cublas, "_addmm_fp32", addmm)
    case = Case(9, 16, 70)
    check_fp32(case, "cublas", requires=(True, False, False))
    kept = 9 - len(range(3, 9, 6))
    # forward: one logits GEMM; backward: the recompute and one dH product, nothing [V, H].
    assert products == [("mm", (kept, 70)), ("mm", (kept, 70)), ("addmm", (kept, 16))]


# ------------------------------------------------------------------------------------------------
# Ignored rows, empty and masked inputs


def test_ignored_rows_are_zero_with_no_gradient():
    case = Case(13, 16, 90, bias=True, lse_grad=True)
    logp, lse, grads, targets = run(
        lambda h, w, t, b: fused("cublas")(h, w, t, b, case), case, torch.float32
    )
    ignored = targets == IGNORE
    assert ignored.sum() >= 2
    assert torch.equal(logp[ignored], torch.zeros_like(logp[ignored]))
    assert torch.equal(lse[ignored], torch.zeros_like(lse[ignored]))
    assert torch.equal(grads["hidden"][ignored], torch.zeros_like(grads["hidden"][ignored]))
    assert (logp[~ignored] < 0).all()


def test_ignored_rows_inside_the_function_get_no_gradient(monkeypatch):
    """Ignored rows that reach the autograd Function (it masks them itself) give 0 and exactly
    zero dH, and the same values and weight gradients as when they are dropped first."""
    _set_tiles(monkeypatch, 4, 32, 4)
    case = Case(24, 16, 90, bias=True, softcap=4.0, lse_grad=True)
    hidden, weight, bias, targets, grad_logp, grad_lse = make_inputs(case, torch.float32)
    options = op_module.LinearLogprobsOptions(softcap=4.0, ignore_index=IGNORE, impl="cublas")
    kept = targets != IGNORE
    results = []
    for call in (
        lambda h, w, b: op_module.LinearLogprobsFunction.apply(h, w, b, targets, options),
        lambda h, w, b: linear_logprobs(
            h, w, targets, bias=b, softcap=4.0, return_lse=True, impl="cublas"
        ),
    ):
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        logp, lse = call(*leaves)
        loss = (logp * grad_logp).sum() + (lse * grad_lse).sum()
        results.append((logp.detach(), lse.detach(), *torch.autograd.grad(loss, leaves)))
    inside, dropped = results
    assert torch.equal(inside[0][~kept], torch.zeros(int((~kept).sum())))
    assert torch.equal(inside[2][~kept], torch.zeros(int((~kept).sum()), 16))
    for name, ours, theirs in zip(("logp", "lse", "dH", "dW", "db"), inside, dropped, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6, msg=name)


def test_all_rows_ignored():
    hidden, weight, bias, _, _, _ = make_inputs(Case(6, 16, 40, bias=True), torch.float32)
    for leaf in (hidden, weight, bias):
        leaf.requires_grad_()
    logp = linear_logprobs(hidden, weight, torch.full((6,), IGNORE), bias=bias, impl="cublas")
    logp.sum().backward()
    assert torch.equal(logp, torch.zeros(6))
    for leaf in (hidden, weight, bias):
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_rows(dtype):
    """N = 0 (here inside the Function, where nothing is dropped): an empty result and zero
    weight and bias gradients, not an error or uninitialized memory."""
    hidden = torch.randn(0, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(40, 16, dtype=dtype, requires_grad=True)
    bias = torch.randn(40, dtype=dtype, requires_grad=True)
    logp = linear_logprobs(
        hidden, weight, torch.zeros(0, dtype=torch.long), bias=bias, impl="cublas"
    )
    logp.sum().backward()
    assert logp.shape == (0,) and hidden.grad.shape == (0, 16)
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


def test_masked_vocabulary_chunks(monkeypatch):
    """A -inf bias masks the first vocabulary chunks of every row: no NaN from -inf - -inf in
    the online log-sum-exp; the same log-probs and gradients as the torch impl."""
    hidden, weight, _, targets, _, _ = make_inputs(Case(6, 8, 40), torch.float32)
    bias = torch.zeros(40)
    bias[:10] = -math.inf
    targets = targets.clamp(10, 39)
    _set_tiles(monkeypatch, 6, 4, 4)
    assert cublas.tile_plan(6, 40, 4, cublas.TILE_BYTES).columns == 4

    def values_and_grads(impl):
        leaf = hidden.clone().requires_grad_()
        logp = linear_logprobs(leaf, weight, targets, bias=bias, impl=impl)
        return logp.detach(), torch.autograd.grad(logp.sum(), leaf)[0]

    (logp, grad), (ref_logp, ref_grad) = values_and_grads("cublas"), values_and_grads("torch")
    assert torch.isfinite(logp).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(logp, ref_logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)


def test_leading_dims_and_strided_hidden():
    """[B, T] inputs, int32 targets and a non-contiguous hidden give the flat results."""
    case = Case(12, 16, 50, softcap=4.0)
    hidden, weight, _, targets, _, _ = make_inputs(case, torch.float32)
    padded = torch.zeros(12, 20)
    padded[:, 2:18] = hidden
    flat = linear_logprobs(hidden, weight, targets, softcap=4.0, impl="cublas")
    shaped = linear_logprobs(
        padded[:, 2:18].view(3, 4, 16), weight, targets.view(3, 4).int(), softcap=4.0,
        impl="cublas",
    )  # fmt: skip
    assert shaped.shape == (3, 4)
    torch.testing.assert_close(shaped.reshape(-1), flat, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Determinism and memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_runs_are_bitwise_equal(monkeypatch, dtype):
    """Values, lse and every gradient, over several chunks. (The interpreter runs programs one
    at a time: `test_gpu_two_runs_are_bitwise_equal` is the real check of a parallel launch.)"""
    _set_tiles(monkeypatch, 16, 128, 4)
    case = TORCH_CASES[1]

    def once():
        return run(lambda h, w, t, b: fused("cublas")(h, w, t, b, case), case, dtype)

    first, second = once(), once()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert set(first[2]) == {"hidden", "weight", "bias"}
    for name in first[2]:
        assert torch.equal(first[2][name], second[2][name]), name


class _RecordFloatTensors(TorchDispatchMode):
    """Records the element counts of every fp32 tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.fp32_sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self.fp32_sizes.append(tensor.numel())
        return out


@pytest.mark.parametrize("one_row_chunk", [True, False])
def test_no_fp32_weight_sized_buffer_for_bf16(monkeypatch, fp32_tiles, one_row_chunk):
    """bf16 weights in the CUDA layout: backward allocates no fp32 tensor as large as [V, H]
    (dW goes straight into the bf16 gradient, or through a [chunk columns, H] fp32 slab)."""
    case = Case(32, 16, 512, bias=True)
    _set_tiles(monkeypatch, 32 if one_row_chunk else 8, 128, 6)
    hidden, weight, bias, targets, grad_logp, _ = make_inputs(case, torch.bfloat16)
    weight.requires_grad_()
    logp = linear_logprobs(hidden, weight, targets, bias=bias, impl="cublas")
    with _RecordFloatTensors() as recorder:
        (grad_weight,) = torch.autograd.grad(logp, weight, grad_logp)
    assert grad_weight.dtype == torch.bfloat16
    assert recorder.fp32_sizes and max(recorder.fp32_sizes) < case.vocab * case.width
    check_low_precision(case, torch.bfloat16, "cublas")


# ------------------------------------------------------------------------------------------------
# Plan, availability, choice


def test_tile_plan():
    # The benchmark's shape in bf16 backward (fp32 logits + bf16 gradient): one row chunk.
    plan = cublas.tile_plan(16384, 128256, 6, 256 * 2**20)
    assert plan.rows == 16384 and plan.columns == 2729
    assert plan.rows * plan.columns * 6 <= 256 * 2**20
    # More rows than fit with MIN_TILE_COLUMNS columns: even row chunks, none tiny.
    plan = cublas.tile_plan(65536, 152064, 6, 256 * 2**20)
    assert plan.columns >= cublas.MIN_TILE_COLUMNS
    assert plan.rows * plan.columns * 6 <= 256 * 2**20
    assert 65536 % plan.rows == 0 or 65536 % plan.rows >= plan.rows // 2
    # A small vocabulary: one chunk of it, rows as the budget allows.
    assert cublas.tile_plan(100, 50, 4, 1000) == cublas.TilePlan(5, 50)
    assert cublas.tile_plan(0, 50, 4, 1000).rows == 1


def test_explicit_cublas_that_cannot_run_says_what_to_do(monkeypatch):
    with pytest.raises(RuntimeError, match=r"impl='cublas'.*impl='torch'"):
        op_module._resolve_impl("cublas", torch.device("meta"))
    monkeypatch.setattr(logits_fold, "is_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        op_module._resolve_impl("cublas", torch.device("cpu"))


def test_auto_never_picks_cublas_on_the_cpu(caplog):
    hidden, weight, _, targets, _, _ = make_inputs(Case(4, 8, 10), torch.float32)
    with caplog.at_level("DEBUG", logger="fastdpo.ops.linear_logprobs"):
        linear_logprobs(hidden, weight, targets)
    assert "impl=torch" in caplog.text
    assert op_module._resolve_impl("auto", torch.device("cpu")) == "torch"


def test_statistics_are_refused_with_what_to_do():
    """Per-token statistics are not computed by this impl (yet): asking says which impls do."""
    hidden, weight, _, targets, _, _ = make_inputs(Case(4, 8, 10), torch.float32)
    with pytest.raises(ValueError, match=r"impl='cublas'.*'torch'"):
        linear_logprobs(hidden, weight, targets, impl="cublas", return_stats=("entropy",))


def test_fp32_products_off_the_gpu():
    assert cublas.fp32_products(torch.device("cpu"), torch.float32)
    assert not cublas.fp32_products(torch.device("cpu"), torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# GPU: realistic shapes (skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_gpu_fp32(case):
    check_fp32(case, "cublas", device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_gpu_low_precision(case, dtype):
    check_low_precision(case, dtype, "cublas", device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "requires", [(True, False, False), (False, True, False), (False, False, True)]
)
def test_gpu_partial_requires_grad(monkeypatch, requires):
    _set_tiles(monkeypatch, 256, 2048, 4)  # several chunks each way
    check_fp32(Case(1000, 512, 10007, bias=True, softcap=30.0), "cublas", "cuda", requires)


@pytest.mark.gpu
def test_gpu_fp32_products():
    """torch 2.8+ writes fp32 products of bf16 inputs on CUDA: the fp32-tile layout runs."""
    assert cublas.fp32_products(torch.device("cuda"), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_gpu_two_runs_are_bitwise_equal(case, dtype):
    def once():
        return run(lambda h, w, t, b: fused("cublas")(h, w, t, b, case), case, dtype, device="cuda")

    first, second = once(), once()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for name in first[2]:
        assert torch.equal(first[2][name], second[2][name]), name
