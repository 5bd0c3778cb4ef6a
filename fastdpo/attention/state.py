"""Per-batch state shared by every attention layer of one forward: boundaries, cached masks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdpo.data.types import SharedPromptLayout

STATE_KWARG = "fastdpo_packed_attention"
"""Keyword under which the per-batch `PackedAttentionState` travels to the attention layers."""


@dataclass(kw_only=True)
class VarlenSegments:
    """The segments of one variable-length attention call.

    Query segment i (`q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]]`) attends to key segment i,
    causally with the ends aligned (bottom-right, flash-attn's convention): when the query
    segment is shorter, its first query sees every key up to the key segment's length minus
    the query segment's. Plain packed self-attention has the same offsets on both sides.
    """

    cu_seqlens_q: torch.Tensor
    """int32 [N + 1]: query segment offsets."""
    cu_seqlens_k: torch.Tensor
    """int32 [N + 1]: key segment offsets (the same tensor for self-attention)."""
    max_seqlen_q: int
    """An upper bound on the query segment lengths (a Python int)."""
    max_seqlen_k: int
    """An upper bound on the key segment lengths (a Python int)."""
    _host: tuple[list[int], list[int]] | None = None

    def host_offsets(self) -> tuple[list[int], list[int]]:
        """(query offsets, key offsets) as Python ints, read once (a device sync on
        accelerators; only the per-segment "sdpa" backend needs them)."""
        if self._host is None:
            queries = self.cu_seqlens_q.tolist()
            same = self.cu_seqlens_k is self.cu_seqlens_q
            self._host = (queries, queries if same else self.cu_seqlens_k.tolist())
        return self._host


@dataclass(kw_only=True)
class SharedPromptAttention:
    """The two attention calls of a shared-prompt batch (see `fastdpo.attention.shared_prompt`)."""

    layout: SharedPromptLayout
    position_ids: torch.Tensor
    """int64 [T]: the batch's positions (FlexAttention's windows are in positions)."""
    prefix: VarlenSegments
    """Every group's prompt + chosen tokens, the stream before `layout.rejected_start`:
    ordinary causal self-attention."""
    rejected: VarlenSegments
    """Every group's rejected tokens (the stream from `layout.rejected_start`) against the
    gathered keys `layout.key_index`: the group's prompt, then its rejected tokens."""


@dataclass(kw_only=True)
class PackedAttentionState:
    """What every attention layer of one forward pass shares: boundaries and cached masks."""

    cu_seqlens: torch.Tensor
    """int32 [S + 1]: sequence start offsets into the stream, then T."""
    max_seqlen: int
    """Longest sequence (a Python int: no device sync to read it)."""
    total_tokens: int
    """T, the stream length."""
    shared_prompt: SharedPromptAttention | None = None
    """Set for a shared-prompt batch: its two calls replace the one over `cu_seqlens`."""
    call_windows: list[int | None] = field(default_factory=list)
    """The sliding window of each attention call so far, in call order (None: full causal).
    Python values, no device sync: lets `fastdpo.model` check that every decoder layer came
    through packed attention with the window its config declares."""
    backends_used: set[str] = field(default_factory=set)
    """Backends that actually ran, for reporting."""
    _segments: VarlenSegments | None = None
    _document_ids: torch.Tensor | None = None
    _masks: dict[tuple[str, int | None], Any] = field(default_factory=dict)

    @property
    def calls(self) -> int:
        """Attention calls so far."""
        return len(self.call_windows)

    @property
    def segments(self) -> VarlenSegments:
        """The plain form's one call: every sequence attends to itself."""
        if self._segments is None:
            self._segments = VarlenSegments(
                cu_seqlens_q=self.cu_seqlens,
                cu_seqlens_k=self.cu_seqlens,
                max_seqlen_q=self.max_seqlen,
                max_seqlen_k=self.max_seqlen,
            )
        return self._segments

    def document_ids(self) -> torch.Tensor:
        """int32 [T]: the index of the segment each stream position belongs to."""
        if self._document_ids is None:
            positions = torch.arange(
                self.total_tokens, device=self.cu_seqlens.device, dtype=self.cu_seqlens.dtype
            )
            self._document_ids = torch.searchsorted(
                self.cu_seqlens[1:].contiguous(), positions, right=True
            ).to(torch.int32)
        return self._document_ids

    def cached_mask(self, kind: str, window: int | None, build: Callable[[], Any]) -> Any:
        """The mask of `kind` (e.g. "flex", "causal-<lengths>") for this window size, built on
        first use and then reused by every layer."""
        key = (kind, window)
        if key not in self._masks:
            self._masks[key] = build()
        return self._masks[key]


def packed_attention_kwargs(
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    total_tokens: int | None = None,
    *,
    shared_prompt: SharedPromptLayout | None = None,
    position_ids: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Keyword arguments for a Hugging Face model's forward that make its attention packed.

    Args:
        cu_seqlens: int32 [S + 1] sequence start offsets, first 0, last T (on the model's device).
        max_seqlen: the longest sequence, as a Python int.
        total_tokens: T; defaults to the last offset (read from the tensor: a device sync).
        shared_prompt: the layout of a shared-prompt batch (`PackedBatch.shared_prompt`).
        position_ids: int64 [T], the batch's positions; required with `shared_prompt`.

    Returns:
        `cu_seq_lens_q/k` and `max_length_q/k` (the names transformers passes through to
        attention functions) and the shared `PackedAttentionState` under `STATE_KWARG`.
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32 (flash kernels need it), got {cu_seqlens.dtype}")
    if isinstance(max_seqlen, torch.Tensor):
        raise TypeError("max_seqlen must be a Python int, not a tensor (reading it would sync)")
    if total_tokens is None:
        total_tokens = int(cu_seqlens[-1])
    state = PackedAttentionState(
        cu_seqlens=cu_seqlens, max_seqlen=int(max_seqlen), total_tokens=int(total_tokens)
    )
    if shared_prompt is not None:
        state.shared_prompt = _shared_prompt_attention(
            cu_seqlens, int(max_seqlen), shared_prompt, position_ids
        )
    return {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": int(max_seqlen),
        "max_length_k": int(max_seqlen),
        STATE_KWARG: state,
    }


def _shared_prompt_attention(
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    layout: SharedPromptLayout,
    position_ids: torch.Tensor | None,
) -> SharedPromptAttention:
    if position_ids is None:
        raise ValueError("a shared-prompt batch needs its position_ids for packed attention")
    # cu_seqlens holds the G prefix segments, then the rejected ones (and the padding), which
    # `rejected_cu_seqlens` lists again: their difference in length is G.
    groups = cu_seqlens.shape[0] - layout.rejected_cu_seqlens.shape[0]
    if groups < 1 or layout.key_cu_seqlens.shape != layout.rejected_cu_seqlens.shape:
        raise ValueError(
            "the shared-prompt layout does not match cu_seqlens: build the batch with "
            "fastdpo.collate_pairs(..., share_prompt=True)"
        )
    prefix = cu_seqlens[: groups + 1]
    return SharedPromptAttention(
        layout=layout,
        position_ids=position_ids,
        prefix=VarlenSegments(
            cu_seqlens_q=prefix,
            cu_seqlens_k=prefix,
            max_seqlen_q=max_seqlen,
            max_seqlen_k=max_seqlen,
        ),
        rejected=VarlenSegments(
            cu_seqlens_q=layout.rejected_cu_seqlens,
            cu_seqlens_k=layout.key_cu_seqlens,
            max_seqlen_q=max_seqlen,
            max_seqlen_k=max_seqlen,
        ),
    )
