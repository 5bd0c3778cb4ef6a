"""Shared-prompt packing: each pair's prompt once, rejected tokens attending to prompt + themselves.

The oracle: per-sequence log-probs and parameter gradients of the shared form equal the plain
packed form and each sequence run alone (the standard eager forward), for every tiny model
family; attention-level checks hold every backend's path against a float64 dense reference
built from the layout alone; negative controls (rejected tokens seeing chosen ones) are caught.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_attention import assert_forward_backward_close
from test_model import (
    FP32_GRAD_RTOL,
    FP32_LOGP_ATOL,
    assert_grads_close,
    assert_logps_close,
    gradients,
    random_pairs,
    reference_logps,
)

from fastdpo.attention import STATE_KWARG, packed_attention_kwargs, runners, varlen_attention
from fastdpo.attention.shared_prompt import shared_prompt_attention
from fastdpo.data.collate import collate_pairs
from fastdpo.data.packing import pack_pairs
from fastdpo.data.shared_prompt import AUTO_MIN_PROMPT_SHARE, prompt_share, resolve_share_prompt
from fastdpo.data.types import Role, TokenizedPair
from fastdpo.model import sequence_logps
from fastdpo.testing.models import MODEL_FAMILIES, tiny_model

HAS_CUDA = torch.cuda.is_available()

# Prompts longer than every tiny model's sliding window (4-6), so windows cut into the prompt
# keys that rejected queries reach through the gather.
LONG_PROMPTS = {"prompt": (6, 16), "completion": (2, 12)}


def pair(example_id, prompt, chosen, rejected, **masks):
    return TokenizedPair(
        example_id=example_id,
        prompt_ids=prompt,
        chosen_ids=chosen,
        rejected_ids=rejected,
        **masks,
    )


# ------------------------------------------------------------------------------------------------
# Layout


def test_layout_by_hand():
    pairs = [
        pair("a", [1, 5, 6], [7, 8], [9], chosen_loss_mask=[False, True]),
        pair("b", [1], [3, 4, 5], [6, 7]),
    ]
    batch = collate_pairs(pairs, pad_to_multiple=8, share_prompt=True)
    # [1 5 6 7 8][1 3 4 5] | [9][6 7] | [0 0 0 0]: 12 real tokens (16 plain), padded to 16
    assert batch.input_ids.tolist() == [1, 5, 6, 7, 8, 1, 3, 4, 5, 9, 6, 7, 0, 0, 0, 0]
    assert batch.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 3, 1, 2, 0, 1, 2, 3]
    assert batch.cu_seqlens.tolist() == [0, 5, 9, 10, 12, 16]
    assert batch.num_tokens == 12 and batch.num_padding == 4 and batch.max_seqlen == 5
    # Rejected targets: the first predicted from the prompt's last position (2 and 5).
    assert batch.target_positions.tolist() == [3, 2, 5, 6, 7, 5, 10]
    assert batch.target_ids.tolist() == [8, 9, 3, 4, 5, 6, 7]
    assert batch.target_cu.tolist() == [0, 1, 2, 5, 7]
    assert batch.seq_role.tolist() == [Role.CHOSEN, Role.REJECTED] * 2
    assert batch.seq_pair.tolist() == [0, 0, 1, 1]
    layout = batch.shared_prompt
    assert layout.rejected_start == 9
    assert layout.rejected_cu_seqlens.tolist() == [0, 1, 3, 7]
    assert layout.key_index.tolist() == [0, 1, 2, 9, 5, 10, 11, 12, 13, 14, 15]
    assert layout.key_cu_seqlens.tolist() == [0, 4, 7, 11]
    assert layout.token_group.tolist() == [0] * 5 + [1] * 4 + [0, 1, 1] + [2] * 4
    assert layout.token_branch.tolist() == [0, 0, 0, 1, 1, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0, 0]
    plain = collate_pairs(pairs)
    assert plain.target_ids.tolist() == batch.target_ids.tolist()
    assert plain.target_cu.tolist() == batch.target_cu.tolist()


def test_layout_moves_and_pins_with_the_batch():
    batch = collate_pairs(random_pairs(2, seed=1), share_prompt=True)
    moved = batch.to("cpu")
    assert moved.shared_prompt is not batch.shared_prompt
    assert torch.equal(moved.shared_prompt.key_index, batch.shared_prompt.key_index)
    assert moved.shared_prompt.rejected_start == batch.shared_prompt.rejected_start


def test_unpaired_examples_are_refused():
    examples = random_pairs(2, seed=2, paired=False)
    with pytest.raises(ValueError, match="nothing to share"):
        collate_pairs(examples, share_prompt=True)
    with pytest.raises(ValueError, match="nothing to share"):
        pack_pairs(examples, max_tokens_per_batch=256, share_prompt=True)
    assert resolve_share_prompt("auto", examples) is False


def test_packing_counts_the_prompt_once():
    pairs = random_pairs(40, seed=3, **LONG_PROMPTS)
    budget = 128
    shared = pack_pairs(pairs, max_tokens_per_batch=budget, share_prompt=True, seed=1)
    plain = pack_pairs(pairs, max_tokens_per_batch=budget, seed=1)
    batches = list(shared)
    assert all(b.shared_prompt is not None and b.num_tokens <= budget for b in batches)
    assert sorted(i for b in shared.plan for i in b) == list(range(len(pairs)))
    saved = sum(len(p.prompt_ids) for p in pairs)
    assert shared.stats.tokens == plain.stats.tokens - saved
    assert sum(b.num_tokens for b in batches) == shared.stats.tokens
    assert len(shared) < len(plain)


def test_auto_follows_the_prompt_share():
    long_prompts = random_pairs(10, seed=4, prompt=(20, 30), completion=(2, 4))
    short_prompts = random_pairs(10, seed=4, prompt=(1, 1), completion=(40, 60))
    assert prompt_share(long_prompts) > AUTO_MIN_PROMPT_SHARE > prompt_share(short_prompts)
    assert resolve_share_prompt("auto", long_prompts) is True
    assert resolve_share_prompt("auto", short_prompts) is False
    assert resolve_share_prompt("true", short_prompts) is True
    assert resolve_share_prompt(False, long_prompts) is False
    with pytest.raises(ValueError, match="'auto', 'true' or 'false'"):
        resolve_share_prompt("yes", long_prompts)
    packed = pack_pairs(long_prompts, max_tokens_per_batch=512, share_prompt="auto")
    assert packed.options.share_prompt and next(iter(packed)).shared_prompt is not None


# ------------------------------------------------------------------------------------------------
# The oracle: shared == plain packed == each sequence alone


def check_shared(model, pairs, *, pad_to_multiple=None, attention=None):
    """Shared-prompt log-probs and gradients (of a random weighting) vs the plain packed form
    and vs each sequence alone; returns the shared result."""
    shared = collate_pairs(pairs, pad_to_multiple=pad_to_multiple, share_prompt=True)
    plain = collate_pairs(pairs, pad_to_multiple=pad_to_multiple)
    assert shared.num_tokens == plain.num_tokens - sum(len(p.prompt_ids) for p in pairs)
    weights = torch.randn(shared.num_sequences)
    result = sequence_logps(model, shared, attention=attention)
    shared_grads = gradients((result.logps * weights).sum(), model)
    plain_result = sequence_logps(model, plain, attention=attention)
    plain_grads = gradients((plain_result.logps * weights).sum(), model)
    reference = reference_logps(model, pairs)
    reference_grads = gradients((reference * weights.double()).sum(), model)
    assert_logps_close(result.logps, reference, FP32_LOGP_ATOL)
    assert_logps_close(result.logps, plain_result.logps.double(), FP32_LOGP_ATOL)
    assert_grads_close(shared_grads, reference_grads, FP32_GRAD_RTOL)
    assert_grads_close(shared_grads, plain_grads, FP32_GRAD_RTOL)
    assert torch.equal(result.lengths, plain_result.lengths)
    return result


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_matches_plain_and_alone(family):
    result = check_shared(tiny_model(family), random_pairs(3, seed=10, **LONG_PROMPTS))
    assert result.attention_backends == ("sdpa",)
    assert result.chosen.shape == result.rejected.shape == (3,)


def test_padding_and_loss_masks():
    pairs = random_pairs(3, seed=11, prompt=(6, 10), completion=(5, 5))
    pairs[0] = dataclasses.replace(
        pairs[0],
        chosen_loss_mask=[False, True, False, True, True],
        rejected_loss_mask=[False, False, True, True, False],  # the first target is not counted
    )
    batch = collate_pairs(pairs, pad_to_multiple=16, share_prompt=True)
    assert batch.num_padding > 0
    result = check_shared(tiny_model("qwen2"), pairs, pad_to_multiple=16)
    assert result.lengths.tolist()[:2] == [3, 2]


def test_one_token_prompts_and_completions():
    pairs = random_pairs(3, seed=12, prompt=(1, 1), completion=(1, 1))
    check_shared(tiny_model("gemma2"), pairs)


def test_flex_forward_matches_plain_on_cpu():
    """FlexAttention's group mask (forward only on the CPU: Flex has no CPU backward)."""
    for family in ("llama", "gemma2", "qwen2"):
        model, pairs = tiny_model(family), random_pairs(3, seed=13, **LONG_PROMPTS)
        with torch.no_grad():
            shared = sequence_logps(
                model, collate_pairs(pairs, share_prompt=True), attention="flex"
            )
            reference = reference_logps(model, pairs)
        assert shared.attention_backends == ("flex",)
        assert_logps_close(shared.logps, reference, FP32_LOGP_ATOL)


