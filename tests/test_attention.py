"""Packed (varlen) attention: every backend against a float64 per-sequence reference, and the
transformers integration (registration by name, per-instance switch, refusals)."""

from __future__ import annotations

import dataclasses
import inspect
import itertools

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaAttention

from fastdpo import attention as packed
from fastdpo.attention import (
    ATTENTION_NAMES,
    BACKENDS,
    STATE_KWARG,
    backends,
    packed_attention_kwargs,
    runners,
    use_packed_attention,
    varlen_attention,
)
from fastdpo.attention.state import VarlenSegments
from fastdpo.testing.models import tiny_model

HAS_CUDA = torch.cuda.is_available()

# Lengths with awkward sizes, a one-token sequence and one longer than every window below.
LENGTHS = [5, 1, 13, 7]


def cu_seqlens_of(lengths, device="cpu") -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32).to(
        device
    )


def state_for(lengths, device="cpu"):
    return packed_attention_kwargs(cu_seqlens_of(lengths, device), max(lengths))[STATE_KWARG]


def reference_attention(q, k, v, lengths, *, scale, window=None, softcap=None) -> torch.Tensor:
    """float64 [T, Hq, D]: each sequence alone, scores written out in full."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    outs, start = [], 0
    for length in lengths:
        sl = slice(start, start + length)
        scores = torch.einsum("qhd,khd->hqk", q[sl], k[sl]) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        distance = torch.arange(length)[:, None] - torch.arange(length)[None, :]
        allowed = distance >= 0
        if window is not None:
            allowed &= distance < window
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[sl]))
        start += length
    return torch.cat(outs)


def assert_forward_backward_close(out, ref, inputs) -> None:
    """`out` equals the float64 `ref`, and so do the gradients of both w.r.t. `inputs` under
    the same random output gradient."""
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out.double())
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=1e-4, atol=1e-5)


def random_qkv(lengths, heads=4, kv_heads=2, dim=16, dtype=torch.float32, device="cpu"):
    total = sum(lengths)
    make = lambda h: torch.randn(total, h, dim, dtype=dtype, device=device, requires_grad=True)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


FEATURES = [
    pytest.param({}, id="causal"),
    pytest.param({"window": 4}, id="window"),
    pytest.param({"softcap": 1.5}, id="softcap"),
    pytest.param({"window": 3, "softcap": 2.0}, id="window+softcap"),
]


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("features", FEATURES)
def test_sdpa_backend_forward_and_backward(kv_heads, features):
    q, k, v = random_qkv(LENGTHS, kv_heads=kv_heads)
    scale = 0.3
    out = varlen_attention(
        q,
        k,
        v,
        state_for(LENGTHS),
        backend="sdpa",
        scale=scale,
        sliding_window=features.get("window"),
        softcap=features.get("softcap"),
    )
    ref = reference_attention(q, k, v, LENGTHS, scale=scale, **features)
    assert_forward_backward_close(out, ref, (q, k, v))


@pytest.mark.parametrize("features", FEATURES)
def test_flex_backend_forward_on_cpu(features):
    q, k, v = random_qkv(LENGTHS)
    with torch.no_grad():
        out = varlen_attention(
            q,
            k,
            v,
            state_for(LENGTHS),
            backend="flex",
            scale=0.25,
            sliding_window=features.get("window"),
            softcap=features.get("softcap"),
        )
        ref = reference_attention(q, k, v, LENGTHS, scale=0.25, **features)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_flex_refuses_backward_on_cpu():
    q, k, v = random_qkv(LENGTHS)
    with pytest.raises(RuntimeError, match="no backward on the CPU"):
        varlen_attention(q, k, v, state_for(LENGTHS), backend="flex")


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU's refusals")
@pytest.mark.parametrize(("backend", "reason"), [("flash", "flash"), ("torch", "CUDA")])
def test_cuda_backends_explain_why_not_on_cpu(backend, reason):
    q, k, v = random_qkv(LENGTHS, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=f"backend '{backend}' cannot run.*{reason}"):
        varlen_attention(q, k, v, state_for(LENGTHS), backend=backend)


def test_auto_picks_sdpa_on_cpu_and_records_it():
    q, k, v = random_qkv(LENGTHS)
    state = state_for(LENGTHS)
    varlen_attention(q, k, v, state, backend="auto")
    assert state.backends_used == {"sdpa"} and state.calls == 1


def test_dropout_needs_a_backend_that_has_it():
    features = packed.CallFeatures(
        device_type="cuda", dtype=torch.bfloat16, dropout=0.1, needs_grad=True
    )
    assert "dropout" in packed.unavailable_reason("flex", features)
    assert "dropout" in packed.unavailable_reason("torch", features)
    assert packed.unavailable_reason("sdpa", features) is None


def test_rejects_bad_inputs():
    q, k, v = random_qkv(LENGTHS)
    with pytest.raises(ValueError, match="describe 20"):
        varlen_attention(q, k, v, state_for([5, 15]), backend="sdpa")
    with pytest.raises(ValueError, match="multiple"):
        varlen_attention(
            q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), state_for(LENGTHS)
        )
    with pytest.raises(ValueError, match="backend must be"):
        varlen_attention(q, k, v, state_for(LENGTHS), backend="xformers")
    with pytest.raises(TypeError, match="int32"):
        packed_attention_kwargs(cu_seqlens_of(LENGTHS).long(), 13)
    with pytest.raises(TypeError, match="Python int"):
        packed_attention_kwargs(cu_seqlens_of(LENGTHS), torch.tensor(13))


# ------------------------------------------------------------------------------------------------
# The CUDA kernels' argument conventions, checked on the CPU against stand-ins that implement
# each documented signature (the kernels themselves run in the `gpu` tests below)


def _segments(cu_seq):
    return [b - a for a, b in itertools.pairwise(cu_seq.tolist())]


def _window_of(left: int, right: int) -> int | None:
    """flash-attn's (left, right) window with right == 0 -> transformers' W (None: unbounded)."""
    assert right == 0, "packed attention is causal: nothing to the right"
    return None if left < 0 else left + 1


def fake_flash_attn_varlen_func(
    q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False,
    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
):  # fmt: skip
    assert causal and cu_q is cu_k and max_q == max_k == max(_segments(cu_q))
    window = None if window_size == (-1, -1) else _window_of(*window_size)
    return reference_attention(
        q, k, v, _segments(cu_q), scale=softmax_scale, window=window, softcap=softcap or None
    ).to(q.dtype)


def fake_varlen_attn_2_10(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
    assert is_causal and q.shape[1] == k.shape[1], "2.10: no GQA, causal by flag"
    scale = q.shape[-1] ** -0.5  # 2.10 has no scale argument
    return reference_attention(q, k, v, _segments(cu_q), scale=scale).to(q.dtype)


def fake_varlen_attn_2_11(
    q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
    enable_gqa=False,
):  # fmt: skip
    assert enable_gqa or q.shape[1] == k.shape[1]
    return reference_attention(
        q, k, v, _segments(cu_q), scale=scale, window=_window_of(*window_size)
    ).to(q.dtype)


@pytest.mark.parametrize("features", FEATURES)
def test_flash_arguments(monkeypatch, features):
    monkeypatch.setattr(runners, "_flash_varlen_func", lambda: fake_flash_attn_varlen_func)
    q, k, v = random_qkv(LENGTHS)
    state = state_for(LENGTHS)
    out = runners._run_flash(
        q, k, v, state.segments, state, scale=0.3, dropout=0.0,
        sliding_window=features.get("window"), softcap=features.get("softcap"),
    )  # fmt: skip
    ref = reference_attention(q, k, v, LENGTHS, scale=0.3, **features)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("version", "window"), [("2.10", None), ("2.11", None), ("2.11", 4)])
def test_torch_varlen_arguments(monkeypatch, version, window):
    fake = fake_varlen_attn_2_10 if version == "2.10" else fake_varlen_attn_2_11
    parameters = frozenset(inspect.signature(fake).parameters)
    monkeypatch.setattr(runners, "_torch_varlen_func", lambda: (fake, parameters))
    q, k, v = random_qkv(LENGTHS)  # grouped-query: 4 query heads, 2 key/value heads
    state = state_for(LENGTHS)
    out = runners._run_torch_varlen(
        q, k, v, state.segments, state, scale=0.3, sliding_window=window, softcap=None, dropout=0.0
    )
    ref = reference_attention(q, k, v, LENGTHS, scale=0.3, window=window)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_torch_varlen_2_10_refuses_windows(monkeypatch):
    parameters = frozenset(inspect.signature(fake_varlen_attn_2_10).parameters)
    monkeypatch.setattr(backends, "_torch_varlen_func", lambda: (fake_varlen_attn_2_10, parameters))
    features = packed.CallFeatures(device_type="cuda", dtype=torch.bfloat16, sliding_window=8)
    assert "2.11" in packed.unavailable_reason("torch", features)
    full = dataclasses.replace(features, sliding_window=None)
    assert packed.unavailable_reason("torch", full) is None


# ------------------------------------------------------------------------------------------------
# transformers integration


def _packed_forward(model, lengths, **kwargs):
    input_ids = torch.randint(3, 96, (1, sum(lengths)), generator=torch.Generator().manual_seed(0))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    extra = packed_attention_kwargs(cu_seqlens_of(lengths), max(lengths))
    extra.update(kwargs)
    return model(input_ids, position_ids=position_ids, **extra), extra[STATE_KWARG]


def test_names_avoid_transformers_substring_checks():
    # transformers treats names containing these as its own flash / sdpa / flex implementations
    for name in ATTENTION_NAMES.values():
        assert not any(word in name for word in ("flash", "sdpa", "flex_attention", "paged"))
    assert set(ATTENTION_NAMES) == {"auto", *BACKENDS}


def test_switch_is_per_instance_and_registered_by_name():
    switched, untouched = tiny_model("llama"), tiny_model("llama")
    name = use_packed_attention(switched, "sdpa")
    assert name in transformers.AttentionInterface._global_mapping
    assert switched.config._attn_implementation == name
    assert untouched.config._attn_implementation == "eager"


def test_per_batch_work_is_shared_by_layers(monkeypatch):
    built, reads = [], []
    original_mask = runners._causal_window_mask
    monkeypatch.setattr(
        runners,
        "_causal_window_mask",
        lambda length_q, length_k, window, device: (
            built.append((length_q, window)) or original_mask(length_q, length_k, window, device)
        ),
    )
    original_offsets = VarlenSegments.host_offsets
    monkeypatch.setattr(
        VarlenSegments,
        "host_offsets",
        lambda self: reads.append(self._host is None) or original_offsets(self),
    )
    model = tiny_model("gemma2", num_hidden_layers=4)  # sliding (W=4), full, sliding, full
    use_packed_attention(model, "sdpa")
    with torch.no_grad():
        _, state = _packed_forward(model, LENGTHS)
    assert state.calls == 4
    assert state.call_windows == [4, None, 4, None]  # what fastdpo.model checks the config by
    assert reads == [True, False, False, False]  # offsets read from the device once
    # Gemma 2 soft-caps scores, so every sequence needs a mask: one per (length, window in
    # effect), built by the first layer of each kind and reused by the second. The one-token
    # sequence is shorter than the window, so both kinds share its mask.
    expected = [(5, 4), (13, 4), (7, 4), (1, 1), (5, 5), (13, 13), (7, 7)]
    assert sorted(built) == sorted(expected)


def test_transformers_style_cu_seqlens_without_state():
    """Callers that pass only cu_seq_lens_q/k and max_length_q/k (transformers' own names)."""
    model = tiny_model("qwen2")
    use_packed_attention(model, "sdpa")
    with torch.no_grad():
        with_state, _ = _packed_forward(model, LENGTHS)
        cu = cu_seqlens_of(LENGTHS).long()
        input_ids = torch.randint(
            3, 96, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(0)
        )
        position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None]
        plain = model(
            input_ids,
            position_ids=position_ids,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu.clone(),
            max_length_q=max(LENGTHS),
            max_length_k=max(LENGTHS),
        )
    torch.testing.assert_close(plain.logits, with_state.logits, rtol=0, atol=0)


