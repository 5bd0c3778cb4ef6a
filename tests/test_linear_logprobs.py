"""fastdpo.linear_logprobs against a float64 full-logits reference, for both implementations.

The "triton" impl runs under TRITON_INTERPRET=1 here (tests/conftest.py), so its CPU cases use
tiny shapes; `gpu` tests repeat the checks at realistic shapes on CUDA, bf16 included.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fastdpo.ops import linear_logprobs as op_module
from fastdpo.ops.linear_logprobs import check_targets, linear_logprobs

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class Case:
    rows: int
    width: int
    vocab: int
    bias: bool = False
    softcap: float | None = None
    temperature: float = 1.0
    lse_grad: bool = False
    """Also backpropagate through the returned log-sum-exp."""


def make_inputs(case: Case, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """Random hidden [N, H], weight [V, H], bias [V] | None, targets [N] (1 in 6 ignored)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(case.rows, case.width, generator=gen)
    # Logits with a standard deviation of about 3, so soft-capping at 4 bites.
    weight = torch.randn(case.vocab, case.width, generator=gen) * (3.0 / case.width**0.5)
    bias = torch.randn(case.vocab, generator=gen) if case.bias else None
    targets = torch.randint(0, case.vocab, (case.rows,), generator=gen)
    targets[3::6] = IGNORE
    targets[0] = case.vocab - 1  # the last column, in the last (partial) vocabulary tile
    grad_logp = torch.randn(case.rows, generator=gen)
    grad_lse = torch.randn(case.rows, generator=gen) if case.lse_grad else None
    to = {"device": device, "dtype": dtype}
    return (
        hidden.to(**to),
        weight.to(**to),
        None if bias is None else bias.to(**to),
        targets.to(device),
        grad_logp.to(device),
        None if grad_lse is None else grad_lse.to(device),
    )


def naive_logprobs(hidden, weight, targets, bias, case: Case, compute_dtype=torch.float64):
    """Full logits: the reference (float64) or the plain low-precision PyTorch path."""
    if compute_dtype == torch.float64:
        hidden, weight = hidden.double(), weight.double()
        bias = None if bias is None else bias.double()
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if compute_dtype == torch.float64:
        logits = logits.double()
    if case.softcap is not None:
        logits = case.softcap * torch.tanh(logits / case.softcap)
    logits = logits / case.temperature
    lse = torch.logsumexp(logits, dim=-1)
    valid = targets != IGNORE
    target_logits = logits.gather(-1, torch.where(valid, targets, 0)[:, None]).squeeze(-1)
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    return torch.where(valid, target_logits - lse, zero), torch.where(valid, lse, zero)


def run(fn, case: Case, dtype, *, device="cpu", requires=(True, True, True), upcast=False):
    """Values (logp, lse) and gradients {name: grad} of `fn` on the case's inputs.

    With `upcast`, the inputs (made in `dtype`) become float64 leaves, so the reference's
    gradients are not rounded back to `dtype`.
    """
    hidden, weight, bias, targets, grad_logp, grad_lse = make_inputs(case, dtype, device)
    if upcast:
        hidden, weight = hidden.double(), weight.double()
        bias = None if bias is None else bias.double()
    leaves = {"hidden": hidden, "weight": weight, "bias": bias}
    for leaf, wanted in zip(leaves.values(), requires, strict=True):
        if leaf is not None:
            leaf.requires_grad_(wanted)
    logp, lse = fn(hidden, weight, targets, bias)
    loss = (logp.double() * grad_logp.double()).sum()
    if grad_lse is not None:
        loss = loss + (lse.double() * grad_lse.double()).sum()
    with_grad = {n: t for n, t in leaves.items() if t is not None and t.requires_grad}
    grads = torch.autograd.grad(loss, list(with_grad.values())) if with_grad else ()
    return logp.detach(), lse.detach(), dict(zip(with_grad, grads, strict=True)), targets


def fused(impl):
    def fn(hidden, weight, targets, bias, case):
        return linear_logprobs(
            hidden,
            weight,
            targets,
            bias=bias,
            softcap=case.softcap,
            temperature=case.temperature,
            ignore_index=IGNORE,
            return_lse=True,
            impl=impl,
        )

    return fn


