"""A tiny byte-level BPE tokenizer with a ChatML chat template, built in-process (no download).

`build_tiny_tokenizer()` trains a byte-level BPE model on a few built-in sentences (a few
milliseconds), so every string round-trips exactly through encode/decode, and wraps it as a
transformers `PreTrainedTokenizerFast` with BOS / EOS / PAD tokens and a Jinja chat template.
Tests, the demo and CPU benchmarks use it wherever a real tokenizer would need the network.

Special tokens take the first ids: pad 0, bos 1, eos 2, <|im_start|> 3, <|im_end|> 4. Plain text
is encoded with a leading BOS (`add_special_tokens=True`); the chat template writes the BOS
itself (chat text is tokenized with `add_special_tokens=False`, as transformers does).
"""

from __future__ import annotations

from functools import lru_cache

PAD, BOS, EOS, IM_START, IM_END = "<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START, IM_END)

CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML: each message is "<|im_start|>{role}\\n{content}<|im_end|>\\n"; the generation prompt
is "<|im_start|>assistant\\n", so a rendered prompt is an exact prefix of prompt + reply."""

_CORPUS = (
    "system user assistant",
    "You are a helpful assistant. Answer the question briefly and politely.",
    "Hello! How are you today? I am fine, thank you for asking.",
    "What is the capital of France? The capital of France is Paris.",
    "Please write a short poem about the sea, the sun and the wind.",
    "Human: Can you help me with my homework? Assistant: Sure, what is the question?",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > , . ; :",
    "I do not know. Sorry, I cannot help with that. Here is a better answer with more detail.",
)


@lru_cache(maxsize=8)
def _trained_model_json(vocab_size: int) -> str:
    """The trained tokenizer as JSON (cached: training is deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer.to_str()


def build_tiny_tokenizer(*, vocab_size: int = 512, chat_template: str = CHATML_TEMPLATE):
    """A `PreTrainedTokenizerFast` (byte-level BPE, at most `vocab_size` tokens, ~5 ms).

    The vocabulary may come out smaller than `vocab_size` (the corpus is small): size a model's
    embedding with `len(tokenizer)`. `chat_template` replaces the ChatML template (tests use
    this to try templates that are not prefix-stable).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_trained_model_json(vocab_size))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=1 << 20,
    )
    tokenizer.chat_template = chat_template
    return tokenizer