def test_switch_remembers_the_implementation_it_replaced():
    """What unpacked calls run afterwards (tests/test_attention_fallback.py checks they do)."""
    model = tiny_model("llama", attn_implementation="sdpa")
    use_packed_attention(model, "sdpa")
    use_packed_attention(model, "auto")  # from one fastdpo backend to another: still "sdpa"
    layers = [m for m in model.modules() if isinstance(m, LlamaAttention)]
    assert len(layers) == 2
    assert {packed.unpacked_implementation(m) for m in layers} == {"sdpa"}
    # Remembered on the modules, not in the config: never saved, never fingerprinted.
    assert "fastdpo" not in model.config.to_json_string()
    model.set_attn_implementation("eager")  # switching back for good still works
    assert model(torch.tensor([[3, 4, 5]])).logits.shape == (1, 3, 96)


def test_attention_mask_is_refused():
    model = tiny_model("llama")
    use_packed_attention(model, "sdpa")
    mask = torch.ones(1, 1, sum(LENGTHS), sum(LENGTHS), dtype=torch.bool)
    with pytest.raises(ValueError, match="attention mask"):
        _packed_forward(model, LENGTHS, attention_mask=mask)


# ------------------------------------------------------------------------------------------------
# CUDA backends (skipped without a GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("backend", ["flash", "torch", "flex"])
def test_cuda_backend_matches_reference(backend, features):
    q, k, v = random_qkv(LENGTHS, dtype=torch.bfloat16, device="cuda")
    feature_set = packed.CallFeatures(
        device_type="cuda",
        dtype=torch.bfloat16,
        grouped=True,
        sliding_window=features.get("window"),
        softcap=features.get("softcap"),
        needs_grad=True,
    )
    reason = packed.unavailable_reason(backend, feature_set)
    if reason is not None:
        pytest.skip(reason)
    state = state_for(LENGTHS, "cuda")
    kwargs = {"sliding_window": features.get("window"), "softcap": features.get("softcap")}
    out = varlen_attention(q, k, v, state, backend=backend, scale=0.25, **kwargs)
    ref = reference_attention(q.cpu(), k.cpu(), v.cpu(), LENGTHS, scale=0.25, **features)
    # bf16 error relative to what plain bf16 rounding of the reference costs
    bf16_noise = (ref.bfloat16().double() - ref).abs().max().item()
    assert (out.double().cpu() - ref).abs().max().item() <= 8 * bf16_noise + 1e-2
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out.double().cpu())
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        scale = ref_grad.abs().max().item()
        assert (grad.double().cpu() - ref_grad).abs().max().item() <= 3e-2 * scale


@pytest.mark.gpu
def test_cuda_auto_prefers_a_varlen_kernel():
    q, k, v = random_qkv(LENGTHS, dtype=torch.bfloat16, device="cuda")
    state = state_for(LENGTHS, "cuda")
    varlen_attention(q, k, v, state)
    assert state.backends_used <= {"flash", "torch", "flex"}
