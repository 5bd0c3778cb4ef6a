"""Packed forward of a Hugging Face causal LM: per-sequence completion log-probs, no logits.

    result = sequence_logps(model, batch)    # batch: a PackedBatch on the model's device
    result.chosen, result.rejected           # fp32 [P] summed log-probs of each pair

The decoder body runs once on the whole packed stream (`input_ids` as [1, T], per-sequence
`position_ids`, explicit `cu_seqlens` for varlen attention; never a 2D attention mask). Only
the hidden states at completion-target positions go through the head, and the head is
`fastdpo.linear_logprobs` with the model's own output embedding, final-logit soft-capping and
logit scaling, so no `[tokens, vocab]` tensor is ever built.

An architecture whose layers are not all attention (Mamba, RWKV, linear-attention or
convolution layers, ...) would mix neighbouring sequences through its recurrent state, so it
is refused, before the forward where its config says so and after it otherwise (every decoder
layer must have run through the packed attention function, with the sliding window its config
declares).

Host syncs: none here. Outside: transformers' mask preparation checks `position_ids` for packed
rows once per forward and mask kind (a sync on CUDA; fastdpo's attention names are in its mask
registry so that unpacked calls fall back to the model's own attention), and the "sdpa" backend
reads the offsets once per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastdpo.attention import (
    STATE_KWARG,
    PackedAttentionState,
    backend_of,
    packed_attention_kwargs,
    use_packed_attention,
)
from fastdpo.data.types import PackedBatch
from fastdpo.ops.linear_logprobs import linear_logprobs
from fastdpo.ops.segments import segment_sums

logger = logging.getLogger(__name__)

PACKABLE_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
"""`config.layer_types` entries that packed attention reproduces exactly."""

UNPACKABLE_MODEL_TYPES = frozenset(
    {
        "bamba",
        "falcon_h1",
        "falcon_mamba",
        "granitemoehybrid",
        "jamba",
        "lfm2",
        "lfm2_moe",
        "mamba",
        "mamba2",
        "minimax",
        "nemotron_h",
        "qwen3_next",
        "recurrent_gemma",
        "rwkv",
        "xlstm",
        "zamba",
        "zamba2",
    }
)
"""Model types known to have recurrent, convolution or linear-attention layers."""


@dataclass(kw_only=True)
class SequenceLogps:
    """Summed completion log-probs of each packed sequence (sequence order of the batch).

    For paired batches (S = 2P) `chosen`/`rejected` and their lengths are strided views of
    `logps`/`lengths` (sequences 2p and 2p + 1); for unpaired batches they are None.
    """

    logps: torch.Tensor
    """fp32 [S]: sum of the log-probs of each sequence's completion targets."""
    lengths: torch.Tensor
    """int [S]: completion targets per sequence (the terms in each sum)."""
    token_logps: torch.Tensor | None = None
    """fp32 [M]: per-target log-probs in `PackedBatch.target_ids` order (if requested, or when
    `stats` are)."""
    token_stats: dict[str, torch.Tensor] | None = None
    """{name: [M]} per-target statistics of the head's final logits, `PackedBatch.target_ids`
    order, when `stats` were asked (`fastdpo.ops.linear_logprobs.STATS`: "entropy" fp32 with
    gradient, "log_sum_p2" and "mean_logit" fp32, "is_top1" bool)."""
    chosen: torch.Tensor | None = None
    """fp32 [P] (paired batches): `logps[0::2]`."""
    rejected: torch.Tensor | None = None
    """fp32 [P] (paired batches): `logps[1::2]`."""
    chosen_lengths: torch.Tensor | None = None
    """int [P] (paired batches): `lengths[0::2]`."""
    rejected_lengths: torch.Tensor | None = None
    """int [P] (paired batches): `lengths[1::2]`."""
    attention_backends: tuple[str, ...] = ()
    """The packed-attention backends that ran (e.g. ("sdpa",)), for reporting."""