# ------------------------------------------------------------------------------------------------
# Attention level: every path against a dense float64 reference built from the layout


def dense_reference(q, k, v, batch, *, scale, window=None, softcap=None):
    """float64 [T, Hq, D]: attention over the whole stream with the mask the shared form
    means (same group, earlier in the stream, a prompt key or the query's own branch, within
    `window` positions), written out in full."""
    layout = batch.shared_prompt
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    index = torch.arange(q.shape[0])
    group, branch, position = layout.token_group, layout.token_branch, batch.position_ids
    allowed = (group[:, None] == group[None, :]) & (index[None, :] <= index[:, None])
    allowed &= (branch[None, :] == 0) | (branch[None, :] == branch[:, None])
    if window is not None:
        allowed &= position[:, None] - position[None, :] < window
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def shared_batch(seed=20, pad_to_multiple=8):
    pairs = random_pairs(4, seed=seed, prompt=(1, 9), completion=(1, 7))
    return collate_pairs(pairs, pad_to_multiple=pad_to_multiple, share_prompt=True)


def shared_state(batch):
    kwargs = packed_attention_kwargs(
        batch.cu_seqlens,
        batch.max_seqlen,
        batch.input_ids.shape[0],
        shared_prompt=batch.shared_prompt,
        position_ids=batch.position_ids,
    )
    return kwargs[STATE_KWARG]


