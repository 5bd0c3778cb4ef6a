"""The transformers-facing side: the registered attention function, unpacked calls, the switch."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch

from fastdpo.attention.backends import _UNSUPPORTED_KWARGS, attention_name, backend_of
from fastdpo.attention.dispatch import varlen_attention
from fastdpo.attention.state import STATE_KWARG, PackedAttentionState

logger = logging.getLogger("fastdpo.attention")

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
