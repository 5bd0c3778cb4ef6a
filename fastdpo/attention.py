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

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("flash", "torch", "flex", "sdpa")
"""Backend names, in the order "auto" tries them."""

ATTENTION_NAMES: dict[str, str] = {
    "auto": "fastdpo_varlen",
    "flash": "fastdpo_varlen_fa",
    "torch": "fastdpo_varlen_torch",
    "flex": "fastdpo_varlen_flex",
    "sdpa": "fastdpo_varlen_dense",
}
"""The `attn_implementation` name of each backend. transformers looks for the substrings "flash",
"sdpa" and "flex_attention" in these names to run its own checks (and to treat a model as a
flash-attention model), so the names avoid them."""

_BACKEND_OF_NAME = {name: backend for backend, name in ATTENTION_NAMES.items()}

STATE_KWARG = "fastdpo_packed_attention"
"""Keyword under which the per-batch `PackedAttentionState` travels to the attention layers."""

_HALF_DTYPES = (torch.float16, torch.bfloat16)

_UNSUPPORTED_KWARGS = ("s_aux", "sinks", "position_bias", "indices", "block_indices")
"""Extra inputs some models give their attention function that packed attention would ignore."""


def attention_name(backend: str = "auto") -> str:
    """The `attn_implementation` name of a backend ("auto" -> "fastdpo_varlen")."""
    _check_backend_name(backend)
    return ATTENTION_NAMES[backend]


def backend_of(attn_implementation: str | None) -> str | None:
    """The backend an `attn_implementation` name stands for, or None if it is not ours."""
    return _BACKEND_OF_NAME.get(attn_implementation)


def _check_backend_name(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"attention backend must be 'auto' or one of {BACKENDS}, got {backend!r}")


# ------------------------------------------------------------------------------------------------
# Per-batch state


@dataclass(kw_only=True)
class PackedAttentionState:
    """What every attention layer of one forward pass shares: boundaries and cached masks."""

    cu_seqlens: torch.Tensor
    """int32 [S + 1]: sequence start offsets into the stream, then T."""
    max_seqlen: int
    """Longest sequence (a Python int: no device sync to read it)."""
    total_tokens: int
    """T, the stream length."""
    call_windows: list[int | None] = field(default_factory=list)
    """The sliding window of each attention call so far, in call order (None: full causal).
    Python values, no device sync: lets `fastdpo.model` check that every decoder layer came
    through packed attention with the window its config declares."""
    backends_used: set[str] = field(default_factory=set)
    """Backends that actually ran, for reporting."""
    _document_ids: torch.Tensor | None = None
    _host_offsets: list[int] | None = None
    _masks: dict[tuple[str, int | None], Any] = field(default_factory=dict)

    @property
    def calls(self) -> int:
        """Attention calls so far."""
        return len(self.call_windows)

    def document_ids(self) -> torch.Tensor:
        """int32 [T]: the index of the sequence each stream position belongs to."""
        if self._document_ids is None:
            positions = torch.arange(
                self.total_tokens, device=self.cu_seqlens.device, dtype=self.cu_seqlens.dtype
            )
            self._document_ids = torch.searchsorted(
                self.cu_seqlens[1:].contiguous(), positions, right=True
            ).to(torch.int32)
        return self._document_ids

    def host_offsets(self) -> list[int]:
        """`cu_seqlens` as Python ints, read once per batch (a device sync on accelerators)."""
        if self._host_offsets is None:
            self._host_offsets = self.cu_seqlens.tolist()
        return self._host_offsets

    def cached_mask(self, kind: str, window: int | None, build: Callable[[], Any]) -> Any:
        """The mask of `kind` (e.g. "flex", "causal-<length>") for this window size, built on
        first use and then reused by every layer."""
        key = (kind, window)
        if key not in self._masks:
            self._masks[key] = build()
        return self._masks[key]


