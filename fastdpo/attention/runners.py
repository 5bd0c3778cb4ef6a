"""The backends, on stream-major tensors: q [Tq, Hq, D], k and v [Tk, Hkv, D] -> out [Tq, Hq, D].

The segment backends ("flash", "torch", "sdpa") run one variable-length call described by
`VarlenSegments` (query segment i against key segment i, causal aligned bottom-right); "flex"
runs the whole stream at once under a mask function. All take the same options;
`resolve_backend` has checked that the one called supports those that are set (softcap,
dropout, sliding window).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fastdpo.attention.backends import (
    _compiled_create_block_mask,
    _compiled_flex_attention,
    _flash_varlen_func,
    _flex_functions,
    _softcap_score_mod,
    _torch_varlen_func,
)
from fastdpo.attention.state import PackedAttentionState, VarlenSegments


def _run_flash(q, k, v, segments, state, *, scale, sliding_window, softcap, dropout):
    function = _flash_varlen_func()
    extra = {}
    if sliding_window is not None:
        # transformers' window W lets a query see itself and the W - 1 keys before it.
        extra["window_size"] = (sliding_window - 1, 0)
    if softcap is not None:
        extra["softcap"] = softcap
    # flash-attn >= 2.1 aligns the causal mask bottom-right when a query segment is shorter
    # than its key segment: what `VarlenSegments` means.
    return function(
        q,
        k,
        v,
        segments.cu_seqlens_q,
        segments.cu_seqlens_k,
        segments.max_seqlen_q,
        segments.max_seqlen_k,
        dropout_p=dropout,
        softmax_scale=scale,
        causal=True,
        **extra,
    )


def _run_torch_varlen(q, k, v, segments, state, *, scale, sliding_window, softcap, dropout):
    function, parameters = _torch_varlen_func()
    extra: dict[str, Any] = {}
    if "scale" in parameters:
        extra["scale"] = scale
    elif scale != q.shape[-1] ** -0.5:  # torch 2.10 always scales by 1 / sqrt(D)
        q = q * (scale * q.shape[-1] ** 0.5)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in parameters:
            extra["enable_gqa"] = True
        else:  # older signature: share the key/value heads explicitly
            groups = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
    if "window_size" in parameters:  # torch >= 2.11: causal is the window (-1, 0)
        left = -1 if sliding_window is None else sliding_window - 1
        extra["window_size"] = (left, 0)
    else:  # torch 2.10
        extra["is_causal"] = True
    # torch's varlen_attn runs flash-attention kernels: causal aligned bottom-right as well.
    return function(
        q,
        k,
        v,
        segments.cu_seqlens_q,
        segments.cu_seqlens_k,
        segments.max_seqlen_q,
        segments.max_seqlen_k,
        **extra,
    )


def _causal_window_mask(
    length_q: int, length_k: int, window: int, device: torch.device
) -> torch.Tensor:
    """bool [Lq, Lk]: True where a query may attend to a key (causal aligned bottom-right:
    query i stands at key position i + Lk - Lq; within `window`)."""
    distance = (
        torch.arange(length_q, device=device)[:, None]
        + (length_k - length_q)
        - torch.arange(length_k, device=device)[None, :]
    )
    return (distance >= 0) & (distance < window)


def _run_sdpa(q, k, v, segments, state, *, scale, sliding_window, softcap, dropout):
    # One SDPA call per segment: O(sum L^2) work and memory, where a block-diagonal mask over
    # the stream costs O(T^2) (at T = 2048 holding 20 sequences of ~100 tokens: ~20x).
    if q.shape[1] != k.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    outs = []
    query_offsets, key_offsets = segments.host_offsets()
    for (q_start, q_end), (k_start, k_end) in zip(
        itertools.pairwise(query_offsets), itertools.pairwise(key_offsets), strict=True
    ):
        if q_end == q_start:
            continue
        qs = q[q_start:q_end].transpose(0, 1)  # [H, Lq, D]
        ks, vs = (x[k_start:k_end].transpose(0, 1) for x in (k, v))  # [H, Lk, D]
        length_q, length_k = q_end - q_start, k_end - k_start
        window = (
            sliding_window if sliding_window is not None and sliding_window < length_k else None
        )
        mask = None  # plain causal attention over equal lengths needs none (is_causal)
        if window is not None or softcap is not None or length_q != length_k:
            mask = state.cached_mask(
                f"causal-{length_q}-{length_k}",
                window,
                lambda lq=length_q, lk=length_k, w=window: _causal_window_mask(
                    lq, lk, w or lk, q.device
                ),
            )
        if softcap is None:
            # 4-D [1, H, L, D]: the CPU's fused (flash) SDPA kernels take only 4-D inputs; 3-D
            # ones fall back to the math path, which keeps [H, L, L] weights for backward
            # (418 vs 16 MiB per call at L = 3000, measured on the CPU, 2026-12-03).
            out = F.scaled_dot_product_attention(
                qs[None],
                ks[None],
                vs[None],
                attn_mask=mask,
                is_causal=mask is None,
                dropout_p=dropout,
                scale=scale,
            )[0]
        else:
            # SDPA cannot soft-cap scores: write them out, as transformers' eager path does.
            scores = (qs @ ks.transpose(-1, -2)) * scale
            scores = (softcap * torch.tanh(scores / softcap)).masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(qs.dtype)
            out = F.dropout(weights, p=dropout, training=dropout > 0) @ vs
        outs.append(out.transpose(0, 1))
    if not outs:
        return q.new_empty(q.shape)
    return torch.cat(outs)


SEGMENT_RUNNERS: dict[str, Callable[..., torch.Tensor]] = {
    "flash": _run_flash,
    "torch": _run_torch_varlen,
    "sdpa": _run_sdpa,
}
"""The backends that run one `VarlenSegments` call."""


def _stream_mask(
    group: torch.Tensor,
    branch: torch.Tensor | None,
    positions: torch.Tensor | None,
    sliding_window: int | None,
) -> Callable:
    """A FlexAttention mask function over the whole stream: a query sees earlier keys of its
    group (its document), only prompt keys or keys of its own branch when `branch` is given
    (shared-prompt groups), within `sliding_window` positions (stream distance when
    `positions` is None)."""

    def mask_mod(batch, head, q_idx, kv_idx):
        allowed = (group[q_idx] == group[kv_idx]) & (kv_idx <= q_idx)
        if branch is not None:
            allowed = allowed & ((branch[kv_idx] == 0) | (branch[kv_idx] == branch[q_idx]))
        if sliding_window is not None:
            if positions is None:
                allowed = allowed & (q_idx - kv_idx < sliding_window)
            else:
                allowed = allowed & (positions[q_idx] - positions[kv_idx] < sliding_window)
        return allowed

    return mask_mod


def run_flex(q, k, v, state: PackedAttentionState, *, scale, sliding_window, softcap, dropout):
    """FlexAttention over the whole stream: the document mask, and for a shared-prompt batch
    the group mask (rejected queries never see chosen keys, windows in positions)."""
    flex_attention, create_block_mask = _flex_functions()
    total = state.total_tokens
    shared = state.shared_prompt

    def build():
        if shared is None:
            mask_mod = _stream_mask(state.document_ids(), None, None, sliding_window)
        else:
            layout = shared.layout
            mask_mod = _stream_mask(
                layout.token_group, layout.token_branch, shared.position_ids, sliding_window
            )
        make = _compiled_create_block_mask() if q.is_cuda else create_block_mask
        return make(mask_mod, None, None, total, total, device=q.device)

    block_mask = state.cached_mask("flex", sliding_window, build)
    score_mod = None if softcap is None else _softcap_score_mod(float(softcap))
    if not torch.is_grad_enabled():
        # Flex refuses CPU inputs that require grad even when no graph is being recorded.
        q, k, v = q.detach(), k.detach(), v.detach()
    inputs = (x.transpose(0, 1)[None] for x in (q, k, v))
    options = {
        "score_mod": score_mod,
        "block_mask": block_mask,
        "scale": scale,
        "enable_gqa": q.shape[1] != k.shape[1],
    }
    if q.is_cuda:
        out = _compiled_flex_attention()(*inputs, **options)
    else:
        with warnings.catch_warnings():
            # Uncompiled on the CPU on purpose (forward-only checks); its warning is expected.
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = flex_attention(*inputs, **options)
    return out[0].transpose(0, 1)


def run_segments(
    backend: str, q, k, v, segments: VarlenSegments, state: PackedAttentionState, **options
) -> torch.Tensor:
    """One variable-length call of a segment backend."""
    return SEGMENT_RUNNERS[backend](q, k, v, segments, state, **options)
