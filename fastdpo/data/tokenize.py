"""`tokenize_pairs`: canonical examples -> `TokenizedPair`s (ids, loss masks, truncation).

Encoding one example (chat template, completion split, masks) lives in `fastdpo.data.chat`,
fitting it into `max_length` in `fastdpo.data.truncation`; this module runs them over a data
set: the bad-row policy, parallel worker processes and the on-disk cache.
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
from typing import Any

from fastdpo.data.cache import cache_key, load_tokenized, save_tokenized, tokenizer_fingerprint
from fastdpo.data.chat import Encoded, EncodeOptions, LossOn, encode_example
from fastdpo.data.truncation import PromptTruncation, TruncationOptions, fit_to_max_length
from fastdpo.data.types import PreferenceExample, TokenizedPair
from fastdpo.data.validation import BadRow, BadRowLog, OnBadRow

logger = logging.getLogger("fastdpo.data")

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
        on_bad_row: what to do with examples that cannot be fitted (see
            `fastdpo.data.truncation`): "error" after the pass, or "skip" (reported).
        num_proc: worker processes for tokenizing (1: in this process).
        cache_dir: if set, results are cached there by content (tokenizer, options, examples).

    Returns:
        a `TokenizedPairs` list (in example order, skipped ones left out) with a `.report`.
    """
    truncation = TruncationOptions(
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        prompt_truncation=prompt_truncation,
    )
    encode_options = EncodeOptions(loss_on=loss_on, add_eos=add_eos, text_as_chat=text_as_chat)
    _check_tokenizer(tokenizer, examples, encode_options)
    bad_rows = BadRowLog(on_bad_row, f"tokenizing {len(examples)} examples")

    cache_path = None
    if cache_dir is not None:
        # on_bad_row is part of the key: a result that skipped rows must not answer "error".
        options = {
            **dataclasses.asdict(encode_options),
            **dataclasses.asdict(truncation),
            "on_bad_row": on_bad_row,
        }
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
        fitted = fit_to_max_length(example, enc, truncation, tokenizer.bos_token_id)
        report.truncated_prompts += fitted.prompt_cut
        report.truncated_completions += fitted.completions_cut
        if fitted.problem is None:
            pairs.append(fitted.pair)
        else:
            reason, message = fitted.problem
            message = f"example {example.example_id}: {message}"
            bad_rows.add(BadRow(reason, message, example.row, example.source))
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
    encodes_text = not options.text_as_chat and any(isinstance(e.prompt, str) for e in examples)
    if options.add_eos and encodes_text and tokenizer.eos_token_id is None:
        raise ValueError(
            "add_eos=True needs a tokenizer with an EOS token for plain-text examples (set "
            "tokenizer.eos_token, or pass add_eos=False)"
        )


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