def packed_attention_kwargs(
    cu_seqlens: torch.Tensor, max_seqlen: int, total_tokens: int | None = None
) -> dict[str, Any]:
    """Keyword arguments for a Hugging Face model's forward that make its attention packed.

    Args:
        cu_seqlens: int32 [S + 1] sequence start offsets, first 0, last T (on the model's device).
        max_seqlen: the longest sequence, as a Python int.
        total_tokens: T; defaults to the last offset (read from the tensor: a device sync).

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
    return {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": int(max_seqlen),
        "max_length_k": int(max_seqlen),
        STATE_KWARG: state,
    }


# ------------------------------------------------------------------------------------------------
# The features one call needs, and which backend can serve them


@dataclass(frozen=True, kw_only=True)
class CallFeatures:
    """What one attention call needs from a backend (see `unavailable_reason`)."""

    device_type: str
    """Device type: "cuda", "cpu", ..."""
    dtype: torch.dtype
    """The activations' dtype."""
    grouped: bool = False
    """Fewer key/value heads than query heads (every backend handles it)."""
    sliding_window: int | None = None
    """Window size W (transformers' convention), or None for full causal attention."""
    softcap: float | None = None
    """Attention-score soft-capping constant, or None."""
    dropout: float = 0.0
    """Attention dropout probability in effect (0 outside training)."""
    needs_grad: bool = False
    """Whether a backward pass will run through the call."""


@functools.cache
def _flash_varlen_func() -> Callable | None:
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as error:  # installed but broken (e.g. built for another torch)
        logger.warning("flash_attn is installed but cannot be imported: %s", error)
        return None
    return flash_attn_varlen_func


@functools.cache
def _flash_has_softcap() -> bool:
    # flash-attn < 2.6 has no softcap argument; read the signature once, not in every layer.
    return "softcap" in inspect.signature(_flash_varlen_func()).parameters


