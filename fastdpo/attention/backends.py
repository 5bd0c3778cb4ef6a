"""Backend names, availability and choice: which packed-attention backend can run a call."""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger("fastdpo.attention")

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
