"""Settings of the two demos, as plain dataclasses (no torch import: the command-line parser
reads their defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True)
class ModelSize:
    """Shape of the demo's Llama."""

    hidden_size: int = 128
    """Width of the residual stream."""
    intermediate_size: int = 256
    """Width of the MLP."""
    num_hidden_layers: int = 2
    """Decoder layers."""
    num_attention_heads: int = 4
    """Query heads (key/value heads: half of them, grouped-query attention as in real Llamas)."""


@dataclass(kw_only=True)
class DemoSettings:
    """Everything the demo's run depends on; `quick()` is a smaller version for tests."""

    output_dir: str = "runs/demo"
    """Run directory (data/, base/, sft/, dpo/, summary.json); a previous demo run there is
    replaced."""
    seed: int = 0
    """Seed of the task's rows, the held-out split, the model's init and the sampling."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""
    model: ModelSize = field(default_factory=ModelSize)
    """Shape of the Llama."""
    sft_epochs: float = 20.0
    """Warm-up passes over the SFT rows (12 left ~6% of held-out replies naming the wrong item
    and DPO less sure; 20: ~2%)."""
    sft_learning_rate: float = 3e-3
    """Peak learning rate of the warm-up (linear decay)."""
    dpo_epochs: float = 4.0
    """Passes over the DPO pairs."""
    dpo_learning_rate: float = 3e-4
    """Peak learning rate of DPO (linear decay)."""
    beta: float = 0.1
    """DPO's beta."""
    nll_weight: float = 1.0
    """Weight of an NLL term on the chosen replies added to the DPO loss (RPO, TRL's
    `rpo_alpha`); 0: plain DPO. Plain DPO learns the preference here (held-out accuracy 90-100%)
    but only constrains the margin between the two replies, so this small model's other
    probabilities drift: sampled replies then stay ~50% polite (lr 1e-4) or fall apart
    (lr 3e-4). With the NLL term: 91-98% polite and on topic over seeds 0-3."""
    pairs_per_step: int = 16
    """Pairs per optimizer step, in both stages."""
    samples_per_prompt: int = 4
    """Sampled replies per held-out request, for the judge's win rate."""
    show_samples: int = 4
    """Held-out requests printed with their before/after replies."""
    heldout_fraction: float = 0.2
    """Share of the task's requests held out of all training."""
    progress: bool = True
    """Show the trainer's progress bars."""

    @classmethod
    def quick(cls, **overrides: Any) -> DemoSettings:
        """A smaller run (tests): fewer passes and samples; learns less, in the same direction."""
        values: dict[str, Any] = {
            "sft_epochs": 8.0,
            "dpo_epochs": 2.0,
            "samples_per_prompt": 2,
            "show_samples": 2,
            "progress": False,
        }
        values.update(overrides)
        return cls(**values)


@dataclass(kw_only=True)
class DemoOptions:
    """Shape and placement of the demo's head."""

    tokens: int = 4096
    """N: rows of hidden states (completion tokens)."""
    hidden: int = 512
    """H: hidden size."""
    vocab: int = 32000
    """V: vocabulary size."""
    device: str = "auto"
    """'auto' (CUDA if available, else CPU), 'cpu' or 'cuda'."""
    impl: str = "auto"
    """fastdpo impl: 'auto' (triton on CUDA, torch on the CPU), 'triton' or 'torch'."""
    seed: int = 0
    """Seed of the random hidden states, head and targets."""
