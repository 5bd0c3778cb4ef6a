"""The packed sequence-loss op: the Triton kernel (interpreted on the CPU) against the PyTorch
path in float64, on random segment layouts with empty and length-1 sequences; errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from fastdpo.kernels import preference_loss as kernels

from fastdpo import losses
from fastdpo.ops.preference_loss import packed_preference_loss
from fastdpo.ops.segments import segment_sums

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

KERNEL_CASES = [
    ("sigmoid", {}),
    ("sigmoid", {"label_smoothing": 0.15}),
    ("robust", {"label_smoothing": 0.2}),
    ("hinge", {}),
    ("ipo", {}),
    ("simpo", {}),
    ("simpo", {"gamma": 0.0}),
]


def make_packed(num_pairs: int, *, max_len: int = 40, masked: bool, seed: int, device=DEVICE):
    """A random packed layout: lengths include 0 and 1; with `masked`, some tokens are invalid
    and one sequence is masked out entirely (empty after masking)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len, (2 * num_pairs,), generator=g)
    # A length-1 chosen and rejected sequence and an empty one (for P = 1: chosen 1, rejected 0).
    lengths[-1], lengths[0] = 1, 1
    lengths[3 % (2 * num_pairs)] = 0
    target_cu = torch.zeros(2 * num_pairs + 1, dtype=torch.int32)
    target_cu[1:] = lengths.cumsum(0)
    num_tokens = int(target_cu[-1])
    token_logps = -3 * torch.rand(num_tokens, generator=g) - 0.01
    valid = None
    if masked:
        valid = torch.rand(num_tokens, generator=g) > 0.25
        longest = int(lengths.argmax())
        valid[target_cu[longest] : target_cu[longest + 1]] = False
    ref = -3 * lengths.float() * torch.rand(2 * num_pairs, generator=g) - 0.5
    to = dict(device=device)
    return dict(
        token_logps=token_logps.to(**to),
        target_cu=target_cu.to(**to),
        ref_chosen=ref[0::2].contiguous().to(**to),
        ref_rejected=ref[1::2].contiguous().to(**to),
        valid=None if valid is None else valid.to(**to),
    )


def run(batch, *, dtype=torch.float32, impl, loss, beta, **params):
    """(loss, metrics, d loss / d token_logps) of one call."""
    token_logps = batch["token_logps"].to(dtype).detach().requires_grad_(True)
    value, metrics = packed_preference_loss(
        token_logps,
        batch["target_cu"],
        batch["ref_chosen"].to(dtype),
        batch["ref_rejected"].to(dtype),
        loss=loss,
        beta=beta,
        valid=batch["valid"],
        impl=impl,
        **params,
    )
    (grad,) = torch.autograd.grad(value, token_logps)
    return value, metrics, grad


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("loss", "params"), KERNEL_CASES)
def test_kernel_matches_float64_torch_path(loss, params, masked):
    for seed, num_pairs in ((0, 1), (1, 5)):
        batch = make_packed(num_pairs, masked=masked, seed=seed)
        beta = 0.05 if loss == "hinge" else 0.5
        got, got_metrics, got_grad = run(batch, impl="triton", loss=loss, beta=beta, **params)
        want, want_metrics, want_grad = run(
            batch, dtype=torch.float64, impl="torch", loss=loss, beta=beta, **params
        )
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)
        assert set(got_metrics) == set(want_metrics)
        for key in want_metrics:
            torch.testing.assert_close(
                got_metrics[key].double(), want_metrics[key], rtol=2e-5, atol=1e-5, msg=key
            )
        torch.testing.assert_close(got_grad.double(), want_grad, rtol=2e-5, atol=1e-7)
        if batch["valid"] is not None:
            assert (got_grad[~batch["valid"]] == 0).all()


def test_kernel_sequence_sums_and_lengths():
    batch = make_packed(4, masked=True, seed=7)
    result = kernels.preference_loss_forward(
        batch["token_logps"],
        batch["target_cu"],
        batch["ref_chosen"],
        batch["ref_rejected"],
        batch["valid"].to(torch.int8),
        loss="sigmoid",
        beta=0.1,
    )
    sums, counts = segment_sums(batch["token_logps"].double(), batch["target_cu"], batch["valid"])
    torch.testing.assert_close(result.seq_logps.double(), sums, rtol=1e-6, atol=1e-5)
    assert torch.equal(result.seq_lengths.long(), counts)
    assert (counts == 0).any()  # the layout has an empty-after-masking sequence