@functools.cache
def _torch_varlen_func() -> tuple[Callable, frozenset[str]] | None:
    """torch's varlen_attn and the names of its parameters (the signature moved in 2.11)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


@functools.cache
def _flex_functions() -> tuple[Callable, Callable] | None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return flex_attention, create_block_mask


@functools.cache
def _compiled_flex_attention() -> Callable:
    # Uncompiled FlexAttention materializes the full score matrix; on CUDA it must be compiled
    # to be a fused kernel. One compiled function for the process, shapes marked dynamic so
    # that changing stream lengths do not recompile every batch.
    flex_attention, _ = _flex_functions()
    return torch.compile(flex_attention, dynamic=True)


@functools.cache
def _compiled_create_block_mask() -> Callable:
    # Uncompiled, create_block_mask evaluates the mask on the full [T, T] grid (1 GiB of bools
    # at T = 32k); compiled, it works block by block.
    _, create_block_mask = _flex_functions()
    return torch.compile(create_block_mask)


@functools.cache
def _softcap_score_mod(softcap: float) -> Callable:
    # One function object per cap value: a fresh closure per call could make the compiled
    # flex_attention recompile.
    def score_mod(score, batch, head, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    return score_mod


def unavailable_reason(backend: str, features: CallFeatures) -> str | None:
    """Why `backend` cannot run a call with these features, or None if it can."""
    if backend == "flash":
        if _flash_varlen_func() is None:
            return "flash-attn is not installed (pip install flash-attn)"
        if features.device_type != "cuda":
            return "flash-attn runs on CUDA only"
        if features.dtype not in _HALF_DTYPES:
            return f"flash-attn needs fp16 or bf16 activations, got {features.dtype}"
        if features.softcap is not None and not _flash_has_softcap():
            return "this flash-attn has no softcap argument (needs flash-attn >= 2.6)"
        return None
    if backend == "torch":
        found = _torch_varlen_func()
        if found is None:
            return "torch.nn.attention.varlen.varlen_attn needs torch >= 2.10"
        _, parameters = found
        if features.device_type != "cuda":
            return "torch's varlen_attn runs on CUDA only"
        if features.dtype not in _HALF_DTYPES:
            return f"torch's varlen_attn needs fp16 or bf16 activations, got {features.dtype}"
        if features.softcap is not None:
            return "torch's varlen_attn has no attention-logit soft-capping"
        if features.sliding_window is not None and "window_size" not in parameters:
            return "torch's varlen_attn supports sliding windows from torch 2.11"
        if features.dropout > 0:
            return "torch's varlen_attn has no attention dropout"
        return None
    if backend == "flex":
        if _flex_functions() is None:
            return "FlexAttention needs torch >= 2.5"
        if features.dropout > 0:
            return "FlexAttention has no attention dropout"
        if features.device_type == "cpu" and features.needs_grad:
            return (
                "FlexAttention has no backward on the CPU: use it there for forward-only passes "
                "(torch.no_grad()), or use the 'sdpa' backend"
            )
        return None
    if backend == "sdpa":
        return None
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


def resolve_backend(backend: str, features: CallFeatures) -> str:
    """The backend that runs a call: `backend` itself, or for "auto" the first that can."""
    _check_backend_name(backend)
    if backend != "auto":
        reason = unavailable_reason(backend, features)
        if reason is not None:
            raise RuntimeError(
                f"attention backend {backend!r} cannot run this call: {reason}. "
                "Use backend='auto' to pick one that can."
            )
        return backend
    for candidate in BACKENDS:
        # On the CPU, uncompiled Flex is a slower SDPA with a forward-only restriction.
        if candidate == "flex" and features.device_type == "cpu":
            continue
        if unavailable_reason(candidate, features) is None:
            return candidate
    raise AssertionError("the 'sdpa' backend always runs")  # pragma: no cover


# ------------------------------------------------------------------------------------------------
# The backends, on stream-major tensors: q [T, Hq, D], k and v [T, Hkv, D] -> out [T, Hq, D].
# All take the same options; `resolve_backend` has checked that the one called supports those
# that are set (softcap, dropout, sliding window).


def _run_flash(q, k, v, state, *, scale, sliding_window, softcap, dropout) -> torch.Tensor:
    function = _flash_varlen_func()
    extra = {}
    if sliding_window is not None:
        # transformers' window W lets a query see itself and the W - 1 keys before it.
        extra["window_size"] = (sliding_window - 1, 0)
    if softcap is not None:
        extra["softcap"] = softcap
    return function(
        q,
        k,
        v,
        state.cu_seqlens,
        state.cu_seqlens,
        state.max_seqlen,
        state.max_seqlen,
        dropout_p=dropout,
        softmax_scale=scale,
        causal=True,
        **extra,
    )


def _run_torch_varlen(q, k, v, state, *, scale, sliding_window, softcap, dropout) -> torch.Tensor:
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
    return function(
        q, k, v, state.cu_seqlens, state.cu_seqlens, state.max_seqlen, state.max_seqlen, **extra
    )


def _document_causal(document_ids: torch.Tensor, sliding_window: int | None) -> Callable:
    def mask_mod(batch, head, q_idx, kv_idx):
        allowed = (document_ids[q_idx] == document_ids[kv_idx]) & (kv_idx <= q_idx)
        if sliding_window is not None:
            allowed = allowed & (q_idx - kv_idx < sliding_window)
        return allowed

    return mask_mod


def _run_flex(q, k, v, state, *, scale, sliding_window, softcap, dropout) -> torch.Tensor:
    flex_attention, create_block_mask = _flex_functions()
    total = state.total_tokens

    def build():
        mask_mod = _document_causal(state.document_ids(), sliding_window)
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


def _causal_window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """bool [L, L]: True where a query may attend to a key (causal, within `window`)."""
    positions = torch.arange(length, device=device)
    distance = positions[:, None] - positions[None, :]
    return (distance >= 0) & (distance < window)


def _run_sdpa(q, k, v, state, *, scale, sliding_window, softcap, dropout) -> torch.Tensor:
    # One SDPA call per sequence: O(sum L^2) work and memory, where a block-diagonal mask over
    # the stream costs O(T^2) (at T = 2048 holding 20 sequences of ~100 tokens: ~20x).
    if q.shape[1] != k.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    outs = []
    for start, end in itertools.pairwise(state.host_offsets()):
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))  # [H, L, D]
        length = end - start
        window = sliding_window if sliding_window is not None and sliding_window < length else None
        mask = None  # plain causal attention needs none (is_causal)
        if window is not None or softcap is not None:
            mask = state.cached_mask(
                f"causal-{length}",
                window,
                lambda length=length, window=window: _causal_window_mask(
                    length, window or length, q.device
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
    return torch.cat(outs)


_RUNNERS: dict[str, Callable[..., torch.Tensor]] = {
    "flash": _run_flash,
    "torch": _run_torch_varlen,
    "flex": _run_flex,
    "sdpa": _run_sdpa,
}


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
    """Causal attention within each packed sequence.

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
    options = {"scale": scale, "sliding_window": sliding_window, "softcap": softcap}
    return _RUNNERS[chosen](query, key, value, state, dropout=dropout, **options)


