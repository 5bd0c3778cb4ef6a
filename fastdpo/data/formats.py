"""Row formats: one row (a dict under canonical column names) -> canonical `PreferenceExample`s.

Formats, recognized by the columns a row has (`detect_format`):

- "explicit": `prompt`, `chosen`, `rejected` as strings.
- "conversational": `prompt` as messages (or a string, taken as one user message) and
  `chosen` / `rejected` as assistant replies (messages, or strings taken as one assistant
  message). Replies may be multi-turn: they start and end with an assistant message.
- "whole_conversation": `chosen` / `rejected` hold the whole conversation, prompt turns included
  (UltraFeedback-binarized); the shared prompt is recovered. A `prompt` column is then only used
  when it is a message list both transcripts start with (a string prompt column is ignored).
- "implicit_prompt": only `chosen` / `rejected` plain-text transcripts (HH-RLHF); the prompt is
  their common prefix cut back to the last assistant marker.
- "unpaired": `prompt`, `completion`, `label` (bool), for KTO.
- "ranked": `prompt`, `responses` (a list of texts or of assistant replies) and `scores`,
  turned into pairs by a pairing policy (see `fastdpo.data.ranking`). Two identical responses
  with different scores make the row a bad row (`IDENTICAL`) under every pairing policy.

Example ids come from the `id` column when the row has one (ranked pairs append
":<chosen index>><rejected index>"), else from a hash of the example's content.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastdpo.data.messages import (
    Text,
    as_assistant_reply,
    as_user_prompt,
    check_label,
    check_messages,
    check_score,
    check_text,
    is_message_list,
)
from fastdpo.data.prompts import HH_ASSISTANT_MARKER, split_shared_conversation, split_shared_text
from fastdpo.data.ranking import PairingPolicy, check_pairing, rank_pairs
from fastdpo.data.types import PreferenceExample
from fastdpo.data.validation import Reason, RowProblem

CANONICAL_COLUMNS = (
    "id",
    "prompt",
    "chosen",
    "rejected",
    "completion",
    "label",
    "responses",
    "scores",
)
"""Names the rest of fastdpo uses; `columns=` maps them to a dataset's own column names."""

FORMATS = (
    "explicit",
    "conversational",
    "whole_conversation",
    "implicit_prompt",
    "unpaired",
    "ranked",
)


@dataclass(frozen=True, kw_only=True)
class FormatOptions:
    """How rows that need a decision are turned into examples."""

    pairing: PairingPolicy = "best_vs_worst"
    """Ranked rows: which pairs to form ("best_vs_worst", "best_vs_each", "all_pairs")."""
    min_score_gap: float = 0.0
    """Ranked rows: smallest score difference for a pair (pairs always need a positive gap)."""
    assistant_marker: str = HH_ASSISTANT_MARKER
    """Implicit-prompt rows: the text that starts an assistant turn."""

    def __post_init__(self) -> None:
        check_pairing(self.pairing, self.min_score_gap)


def content_id(**fields: Any) -> str:
    """A 16-hex-digit id from an example's content (same content, same id, on any machine)."""
    blob = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def detect_format(row: Mapping[str, Any]) -> str:
    """The format name of a row, from which canonical columns it has."""
    if "responses" in row or "scores" in row:
        return "ranked"
    if "completion" in row or "label" in row:
        return "unpaired"
    if "chosen" in row or "rejected" in row:
        chosen, rejected = row.get("chosen"), row.get("rejected")
        if is_message_list(chosen) and is_message_list(rejected):
            starts_with_reply = bool(chosen) and chosen[0].get("role") == "assistant"
            return "conversational" if starts_with_reply else "whole_conversation"
        if "prompt" not in row:
            return "implicit_prompt"
        prompt = row.get("prompt")
        return "conversational" if is_message_list(prompt) else "explicit"
    raise RowProblem(
        Reason.MISSING_COLUMN,
        "the row matches no known format: expected columns chosen + "
        "rejected (+ prompt), or prompt + completion + label, or prompt + responses + scores "
        "(map your column names with columns={...})",
    )


def _require(row: Mapping[str, Any], *names: str) -> None:
    for name in names:
        if name not in row:
            raise RowProblem(Reason.MISSING_COLUMN, f"missing column {name!r} (absent or null)")