def test_kernel_loops_over_several_blocks(monkeypatch):
    """Sequences longer than a block and more pairs than a block: every kernel loop (segment
    sums, the backward fill, the finalize over pairs) takes several trips, ending mid-block."""
    monkeypatch.setattr(kernels, "_BLOCK_TOKENS", 16)
    monkeypatch.setattr(kernels, "_BLOCK_PAIRS", 16)
    batch = make_packed(37, max_len=70, masked=True, seed=11)
    assert (batch["target_cu"].diff() > 2 * 16).any()
    got = run(batch, impl="triton", loss="sigmoid", beta=0.2)
    want = run(batch, dtype=torch.float64, impl="torch", loss="sigmoid", beta=0.2)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-6)
    for key in kernels.METRIC_NAMES[1:]:
        torch.testing.assert_close(got[1][key].double(), want[1][key], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2].double(), want[2], rtol=1e-5, atol=1e-8)


@pytest.mark.gpu
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("loss", "params"), KERNEL_CASES)
def test_kernel_is_deterministic(loss, params, masked):
    """Two runs give the same bits (loss, every metric, the gradient). Only a real parallel
    launch can show a race: under the interpreter programs run one after another, so this runs
    on CUDA only, with thousands of pairs (one program each) and sequences longer than a block."""
    batch = make_packed(3000, max_len=2500, masked=masked, seed=3, device="cuda")
    first = run(batch, impl="triton", loss=loss, beta=0.3, **params)
    second = run(batch, impl="triton", loss=loss, beta=0.3, **params)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[2], second[2])
    assert set(kernels.METRIC_NAMES[1:]) <= set(first[1])  # every kernel metric is compared
    for key in first[1]:
        assert torch.equal(first[1][key], second[1][key]), key


def test_kernel_knows_which_losses_normalize_and_need_reference():
    for name in kernels.KERNEL_LOSSES:
        spec = losses.LOSSES[name]
        assert (name in kernels.LENGTH_NORMALIZED) == spec.length_normalized, name
        assert (name in kernels.REFERENCE_FREE) == (not spec.needs_reference), name


def test_reference_free_kernel_call_without_reference():
    batch = make_packed(3, masked=False, seed=4)
    token_logps = batch["token_logps"].requires_grad_(True)
    got, _ = packed_preference_loss(
        token_logps, batch["target_cu"], loss="simpo", beta=2.0, impl="triton"
    )
    want, _ = packed_preference_loss(
        token_logps.double(), batch["target_cu"], loss="simpo", beta=2.0, impl="torch"
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The PyTorch path for the losses the kernel does not cover


@pytest.mark.parametrize(
    ("loss", "params"),
    [("nca_pair", {}), ({"sigmoid": 1.0, "sft": 0.5}, {}), ("orpo", {}), ("exo_pair", {})],
)
def test_torch_path_is_preference_loss_on_segment_sums(loss, params):
    batch = make_packed(4, masked=True, seed=5)
    value, metrics = packed_preference_loss(
        batch["token_logps"].double(),
        batch["target_cu"],
        batch["ref_chosen"].double(),
        batch["ref_rejected"].double(),
        loss=loss,
        beta=0.2,
        valid=batch["valid"],
        **params,
    )
    # Sums and counts written out sequence by sequence.
    cu, valid, logps = batch["target_cu"].tolist(), batch["valid"], batch["token_logps"].double()
    sums = torch.stack([logps[a:b][valid[a:b]].sum() for a, b in itertools.pairwise(cu)])
    counts = torch.tensor([int(valid[a:b].sum()) for a, b in itertools.pairwise(cu)])
    expected, expected_metrics = losses.preference_loss(
        sums[0::2],
        sums[1::2],
        batch["ref_chosen"].double(),
        batch["ref_rejected"].double(),
        loss=loss,
        beta=0.2,
        chosen_lengths=counts[0::2],
        rejected_lengths=counts[1::2],
        **params,
    )
    torch.testing.assert_close(value, expected)
    assert set(metrics) == set(expected_metrics)


def test_auto_uses_torch_on_cpu_and_kernel_on_cuda():
    batch = make_packed(2, masked=False, seed=6)
    token_logps = batch["token_logps"].requires_grad_(True)
    value, _ = packed_preference_loss(
        token_logps, batch["target_cu"], batch["ref_chosen"], batch["ref_rejected"]
    )
    uses_kernel = type(value.grad_fn).__name__.startswith("PackedPreferenceLossFunction")
    assert uses_kernel == HAS_CUDA


# ------------------------------------------------------------------------------------------------
# Errors


def _args(batch):
    return batch["token_logps"], batch["target_cu"], batch["ref_chosen"], batch["ref_rejected"]


def test_explicit_triton_refuses_what_it_cannot_compute():
    batch = make_packed(2, masked=False, seed=8)
    with pytest.raises(RuntimeError, match="loss 'nca_pair' has no kernel"):
        packed_preference_loss(*_args(batch), loss="nca_pair", impl="triton")
    with pytest.raises(RuntimeError, match="single loss given by name"):
        packed_preference_loss(*_args(batch), loss={"sigmoid": 1.0, "sft": 1.0}, impl="triton")
    with pytest.raises(RuntimeError, match="takes no parameter"):
        packed_preference_loss(*_args(batch), loss="hinge", impl="triton", label_smoothing=0.1)
    ref = batch["ref_chosen"].clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="reference log-probs as constants"):
        packed_preference_loss(
            batch["token_logps"], batch["target_cu"], ref, batch["ref_rejected"], impl="triton"
        )
    with pytest.raises(ValueError, match="impl must be one of"):
        packed_preference_loss(*_args(batch), impl="cuda")