# ------------------------------------------------------------------------------------------------
# Unpacked calls: the implementation the model had, with its own masks

UNPACKED_ATTRIBUTE = "_fastdpo_unpacked_attention"
"""Attribute under which `use_packed_attention` stores, on each module whose config it switched,
the attn implementation that module's calls without cu_seqlens run. A plain module attribute,
not a config field: it is copied with the model (deepcopy) but never saved into config.json nor
into a reference-cache fingerprint."""

DEFAULT_UNPACKED = "sdpa"
"""What unpacked calls run on a module with no remembered implementation (a model created with
a fastdpo attn_implementation from the start): transformers' own default."""


class DeferredMask:
    """A mask transformers asked for, not built yet: the arguments of its mask-function call.

    transformers makes one mask per forward and mask kind (full, sliding window) before the
    decoder layers run, and cannot know whether the call is packed. Building the original
    implementation's mask there would cost a packed call a [T, T] mask it never uses (1 GiB in
    fp32 at T = 16384 for "eager"), so fastdpo's mask function returns this record instead and
    the attention function decides: packed calls drop it, unpacked calls `build` it.
    """

    # generate with a compileable (static) cache asks for the masks before the forward and
    # passes them in as its attention_mask; the forward's mask preparation reads `ndim` (2: a
    # padding mask to convert) and hands anything else back to the mask function, which
    # returns this record as it is.
    ndim = 4

    def __init__(self, arguments: dict[str, Any]):
        # Tensors are copied as they are now: a static cache's query offset is a tensor that
        # the first layer's cache update advances in place before the mask is built (seen on
        # a tiny Llama: decoding logits off by one cache slot, its tokens from the 4th step).
        # Packed calls pass no tensors here, so they copy nothing.
        self.arguments = {
            name: value.clone() if isinstance(value, torch.Tensor) else value
            for name, value in arguments.items()
        }
        """Keyword arguments of the mask-function call (batch size, lengths, offsets,
        mask_function, the 2-D padding mask or None, dtype, device, ...)."""
        self._built: dict[str, Any] = {}

    @property
    def padding_mask(self) -> torch.Tensor | None:
        """The caller's 2-D attention mask ([B, kv_length]), or None if it gave none."""
        return self.arguments.get("attention_mask")

    def build(self, implementation: str) -> Any:
        """The mask `implementation`'s own mask function makes from these arguments (None, a
        tensor or a BlockMask): exactly what an untouched model would pass its layers. Built
        once per implementation, then shared by the layers of the forward."""
        if implementation not in self._built:
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

            if implementation in ALL_MASK_ATTENTION_FUNCTIONS:
                mask_function = ALL_MASK_ATTENTION_FUNCTIONS[implementation]
                self._built[implementation] = mask_function(**self.arguments)
            else:
                # transformers gives implementations without a mask function (kernels that
                # take none, e.g. paged attention) no mask at all.
                self._built[implementation] = None
        return self._built[implementation]