def _paired_texts(row: Mapping[str, Any], fmt: str, options: FormatOptions) -> tuple[Text, ...]:
    """(prompt, chosen, rejected) of a paired row, checked and normalized for its format."""
    _require(row, "chosen", "rejected")
    chosen = check_text(row["chosen"], "chosen")
    rejected = check_text(row["rejected"], "rejected")
    if fmt == "conversational":  # replies may mix kinds: a string is one assistant message
        chosen = as_assistant_reply(chosen, "chosen")
        rejected = as_assistant_reply(rejected, "rejected")
    elif isinstance(chosen, str) != isinstance(rejected, str):
        raise RowProblem(
            Reason.MALFORMED, "'chosen' and 'rejected' must both be strings or both be messages"
        )
    if chosen == rejected:
        raise RowProblem(Reason.IDENTICAL, "'chosen' is identical to 'rejected'")
    if fmt == "implicit_prompt":
        return split_shared_text(chosen, rejected, options.assistant_marker)
    if fmt == "whole_conversation":
        prompt = row.get("prompt")
        prompt = check_messages(prompt, "prompt") if is_message_list(prompt) else None
        n = len(prompt) if prompt else 0
        if prompt and chosen[:n] == rejected[:n] == prompt and min(len(chosen), len(rejected)) > n:
            chosen, rejected = chosen[n:], rejected[n:]  # the prompt column says where to split
        else:
            prompt, chosen, rejected = split_shared_conversation(chosen, rejected)
        return (
            prompt,
            as_assistant_reply(chosen, "chosen"),
            as_assistant_reply(rejected, "rejected"),
        )
    _require(row, "prompt")
    prompt = check_text(row["prompt"], "prompt")
    if fmt == "conversational":
        prompt = as_user_prompt(prompt)
    return prompt, chosen, rejected


def _promote(prompt: Text, completion: Text, name: str) -> tuple[Text, Text]:
    """Prompt and completion in one kind: both text, or both messages when either is."""
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt, completion
    return as_user_prompt(prompt), as_assistant_reply(completion, name)


def row_to_examples(
    row: Mapping[str, Any],
    options: FormatOptions,
    *,
    source: str | None = None,
    index: int | None = None,
) -> tuple[str, list[PreferenceExample]]:
    """(format name, examples) for one row under canonical column names.

    Raises `RowProblem` for a bad row. A ranked row may give several examples; every other
    format gives exactly one.
    """
    fmt = detect_format(row)
    row_id = row.get("id")
    row_id = None if row_id is None else str(row_id)

    def example(example_id: str | None, **fields: Any) -> PreferenceExample:
        return PreferenceExample(
            example_id=example_id or content_id(**fields), source=source, row=index, **fields
        )

    if fmt == "unpaired":
        _require(row, "prompt", "completion", "label")
        prompt, completion = _promote(
            check_text(row["prompt"], "prompt"),
            check_text(row["completion"], "completion"),
            "completion",
        )
        label = check_label(row["label"])
        return fmt, [example(row_id, prompt=prompt, completion=completion, label=label)]

    if fmt == "ranked":
        return fmt, _ranked_examples(row, options, row_id, example)

    prompt, chosen, rejected = _paired_texts(row, fmt, options)
    return fmt, [example(row_id, prompt=prompt, chosen=chosen, rejected=rejected)]


def _ranked_examples(row, options: FormatOptions, row_id, example) -> list[PreferenceExample]:
    _require(row, "prompt", "responses", "scores")
    prompt = check_text(row["prompt"], "prompt")
    responses, scores = row["responses"], row["scores"]
    if not isinstance(responses, (list, tuple)) or is_message_list(responses):
        raise RowProblem(Reason.MALFORMED, "'responses' must be a list of texts or of replies")
    if not isinstance(scores, (list, tuple)) or len(scores) != len(responses):
        length = len(scores) if isinstance(scores, (list, tuple)) else type(scores).__name__
        raise RowProblem(
            Reason.BAD_SCORES,
            f"'scores' must be a list with one number per response ({len(responses)}), "
            f"got {length}",
        )
    scores = [check_score(s, f"scores[{i}]") for i, s in enumerate(scores)]
    texts = [check_text(r, f"responses[{i}]") for i, r in enumerate(responses)]
    if len({isinstance(t, str) for t in texts}) > 1:
        raise RowProblem(
            Reason.MALFORMED, "'responses' must all be strings or all be message lists"
        )
    _check_consistent_scores(texts, scores)
    pairs = rank_pairs(scores, options.pairing, options.min_score_gap)
    if not pairs:
        raise RowProblem(
            Reason.NO_PAIR,
            f"pairing {options.pairing!r} (min_score_gap={options.min_score_gap}) forms no pair "
            f"from scores {scores}",
        )
    examples = []
    for i, j in pairs:
        chosen, rejected = texts[i], texts[j]
        p, chosen = _promote(prompt, chosen, f"responses[{i}]")
        _, rejected = _promote(prompt, rejected, f"responses[{j}]")
        pair_id = None if row_id is None else f"{row_id}:{i}>{j}"
        examples.append(example(pair_id, prompt=p, chosen=chosen, rejected=rejected))
    return examples


def _check_consistent_scores(texts: list[Text], scores: list[float]) -> None:
    """Two identical responses scored differently make the row contradict itself, whichever
    pairs the policy forms (best_vs_worst may never pair the two): an `IDENTICAL` bad row.
    Identical responses with equal scores are left to the pairing (a positive gap is needed)."""
    first_of: dict[str, int] = {}
    for j, text in enumerate(texts):
        key = json.dumps(text, sort_keys=True, ensure_ascii=False, default=str)
        i = first_of.setdefault(key, j)
        if i != j and scores[i] != scores[j]:
            raise RowProblem(
                Reason.IDENTICAL,
                f"responses[{i}] is identical to responses[{j}] but they are scored differently "
                f"({scores[i]} vs {scores[j]})",
            )