def test_re_registered_loss_is_not_computed_by_the_kernel():
    saved = dict(losses.LOSSES)
    try:

        @losses.register_loss("hinge", replace=True)
        def squared_hinge(x: losses.LossInputs) -> torch.Tensor:
            return torch.relu(1.0 - x.beta * x.margin()).square().mean()

        batch = make_packed(2, masked=False, seed=9)
        with pytest.raises(RuntimeError, match="re-registered"):
            packed_preference_loss(*_args(batch), loss="hinge", impl="triton")
    finally:
        losses.LOSSES.clear()
        losses.LOSSES.update(saved)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bad_arguments(impl):
    batch = make_packed(2, masked=False, seed=10)
    token_logps, target_cu, ref_c, ref_r = _args(batch)
    with pytest.raises(ValueError, match="even number"):
        packed_preference_loss(token_logps, target_cu[:-1], ref_c, ref_r, impl=impl)
    with pytest.raises(ValueError, match="end at M"):
        packed_preference_loss(token_logps[:-1], target_cu, ref_c, ref_r, impl=impl)
    with pytest.raises(ValueError, match=r"ref_chosen must have one value per pair, shape \[2\]"):
        packed_preference_loss(token_logps, target_cu, ref_c[:1], ref_r, impl=impl)
    with pytest.raises(ValueError, match="loss 'sigmoid' needs reference log-probs"):
        packed_preference_loss(token_logps, target_cu, impl=impl)
    with pytest.raises(ValueError, match=r"robust.*label_smoothing must be in \[0, 0.5\)"):
        packed_preference_loss(*_args(batch), loss="robust", label_smoothing=0.5, impl=impl)
    with pytest.raises(ValueError, match="valid must be a bool mask"):
        packed_preference_loss(*_args(batch), valid=torch.ones(3, dtype=torch.bool), impl=impl)


def test_unpaired_loss_is_pointed_to_preference_loss():
    batch = make_packed(2, masked=False, seed=11)
    with pytest.raises(ValueError, match="'kto' takes unpaired completions"):
        packed_preference_loss(*_args(batch), loss="kto", kl=0.0)


# ------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize(("loss", "params"), KERNEL_CASES)
def test_kernel_on_gpu_large(loss, params):
    batch = make_packed(64, max_len=3000, masked=True, seed=12)
    beta = 0.01 if loss == "hinge" else 0.5
    got, got_metrics, got_grad = run(batch, impl="triton", loss=loss, beta=beta, **params)
    want, want_metrics, want_grad = run(
        batch, dtype=torch.float64, impl="torch", loss=loss, beta=beta, **params
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    for key in want_metrics:
        torch.testing.assert_close(
            got_metrics[key].double(), want_metrics[key], rtol=1e-4, atol=1e-4, msg=key
        )
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-4, atol=1e-8)
