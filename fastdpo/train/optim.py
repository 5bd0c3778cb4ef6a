"""AdamW and the learning-rate schedule, as HF's Trainer builds them.

Weight decay skips biases and normalization weights (every parameter with fewer than two
dimensions), as `transformers.Trainer` does; the schedule comes from transformers'
`get_scheduler`, so `lr_scheduler_type` takes the same names as in TRL / HF.
"""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from fastdpo.train.config import TrainConfig


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (fused kernels on CUDA)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    decay = [p for _, p in trainable if p.dim() >= 2]
    no_decay = [p for _, p in trainable if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    on_cuda = all(p.is_cuda for _, p in trainable)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        fused=True if on_cuda else None,
    )


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    """warmup_steps when > 0, else ceil(warmup_ratio x total_steps) (HF's rule)."""
    if config.warmup_steps > 0:
        return config.warmup_steps
    return math.ceil(config.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """transformers' scheduler `lr_scheduler_type` over `total_steps` optimizer steps."""
    return get_scheduler(
        config.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup_steps(config, total_steps),
        num_training_steps=total_steps,
    )