# ------------------------------------------------------------------------------------------------
# What the model is made of


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside `model` (a PEFT wrapper is looked through).

    A PEFT model's `get_base_model()` is the causal LM with its adapter layers injected, so
    LoRA weights still take part in the forward.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "sequence_logps got a DistributedDataParallel wrapper: it calls the decoder body "
            "and the head separately, which bypasses DDP's forward and so its gradient "
            "synchronisation. Pass the bare model (model.module) and synchronise gradients in "
            "the training loop"
        )
    compiled = getattr(model, "_orig_mod", None)
    if isinstance(compiled, nn.Module):  # a torch.compile wrapper (OptimizedModule)
        logger.warning(
            "sequence_logps calls the decoder body and the head separately, so torch.compile "
            "around the whole %s is bypassed; compile the decoder layers instead "
            "(for layer in model.model.layers: layer.compile())",
            type(compiled).__name__,
        )
        model = compiled
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model) and hasattr(model, "peft_config"):
        # Prompt-learning adapters (prefix/prompt tuning, P-tuning) add virtual tokens in the
        # PEFT wrapper's own forward, which the base model never sees: they would be dropped.
        prompt_learning = sorted(
            name
            for name, config in model.peft_config.items()
            if getattr(config, "is_prompt_learning", False)
        )
        if prompt_learning:
            raise TypeError(
                f"PEFT adapters {prompt_learning} are prompt-learning adapters (virtual tokens "
                "added by the PEFT wrapper's forward); sequence_logps runs the base model on the "
                "packed stream and would silently drop them. Use an adapter that lives in the "
                "model's layers (LoRA, IA3, ...)"
            )
        model = get_base_model()
    return model