def errors(case: Case, dtype, impl, *, device="cpu", requires=(True, True, True)):
    """Scaled max errors of the fused op and of the same-dtype naive path vs float64.

    Returns {output: (fused_error, naive_error)} with outputs logp, lse and each gradient; an
    error is max |x - ref| / max |ref|, both computed on the same low-precision inputs.
    """
    results = {}
    for name, fn in (
        ("ref", lambda h, w, t, b: naive_logprobs(h, w, t, b, case)),
        ("fused", lambda h, w, t, b: fused(impl)(h, w, t, b, case)),
        ("naive", lambda h, w, t, b: naive_logprobs(h, w, t, b, case, compute_dtype=dtype)),
    ):
        logp, lse, grads, _ = run(
            fn, case, dtype, device=device, requires=requires, upcast=name == "ref"
        )
        results[name] = {"logp": logp, "lse": lse, **grads}
    out = {}
    for key, ref in results["ref"].items():
        scale = ref.double().abs().max().clamp_min(1e-30)

        def err(x, ref=ref, scale=scale):
            return ((x.double() - ref.double()).abs().max() / scale).item()

        out[key] = (err(results["fused"][key]), err(results["naive"][key]))
    return out


# Shapes: awkward sizes (not multiples of any block), several tiles per dimension.
TORCH_CASES = [
    Case(37, 48, 1001),
    Case(37, 48, 1001, bias=True, softcap=4.0, temperature=0.7, lse_grad=True),
    Case(64, 32, 257, softcap=4.0),
    Case(5, 17, 3001, bias=True, temperature=1.5),
    Case(1, 8, 3, lse_grad=True),
]
# The interpreter is slow: few, tiny cases that still cover every feature and masked edges.
TRITON_CASES = [
    Case(37, 48, 1001, bias=True, softcap=4.0, temperature=0.7, lse_grad=True),
    Case(20, 40, 203, temperature=1.5),  # temperature without soft-capping
    Case(3, 64, 130, bias=True, lse_grad=True),
]

FP32_TOL = 2e-5


def case_id(case: Case) -> str:
    flags = [f"{case.rows}x{case.width}x{case.vocab}"]
    flags += ["bias"] if case.bias else []
    flags += [f"cap{case.softcap}"] if case.softcap else []
    flags += [f"T{case.temperature}"] if case.temperature != 1.0 else []
    flags += ["dlse"] if case.lse_grad else []
    return "-".join(flags)


def check_fp32(case: Case, impl: str, device: str = "cpu", requires=(True, True, True)):
    errs = errors(case, torch.float32, impl, device=device, requires=requires)
    for key, (fused_err, _) in errs.items():
        assert fused_err < FP32_TOL, f"{impl} {key}: scaled error {fused_err:.2e}"
    return errs


def check_low_precision(case: Case, dtype, impl: str, device: str = "cpu", factor: float = 2.0):
    errs = errors(case, dtype, impl, device=device)
    for key, (fused_err, naive_err) in errs.items():
        # A floor for outputs where the naive path happens to be almost exact.
        bound = factor * naive_err + 1e-3 * torch.finfo(dtype).eps
        assert fused_err <= bound, (
            f"{impl} {dtype} {key}: error {fused_err:.2e} vs naive {naive_err:.2e}"
        )


# ------------------------------------------------------------------------------------------------
# Values and gradients


@pytest.mark.parametrize("case", TORCH_CASES, ids=case_id)
def test_torch_impl_matches_float64(case):
    check_fp32(case, "torch")


@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
def test_triton_impl_matches_float64(case):
    check_fp32(case, "triton")


def _set_blocks(monkeypatch, case: Case, rows: int, columns: int) -> None:
    """The torch impl's blocks: at most `rows` x `columns` (both capped by the case's size)."""
    columns = min(columns, case.vocab)
    monkeypatch.setattr(op_module, "INPUT_BLOCK_BYTES", max(columns, rows) * 4 * case.width)
    monkeypatch.setattr(op_module, "LOGITS_BLOCK_BYTES", rows * 4 * columns)