def _deferred_mask(**arguments: Any) -> DeferredMask:
    """The mask function registered for fastdpo's names (see `DeferredMask`)."""
    padding = arguments.get("attention_mask")
    if isinstance(padding, DeferredMask):  # a mask made ahead of the forward (static cache)
        return padding
    return DeferredMask(arguments)


def unpacked_implementation(module: torch.nn.Module) -> str:
    """The attn implementation `module` runs for calls without cu_seqlens."""
    return getattr(module, UNPACKED_ATTRIBUTE, DEFAULT_UNPACKED)


def _unpacked_attention_function(module: torch.nn.Module, implementation: str) -> Callable:
    if implementation == "eager":
        # Each modeling file has its own eager function (Gemma 2's soft-caps scores), and the
        # model's layers call the one of the file that defines them.
        for cls in type(module).__mro__:
            function = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
            if function is not None:
                return function
        raise RuntimeError(
            f"{_layer_name(module)}: its model had attn_implementation 'eager' before fastdpo "
            "switched it to packed attention, but its modeling module has no "
            "eager_attention_forward to run unpacked calls with; call "
            "model.set_attn_implementation('sdpa') before unpacked calls"
        )
    from transformers import AttentionInterface

    interface = AttentionInterface()
    if implementation not in interface:
        raise RuntimeError(
            f"{_layer_name(module)}: the attn implementation it had before fastdpo switched it "
            f"to packed attention, {implementation!r}, is not registered with transformers; "
            "call model.set_attn_implementation('sdpa') before unpacked calls"
        )
    return interface[implementation]


def _unpacked_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A call without cu_seqlens: the module's remembered implementation, with its own mask."""
    implementation = unpacked_implementation(module)
    if isinstance(attention_mask, DeferredMask):
        attention_mask = attention_mask.build(implementation)
    function = _unpacked_attention_function(module, implementation)
    return function(module, query, key, value, attention_mask, **kwargs)


# ------------------------------------------------------------------------------------------------
# The transformers-facing attention function


def _layer_name(module: torch.nn.Module) -> str:
    return f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')})"