def text_config(model: nn.Module):
    """The config of the language model (the text part of a multimodal config)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_packable(model: nn.Module) -> None:
    """Raise ValueError if the config shows layers that packed attention cannot reproduce."""
    config = text_config(model)
    name = type(model).__name__
    model_type = getattr(config, "model_type", None)
    if model_type in UNPACKABLE_MODEL_TYPES:
        raise ValueError(
            f"{name} (model_type {model_type!r}) has recurrent, convolution or linear-attention "
            "layers, whose state would flow from one packed sequence into the next: fastdpo "
            "cannot pack it. Use a model made of attention layers only."
        )
    layer_types = getattr(config, "layer_types", None) or ()
    unsupported = sorted(set(layer_types) - PACKABLE_LAYER_TYPES)
    if unsupported:
        raise ValueError(
            f"{name} has layer types {unsupported} besides full/sliding attention; packed "
            "attention only reproduces full and sliding-window causal attention, so fastdpo "
            "cannot pack this model."
        )
    if getattr(config, "attention_chunk_size", None):
        raise ValueError(
            f"{name} uses chunked attention (attention_chunk_size="
            f"{config.attention_chunk_size}), which packed attention does not implement."
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"{name} uses bidirectional attention; packed attention is causal only.")


LOGIT_SCALES: dict[str, tuple[str, str]] = {
    "cohere": ("logit_scale", "multiply"),
    "cohere2": ("logit_scale", "multiply"),
    "cohere2_moe": ("logit_scale", "multiply"),
    "granite": ("logits_scaling", "divide"),
    "granite_swa": ("logits_scaling", "divide"),
    "granitemoe": ("logits_scaling", "divide"),
    "granitemoe_swa": ("logits_scaling", "divide"),
    "granitemoeshared": ("logits_scaling", "divide"),
    "hyperclovax": ("logits_scaling", "multiply"),  # the same field name as Granite's, inverse use
}
"""model_type -> (config field, how its forward applies it to the head's logits), read from
each model's transformers code. The same field means different things in different models,
so a field set on a model_type missing here is refused rather than guessed."""

_SCALE_FIELDS = ("logit_scale", "logits_scaling", "output_multiplier")


def head_logit_transform(model: nn.Module) -> tuple[float | None, float]:
    """(softcap, temperature) reproducing what the model's forward does to its head's logits.

    `final_logit_softcapping` (Gemma 2/3: c * tanh(z / c)) becomes the softcap; the logit
    scaling of `LOGIT_SCALES` becomes the temperature (`linear_logprobs` divides by it). No
    supported model both caps and scales, and the order would matter, so that is refused.
    """
    config = text_config(model)
    name = f"{type(model).__name__} (model_type {config.model_type!r})"
    softcap = getattr(config, "final_logit_softcapping", None)
    temperature = 1.0
    known = LOGIT_SCALES.get(config.model_type)
    for field in _SCALE_FIELDS:
        value = getattr(config, field, None)
        if value is None or (known is not None and field == known[0]):
            continue
        raise ValueError(
            f"{name}: its config sets {field}={value!r} and fastdpo does not know how this "
            "model applies it to its logits (see fastdpo.model.LOGIT_SCALES)"
        )
    if known is not None and getattr(config, known[0], None) is not None:
        value = float(getattr(config, known[0]))
        temperature = value if known[1] == "divide" else 1.0 / value
        if softcap is not None and value != 1.0:
            raise ValueError(
                f"{name} both scales ({known[0]}) and soft-caps its logits; fastdpo does not "
                "reproduce that combination"
            )
    return (None if softcap is None else float(softcap)), temperature


def _output_head(model: nn.Module) -> nn.Linear:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise TypeError(
            f"{type(model).__name__} has no output embedding (lm_head): pass a causal LM "
            "(AutoModelForCausalLM), not its base model"
        )
    # The head is applied from its weight and bias by fastdpo, so any behaviour a wrapper adds
    # (a LoRA adapter, quantization) would be silently lost.
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise TypeError(
            f"the output embedding of {type(model).__name__} is a {type(head).__name__}, not a "
            "plain torch.nn.Linear: fastdpo applies the head itself from its weight and bias, "
            "so whatever the wrapper adds (a LoRA adapter on lm_head, quantization) would be "
            "ignored. Keep lm_head out of LoRA target_modules / quantization."
        )
    return head


def _decoder_body(model: nn.Module) -> nn.Module:
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise TypeError(
            f"{type(model).__name__} has no separate decoder body (base_model): pass a "
            "transformers causal LM such as LlamaForCausalLM"
        )
    return body


# ------------------------------------------------------------------------------------------------
# The batch


def _check_batch(batch: PackedBatch, device: torch.device) -> None:
    """Shape, dtype and device checks that need no device sync."""
    total = batch.input_ids.shape[0]
    if batch.input_ids.dim() != 1 or batch.position_ids.shape != batch.input_ids.shape:
        raise ValueError(
            "batch.input_ids and batch.position_ids must both be [T], got "
            f"{tuple(batch.input_ids.shape)} and {tuple(batch.position_ids.shape)}"
        )
    if total == 0:
        raise ValueError("batch is empty (T = 0)")
    sequences = batch.num_sequences
    segments = batch.cu_seqlens.shape[0] - 1
    expected_segments = sequences + (1 if batch.num_padding else 0)
    if segments != expected_segments:
        raise ValueError(
            f"batch.cu_seqlens has {segments} segments but the batch has {sequences} sequences "
            f"and {batch.num_padding} padding tokens (expected {expected_segments} segments)"
        )
    if batch.target_cu.shape != (sequences + 1,):
        raise ValueError(
            f"batch.target_cu must be [S + 1] = [{sequences + 1}], "
            f"got {tuple(batch.target_cu.shape)}"
        )
    if batch.target_positions.shape != batch.target_ids.shape or batch.target_ids.dim() != 1:
        raise ValueError(
            "batch.target_positions and batch.target_ids must both be [M], got "
            f"{tuple(batch.target_positions.shape)} and {tuple(batch.target_ids.shape)}"
        )
    if batch.max_seqlen > total or batch.max_seqlen < 1:
        raise ValueError(f"batch.max_seqlen={batch.max_seqlen} is outside [1, T={total}]")
    if batch.shared_prompt is not None and sequences != 2 * batch.num_examples:
        raise ValueError(
            f"batch has a shared-prompt layout but {sequences} sequences for "
            f"{batch.num_examples} examples: the form holds pairs only (2 sequences each)"
        )
    if batch.input_ids.device != device:
        raise ValueError(
            f"batch is on {batch.input_ids.device} but the model is on {device}: move it with "
            "batch.to(device)"
        )


# ------------------------------------------------------------------------------------------------
# The forward


def sequence_logps(
    model: nn.Module,
    batch: PackedBatch,
    *,
    return_token_logps: bool = False,
    attention: str | None = None,
    impl: str = "auto",
    stats: Sequence[str] = (),
) -> SequenceLogps:
    """Summed completion log-probs of every sequence of a packed batch.

    Args:
        model: a transformers causal LM (or a PEFT model around one) made of attention layers.
            Its attention implementation is set to fastdpo's packed attention, on this
            instance, if it is not already (see `fastdpo.attention.use_packed_attention`).
        batch: a `PackedBatch` on the model's device.
        return_token_logps: also return the per-target log-probs (fp32 [M]).
        attention: packed-attention backend ("auto", "flash", "torch", "flex", "sdpa"); None
            keeps the one the model already uses, else "auto".
        impl: `linear_logprobs` implementation ("auto", "triton", "torch", "cublas").
        stats: per-token statistics computed by the head in the same pass (names from
            `fastdpo.ops.linear_logprobs.STATS`, see `linear_logprobs(return_stats=...)`),
            returned as `token_stats`, with `token_logps`.

    Returns:
        `SequenceLogps` with fp32 `logps` [S] (differentiable w.r.t. the model's parameters)
        and int `lengths` [S]; `chosen`/`rejected` [P] views for paired batches.
    """
    lm = unwrap_model(model)
    check_packable(lm)
    body = _decoder_body(lm)
    head = _output_head(lm)
    softcap, temperature = head_logit_transform(lm)
    _check_batch(batch, head.weight.device)

    if attention is None:
        attention = backend_of(getattr(lm.config, "_attn_implementation", None)) or "auto"
    use_packed_attention(lm, attention)

    total = batch.input_ids.shape[0]
    attention_kwargs = packed_attention_kwargs(
        batch.cu_seqlens,
        batch.max_seqlen,
        total,
        shared_prompt=batch.shared_prompt,
        position_ids=batch.position_ids,
    )
    outputs = body(
        input_ids=batch.input_ids[None],
        position_ids=batch.position_ids[None],
        use_cache=False,
        **attention_kwargs,
    )
    state: PackedAttentionState = attention_kwargs[STATE_KWARG]
    _check_layers_ran_packed(lm, state, batch.max_seqlen)

    hidden = outputs[0][0]  # [T, H]
    target_hidden = hidden.index_select(0, batch.target_positions)  # [M, H]
    weight, bias = head.weight, head.bias
    target_hidden, weight, bias = _head_dtype(target_hidden, weight, bias)
    head_outputs = linear_logprobs(
        target_hidden,
        weight,
        batch.target_ids,
        bias=bias,
        softcap=softcap,
        temperature=temperature,
        ignore_index=None,  # completion targets only: no row to drop, no count (a host sync)
        return_stats=stats,
        impl=impl,
    )
    token_stats = None
    if isinstance(head_outputs, tuple):  # (logp, stats) when stats were asked
        token_logps, token_stats = head_outputs
    else:
        token_logps = head_outputs
    logps, _ = segment_sums(token_logps, batch.target_cu)
    lengths = batch.completion_lengths
    result = SequenceLogps(
        logps=logps,
        lengths=lengths,
        token_logps=token_logps if return_token_logps or token_stats else None,
        token_stats=token_stats,
        attention_backends=tuple(sorted(state.backends_used)),
    )
    if batch.num_sequences == 2 * batch.num_examples and batch.num_examples > 0:
        result.chosen, result.rejected = logps[0::2], logps[1::2]
        result.chosen_lengths, result.rejected_lengths = lengths[0::2], lengths[1::2]
    return result


def _check_layers_ran_packed(model: nn.Module, state: PackedAttentionState, max_seqlen: int):
    """Raise ValueError unless every decoder layer ran through packed attention, with the
    sliding window its config declares.

    Layers that never called the attention function (recurrent, convolution or linear-attention
    layers) mix neighbouring sequences. A layer whose window lives only in the model's mask
    (e.g. Qwen2-MoE, PhiMoE: their attention call does not pass `sliding_window`) would run
    full causal attention here, since packed batches have no mask.
    """
    config = text_config(model)
    layers = getattr(config, "num_hidden_layers", None)
    name = type(model).__name__
    if layers is None:
        return
    if state.calls < layers:
        raise ValueError(
            f"only {state.calls} of the {layers} decoder layers of {name} ran through fastdpo's "
            "packed attention; the others (recurrent, convolution or linear-attention layers, "
            "or attention that bypasses transformers' AttentionInterface) would mix "
            "neighbouring sequences, so this model cannot be packed"
        )
    expected = _declared_windows(config, layers)
    if expected is None:
        return

    def effective(window: int | None) -> int | None:
        # A window at least as long as the longest sequence changes nothing.
        return window if window is not None and window < max_seqlen else None

    for layer, (declared, used) in enumerate(zip(expected, state.call_windows, strict=False)):
        if effective(declared) != effective(used):
            raise ValueError(
                f"{name} layer {layer}: its config declares sliding window {declared} but its "
                f"attention call asked for {used}. Packed attention applies only the window the "
                "call passes (packed batches have no attention mask, where this model keeps its "
                "window), so the result would differ from the model's own: fastdpo cannot pack it"
            )


def _declared_windows(config, layers: int) -> list[int | None] | None:
    """The sliding window of each decoder layer as the config declares it (None: full causal),
    or None if the config declares no window at all."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [window if kind == "sliding_attention" else None for kind in layer_types]
    if window is not None and getattr(config, "use_sliding_window", True):
        return [window] * layers
    return None


def _head_dtype(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Cast the head's inputs to the dtype the model's own lm_head call would compute in.

    Under autocast that is the autocast dtype (the casts are differentiable, so fp32 master
    weights still get their gradients); otherwise the head weight's dtype.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = weight.dtype
    cast = [t if t is None or t.dtype == dtype else t.to(dtype) for t in (hidden, weight, bias)]
    return cast[0], cast[1], cast[2]
