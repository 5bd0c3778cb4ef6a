"""Optional: Liger-Kernel's body kernels (RMSNorm, fused gated MLP) on one model instance.

Nothing in transformers or liger-kernel is patched globally: submodules of the given model are
replaced by ones that share their parameters.
"""

from __future__ import annotations

import importlib
import logging

import torch
from torch import nn

from fastdpo.model import text_config, unwrap_model

logger = logging.getLogger(__name__)

# model_type -> (RMSNorm offset, Liger casting mode): Gemma norms scale by (1 + weight) in fp32.
_LIGER_NORM_MODES = {
    "llama": (0.0, "llama"),
    "mistral": (0.0, "llama"),
    "qwen2": (0.0, "llama"),
    "qwen3": (0.0, "llama"),
    "gemma": (1.0, "gemma"),
    "gemma2": (1.0, "gemma"),
}
# config activation -> (module, name) of Liger's fused act(gate) * up autograd Function. Imported
# from its own module: the `liger_kernel.ops` package re-exports it only in recent releases.
_LIGER_GATED_ACTIVATIONS = {
    "silu": ("liger_kernel.ops.swiglu", "LigerSiLUMulFunction"),
    "swish": ("liger_kernel.ops.swiglu", "LigerSiLUMulFunction"),
    "gelu_pytorch_tanh": ("liger_kernel.ops.geglu", "LigerGELUMulFunction"),
}


class _GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with a fused act-and-multiply; holds the original Linears,
    so parameter names and state-dict keys stay those of the module it replaces."""

    def __init__(self, mlp: nn.Module, multiply) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self._multiply = multiply

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self._multiply(self.gate_proj(x), self.up_proj(x)))


def _swap_body_modules(model: nn.Module, make_norm, multiply, *, rms_norm: bool, swiglu: bool):
    """Replace RMSNorm / gated-MLP submodules of this instance; return the replaced names.

    `make_norm(module) -> nn.Module` builds a norm holding the same weight Parameter;
    `multiply(gate, up)` is the fused activation product. Only this model's tree changes.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        parent_name, _, child_name = name.rpartition(".")
        is_norm = type(module).__name__.endswith("RMSNorm")
        is_norm = is_norm and getattr(module, "weight", None) is not None
        is_mlp = all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))
        if (rms_norm and is_norm) or (swiglu and is_mlp):
            new = make_norm(module) if is_norm else _GatedMLP(module, multiply)
            setattr(model.get_submodule(parent_name), child_name, new)
            replaced.append(name)
    return replaced


def apply_liger_body_kernels(
    model: nn.Module, *, rms_norm: bool = True, swiglu: bool = True
) -> list[str]:
    """Run this model instance's RMSNorms and gated MLPs with Liger-Kernel's Triton kernels.

    Per instance: submodules of this model are replaced by ones that share their parameters;
    nothing in transformers or liger-kernel is patched, other models are unaffected, and state
    dict keys are unchanged. RoPE is not offered: transformers applies it through a
    module-level function, which only a global patch could swap.

    Returns the names of the replaced modules. Raises if liger-kernel is missing, the model is
    not on CUDA (Liger's kernels are Triton-only), or its family is not one this knows.
    """
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
    except ImportError as error:
        raise ImportError(
            "apply_liger_body_kernels needs liger-kernel: pip install liger-kernel"
        ) from error
    lm = unwrap_model(model)
    if lm.get_output_embeddings().weight.device.type != "cuda":
        raise RuntimeError("Liger's kernels run on CUDA only: move the model to a GPU first")
    config = text_config(lm)
    if config.model_type not in _LIGER_NORM_MODES:
        raise ValueError(
            f"no Liger body-kernel mapping for model_type {config.model_type!r}; known: "
            f"{sorted(_LIGER_NORM_MODES)}"
        )
    offset, casting_mode = _LIGER_NORM_MODES[config.model_type]
    activation = getattr(config, "hidden_activation", None) or config.hidden_act
    multiply = None
    if swiglu:
        if activation not in _LIGER_GATED_ACTIVATIONS:
            raise ValueError(f"Liger has no fused gated MLP for activation {activation!r}")
        module_name, function_name = _LIGER_GATED_ACTIVATIONS[activation]
        multiply = getattr(importlib.import_module(module_name), function_name).apply

    def make_norm(module: nn.Module) -> nn.Module:
        eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
        norm = LigerRMSNorm(
            module.weight.shape[0],
            eps=eps,
            offset=offset,
            casting_mode=casting_mode,
            in_place=False,
        )
        norm.weight = module.weight  # the same Parameter: optimizer state and tying survive
        return norm

    replaced = _swap_body_modules(lm, make_norm, multiply, rms_norm=rms_norm, swiglu=swiglu)
    logger.info("Liger body kernels on %s: %d modules", type(lm).__name__, len(replaced))
    return replaced