def random_qkv(total, heads=4, kv_heads=2, dim=8):
    make = lambda h: torch.randn(total, h, dim, requires_grad=True)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


FEATURES = [
    pytest.param({}, id="causal"),
    pytest.param({"window": 3}, id="window"),
    pytest.param({"softcap": 1.5}, id="softcap"),
    pytest.param({"window": 4, "softcap": 2.0}, id="window+softcap"),
]


@pytest.mark.parametrize("features", FEATURES)
def test_sdpa_path_forward_and_backward(features):
    batch = shared_batch()
    q, k, v = random_qkv(batch.input_ids.shape[0])
    options = {"sliding_window": features.get("window"), "softcap": features.get("softcap")}
    out = varlen_attention(q, k, v, shared_state(batch), backend="sdpa", scale=0.4, **options)
    ref = dense_reference(q, k, v, batch, scale=0.4, **features)
    assert_forward_backward_close(out, ref, (q, k, v))


@pytest.mark.parametrize("features", FEATURES)
def test_flex_path_forward(features):
    batch = shared_batch(seed=21)
    q, k, v = random_qkv(batch.input_ids.shape[0])
    options = {"sliding_window": features.get("window"), "softcap": features.get("softcap")}
    with torch.no_grad():
        out = varlen_attention(q, k, v, shared_state(batch), backend="flex", scale=0.4, **options)
        ref = dense_reference(q, k, v, batch, scale=0.4, **features)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def fake_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window=None, softcap=None):
    """float64 stand-in for flash-attn / torch varlen kernels: segment i of q against segment i
    of k, causal aligned bottom-right, as the real kernels define it."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    outs = []
    for i in range(cu_q.shape[0] - 1):
        qs = q[cu_q[i] : cu_q[i + 1]].double()
        ks, vs = k[cu_k[i] : cu_k[i + 1]], v[cu_k[i] : cu_k[i + 1]]
        assert qs.shape[0] <= max_q and ks.shape[0] <= max_k
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        distance = (
            torch.arange(qs.shape[0])[:, None] + ks.shape[0] - qs.shape[0]
            - torch.arange(ks.shape[0])[None, :]
        )  # fmt: skip
        allowed = (distance >= 0) & (distance < (window or ks.shape[0] + 1))
        outs.append(
            torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, -torch.inf).softmax(-1), vs)
        )
    return torch.cat(outs).to(q.dtype)


def fake_flash(q, k, v, cu_q, cu_k, max_q, max_k, *, dropout_p, softmax_scale, causal,
               window_size=(-1, -1), softcap=None):  # fmt: skip
    assert causal and dropout_p == 0.0
    window = None if window_size[0] < 0 else window_size[0] + 1
    return fake_varlen_kernel(
        q, k, v, cu_q, cu_k, max_q, max_k, scale=softmax_scale, window=window, softcap=softcap
    )


def fake_torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1), enable_gqa=False):  # fmt: skip
    window = None if window_size[0] < 0 else window_size[0] + 1
    return fake_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window=window)


@pytest.mark.parametrize("backend", ["flash", "torch"])
@pytest.mark.parametrize("window", [None, 3])
def test_varlen_kernel_paths_pass_the_right_segments(monkeypatch, backend, window):
    """The two calls the flash / torch varlen backends make (prefix slice; rejected slice
    against the gathered keys), run through float64 stand-ins of the kernels."""
    import inspect

    monkeypatch.setattr(runners, "_flash_varlen_func", lambda: fake_flash)
    parameters = frozenset(inspect.signature(fake_torch_varlen).parameters)
    monkeypatch.setattr(runners, "_torch_varlen_func", lambda: (fake_torch_varlen, parameters))
    batch = shared_batch(seed=22)
    q, k, v = random_qkv(batch.input_ids.shape[0])
    options = {"scale": 0.4, "sliding_window": window, "softcap": None, "dropout": 0.0}
    out = shared_prompt_attention(backend, q, k, v, shared_state(batch), **options)
    ref = dense_reference(q, k, v, batch, scale=0.4, window=window)
    assert_forward_backward_close(out, ref, (q, k, v))


# ------------------------------------------------------------------------------------------------
# Negative controls: rejected tokens that see chosen ones are caught


def _leaky_keys(batch):
    """The layout's gathered keys with each group's chosen tokens put between its prompt and
    its rejected tokens: rejected queries then see the chosen tokens (positions aside)."""
    layout = batch.shared_prompt
    prefix = batch.cu_seqlens.tolist()
    groups = batch.num_examples
    rejected = layout.rejected_cu_seqlens.tolist()
    keys, offsets = [], [0]
    for g in range(groups):
        keys += list(range(prefix[g], prefix[g + 1]))  # prompt and chosen
        start = layout.rejected_start
        keys += list(range(start + rejected[g], start + rejected[g + 1]))
        offsets.append(len(keys))
    return dataclasses.replace(
        layout,
        key_index=torch.tensor(keys),
        key_cu_seqlens=torch.tensor(offsets, dtype=torch.int32),
    )


def test_control_rejected_seeing_chosen_is_caught():
    model, pairs = tiny_model("llama"), random_pairs(3, seed=30, **LONG_PROMPTS)
    batch = collate_pairs(pairs, share_prompt=True)
    leaky = dataclasses.replace(batch, shared_prompt=_leaky_keys(batch))
    with torch.no_grad():
        broken = sequence_logps(model, leaky).logps
        reference = reference_logps(model, pairs)
    assert_logps_close(broken[0::2], reference[0::2], FP32_LOGP_ATOL)  # chosen are intact
    with pytest.raises(AssertionError, match="packed"):
        assert_logps_close(broken, reference, FP32_LOGP_ATOL)


def test_control_flex_without_the_group_mask_is_caught(monkeypatch):
    model, pairs = tiny_model("llama"), random_pairs(3, seed=31, **LONG_PROMPTS)
    original = runners._stream_mask
    monkeypatch.setattr(
        runners,
        "_stream_mask",
        lambda group, branch, positions, window: original(group, None, positions, window),
    )
    with torch.no_grad():
        broken = sequence_logps(model, collate_pairs(pairs, share_prompt=True), attention="flex")
        reference = reference_logps(model, pairs)
    with pytest.raises(AssertionError, match="packed"):
        assert_logps_close(broken.logps, reference, FP32_LOGP_ATOL)


# ------------------------------------------------------------------------------------------------
# CUDA: the real kernels (flash-attn when installed, torch varlen, compiled Flex)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash", "torch", "flex", "sdpa"])
def test_cuda_backends_match_plain(backend):
    from fastdpo.attention import CallFeatures, unavailable_reason

    reason = unavailable_reason(
        backend, CallFeatures(device_type="cuda", dtype=torch.bfloat16, needs_grad=True)
    )
    if reason is not None:
        pytest.skip(reason)
    model = tiny_model("qwen2", dtype=torch.bfloat16).cuda()
    pairs = random_pairs(6, seed=40, prompt=(20, 60), completion=(5, 30))
    shared = sequence_logps(
        model, collate_pairs(pairs, share_prompt=True).to("cuda"), attention=backend
    )
    plain = sequence_logps(model, collate_pairs(pairs).to("cuda"), attention=backend)
    assert shared.attention_backends == (backend,)
    # bf16 activations: the two forms round differently; broken masks move log-probs by >1.
    torch.testing.assert_close(shared.logps, plain.logps, rtol=2e-2, atol=0.15)
    shared.logps.sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
