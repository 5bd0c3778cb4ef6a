"""Fitting one encoded example into `max_length` tokens per sequence.

Per sequence (prompt + one completion <= `max_length`):
1. if `max_prompt_length` is set, a longer prompt is cut to it: from the left (keeping the
   most recent turns, and a leading BOS) or from the right (`prompt_truncation`);
2. a prompt that leaves no room for a completion token makes the example a bad row ("prompt
   longer than max_length"), which `tokenize_pairs` handles by its `on_bad_row` policy;
3. completions are cut from the right to fit; if no loss token of a completion survives, the
   example is also "prompt longer than max_length" (and a completion that has no loss token to
   begin with is "empty content").
Every sequence keeps at least one prompt token: packing relies on it (the hidden state that
predicts a sequence's first completion token lies inside the sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from fastdpo.data.chat import Completion, Encoded
from fastdpo.data.types import PreferenceExample, TokenizedPair
from fastdpo.data.validation import Reason

PromptTruncation = Literal["left", "right"]


@dataclass(frozen=True, kw_only=True)
class TruncationOptions:
    """The length limits (all that truncation needs; part of the tokenization cache key)."""

    max_length: int
    """Most tokens per sequence (prompt + one completion)."""
    max_prompt_length: int | None = None
    """Cut longer prompts to this many tokens (None: never cut prompts)."""
    prompt_truncation: PromptTruncation = "left"
    """"left" keeps the end of the prompt (and a leading BOS), "right" its start."""

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(
                "max_length must be >= 2 (a prompt token and a completion token), "
                f"got {self.max_length}"
            )
        limit = self.max_prompt_length
        if limit is not None and not 1 <= limit < self.max_length:
            raise ValueError(
                f"max_prompt_length must be in [1, max_length), got {limit} "
                f"with max_length={self.max_length}"
            )
        if self.prompt_truncation not in ("left", "right"):
            raise ValueError(
                f"prompt_truncation must be 'left' or 'right', got {self.prompt_truncation!r}"
            )


class Fitted(NamedTuple):
    """One example after truncation: the pair, or why it was left out."""

    pair: TokenizedPair | None
    problem: tuple[Reason, str] | None
    """(reason, message) when the example cannot be kept; `pair` is then None."""
    prompt_cut: bool
    completions_cut: int


def fit_to_max_length(
    example: PreferenceExample, enc: Encoded, options: TruncationOptions, bos_token_id: int | None
) -> Fitted:
    """`example`'s `TokenizedPair` within `options.max_length`, or the problem that prevents it."""
    prompt = enc.prompt_ids
    if not prompt:
        raise ValueError(
            f"example {example.example_id!r}: the prompt encodes to no tokens; every sequence "
            "needs a prompt token (use a tokenizer with a BOS token or a chat template)"
        )
    limit = options.max_prompt_length
    prompt_cut = limit is not None and len(prompt) > limit
    if prompt_cut:
        prompt = _cut_prompt(prompt, limit, options.prompt_truncation, bos_token_id)

    def left_out(reason: Reason, message: str) -> Fitted:
        return Fitted(None, (reason, message), prompt_cut, 0)

    room = options.max_length - len(prompt)
    if room < 1:
        return left_out(
            Reason.PROMPT_TOO_LONG,
            f"prompt has {len(prompt)} tokens, no room for a completion in "
            f"max_length={options.max_length}",
        )
    kept: list[Completion] = []
    completions_cut = 0
    names = ["chosen", "rejected"] if example.is_paired else ["completion"]
    for name, completion in zip(names, enc.completions, strict=True):
        if not (any(completion.mask) if completion.mask is not None else completion.ids):
            return left_out(Reason.EMPTY_CONTENT, f"{name!r} encodes to no loss token")
        if len(completion.ids) > room:
            completions_cut += 1
            mask = None if completion.mask is None else completion.mask[:room]
            completion = Completion(completion.ids[:room], mask)
            if mask is not None and not any(mask):
                return left_out(
                    Reason.PROMPT_TOO_LONG,
                    f"{name!r}: no loss token fits in max_length={options.max_length} after "
                    f"the {len(prompt)}-token prompt",
                )
        kept.append(completion)
    chosen = kept[0]
    rejected = kept[1] if example.is_paired else None
    pair = TokenizedPair(
        example_id=example.example_id,
        prompt_ids=prompt,
        chosen_ids=chosen.ids,
        rejected_ids=None if rejected is None else rejected.ids,
        label=example.label,
        chosen_loss_mask=chosen.mask,
        rejected_loss_mask=None if rejected is None else rejected.mask,
    )
    return Fitted(pair, None, prompt_cut, completions_cut)


def _cut_prompt(
    prompt: list[int], limit: int, side: PromptTruncation, bos: int | None
) -> list[int]:
    if side == "right":
        return prompt[:limit]
    if bos is not None and prompt[0] == bos and limit > 1:
        return [bos, *prompt[len(prompt) - limit + 1 :]]
    return prompt[len(prompt) - limit :]
