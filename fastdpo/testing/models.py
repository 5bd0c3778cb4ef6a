"""Tiny random-initialized causal LMs built from configs: no downloads, built in milliseconds.

Each family keeps the architectural feature that packing must get right:

| family | feature exercised |
| --- | --- |
| "llama" | grouped-query attention (4 query heads, 2 key/value heads), untied head by default |
| "qwen2" | q/k/v projection biases, a sliding-window layer after a full-attention one |
| "mistral" | a sliding window on every layer |
| "gemma2" | attention and final-logit soft-capping, alternating sliding/full layers, tied head, |
|          | query_pre_attn_scalar, embedding scaling |
| "granite" | logits divided by `logits_scaling`, embedding/residual/attention multipliers |
| "cohere" | logits multiplied by `logit_scale`, LayerNorm, tied head |
| "gpt2" | learned absolute position embeddings (RoPE is relative, so only absolute positions |
|        | show whether `position_ids` restart per sequence) |

Windows and caps are small so that test sequences of 10-30 tokens actually reach them. Weights
use a larger init range than real checkpoints (0.02) so attention is peaked and log-probs vary
across tokens: a packing mistake then moves log-probs far beyond rounding error.
"""

from __future__ import annotations

import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

MODEL_FAMILIES: tuple[str, ...] = (
    "llama",
    "qwen2",
    "mistral",
    "gemma2",
    "granite",
    "cohere",
    "gpt2",
)

_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "granite": (GraniteConfig, GraniteForCausalLM),
    "cohere": (CohereConfig, CohereForCausalLM),
    "gpt2": (GPT2Config, GPT2LMHeadModel),
}

TINY_SIZES = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.2,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
"""Config values every tiny model shares (also for building other tiny architectures in tests)."""

_FAMILY_DEFAULTS = {
    "llama": {"tie_word_embeddings": False},
    "qwen2": {
        "tie_word_embeddings": False,
        "use_sliding_window": True,
        "sliding_window": 5,
        "max_window_layers": 1,  # layer 0 full attention, layer 1 sliding
    },
    "mistral": {"tie_word_embeddings": False, "sliding_window": 6},
    "gemma2": {
        "tie_word_embeddings": True,
        "head_dim": 8,
        "query_pre_attn_scalar": 8,
        "sliding_window": 4,
        "attn_logit_softcapping": 2.0,
        "final_logit_softcapping": 3.0,
        "hidden_activation": "gelu_pytorch_tanh",
    },
    "granite": {
        "tie_word_embeddings": False,
        "logits_scaling": 4.0,
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.3,
    },
    "cohere": {"tie_word_embeddings": True, "logit_scale": 2.5},
    "gpt2": {"n_inner": 64, "n_positions": 256, "tie_word_embeddings": True},
}


def tiny_config(
    family: str, *, attn_implementation: str = "eager", **overrides
) -> PretrainedConfig:
    """The config of a tiny `family` model (see the module table); `overrides` win."""
    if family not in _CLASSES:
        raise ValueError(f"unknown model family {family!r}; expected one of {MODEL_FAMILIES}")
    config_class, _ = _CLASSES[family]
    values = {**TINY_SIZES, **_FAMILY_DEFAULTS[family], **overrides}
    config = config_class(**values)
    config._attn_implementation = attn_implementation
    return config


def tiny_model(
    family: str,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    attn_implementation: str = "eager",
    **overrides,
) -> PreTrainedModel:
    """A tiny random-initialized `family` causal LM in eval mode, weights in `dtype`.

    The global RNG is left untouched (weights come from a forked generator seeded with `seed`).
    `attn_implementation` defaults to "eager", the reference every other path is checked against.
    """
    config = tiny_config(family, attn_implementation=attn_implementation, **overrides)
    _, model_class = _CLASSES[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.to(dtype).eval()
