"""Writes trl_loss_options.json: TRL 1.16's DPO loss, gradients and metrics for its loss options.

`tests/test_loss_options.py` computes the same numbers with fastdpo from the same per-token
inputs. TRL is not a dependency of fastdpo, so the numbers are made once, here, and stored.

What runs: TRL's own `DPOTrainer._compute_loss` (the code that reads `loss_type`,
`f_divergence_type`, `f_alpha_divergence_coef`, `ld_alpha` and `use_weighting`), on a trainer
object holding only the attributes that method reads, with stand-in models whose "fused LM
head" outputs are fixed per-token tensors: policy log-probs (a leaf tensor, so its gradient
is TRL's d loss / d log p per token), entropy, mean logit, top-1 flags and log sum_v p_v^2,
and the reference's per-token log-probs (the live-reference path, so LD-DPO reweights them
with TRL's masks). Nothing else of TRL's trainer runs; no model, no data set, no Hub.

The inputs (a padded batch of 4 pairs, prompts of 1-3 tokens, completions of 1-7 tokens,
chosen rows then rejected rows as TRL's collator lays them out) are drawn once from a seeded
generator and stored in the JSON with the results, so the test rebuilds exactly these tensors.
Run from the repository root (a few seconds), in the venv described in
generate_trl_reference.py (TRL 1.16.0, torch 2.13.0+cpu):

    /work/trl-venv/bin/python tests/trl_reference/generate_trl_loss_options.py
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import torch

OUTPUT = Path(__file__).resolve().parent / "trl_loss_options.json"

PROMPT_LENGTHS = [2, 1, 3, 2, 1, 3, 2, 2]
"""Per row (4 chosen rows, then their 4 rejected rows)."""
COMPLETION_LENGTHS = [5, 3, 7, 1, 5, 6, 2, 4]
"""Pair 0 equal lengths, pair 1 rejected longer, pairs 2-3 chosen longer (pair 3: length 1)."""
WIDTH = 11
"""Padded row length (prompt + completion <= 10, so every row has padding)."""

CASES = [
    # (name, inputs, loss_type, loss_weights or None, extra DPOConfig-style options)
    ("sigmoid_norm", "base", ["sigmoid_norm"], None, {}),
    ("sigmoid_forward_kl", "base", ["sigmoid"], None, {"f_divergence_type": "forward_kl"}),
    ("sigmoid_js", "base", ["sigmoid"], None, {"f_divergence_type": "js_divergence"}),
    (
        "sigmoid_alpha_0.5",
        "base",
        ["sigmoid"],
        None,
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5},
    ),
    (
        "sigmoid_alpha_1",
        "base",
        ["sigmoid"],
        None,
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0},
    ),
    (
        "hinge_alpha_1.5",
        "base",
        ["hinge"],
        None,
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.5},
    ),
    (
        "ipo_alpha_0.3",
        "base",
        ["ipo"],
        None,
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    ),
    (
        "robust_js",
        "base",
        ["robust"],
        None,
        {"f_divergence_type": "js_divergence", "label_smoothing": 0.1},
    ),
    (
        "exo_pair_forward_kl",
        "base",
        ["exo_pair"],
        None,
        {"f_divergence_type": "forward_kl", "label_smoothing": 1e-3},
    ),
    ("discopop_js", "base", ["discopop"], None, {"f_divergence_type": "js_divergence"}),
    (
        "sigmoid_norm_alpha_clamped",
        "large",
        ["sigmoid_norm"],
        None,
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": -3.0},
    ),
    ("sigmoid_ld_0.5", "base", ["sigmoid"], None, {"ld_alpha": 0.5}),
    ("ipo_ld_0", "base", ["ipo"], None, {"ld_alpha": 0.0}),
    ("aot_ld_0.3", "base", ["aot"], None, {"ld_alpha": 0.3}),
    ("rpo_ld_0.3", "base", ["sigmoid", "sft"], [1.0, 0.5], {"ld_alpha": 0.3}),
    ("sigmoid_wpo", "base", ["sigmoid"], None, {"use_weighting": True}),
    ("nca_pair_wpo", "base", ["nca_pair"], None, {"use_weighting": True}),
    # Not here: "sft" with use_weighting, which TRL 1.16 cannot run (it multiplies the expanded
    # batch NLL in place: "more than one element of the written-to tensor refers to a single
    # memory location"); fastdpo applies what that code means, the NLL times the mean weight.
    # Nor "hinge" with use_weighting: the same in-place product overwrites the relu output
    # that relu's backward reads, so TRL's backward fails (its loss value would be right).
    (
        "everything",
        "base",
        ["sigmoid_norm", "apo_zero"],
        [1.0, 0.25],
        {"ld_alpha": 0.4, "use_weighting": True},
    ),
    (
        "everything_f",
        "base",
        ["sigmoid_norm", "ipo"],
        [1.0, 0.25],
        {"ld_alpha": 0.4, "use_weighting": True, "f_divergence_type": "forward_kl"},
    ),
]

METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "entropy",
    "logits/chosen",
    "logits/rejected",
    "mean_token_accuracy",
)


def make_inputs(kind: str) -> dict:
    """Per-token tensors of the padded batch (float32; 0 log-prob outside completions, as TRL's
    fused head gives for label -100; the other statistics are arbitrary there: TRL masks them)."""
    g = torch.Generator().manual_seed(1234 if kind == "base" else 4321)
    rows = len(PROMPT_LENGTHS)
    completion_mask = torch.zeros(rows, WIDTH, dtype=torch.int64)
    for r, (p, c) in enumerate(zip(PROMPT_LENGTHS, COMPLETION_LENGTHS, strict=True)):
        completion_mask[r, p : p + c] = 1
    attention_mask = torch.zeros_like(completion_mask)
    for r, (p, c) in enumerate(zip(PROMPT_LENGTHS, COMPLETION_LENGTHS, strict=True)):
        attention_mask[r, : p + c] = 1
    mask = completion_mask[:, 1:].to(torch.float32)
    shape = (rows, WIDTH - 1)
    logps = -torch.rand(shape, generator=g) * 3.0
    ref = -torch.rand(shape, generator=g) * 3.0
    if kind == "large":  # log-ratios of about +-30: exp((a - 1) rho) needs TRL's clamp at 80
        logps = logps - 6.0 * (torch.arange(rows) < 4).to(torch.float32)[:, None]
        ref = ref - 5.0 * (torch.arange(rows) >= 4).to(torch.float32)[:, None]
    log_sum_p2 = -torch.rand(shape, generator=g) * 2.0 - 0.1
    return {
        "completion_mask": completion_mask,
        "attention_mask": attention_mask,
        "log_probs": logps * mask,
        "ref_log_probs": ref * mask,
        "entropy": torch.rand(shape, generator=g) * 4.0,
        "mean_logits": torch.randn(shape, generator=g),
        "is_top1": torch.rand(shape, generator=g) < 0.4,
        "log_sum_sq_probs": log_sum_p2,
    }


class _Head:
    """Stand-in model: returns the fixed per-token outputs whatever it is called with."""

    is_gradient_checkpointing = False

    def __init__(self, outputs: dict, training: bool):
        self.outputs = outputs
        self.training = training

    def __call__(self, **kwargs):
        assert kwargs.get("fused_lm_head") is True
        return SimpleNamespace(**self.outputs)


def run_trl(inputs: dict, loss_type, loss_weights, options: dict) -> dict:
    from trl.trainer.dpo_trainer import DPOTrainer

    log_probs = inputs["log_probs"].clone().requires_grad_(True)
    policy_outputs = {
        "log_probs": log_probs,
        "entropy": inputs["entropy"],
        "mean_logits": inputs["mean_logits"],
        "is_top1": inputs["is_top1"],
        "log_sum_sq_probs": inputs["log_sum_sq_probs"],
    }
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.model = _Head(policy_outputs, training=True)
    trainer.ref_model = _Head({"log_probs": inputs["ref_log_probs"]}, training=False)
    trainer.accelerator = SimpleNamespace(
        device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t
    )
    trainer.args = SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05)
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    trainer.precompute_ref_logps = False
    trainer.beta = 0.1
    trainer.loss_types = list(loss_type)
    trainer.loss_weights = loss_weights or [1.0] * len(loss_type)
    trainer.label_smoothing = options.get("label_smoothing", 0.0)
    trainer.ld_alpha = options.get("ld_alpha")
    trainer.f_divergence_type = options.get("f_divergence_type", "reverse_kl")
    trainer.f_alpha_divergence_coef = options.get("f_alpha_divergence_coef", 0.5)
    trainer.use_weighting = options.get("use_weighting", False)
    batch = {
        "input_ids": torch.zeros_like(inputs["completion_mask"]),
        "attention_mask": inputs["attention_mask"],
        "completion_mask": inputs["completion_mask"],
    }
    loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    loss.backward()
    logged = trainer._metrics["train"]
    return {
        "loss": float(loss.detach()),
        "grad_log_probs": log_probs.grad.tolist(),
        "metrics": {key: float(logged[key][-1]) for key in METRICS},
    }


def main() -> None:
    inputs = {kind: make_inputs(kind) for kind in ("base", "large")}
    cases = []
    for name, kind, loss_type, loss_weights, options in CASES:
        result = run_trl(inputs[kind], loss_type, loss_weights, options)
        cases.append(
            {
                "name": name,
                "inputs": kind,
                "loss_type": loss_type,
                "loss_weights": loss_weights,
                "options": options,
                **result,
            }
        )
    record = {
        "made_with": {
            name: metadata.version(name) for name in ("trl", "torch", "transformers", "accelerate")
        },
        "date": dt.date.today().isoformat(),
        "beta": 0.1,
        "prompt_lengths": PROMPT_LENGTHS,
        "completion_lengths": COMPLETION_LENGTHS,
        "inputs": {
            kind: {key: value.tolist() for key, value in tensors.items()}
            for kind, tensors in inputs.items()
        },
        "cases": cases,
    }
    OUTPUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUTPUT} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
