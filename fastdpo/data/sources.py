"""`load_preference_data`: any source -> checked, canonical `PreferenceExample`s with unique ids."""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fastdpo.data.formats import CANONICAL_COLUMNS, FormatOptions, row_to_examples
from fastdpo.data.prompts import HH_ASSISTANT_MARKER
from fastdpo.data.ranking import PairingPolicy
from fastdpo.data.readers import read_rows
from fastdpo.data.types import PreferenceExample
from fastdpo.data.validation import BadRow, BadRowLog, OnBadRow, Reason, RowProblem

logger = logging.getLogger("fastdpo.data")


@dataclass(kw_only=True)
class LoadReport:
    """What `load_preference_data` read, made and skipped."""

    rows: int = 0
    """Rows read (bad ones included)."""
    examples: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    """Rows per detected format (see `fastdpo.data.formats`)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Rows dropped under on_bad_row="skip", per reason."""
    renamed_ids: int = 0
    """Examples whose id repeated an earlier one and got a "#k" suffix."""


class PreferenceData(list):
    """A list of `PreferenceExample` with the `LoadReport` of how it was loaded."""

    report: LoadReport


def load_preference_data(
    source: Any,
    *,
    columns: Mapping[str, str | None] | None = None,
    on_bad_row: OnBadRow = "error",
    split: str = "train",
    config: str | None = None,
    pairing: PairingPolicy = "best_vs_worst",
    min_score_gap: float = 0.0,
    assistant_marker: str = HH_ASSISTANT_MARKER,
) -> PreferenceData:
    """Read preference data from `source` into canonical examples (row formats: see formats.py).

    Args:
        source: a list of dicts; a `datasets.Dataset` / `DatasetDict`; a path to a .jsonl /
            .json / .parquet file, a saved-dataset folder, a folder of such files or a glob; or a
            Hugging Face Hub dataset name.
        columns: canonical name -> the dataset's column name, e.g. `{"prompt": "question"}`;
            map a name to None to ignore a column the data has (e.g. `{"id": None}`). Canonical
            names: id, prompt, chosen, rejected, completion, label, responses, scores. A null
            cell counts as an absent column (columnar files hold every column in every row).
        on_bad_row: "error" raises one `BadRowError` listing the first problems (after reading
            everything); "skip" drops bad rows and logs the count per reason.
        split, config: which split (of a DatasetDict or Hub dataset) and Hub config to read.
        pairing, min_score_gap: how ranked rows become pairs (see `fastdpo.data.ranking`).
        assistant_marker: where an assistant turn starts in implicit-prompt transcripts.

    Returns:
        a `PreferenceData` (a list of `PreferenceExample`) whose `.report` says what was read.
        Example ids are unique: a repeated id (or repeated content) gets a "#k" suffix.
    """
    mapping = _column_mapping(columns)
    options = FormatOptions(
        pairing=pairing, min_score_gap=min_score_gap, assistant_marker=assistant_marker
    )
    bad_rows = BadRowLog(on_bad_row, f"loading {_describe(source)}")
    report = LoadReport()
    formats: Counter[str] = Counter()
    examples: list[PreferenceExample] = []
    for raw in read_rows(source, split=split, config=config):
        report.rows += 1
        try:
            if raw.problem is not None:
                raise raw.problem
            row = _canonical_row(raw.values, mapping)
            fmt, made = row_to_examples(row, options, source=raw.source, index=raw.index)
        except RowProblem as problem:
            message = _with_column_names(problem.message, mapping)
            if problem.reason is Reason.MISSING_COLUMN and raw.values is not None:
                present = sorted(k for k, v in raw.values.items() if v is not None)
                message += f" (the row has non-null columns {present})"
            bad_rows.add(BadRow(problem.reason, message, raw.index, raw.source))
            continue
        formats[fmt] += 1
        examples.extend(made)
    report.skipped = bad_rows.finish()
    if not examples:
        raise ValueError(f"{_describe(source)} holds no usable preference examples")
    report.formats = dict(formats)
    data = PreferenceData(_unique_ids(examples, report))
    report.examples = len(data)
    data.report = report
    logger.info(
        "loaded %d examples from %d rows of %s (formats: %s)",
        report.examples,
        report.rows,
        _describe(source),
        report.formats,
    )
    return data


def _column_mapping(columns: Mapping[str, str | None] | None) -> dict[str, str]:
    """canonical name -> column name, for every canonical column not switched off."""
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(CANONICAL_COLUMNS))
    if unknown:
        raise ValueError(
            f"columns= has unknown canonical names {unknown}; the keys must be among "
            f"{CANONICAL_COLUMNS} (mapping canonical name -> your column name)"
        )
    mapping = {canon: columns.get(canon, canon) for canon in CANONICAL_COLUMNS}
    return {canon: name for canon, name in mapping.items() if name is not None}


def _canonical_row(values: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    """The row under canonical names. A null cell counts as an absent column: columnar sources
    (Parquet, `datasets`) give every row every column, with nulls where a row has no value."""
    return {
        canon: values[name]
        for canon, name in mapping.items()
        if name in values and values[name] is not None
    }


def _with_column_names(message: str, mapping: dict[str, str]) -> str:
    """Name the user's columns in a message that speaks of canonical ones (one pass, so a
    mapping that swaps two names is rendered right)."""
    renamed = {
        repr(canon): f"{name!r} (as {canon!r})" for canon, name in mapping.items() if name != canon
    }
    if not renamed:
        return message
    pattern = "|".join(re.escape(old) for old in renamed)
    return re.sub(pattern, lambda m: renamed[m.group(0)], message)


def _unique_ids(examples: list[PreferenceExample], report: LoadReport) -> list[PreferenceExample]:
    seen: set[str] = set()
    suffixes: Counter[str] = Counter()  # last suffix used per repeated id
    out = []
    for example in examples:
        base = example_id = example.example_id
        while example_id in seen:
            suffixes[base] += 1
            example_id = f"{base}#{suffixes[base]}"
        if example_id != base:
            report.renamed_ids += 1
            example = replace(example, example_id=example_id)
        seen.add(example_id)
        out.append(example)
    if report.renamed_ids:
        logger.warning(
            "%d example ids repeated an earlier id (a repeated id column value or duplicate "
            "content) and were made unique with a '#k' suffix",
            report.renamed_ids,
        )
    return out


def _describe(source: Any) -> str:
    if isinstance(source, (list, tuple)):
        return f"a list of {len(source)} rows"
    if isinstance(source, str) or hasattr(source, "__fspath__"):
        return repr(str(source))
    return f"a {type(source).__name__}"