@pytest.mark.parametrize(("block_rows", "block_columns"), [(3, 10_000), (16, 128), (5, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_impl_several_blocks(monkeypatch, block_rows, block_columns, dtype):
    """Several row and vocabulary blocks (the last ones partial) give the same values and
    gradients: the online log-sum-exp and the accumulations over blocks."""
    case = TORCH_CASES[1]
    _set_blocks(monkeypatch, case, block_rows, block_columns)
    plan = op_module._block_plan(
        case.rows, case.vocab, case.width, op_module.LOGITS_BLOCK_BYTES, torch.device("cpu")
    )
    assert plan.rows <= block_rows and case.rows % plan.rows != 0  # a partial last row block
    if block_columns < case.vocab:
        assert case.vocab % plan.columns != 0  # a partial last vocabulary block
    if dtype == torch.float32:
        check_fp32(case, "torch")
    else:
        check_low_precision(case, dtype, "torch")


@pytest.mark.parametrize(
    "requires", [(True, False, False), (False, True, False), (False, False, True)]
)
def test_torch_impl_several_blocks_partial_requires_grad(monkeypatch, requires):
    case = Case(21, 24, 150, bias=True, softcap=4.0, temperature=0.8)
    _set_blocks(monkeypatch, case, 4, 32)
    check_fp32(case, "torch", requires=requires)


def test_torch_impl_blocks_of_masked_tokens():
    """A -inf bias masks the first vocabulary blocks of every row: no NaN from -inf - -inf in the
    online log-sum-exp, the same log-probs as one block."""
    hidden, weight, _, targets, _, _ = make_inputs(Case(6, 8, 40), torch.float32)
    bias = torch.zeros(40)
    bias[:10] = -math.inf
    targets = targets.clamp(10, 39)
    one_block = linear_logprobs(hidden, weight, targets, bias=bias, impl="torch")
    with pytest.MonkeyPatch.context() as patch:
        _set_blocks(patch, Case(6, 8, 40), 6, 8)
        blocks = linear_logprobs(hidden, weight, targets, bias=bias, impl="torch")
    assert torch.isfinite(blocks).all()
    torch.testing.assert_close(blocks, one_block)


def test_block_plan_is_cache_sized_on_the_cpu_only():
    cpu = op_module._block_plan(16384, 128256, 4096, 32 * 2**20, torch.device("cpu"))
    assert cpu.columns * 4096 * 4 <= op_module.INPUT_BLOCK_BYTES
    # A GPU runs whole-vocabulary row chunks: thousands of small blocks would be launch-bound.
    gpu = op_module._block_plan(16384, 128256, 4096, 32 * 2**20, torch.device("meta"))
    assert gpu.columns == 128256 and gpu.rows * gpu.columns * 4 <= 32 * 2**20


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", TORCH_CASES[:4], ids=case_id)
def test_torch_impl_low_precision(case, dtype):
    check_low_precision(case, dtype, "torch")


def test_triton_impl_fp16():
    # bf16 is garbage under the interpreter (raw bits in tl.dot): see test_gpu_* for bf16.
    case = Case(37, 48, 300, bias=True, softcap=4.0, temperature=0.7, lse_grad=True)
    check_low_precision(case, torch.float16, "triton")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize(
    "requires", [(True, False, False), (False, True, False), (False, False, True)]
)
def test_partial_requires_grad(impl, requires):
    case = Case(21, 24, 150, bias=True, softcap=4.0, temperature=0.8)
    errs = check_fp32(case, impl, requires=requires)
    wanted = {n for n, r in zip(("hidden", "weight", "bias"), requires, strict=True) if r}
    assert set(errs) - {"logp", "lse"} == wanted


def test_frozen_head_skips_weight_kernel(monkeypatch):
    """With only hidden requiring grad (LoRA), the dW/db kernel never launches."""
    from fastdpo.kernels import linear_logprobs as kernels

    class Forbidden:
        def __getitem__(self, grid):
            raise AssertionError("dW kernel launched for a frozen head")

    monkeypatch.setattr(kernels, "_linear_logprobs_bwd_weight_kernel", Forbidden())
    check_fp32(Case(9, 16, 70), "triton", requires=(True, False, False))


def test_no_input_requires_grad_gives_plain_tensors():
    hidden, weight, _, targets, _, _ = make_inputs(Case(4, 8, 10), torch.float32)
    logp = linear_logprobs(hidden, weight, targets, impl="torch")
    assert logp.dtype == torch.float32 and logp.shape == (4,) and not logp.requires_grad


# ------------------------------------------------------------------------------------------------
# Ignored rows, shapes, options


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_ignored_rows_are_zero_with_no_gradient(impl):
    case = Case(13, 16, 90, bias=True, lse_grad=True)
    logp, lse, grads, targets = run(
        lambda h, w, t, b: fused(impl)(h, w, t, b, case), case, torch.float32
    )
    ignored = targets == IGNORE
    assert ignored.sum() >= 2
    assert torch.equal(logp[ignored], torch.zeros_like(logp[ignored]))
    assert torch.equal(lse[ignored], torch.zeros_like(lse[ignored]))
    assert torch.equal(grads["hidden"][ignored], torch.zeros_like(grads["hidden"][ignored]))
    assert (logp[~ignored] < 0).all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_all_rows_ignored(impl):
    hidden, weight, bias, _, _, _ = make_inputs(Case(6, 16, 40, bias=True), torch.float32)
    for leaf in (hidden, weight, bias):
        leaf.requires_grad_()
    targets = torch.full((6,), IGNORE)
    logp = linear_logprobs(hidden, weight, targets, bias=bias, impl=impl)
    logp.sum().backward()
    assert torch.equal(logp, torch.zeros(6))
    for leaf in (hidden, weight, bias):
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_no_rows(impl):
    """An empty batch (N = 0) gives an empty result and zero gradients, not an error."""
    hidden = torch.randn(0, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    logp = linear_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), bias=bias, impl=impl)
    logp.sum().backward()
    assert logp.shape == (0,) and hidden.grad.shape == (0, 16)
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


def _record_rows(monkeypatch) -> list[tuple[str, int]]:
    """Wraps the impls so that every forward / backward call records how many rows it got."""
    seen: list[tuple[str, int]] = []
    implementation = op_module._implementation

    def recording(options):
        forward, backward = implementation(options)

        def counted(name, fn):
            def call(hidden, *args, **kwargs):
                seen.append((name, hidden.shape[0]))
                return fn(hidden, *args, **kwargs)

            return call

        return counted("forward", forward), counted("backward", backward)

    monkeypatch.setattr(op_module, "_implementation", recording)
    return seen


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_ignored_rows_are_dropped_before_the_head(impl, monkeypatch):
    """[B, T] labels whose prompt third is ignore_index: the impl computes only the kept rows
    (no matmul work for the others), bitwise as the op on those rows alone would; the values
    and gradients equal the path that ran every row and masked the ignored ones (the op before
    rows were dropped); dropped rows give 0 and exactly zero gradient."""
    case = Case(24, 16, 90, bias=True, softcap=4.0, lse_grad=True)
    hidden, weight, bias, targets, grad_logp, grad_lse = make_inputs(case, torch.float32)
    targets = targets.view(4, 6)
    targets[:, :2] = IGNORE
    kept = targets.reshape(-1) != IGNORE
    options = {"bias": bias, "softcap": 4.0, "ignore_index": IGNORE, "impl": impl}

    def values_and_grads(call, rows=slice(None)):
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        logp, lse = call(*leaves)
        loss = (logp.reshape(-1) * grad_logp[rows]).sum() + (lse.reshape(-1) * grad_lse[rows]).sum()
        return (
            logp.detach().reshape(-1),
            lse.detach().reshape(-1),
            torch.autograd.grad(loss, leaves),
        )

    seen = _record_rows(monkeypatch)
    logp, lse, (d_hidden, d_weight, d_bias) = values_and_grads(
        lambda h, w, b: linear_logprobs(
            h.view(4, 6, 16), w, targets, **dict(options, bias=b), return_lse=True
        )
    )
    assert seen == [("forward", int(kept.sum())), ("backward", int(kept.sum()))]

    # The op on the kept rows alone: the same numbers, bit for bit.
    alone = values_and_grads(
        lambda h, w, b: linear_logprobs(
            h[kept], w, targets.reshape(-1)[kept], **dict(options, bias=b), return_lse=True
        ),
        rows=kept,
    )
    assert torch.equal(logp[kept], alone[0]) and torch.equal(lse[kept], alone[1])
    assert torch.equal(d_hidden[kept], alone[2][0][kept])
    assert seen[2:] == [("forward", int(kept.sum())), ("backward", int(kept.sum()))]
    assert torch.equal(d_weight, alone[2][1]) and torch.equal(d_bias, alone[2][2])

    # Dropped rows: zeros, and exactly zero gradient.
    zeros = torch.zeros(int((~kept).sum()))
    assert torch.equal(logp[~kept], zeros) and torch.equal(lse[~kept], zeros)
    assert torch.equal(d_hidden[~kept], torch.zeros(len(zeros), 16))

    # Every row through the autograd Function, ignored ones masked inside: the same results.
    op = op_module.LinearLogprobsOptions(softcap=4.0, ignore_index=IGNORE, impl=impl)
    every_row = values_and_grads(
        lambda h, w, b: op_module.LinearLogprobsFunction.apply(h, w, b, targets.reshape(-1), op)
    )
    assert seen[4:] == [("forward", 24), ("backward", 24)]
    for name, ours, theirs in zip(
        ("logp", "lse", "dH", "dW", "db"),
        (logp, lse, d_hidden, d_weight, d_bias),
        (*every_row[:2], *every_row[2]),
        strict=True,
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6, msg=name)


def test_leading_dims_and_int32_targets():
    case = Case(12, 16, 50, softcap=4.0)
    hidden, weight, _, targets, _, _ = make_inputs(case, torch.float32)
    flat = linear_logprobs(hidden, weight, targets, softcap=4.0, impl="torch")
    shaped = linear_logprobs(
        hidden.view(3, 4, 16), weight, targets.view(3, 4).int(), softcap=4.0, impl="torch"
    )
    assert shaped.shape == (3, 4)
    assert torch.equal(shaped.reshape(-1), flat)


def test_triton_strided_hidden_and_splits():
    """Non-contiguous hidden rows, and every V-split count, give the same values."""
    from fastdpo.kernels import linear_logprobs as kernels

    case = Case(19, 32, 200, bias=True, softcap=4.0)
    hidden, weight, bias, targets, _, _ = make_inputs(case, torch.float32)
    padded = torch.zeros(case.rows, 40)
    padded[:, 3:35] = hidden
    strided = padded[:, 3:35]
    assert not strided.is_contiguous()
    safe = torch.where(targets == IGNORE, 0, targets)
    ref_logp, ref_lse = naive_logprobs(hidden, weight, targets, bias, case)
    valid = targets != IGNORE
    for split_v in (1, 2, 4):
        config = dataclasses.replace(kernels.INTERPRETER_CONFIG, split_v=split_v)
        target_logit, lse = kernels.linear_logprobs_forward(
            strided, weight, bias, safe, softcap=4.0, temperature=1.0, config=config
        )
        logp = torch.where(valid, target_logit - lse, 0.0)
        torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=2e-5)
        torch.testing.assert_close(lse[valid].double(), ref_lse[valid], rtol=0, atol=2e-5)


def test_triton_weight_slabs_are_bitwise_equal():
    """fp16 dW goes through vocabulary slabs; slab boundaries must not change a single bit."""
    from fastdpo.kernels import linear_logprobs as kernels

    case = Case(19, 32, 200, bias=True, softcap=4.0, temperature=0.8)
    hidden, weight, bias, targets, grad_logp, _ = make_inputs(case, torch.float16)
    safe = torch.where(targets == IGNORE, 0, targets)
    _, lse = kernels.linear_logprobs_forward(
        hidden, weight, bias, safe, softcap=4.0, temperature=0.8
    )
    grad_target = torch.where(targets == IGNORE, 0.0, grad_logp)
    results = []
    for slab_tiles in (1, 3, None):  # 4 tiles of 64: slabs of 1, 3 (+1) and all
        config = dataclasses.replace(kernels.INTERPRETER_CONFIG, weight_slab_tiles=slab_tiles)
        results.append(
            kernels.linear_logprobs_backward(
                hidden, weight, bias, safe, lse, grad_target, -grad_target,
                softcap=4.0, temperature=0.8, need_hidden=False, need_weight=True,
                need_bias=True, config=config,
            )
        )  # fmt: skip
    for _, grad_weight, grad_bias in results[1:]:
        assert torch.equal(grad_weight, results[0][1])
        assert torch.equal(grad_bias, results[0][2])


def test_auto_picks_torch_on_cpu(caplog):
    hidden, weight, _, targets, _, _ = make_inputs(Case(4, 8, 10), torch.float32)
    with caplog.at_level("DEBUG", logger="fastdpo.ops.linear_logprobs"):
        linear_logprobs(hidden, weight, targets)
    assert "impl=torch" in caplog.text


# ------------------------------------------------------------------------------------------------
# Bad input


def _good():
    hidden, weight, bias, targets, _, _ = make_inputs(Case(6, 8, 20, bias=True), torch.float32)
    return {"hidden": hidden, "weight": weight, "targets": targets, "bias": bias}


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"weight": torch.randn(20, 9)}, ValueError, "last dim"),
        ({"weight": torch.randn(20)}, ValueError, r"weight must have shape \[V, H\]"),
        ({"targets": torch.zeros(5, dtype=torch.long)}, ValueError, "leading shape"),
        ({"targets": torch.zeros(6)}, TypeError, "integer"),
        ({"bias": torch.randn(21)}, ValueError, "bias must have shape"),
        ({"weight": torch.randn(20, 8, dtype=torch.float64)}, TypeError, "weight dtype"),
        ({"hidden": torch.randn(6, 8).long()}, TypeError, "hidden must be"),
        ({"bias": torch.randn(20).half()}, TypeError, "bias dtype"),
        ({"weight": torch.randn(20, 8, device="meta")}, ValueError, "weight is on meta"),
        ({"targets": torch.tensor([0, 1, 2, 20, 4, 5])}, ValueError, "position 3: 20"),
        ({"targets": torch.tensor([0, -1, 2, 3, 4, 5])}, ValueError, "position 1: -1"),
        ({"softcap": 0.0}, ValueError, "softcap"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"impl": "cuda"}, ValueError, "impl must be one of"),
    ],
)
def test_bad_input_is_a_clear_error(change, error, match):
    kwargs = {**_good(), **change}
    with pytest.raises(error, match=match):
        linear_logprobs(**kwargs)


