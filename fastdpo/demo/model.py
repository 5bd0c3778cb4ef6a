"""The demo's model and tokenizer, built locally: nothing is downloaded.

The tokenizer is a byte-level BPE trained on the task's own text (so the task's words are
single tokens and a reply is ~15 tokens); the model is a small Llama with random weights, sized
so the SFT warm-up and DPO together fit the demo's time budget on a 2-core CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastdpo.demo.settings import ModelSize
from fastdpo.demo.task import corpus
from fastdpo.testing.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS


def build_tokenizer(*, vocab_size: int = 1024):
    """A `PreTrainedTokenizerFast` trained on `task.corpus()` (byte-level BPE, BOS prepended).

    Special tokens take the first ids (pad 0, bos 1, eos 2), as in `fastdpo.testing.tokenizer`;
    there is no chat template: the task's prompts are plain text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS[:3]),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(), trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, backend.token_to_id(BOS))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=256,
    )


def build_model(tokenizer, size: ModelSize, *, seed: int):
    """A random-initialized `LlamaForCausalLM` (fp32) for `tokenizer`, weights from `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=max(1, size.num_attention_heads // 2),
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def save_base_model(folder: Path, size: ModelSize, *, seed: int) -> Path:
    """Builds the tokenizer and the random model and saves both to `folder` (HF format)."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, size, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
