"""Encoding one example into token ids: prompt ids, and per completion its ids and loss mask.

Chat (message-list) examples go through the tokenizer's chat template: the prompt is rendered
with `add_generation_prompt=True`, prompt + reply without, and the completion is what follows
the prompt's tokens in the full conversation's tokens. If the template does not keep the prompt
tokens as an exact prefix (a merge across the boundary, say), the completion text after the
rendered prompt is tokenized on its own instead and the example is counted as a fallback.

Plain-text examples: the prompt is tokenized with the tokenizer's special tokens (one BOS, even
if the text starts with it), the completion without, and EOS is appended to the completion if
missing.

Loss mask of a multi-turn reply (assistant, user, ..., assistant): by default only the tokens
of the final assistant turn count, with `loss_on="all_assistant_turns"` every assistant turn's
tokens. A turn's tokens run from just after its generation prompt to the end of its rendered
message (content and end-of-turn marker), located by rendering the conversation up to each turn.

This module holds plain data only (no torch, no fastdpo types), so worker processes that
tokenize in parallel import little.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

LossOn = Literal["final_turn", "all_assistant_turns"]
LOSS_ON_CHOICES = ("final_turn", "all_assistant_turns")


class ChatTemplateError(ValueError):
    """The chat template cannot be split into prompt and completion for some example."""


@dataclass(frozen=True, kw_only=True)
class EncodeOptions:
    """How examples become token ids (all that changes the ids is here: it keys the cache)."""

    loss_on: LossOn = "final_turn"
    """Multi-turn replies: which assistant turns count in the loss."""
    add_eos: bool = True
    """Plain-text completions: append EOS if the completion does not already end with it."""
    text_as_chat: bool = False
    """Plain-text examples: wrap the prompt as a user message and the completion as an assistant
    message and use the chat template (default: tokenize the text as it is)."""

    def __post_init__(self) -> None:
        if self.loss_on not in LOSS_ON_CHOICES:
            raise ValueError(f"loss_on must be one of {LOSS_ON_CHOICES}, got {self.loss_on!r}")


class Completion(NamedTuple):
    ids: list[int]
    mask: list[bool] | None
    """Which of `ids` count in the loss; None when all do."""


class Encoded(NamedTuple):
    prompt_ids: list[int]
    completions: list[Completion]
    used_fallback: bool
    """True when some completion could not be split off as a token suffix of the conversation."""


def encode_example(
    tokenizer: Any, prompt: Any, completions: list[Any], options: EncodeOptions
) -> Encoded:
    """Prompt ids and one `Completion` per entry of `completions` (text or message lists)."""
    if isinstance(prompt, str) and options.text_as_chat:
        prompt = [{"role": "user", "content": prompt}]
        completions = [
            [{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions
        ]
    if isinstance(prompt, str):
        return _encode_text(tokenizer, prompt, completions, options)
    return _encode_chat(tokenizer, prompt, completions, options)


def _encode_text(tokenizer, prompt: str, completions: list[str], options: EncodeOptions) -> Encoded:
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    # A prompt text that starts with the BOS token itself would get a second one.
    if bos is not None and prompt_ids[:2] == [bos, bos]:
        prompt_ids = prompt_ids[1:]
    # Some tokenizers also append EOS to every encoded text: a prompt must not end the sequence.
    if eos is not None and len(prompt_ids) > 1 and prompt_ids[-1] == eos:
        prompt_ids = prompt_ids[:-1]
    encoded = []
    for text in completions:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if options.add_eos and (not ids or ids[-1] != eos):
            ids = [*ids, eos]
        encoded.append(Completion(ids, None))
    return Encoded(prompt_ids, encoded, False)


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def _encode_chat(tokenizer, prompt: list[dict], completions, options: EncodeOptions) -> Encoded:
    prompt_text = _render(tokenizer, prompt, True)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    encoded = []
    used_fallback = False
    for reply in completions:
        # Token offsets (to locate assistant turns) are only needed for multi-turn replies.
        multi_turn = len(reply) > 1
        if multi_turn and not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "multi-turn replies need a fast tokenizer (token offsets locate each turn)"
            )
        full_text = _render(tokenizer, prompt + reply, False)
        full = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=multi_turn)
        n = len(prompt_ids)
        if full["input_ids"][:n] == prompt_ids:
            ids = full["input_ids"][n:]
            offsets, shift = (full["offset_mapping"][n:] if multi_turn else None), 0
        elif full_text.startswith(prompt_text):
            used_fallback = True
            rest = tokenizer(
                full_text[len(prompt_text) :],
                add_special_tokens=False,
                return_offsets_mapping=multi_turn,
            )
            ids = rest["input_ids"]
            offsets, shift = (rest["offset_mapping"] if multi_turn else None), len(prompt_text)
        else:
            raise ChatTemplateError(
                "the chat template renders the prompt (with add_generation_prompt=True) as text "
                "that is not a prefix of the rendered prompt + reply, so the reply cannot be "
                f"separated; prompt renders as {prompt_text[-80:]!r}, the conversation as "
                f"{full_text[len(prompt_text) - 80 : len(prompt_text) + 40]!r}"
            )
        mask = None
        if multi_turn:
            spans = _assistant_spans(tokenizer, prompt, reply, full_text, options.loss_on)
            mask = [any(lo <= shift + start < hi for lo, hi in spans) for start, _ in offsets]
        encoded.append(Completion(ids, mask))
    return Encoded(prompt_ids, encoded, used_fallback)


def _assistant_spans(
    tokenizer, prompt: list[dict], reply: list[dict], full_text: str, loss_on: LossOn
) -> list[tuple[int, int]]:
    """Character spans [start, end) of the assistant turns of `reply` that count in the loss."""
    turns = [k for k, message in enumerate(reply) if message["role"] == "assistant"]
    if loss_on == "final_turn":
        turns = turns[-1:]
    spans = []
    for k in turns:
        before = _render(tokenizer, prompt + reply[:k], True)
        through = _render(tokenizer, prompt + reply[: k + 1], False)
        if not (full_text.startswith(before) and full_text.startswith(through)):
            raise ChatTemplateError(
                "the chat template renders earlier turns differently once later turns follow, so "
                "the assistant turns of a multi-turn reply cannot be located; use a template "
                "that renders each turn the same way, or loss_on='final_turn' with single replies"
            )
        spans.append((len(before), len(through)))
    return spans