def test_triton_impl_unavailable_says_what_to_do():
    with pytest.raises(RuntimeError, match="impl='torch'"):
        op_module._resolve_impl("triton", torch.device("meta"))


def test_check_targets():
    check_targets(torch.tensor([0, 19, IGNORE]), 20, IGNORE)
    with pytest.raises(ValueError, match="2 value"):
        check_targets(torch.tensor([0, 20, -5, IGNORE]), 20, IGNORE)
    with pytest.raises(TypeError, match="integer"):
        check_targets(torch.tensor([0.0]), 20)


# ------------------------------------------------------------------------------------------------
# GPU: the same checks at realistic shapes (skipped without CUDA)

GPU_CASES = [
    Case(4096, 1024, 32003, bias=True, softcap=30.0, temperature=0.7, lse_grad=True),
    Case(333, 2048, 50257),  # few rows: the V-split path
]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_gpu_fp32(case, impl):
    check_fp32(case, impl, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_gpu_low_precision(case, impl, dtype):
    check_low_precision(case, dtype, impl, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "requires", [(True, False, False), (False, True, False), (False, False, True)]
)
def test_gpu_partial_requires_grad(requires):
    check_fp32(Case(1000, 512, 10007, bias=True, softcap=30.0), "triton", "cuda", requires)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_backward_is_bitwise_deterministic(case, impl, dtype):
    """Two runs give the same bits (values, lse and every gradient). Only a real parallel
    launch can show a race or an order-dependent reduction: under the interpreter programs run
    one after another, so this runs on CUDA only, at shapes with many row and vocabulary tiles
    (and the few-rows V-split path)."""

    def once():
        return run(lambda h, w, t, b: fused(impl)(h, w, t, b, case), case, dtype, device="cuda")

    first, second = once(), once()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert set(first[2]) == {"hidden", "weight"} | ({"bias"} if case.bias else set())
    for name in first[2]:
        assert torch.equal(first[2][name], second[2][name]), name


@pytest.mark.gpu
def test_gpu_auto_picks_triton(caplog):
    hidden, weight, _, targets, _, _ = make_inputs(Case(64, 64, 1000), torch.bfloat16, "cuda")
    with caplog.at_level("DEBUG", logger="fastdpo.ops.linear_logprobs"):
        linear_logprobs(hidden, weight, targets)
    assert "impl=triton" in caplog.text


def test_ignore_index_none_counts_no_rows_and_gives_the_same_values(monkeypatch):
    """`ignore_index=None` (sequence_logps' call: completion targets only) skips the count of
    kept rows, a host sync on accelerators, and computes exactly what the default does."""
    hidden = torch.randn(7, 16, requires_grad=True)
    weight = torch.randn(
        40,
        16,
    )
    targets = torch.randint(0, 40, (7,))
    expected = linear_logprobs(hidden, weight, targets, impl="torch")

    def no_count(*args, **kwargs):
        raise AssertionError("rows were counted")

    monkeypatch.setattr(op_module, "_kept_rows", no_count)
    got = linear_logprobs(hidden, weight, targets, ignore_index=None, impl="torch")
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="outside"):
        linear_logprobs(hidden, weight, torch.full((7,), -100), ignore_index=None)
