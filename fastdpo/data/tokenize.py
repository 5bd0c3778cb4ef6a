"""`tokenize_pairs`: canonical examples -> `TokenizedPair`s (ids, loss masks, truncation).

Encoding itself (chat template, completion split, masks) lives in `fastdpo.data.chat`; this
module adds truncation, the prompt-too-long policy, parallel workers and the on-disk cache.

Truncation, per sequence (prompt + completion <= `max_length`):
1. if `max_prompt_length` is set, a longer prompt is cut to it: from the left (keeping the
   most recent turns, and a leading BOS) or from the right (`prompt_truncation`);
2. a prompt that leaves no room for a completion token is a bad row ("prompt longer than
   max_length"), handled by `on_bad_row` (error or reported skip);
3. completions are cut from the right to fit; if no loss token of a completion survives, the
   row is also "prompt longer than max_length".
Every sequence keeps at least one prompt token: packing relies on it (the hidden state that
predicts a sequence's first completion token lies inside the sequence).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastdpo.data.cache import cache_key, load_tokenized, save_tokenized, tokenizer_fingerprint
from fastdpo.data.chat import Completion, Encoded, EncodeOptions, LossOn, encode_example
from fastdpo.data.types import PreferenceExample, TokenizedPair
from fastdpo.data.validation import BadRow, BadRowLog, OnBadRow, Reason

logger = logging.getLogger("fastdpo.data")

PromptTruncation = Literal["left", "right"]

MIN_EXAMPLES_PER_WORKER = 64
"""Below this many examples per worker process, tokenizing in the parent is faster."""


@dataclass(kw_only=True)
class TokenizeReport:
    """What `tokenize_pairs` did, summed over all examples."""

    examples: int = 0
    pairs: int = 0
    """Examples kept."""
    template_fallbacks: int = 0
    """Chat examples whose completion was tokenized apart from the prompt (see chat.py)."""
    truncated_prompts: int = 0
    truncated_completions: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    from_cache: bool = False


class TokenizedPairs(list):
    """A list of `TokenizedPair` with the `TokenizeReport` of how it was made."""

    report: TokenizeReport


def tokenize_pairs(
    examples: Sequence[PreferenceExample],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    prompt_truncation: PromptTruncation = "left",
    loss_on: LossOn = "final_turn",
    add_eos: bool = True,
    text_as_chat: bool = False,
    on_bad_row: OnBadRow = "error",
    num_proc: int = 1,
    cache_dir: str | Path | None = None,
) -> TokenizedPairs:
    """Tokenize examples into prompt ids and completion ids (completion only) with loss masks.

    Args:
        examples: canonical examples (from `load_preference_data`).
        tokenizer: a transformers tokenizer; message-list examples need its chat template.
        max_length: most tokens per sequence (prompt + one completion).
        max_prompt_length: cut longer prompts to this many tokens (None: never cut prompts).
        prompt_truncation: "left" keeps the end of the prompt (and a leading BOS), "right" the
            start.
        loss_on: multi-turn replies: "final_turn" or "all_assistant_turns" count in the loss.
        add_eos: append EOS to plain-text completions that lack it.
        text_as_chat: run plain-text examples through the chat template as one user turn and
            one assistant turn.
        on_bad_row: prompts that leave no room for a completion: "error" or "skip" (reported).
        num_proc: worker processes for tokenizing (1: in this process).
        cache_dir: if set, results are cached there by content (tokenizer, options, examples).

    Returns:
        a `TokenizedPairs` list (in example order, skipped ones left out) with a `.report`.
    """
    if max_length < 2:
        raise ValueError(
            f"max_length must be >= 2 (a prompt token and a completion token), got {max_length}"
        )
    if max_prompt_length is not None and not 1 <= max_prompt_length < max_length:
        raise ValueError(
            f"max_prompt_length must be in [1, max_length), got {max_prompt_length} "
            f"with max_length={max_length}"
        )
    if prompt_truncation not in ("left", "right"):
        raise ValueError(f"prompt_truncation must be 'left' or 'right', got {prompt_truncation!r}")
    encode_options = EncodeOptions(loss_on=loss_on, add_eos=add_eos, text_as_chat=text_as_chat)
    _check_tokenizer(tokenizer, examples, encode_options)
    truncation = dict(
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        prompt_truncation=prompt_truncation,
    )
    bad_rows = BadRowLog(on_bad_row, f"tokenizing {len(examples)} examples")

    cache_path = None
    if cache_dir is not None:
        # on_bad_row is part of the key: a result that skipped rows must not answer "error".
        options = {**dataclasses.asdict(encode_options), **truncation, "on_bad_row": on_bad_row}
        key = cache_key(tokenizer_fingerprint(tokenizer), options, examples)
        cache_path = Path(cache_dir) / f"{key}.npz"
        if cache_path.exists():
            pairs, report_dict = load_tokenized(cache_path)
            report = TokenizeReport(**{**report_dict, "from_cache": True})
            logger.info("tokenized pairs loaded from cache %s", cache_path)
            if report.skipped:
                logger.warning("the cached result skipped bad rows: %s", report.skipped)
            return _finish(pairs, report)

    encoded = _encode_all(examples, tokenizer, encode_options, num_proc)
    report = TokenizeReport(examples=len(examples))
    pairs = []
    for example, enc in zip(examples, encoded, strict=True):
        report.template_fallbacks += enc.used_fallback
        pair = _truncate(example, enc, tokenizer, report, bad_rows, **truncation)
        if pair is not None:
            pairs.append(pair)
    report.skipped = bad_rows.finish()
    report.pairs = len(pairs)
    if report.template_fallbacks:
        logger.warning(
            "chat template: for %d of %d examples the prompt tokens were not an exact prefix of "
            "the conversation's tokens; their completions were tokenized separately",
            report.template_fallbacks,
            len(examples),
        )
    if cache_path is not None:
        save_tokenized(cache_path, pairs, dataclasses.asdict(report))
    return _finish(pairs, report)


def _finish(pairs: list[TokenizedPair], report: TokenizeReport) -> TokenizedPairs:
    out = TokenizedPairs(pairs)
    out.report = report
    return out


def _check_tokenizer(tokenizer, examples, options: EncodeOptions) -> None:
    uses_chat = options.text_as_chat or any(not isinstance(e.prompt, str) for e in examples)
    if uses_chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the examples hold chat messages but the tokenizer has no chat template: set "
            "tokenizer.chat_template (a Jinja string) or use a chat model's tokenizer"
        )
    if options.add_eos and tokenizer.eos_token_id is None:
        raise ValueError("add_eos=True needs a tokenizer with an EOS token (or pass add_eos=False)")


def _completions(example: PreferenceExample) -> list[Any]:
    if example.is_paired:
        return [example.chosen, example.rejected]
    return [example.completion]


# ---- parallel encoding ------------------------------------------------------------------------

_worker_state: tuple[Any, EncodeOptions] | None = None


def _init_worker(tokenizer, options: EncodeOptions) -> None:
    global _worker_state
    _worker_state = (tokenizer, options)


def _encode_chunk(chunk: list[tuple[Any, list[Any]]]) -> list[Encoded]:
    tokenizer, options = _worker_state
    return [
        encode_example(tokenizer, prompt, completions, options) for prompt, completions in chunk
    ]


def _encode_all(examples, tokenizer, options: EncodeOptions, num_proc: int) -> list[Encoded]:
    items = [(e.prompt, _completions(e)) for e in examples]
    num_proc = max(1, min(num_proc, len(items) // MIN_EXAMPLES_PER_WORKER))
    if num_proc == 1:
        return [encode_example(tokenizer, p, c, options) for p, c in items]
    # Several chunks per worker balance uneven lengths. Fork where it exists: spawned workers
    # would re-import the caller's main module, which a script without a __main__ guard breaks.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    size = math.ceil(len(items) / (num_proc * 4))
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    with ProcessPoolExecutor(
        num_proc, mp_context=context, initializer=_init_worker, initargs=(tokenizer, options)
    ) as pool:
        return [enc for chunk in pool.map(_encode_chunk, chunks) for enc in chunk]


# ---- truncation -------------------------------------------------------------------------------


def _truncate(
    example: PreferenceExample,
    enc: Encoded,
    tokenizer,
    report: TokenizeReport,
    bad_rows: BadRowLog,
    *,
    max_length: int,
    max_prompt_length: int | None,
    prompt_truncation: PromptTruncation,
) -> TokenizedPair | None:
    """The example's `TokenizedPair` within `max_length`, or None after recording a bad row."""
    prompt = enc.prompt_ids
    if not prompt:
        raise ValueError(
            f"example {example.example_id!r}: the prompt encodes to no tokens; every sequence "
            "needs a prompt token (use a tokenizer with a BOS token or a chat template)"
        )
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        report.truncated_prompts += 1
        prompt = _cut_prompt(prompt, max_prompt_length, prompt_truncation, tokenizer.bos_token_id)

    def bad(message: str) -> None:
        message = f"example {example.example_id}: {message}"
        bad_rows.add(BadRow(Reason.PROMPT_TOO_LONG, message, example.row, example.source))

    room = max_length - len(prompt)
    if room < 1:
        bad(f"prompt has {len(prompt)} tokens, no room for a completion in max_length={max_length}")
        return None
    kept: list[Completion] = []
    names = ["chosen", "rejected"] if example.is_paired else ["completion"]
    for name, completion in zip(names, enc.completions, strict=True):
        if len(completion.ids) > room:
            report.truncated_completions += 1
            mask = None if completion.mask is None else completion.mask[:room]
            completion = Completion(completion.ids[:room], mask)
            if mask is not None and not any(mask):
                bad(
                    f"{name!r}: no loss token fits in max_length={max_length} after the "
                    f"{len(prompt)}-token prompt"
                )
                return None
        kept.append(completion)
    chosen = kept[0]
    rejected = kept[1] if example.is_paired else None
    return TokenizedPair(
        example_id=example.example_id,
        prompt_ids=prompt,
        chosen_ids=chosen.ids,
        rejected_ids=None if rejected is None else rejected.ids,
        label=example.label,
        chosen_loss_mask=chosen.mask,
        rejected_loss_mask=None if rejected is None else rejected.mask,
    )


def _cut_prompt(
    prompt: list[int], limit: int, side: PromptTruncation, bos: int | None
) -> list[int]:
    if side == "right":
        return prompt[:limit]
    if bos is not None and prompt[0] == bos and limit > 1:
        return [bos, *prompt[len(prompt) - limit + 1 :]]
    return prompt[len(prompt) - limit :]
