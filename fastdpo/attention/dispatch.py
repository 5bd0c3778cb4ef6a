"""`varlen_attention`: checks a packed call, picks its backend and runs the batch's form."""

from __future__ import annotations

import logging

import torch

from fastdpo.attention.backends import CallFeatures, resolve_backend
from fastdpo.attention.runners import run_flex, run_segments
from fastdpo.attention.shared_prompt import shared_prompt_attention
from fastdpo.attention.state import PackedAttentionState

logger = logging.getLogger("fastdpo.attention")


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    state: PackedAttentionState,
    *,
    backend: str = "auto",
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Causal attention within each packed sequence (or shared-prompt group).

    Args:
        query: [T, Hq, D]; key, value: [T, Hkv, D] with Hq a multiple of Hkv (grouped-query).
        state: the batch's boundaries (`packed_attention_kwargs(...)[STATE_KWARG]`).
        backend: "auto" or one of `BACKENDS`.
        scale: score scale (default 1 / sqrt(D)).
        sliding_window: W lets each query see itself and the W - 1 keys before it (transformers'
            convention); None for full causal attention.
        softcap: scores -> softcap * tanh(scores / softcap) before the softmax (Gemma 2).
        dropout: attention dropout probability, applied only when `training`.

    Returns:
        [T, Hq, D] in the query's dtype.
    """
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
        raise ValueError(
            "query, key and value must be [T, heads, head_dim], got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.shape[0] != state.total_tokens or key.shape[0] != state.total_tokens:
        raise ValueError(
            f"the stream has {query.shape[0]} query / {key.shape[0]} key tokens but the batch's "
            f"cu_seqlens describe {state.total_tokens}: pass the cu_seqlens of this batch"
        )
    if query.shape[1] % key.shape[1] != 0:
        raise ValueError(
            f"query heads ({query.shape[1]}) must be a multiple of key/value heads ({key.shape[1]})"
        )
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    dropout = dropout if training else 0.0
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    features = CallFeatures(
        device_type=query.device.type,
        dtype=query.dtype,
        grouped=query.shape[1] != key.shape[1],
        sliding_window=sliding_window,
        softcap=softcap,
        dropout=dropout,
        needs_grad=torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value)),
    )
    chosen = resolve_backend(backend, features)
    if chosen not in state.backends_used:
        # Once per batch and backend: debug level (the backends that ran are also reported in
        # `SequenceLogps.attention_backends`).
        logger.debug("packed attention: backend %r (asked %r) for %s", chosen, backend, features)
        state.backends_used.add(chosen)
    state.call_windows.append(sliding_window)
    options = {
        "scale": scale,
        "sliding_window": sliding_window,
        "softcap": softcap,
        "dropout": dropout,
    }
    if state.shared_prompt is not None:
        return shared_prompt_attention(chosen, query, key, value, state, **options)
    if chosen == "flex":
        return run_flex(query, key, value, state, **options)
    return run_segments(chosen, query, key, value, state.segments, state, **options)
