"""The setup that fastdpo's Trainer and TRL's DPOTrainer are both run on for the fidelity test.

One module, imported by `generate_trl_reference.py` (run once, in an environment with TRL) and
by `tests/test_trl_fidelity.py` (every test run, without TRL), so both sides train exactly the
same model on exactly the same data:

- the tiny byte-level BPE tokenizer of `fastdpo.testing.tokenizer`;
- a tiny Llama (2 layers, hidden 32, grouped-query attention, untied head) whose weights are
  drawn here from a seeded `torch.Generator` in parameter-name order, not by transformers'
  initializers, so the weights depend only on torch's CPU generator (stable across releases)
  and not on how a transformers version initializes a Llama; `weights_checksum` pins them;
- 14 plain-text preference pairs. Every prompt ends in punctuation and every completion starts
  with a space and a letter or digit, so the byte-level pre-tokenizer splits at the prompt /
  completion boundary and BPE cannot merge across it: tokenizing prompt + completion jointly
  (TRL) and separately (fastdpo) gives the same ids (the generator checks this and stores
  the ids).

The training settings (`SETTINGS`) make one optimizer step = the whole data set, so the order
in which either trainer visits the pairs cannot change a number.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

MODEL_SEED = 20260
"""Seed of the generator the weights are drawn from."""

INIT_STD = 0.2
"""Standard deviation of the matrices (the tiny models' range: log-probs vary across tokens)."""

REFERENCE_NOISE_STD = 0.02
"""The separate reference model is the policy plus noise of this size: its log-probs differ from
the policy's by a few tenths of a nat per sequence, so at step 1 some pairs already rank right
and some wrong (a reward accuracy strictly between 0 and 1), and training flips the wrong ones
over a few steps. With the policy as its own reference every step-1 margin is 0, and a tiny
model fits all 14 pairs after one step, so the accuracy would only ever read 0 then 1."""

PAIRS: list[dict[str, str]] = [
    {
        "prompt": "What is the capital of France?",
        "chosen": " The capital of France is Paris.",
        "rejected": " I do not know.",
    },
    {
        "prompt": "Hello! How are you today?",
        "chosen": " I am fine, thank you for asking.",
        "rejected": " Sorry, I cannot help with that.",
    },
    {
        "prompt": "Please write a short poem about the sea:",
        "chosen": " The sea, the sun and the wind.",
        "rejected": " No.",
    },
    {
        "prompt": "Can you help me with my homework?",
        "chosen": " Sure, what is the question?",
        "rejected": " I cannot help with that. Here is a poem about the wind.",
    },
    {
        "prompt": "Answer the question briefly: what jumps over the lazy dog?",
        "chosen": " The quick brown fox.",
        "rejected": " The dog jumps over the fox, and the fox is lazy.",
    },
    {
        "prompt": "You are a helpful assistant. What is 2 + 3?",
        "chosen": " 2 + 3 = 5.",
        "rejected": " It is 23.",
    },
    {
        "prompt": "Human: Is Paris in France?",
        "chosen": " Yes, Paris is the capital of France.",
        "rejected": " I do not know. Sorry.",
    },
    {
        "prompt": "Write one polite sentence:",
        "chosen": " Thank you for asking, I am happy to help.",
        "rejected": " What is the question?",
    },
    {
        "prompt": "What is 7 * 8?",
        "chosen": " 7 * 8 = 56.",
        "rejected": " 7 * 8 = 54, I think.",
    },
    {
        "prompt": "Describe the wind in a few words:",
        "chosen": " Quick, cold and free.",
        "rejected": " The wind is the wind is the wind.",
    },
    {
        "prompt": "Please answer politely: can you write a poem?",
        "chosen": " Sure, here is a short poem about the sun.",
        "rejected": " No, I cannot.",
    },
    {
        "prompt": "Which animal is lazy in the sentence about the fox?",
        "chosen": " The dog is lazy.",
        "rejected": " The fox is lazy and the dog is quick.",
    },
    {
        "prompt": "Say hello:",
        "chosen": " Hello! How are you?",
        "rejected": " Goodbye.",
    },
    {
        "prompt": "What is 10 / 2?",
        "chosen": " 10 / 2 = 5.",
        "rejected": " 10 / 2 = 4, or 8.",
    },
]
"""The preference pairs (plain text: TRL appends the EOS token, fastdpo's add_eos does too)."""

SETTINGS = {
    "loss": "sigmoid",
    "beta": 0.1,
    "learning_rate": 3e-4,
    "steps": 6,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "weight_decay": 0.0,
    "max_length": 1024,
}
"""Shared training settings: AdamW at a constant learning rate, no clipping, fp32, one step =
all of `PAIRS` (TRL: per_device_train_batch_size = len(PAIRS); fastdpo: pairs_per_step)."""


def build_tokenizer():
    """The tiny tokenizer (a transformers `PreTrainedTokenizerFast`)."""
    from fastdpo.testing.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


def build_model(vocab_size: int, *, reference: bool = False):
    """The tiny Llama in fp32 with seeded weights (see the module docstring), in eval mode.

    Matrices ~ N(0, INIT_STD^2); RMSNorm weights ~ 1 + N(0, 0.1^2), so the norms are not
    all ones and a missing norm would show. `reference=True`: the same weights plus
    N(0, REFERENCE_NOISE_STD^2) noise (a separate reference model, see `REFERENCE_NOISE_STD`).
    """
    from transformers import LlamaForCausalLM

    from fastdpo.testing.models import tiny_config

    config = tiny_config("llama", vocab_size=vocab_size, max_position_embeddings=256)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED)  # only for construction; every weight is overwritten
        model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(MODEL_SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(INIT_STD * noise)
        if reference:
            generator = torch.Generator().manual_seed(MODEL_SEED + 1)
            for _, param in sorted(model.named_parameters()):
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.add_(REFERENCE_NOISE_STD * noise)
    return model.float().eval()


def weights_checksum(model) -> str:
    """SHA-256 over every parameter's name and fp32 bytes, in name order."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_model_dir(path: Path, *, reference: bool = False) -> tuple[Path, str]:
    """Saves the tokenizer and the model (`reference`: the separate reference model) to `path`,
    a Hugging Face folder both trainers load; returns (path, weights checksum)."""
    path = Path(path)
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), reference=reference)
    tokenizer.save_pretrained(path)
    model.save_pretrained(path, safe_serialization=True)
    return path, weights_checksum(model)
