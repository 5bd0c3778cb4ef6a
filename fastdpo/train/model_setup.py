"""Loading the policy and reference models: device, precision, packed attention, LoRA.

Precision (`dtype`): "auto" keeps fp32 master weights and runs the forward under bf16
autocast on CUDA, and plain fp32 on the CPU; "float32" is fp32 everywhere; "bfloat16" stores
the weights in bf16 (no autocast). The reference pass runs in bf16 on CUDA and fp32 on the
CPU unless the config says float32.

LoRA goes through `peft` (the `lora` extra). The output head never gets an adapter and stays
frozen, so the fused head op computes no weight gradient for it.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from fastdpo.attention import use_packed_attention
from fastdpo.train.config import ConfigError, TrainConfig

logger = logging.getLogger("fastdpo.train")


def resolve_device(choice: str) -> torch.device:
    """`device` config value -> a torch device; an error if CUDA is asked for but missing."""
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {choice!r} but no CUDA device is available")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if choice in ("auto", "cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(choice)


def weight_dtype(config: TrainConfig) -> torch.dtype:
    """Dtype the policy's weights are stored in."""
    return torch.bfloat16 if config.dtype == "bfloat16" else torch.float32


def reference_dtype(config: TrainConfig) -> torch.dtype:
    """Weights dtype of the reference pass: the policy's, so that with `dtype: auto` the pass
    runs under the same bf16 autocast and the policy equals the reference at step 0."""
    return weight_dtype(config)


def autocast_context(config: TrainConfig, device: torch.device):
    """bf16 autocast for dtype auto on CUDA; a no-op context otherwise."""
    if config.dtype == "auto" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_causal_lm(path: str | Path, config: TrainConfig, dtype: torch.dtype, device):
    """A transformers causal LM on `device` with fastdpo's packed attention."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, trust_remote_code=config.trust_remote_code
        )
    except OSError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"model: cannot load {str(path)!r}: {first_line}") from None
    use_packed_attention(model, backend=config.attention)
    return model.to(device)


def load_policy(config: TrainConfig, device: torch.device):
    """The policy in training mode from `config.model`, LoRA applied if asked. A resumed run
    loads its trained weights from the checkpoint afterwards (`load_training_state`, once the
    model is wrapped for data parallelism: the checkpoint is resharded onto that layout)."""
    dtype = weight_dtype(config)
    model = load_causal_lm(config.model, config, dtype, device)
    if config.lora_r:
        model = _with_lora(model, config)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    return model


def _with_lora(model, config: TrainConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError(
            f"lora_r: {config.lora_r} needs peft: pip install 'fastdpo[lora]'"
        ) from None
    targets = config.lora_target_modules
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    head = model.get_base_model().get_output_embeddings()
    if head is not None and head.weight.requires_grad:
        raise ConfigError(
            "lora_target_modules: the output head got an adapter or stayed trainable; leave "
            "lm_head out (the fused head op expects a frozen head under LoRA)"
        )
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
