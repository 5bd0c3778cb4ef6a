"""Variable-length (packed) causal attention for Hugging Face models, registered by name.

A packed batch is one token stream `[T]` holding several sequences back to back; `cu_seqlens`
(int32 `[S + 1]`, starting at 0 and ending at T) marks where each one starts. Every token may
attend only to earlier tokens of its own sequence. This module runs that attention with the
best backend available and plugs it into transformers through its public `AttentionInterface`:

    name = use_packed_attention(model, backend="auto")   # sets the model's attn implementation
    hidden = model.model(input_ids[None], position_ids=position_ids[None],
                         **packed_attention_kwargs(cu_seqlens, max_seqlen))

Backends, in the order "auto" tries them:

| backend | runs | needs | sliding window | softcap | backward |
| --- | --- | --- | --- | --- | --- |
| "flash" | `flash_attn_varlen_func` | flash-attn, CUDA, fp16/bf16 | yes | flash-attn >= 2.6 | yes |
| "torch" | torch `varlen_attn` | torch >= 2.10, CUDA, fp16/bf16 | torch >= 2.11 | no | yes |
| "flex" | FlexAttention + document mask | torch >= 2.5 | yes | yes | CUDA only |
| "sdpa" | SDPA, one call per sequence | - | yes | yes (math path) | yes |

All handle grouped-query attention (fewer key/value heads than query heads).

"auto" picks the first that can run the call (device, dtype, features, gradients); on the CPU
that is "sdpa" ("flex" has no backward there and is no faster). An explicitly named backend that
cannot run a call raises an error that says why. What "flex" and "sdpa" derive from the
boundaries (block masks; the offsets as Python ints and window masks) is built once per batch
and reused by every layer through the `PackedAttentionState` that `packed_attention_kwargs`
passes along. "sdpa" loops over the sequences (one device sync per batch to read the offsets
on accelerators): it is the portable fallback (CPU, tests), not the fast path on GPUs.

Attention dropout is supported by "flash" and "sdpa" only; other backends refuse it.

Shared-prompt batches (`pack_pairs(..., share_prompt=True)`: each pair's prompt once, its
rejected tokens attending to the prompt and themselves) run on every backend; how each one
does it, and what it costs, is in `fastdpo.attention.shared_prompt`.

Modules: `backends` (names, availability, choice), `state` (per-batch boundaries and cached
masks), `runners` (the backends' calls), `shared_prompt`, `dispatch` (`varlen_attention`),
`huggingface` (the registered attention function, unpacked calls, the switch).

Unpacked calls keep working on a switched model. `use_packed_attention` remembers, on each
module whose config it switches, the implementation the model had ("eager", "sdpa", ...). A
call without cu_seqlens (`model(input_ids, attention_mask=...)`, `model.generate(...)`) runs
that implementation's own attention function with the mask its own mask function makes, so its
logits are those of an untouched copy. The mask is made lazily: fastdpo's names are registered
with transformers' `AttentionMaskInterface` too, with a function that only records the mask
arguments (`DeferredMask`); the packed path ignores the record and so never builds a [T, T]
mask, the unpacked path builds the original mask from it once per forward and mask kind. The
registration costs packed calls what transformers does before any mask function runs: a check
of `position_ids` for packed sequences, one device sync per mask kind and forward on
accelerators.
"""

from fastdpo.attention.backends import (
    ATTENTION_NAMES,
    BACKENDS,
    CallFeatures,
    attention_name,
    backend_of,
    resolve_backend,
    unavailable_reason,
)
from fastdpo.attention.dispatch import varlen_attention
from fastdpo.attention.huggingface import (
    DEFAULT_UNPACKED,
    UNPACKED_ATTRIBUTE,
    DeferredMask,
    register_attention,
    unpacked_implementation,
    use_packed_attention,
)
from fastdpo.attention.state import STATE_KWARG, PackedAttentionState, packed_attention_kwargs

__all__ = [
    "ATTENTION_NAMES",
    "BACKENDS",
    "DEFAULT_UNPACKED",
    "STATE_KWARG",
    "UNPACKED_ATTRIBUTE",
    "CallFeatures",
    "DeferredMask",
    "PackedAttentionState",
    "attention_name",
    "backend_of",
    "packed_attention_kwargs",
    "register_attention",
    "resolve_backend",
    "unavailable_reason",
    "unpacked_implementation",
    "use_packed_attention",
    "varlen_attention",
]
