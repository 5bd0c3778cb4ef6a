"""Rows -> tokenized pairs for evaluation, with the trainer's tokenization options and defaults.

The tokenization keys are `fastdpo.train.config.TOKENIZATION_FIELDS` with `TrainConfig`'s
defaults, so data tokenized here equals what training (and `fastdpo precompute-ref`) saw, and a
reference cache built there matches. Nothing is dropped silently: rows skipped while loading or
tokenizing (`on_bad_row="skip"`) and truncated prompts / completions are counted in
`EvalData.counts`, which the report carries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastdpo.data.sources import load_preference_data
from fastdpo.data.tokenize import tokenize_pairs
from fastdpo.data.types import PreferenceExample, TokenizedPair
from fastdpo.data.validation import BadRow, BadRowError
from fastdpo.evaluation.models import EvaluationInputError
from fastdpo.reference_fingerprint import tokenization_settings
from fastdpo.train.config import TOKENIZATION_FIELDS, TrainConfig


def tokenization_kwargs(
    max_length: int | None = None, tokenization: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """`tokenize_pairs` keyword arguments: TrainConfig's defaults, then `tokenization`, then
    `max_length` (when given)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    kwargs = {name: defaults[name] for name in TOKENIZATION_FIELDS}
    unknown = sorted(set(tokenization or {}) - set(TOKENIZATION_FIELDS))
    if unknown:
        raise EvaluationInputError(
            f"tokenization: unknown key(s) {unknown}; the keys are {list(TOKENIZATION_FIELDS)}"
        )
    kwargs.update(tokenization or {})
    if max_length is not None:
        kwargs["max_length"] = max_length
    return kwargs


@dataclass(kw_only=True)
class EvalData:
    """Tokenized examples in data order, how they were made, and what was dropped or cut."""

    pairs: list[TokenizedPair]
    settings: dict[str, Any]
    """Tokenization settings as the reference fingerprint records them."""
    origin: dict[str, tuple[str | None, int | None]] = field(default_factory=dict)
    """example id -> (source, row) of the row it came from."""
    counts: dict[str, Any] = field(default_factory=dict)
    """rows, examples, pairs (kept), skipped_loading / skipped_tokenizing (per reason),
    truncated_prompts, truncated_completions."""


def is_pretokenized(data: Any) -> bool:
    """True if `data` is a non-empty list of `TokenizedPair`s (no tokenizer needed)."""
    return isinstance(data, Sequence) and bool(data) and isinstance(data[0], TokenizedPair)


def prepare_data(
    data: Any,
    tokenizer: Any,
    *,
    tokenize: Mapping[str, Any],
    on_bad_row: str = "error",
    split: str = "train",
    single_responses: bool = False,
) -> EvalData:
    """Load (`load_preference_data`) and tokenize (`tokenize_pairs`) `data`.

    `data`: anything `load_preference_data` reads, a list of `PreferenceExample`s, or a list of
    `TokenizedPair`s (used as they are). `single_responses`: rows with a prompt and a
    completion but no label are single responses to score (labelled desirable, which the
    reward ignores) instead of bad rows.
    """
    settings = tokenization_settings(**tokenize)
    if is_pretokenized(data):
        pairs = list(data)
        return EvalData(
            pairs=pairs,
            settings=settings,
            origin={p.example_id: (None, None) for p in pairs},
            counts={"examples": len(pairs), "pairs": len(pairs)},
        )
    if isinstance(data, Sequence) and data and isinstance(data[0], PreferenceExample):
        examples = list(data)
        counts: dict[str, Any] = {"rows": None, "examples": len(examples), "skipped_loading": {}}
        origin_of_row = None
    else:
        source = data
        origin_of_row = None
        if single_responses:
            source, origin_of_row = _rows_with_labels(data, on_bad_row, split)
        if isinstance(source, Sequence) and not isinstance(source, str) and not source:
            raise EvaluationInputError("data: no rows (the data is empty)")
        examples = load_preference_data(source, on_bad_row=on_bad_row, split=split)
        counts = {
            "rows": examples.report.rows,
            "examples": len(examples),
            "skipped_loading": dict(examples.report.skipped),
        }
    if tokenizer is None:
        raise EvaluationInputError(
            "tokenizer: none given and none to load (pass tokenizer=, or a model path)"
        )
    tokenized = tokenize_pairs(examples, tokenizer, on_bad_row=on_bad_row, **tokenize)
    report = tokenized.report
    counts.update(
        pairs=len(tokenized),
        skipped_tokenizing=dict(report.skipped),
        truncated_prompts=report.truncated_prompts,
        truncated_completions=report.truncated_completions,
    )
    if not tokenized:
        raise EvaluationInputError(
            f"data: none of the {len(examples)} examples survived tokenization "
            f"(skipped: {report.skipped}); raise max_length or fix the data"
        )
    origin = {}
    for example in examples:
        row = example.row
        where = (example.source, row)
        if origin_of_row is not None and row is not None:
            where = origin_of_row[row]
        origin[example.example_id] = where
    return EvalData(pairs=list(tokenized), settings=settings, origin=origin, counts=counts)


def _rows_with_labels(data: Any, on_bad_row: str, split: str):
    """Rows as dicts, single responses (prompt + completion, no label) labelled True, with
    (source, row) of each; unreadable rows are raised now (policy "error") or kept as None,
    which loading counts as malformed (policy "skip")."""
    from fastdpo.data.readers import read_rows

    rows, origin, unreadable = [], [], []
    for raw in read_rows(data, split=split):
        origin.append((raw.source, raw.index))
        if raw.values is None:
            unreadable.append(
                BadRow(raw.problem.reason, raw.problem.message, raw.index, raw.source)
            )
            rows.append(None)
            continue
        values = dict(raw.values)
        if values.get("completion") is not None and values.get("label") is None:
            values["label"] = True
        rows.append(values)
    if unreadable and on_bad_row == "error":
        raise BadRowError(unreadable, f"reading {data!r}")
    return rows, origin
