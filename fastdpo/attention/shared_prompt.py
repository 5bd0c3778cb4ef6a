"""Attention of a shared-prompt batch: each pair's rejected tokens see its prompt, never its
chosen tokens (the layout is `PackedBatch`'s shared-prompt form, fastdpo/data/types.py).

The stream is `[P0 C0][P1 C1] ... | [R0][R1] ... | [padding]`. One design per backend:

- "flash", "torch" (varlen kernels with separate query / key offsets) and "sdpa" (the CPU's
  per-segment path with dense masks): two calls. The prompt + chosen part is an ordinary
  packed stream (a slice, causal self-attention). The rejected part (a slice) attends to keys
  gathered per group as [prompt, rejected] (`SharedPromptLayout.key_index`), causal aligned
  bottom-right, so rejected token i sees the whole prompt and rejected tokens 0..i; a sliding
  window counts the gathered keys, whose distances are position distances.
- "flex": one call over the whole stream with the group mask (same group, causal, and a key
  is a prompt token or on the query's branch) combined with the document mask; windows are
  measured in positions.

What sharing costs per layer (the varlen and "sdpa" paths): one gather of K and of V over the
prompt and rejected keys, 2 x (sum of prompt + rejected tokens) x Hkv x D elements, read and
written (K, V of Llama-3-8B in bf16: 4 KiB per token and layer, so a 4k-token prompt moves
~16 MiB per layer, microseconds of HBM time), the same in backward as an index-add into
dK/dV, and one copy of the output ([T, Hq, D]) that joins the two calls. What it saves:
every layer's work on each pair's second copy of the prompt (projections, MLP, norms, and
its attention). Gradients reach the prompt from both completions: through the first call's
keys and through the gathered ones.
"""

from __future__ import annotations

import torch

from fastdpo.attention.runners import run_flex, run_segments
from fastdpo.attention.state import PackedAttentionState


def shared_prompt_attention(
    backend: str, q, k, v, state: PackedAttentionState, **options
) -> torch.Tensor:
    """q [T, Hq, D], k and v [T, Hkv, D] of a shared-prompt batch -> [T, Hq, D]."""
    if backend == "flex":
        return run_flex(q, k, v, state, **options)
    shared = state.shared_prompt
    start = shared.layout.rejected_start
    prefix = run_segments(backend, q[:start], k[:start], v[:start], shared.prefix, state, **options)
    if start == q.shape[0]:  # no rejected tokens nor padding
        return prefix
    key_index = shared.layout.key_index
    rejected = run_segments(
        backend,
        q[start:],
        k.index_select(0, key_index),
        v.index_select(0, key_index),
        shared.rejected,
        state,
        **options,
    )
    return torch.cat([prefix, rejected])