def _hf_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    *,
    backend: str,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention-function signature. Packed calls (cu_seqlens given): q
    [1, Hq, T, D], k/v [1, Hkv, T, D] -> ([1, T, Hq, D], None). Other calls run the
    implementation the model had before the switch, with its signature and result."""
    if kwargs.get(STATE_KWARG) is None and kwargs.get("cu_seq_lens_q") is None:
        kwargs.pop(STATE_KWARG, None)
        return _unpacked_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return _packed_attention_forward(
        module, query, key, value, attention_mask, backend=backend, **kwargs
    )


def _packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    *,
    backend: str,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    state = kwargs.get(STATE_KWARG)
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if state is None:
        # cu_seqlens from another caller (e.g. transformers' flattening collator): check them
        # here (device syncs), and accept that masks are rebuilt in every layer.
        cu_seqlens_k = kwargs.get("cu_seq_lens_k")
        if cu_seqlens_k is not None and not torch.equal(cu_seqlens_k, cu_seqlens):
            raise ValueError(
                f"{_layer_name(module)}: packed self-attention needs cu_seq_lens_k == cu_seq_lens_q"
            )
        max_seqlen = kwargs.get("max_length_q")
        if max_seqlen is None:
            max_seqlen = cu_seqlens.diff().max()
        state = PackedAttentionState(
            cu_seqlens=cu_seqlens.to(torch.int32),
            max_seqlen=int(max_seqlen),
            total_tokens=query.shape[2],
        )
    elif cu_seqlens is not None and cu_seqlens is not state.cu_seqlens:
        raise ValueError(
            f"{_layer_name(module)}: cu_seq_lens_q is not the cu_seqlens of the packed state: "
            "build both with fastdpo.attention.packed_attention_kwargs"
        )
    if isinstance(attention_mask, DeferredMask):
        # Made for every call (transformers cannot tell packed ones apart); only a padding
        # mask the caller passed makes it a mask.
        attention_mask = attention_mask.padding_mask
    if attention_mask is not None:
        raise ValueError(
            f"{_layer_name(module)}: got an attention mask with packed attention; packed batches "
            "are described by cu_seqlens alone (a 2D mask would be ambiguous across sequences): "
            "drop the mask"
        )
    if is_causal is False or getattr(module, "is_causal", True) is False:
        raise ValueError(
            f"{_layer_name(module)}: packed attention is causal only; this layer is bidirectional"
        )
    unsupported = sorted(name for name in _UNSUPPORTED_KWARGS if kwargs.get(name) is not None)
    if unsupported:
        raise ValueError(
            f"{_layer_name(module)}: packed attention does not implement {unsupported} "
            "(attention sinks, position biases or sparse indices); this model cannot run packed"
        )
    if query.shape[0] != 1:
        raise ValueError(
            f"{_layer_name(module)}: packed attention expects one stream (batch size 1), "
            f"got {query.shape[0]}"
        )
    out = varlen_attention(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        state,
        backend=backend,
        scale=scaling,
        sliding_window=sliding_window,
        softcap=softcap,
        dropout=dropout,
        training=module.training,
    )
    return out[None], None


_REGISTERED: set[str] = set()
"""Names this process has registered with transformers' attention and mask interfaces."""


def register_attention(backend: str = "auto") -> str:
    """Register the packed attention function for `backend` with transformers; return its name.

    Idempotent. Registration is by name in transformers' `AttentionInterface` (and, for the
    deferred masks of unpacked calls, `AttentionMaskInterface`); nothing of transformers is
    patched, and a model uses it only once its attn implementation is set to it.
    """
    name = attention_name(backend)
    if name not in _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        function = functools.partial(_hf_attention_forward, backend=backend)
        functools.update_wrapper(function, _hf_attention_forward)
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, _deferred_mask)
        _REGISTERED.add(name)
    return name


def _attn_implementation_of(module: torch.nn.Module) -> str | None:
    return getattr(getattr(module, "config", None), "_attn_implementation", None)


def use_packed_attention(model: torch.nn.Module, backend: str = "auto") -> str:
    """Set this model instance's attention to fastdpo's packed attention; return the name.

    Only this instance (its config) changes. Calls with cu_seqlens (see
    `packed_attention_kwargs`) run packed; calls without (padded batches, generation) run the
    implementation the model had before, remembered here on each switched module (see
    `UNPACKED_ATTRIBUTE`), with its own masks and results. `model.set_attn_implementation(...)`
    switches back for good.
    """
    name = register_attention(backend)
    if getattr(model.config, "_attn_implementation", None) == name:
        return name
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(
            f"{type(model).__name__} has no set_attn_implementation: pass a transformers "
            "PreTrainedModel (transformers >= 4.56)"
        )
    before = {module: _attn_implementation_of(module) for module in model.modules()}
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(
            f"{type(model).__name__} did not accept attn_implementation={name!r} (it is "
            f"{model.config._attn_implementation!r}): the model does not dispatch attention "
            "through transformers' AttentionInterface, so it cannot run packed batches"
        )
    for module, previous in before.items():
        # A module switched from one fastdpo backend to another keeps what it had before the
        # first switch; one that had no implementation set runs DEFAULT_UNPACKED.
        if _attn_implementation_of(module) == name and previous and backend_of(previous) is None:
            setattr(module, UNPACKED_ATTRIBUTE, previous)
    logger.info("%s: attention set to %r", type(model).__name__, name)
    return name
