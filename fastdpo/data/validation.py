"""Bad rows: what can be wrong with a row, and the `on_bad_row` policy that decides what happens.

Every problem is recorded as a `BadRow` (reason, row index, source, message). Under
`on_bad_row="error"` (the default) all problems of a pass are collected and then raised together
as one `BadRowError` listing the first few, before anything trains. Under `"skip"` the rows are
dropped and the count per reason is logged once. Nothing is dropped silently.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

logger = logging.getLogger("fastdpo.data")

OnBadRow = Literal["error", "skip"]
ON_BAD_ROW_CHOICES = ("error", "skip")

MAX_LISTED_PROBLEMS = 5
"""How many problems a `BadRowError` message lists before summarizing the rest by reason."""


class Reason(str, enum.Enum):
    """Why a row was rejected; the value is the phrase used in reports."""

    MISSING_COLUMN = "missing column"
    EMPTY_CONTENT = "empty content"
    NON_STRING_CONTENT = "non-string content"
    UNKNOWN_ROLE = "unknown role"
    MALFORMED = "malformed row"
    """Structure that no row format accepts (e.g. a message that is not a dict)."""
    NO_SHARED_PROMPT = "no shared prompt"
    """chosen/rejected transcripts whose common prefix holds no complete prompt turn."""
    IDENTICAL = "chosen identical to rejected"
    LABEL_NOT_BOOL = "label not a bool"
    BAD_SCORES = "bad scores"
    """Ranked rows: scores missing, not numbers, NaN, or a count different from the responses."""
    NO_PAIR = "no pair from ranking"
    """Ranked rows: the pairing policy produced no pair (all scores tied or gaps too small)."""
    PROMPT_TOO_LONG = "prompt longer than max_length"
    INVALID_JSON = "invalid JSON"


@dataclass(frozen=True)
class BadRow:
    """One problem found in one row."""

    reason: Reason
    message: str
    """What is wrong, naming the field (e.g. "'chosen' is empty")."""
    row: int | None = None
    source: str | None = None

    def __str__(self) -> str:
        where = []
        if self.source is not None:
            where.append(str(self.source))
        if self.row is not None:
            where.append(f"row {self.row}")
        prefix = ", ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


class BadRowError(ValueError):
    """Raised under `on_bad_row="error"`; `problems` holds every `BadRow` found in the pass."""

    def __init__(self, problems: list[BadRow], what: str):
        self.problems = problems
        counts = Counter(p.reason.value for p in problems)
        listed = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED_PROBLEMS])
        more = len(problems) - MAX_LISTED_PROBLEMS
        summary = ", ".join(f"{n} x {reason}" for reason, n in counts.most_common())
        text = f"{len(problems)} bad row(s) while {what} ({summary}):\n{listed}"
        if more > 0:
            text += f"\n  ... and {more} more"
        text += "\nFix the data, or pass on_bad_row='skip' to drop these rows (counts are logged)."
        super().__init__(text)


def check_policy(on_bad_row: str) -> None:
    if on_bad_row not in ON_BAD_ROW_CHOICES:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW_CHOICES}, got {on_bad_row!r}")


@dataclass
class BadRowLog:
    """Collects the problems of one pass (loading, tokenizing) and applies the policy at the end."""

    on_bad_row: OnBadRow
    what: str
    """The pass, for messages: e.g. "loading data.jsonl"."""
    problems: list[BadRow] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_policy(self.on_bad_row)

    def add(self, problem: BadRow) -> None:
        self.problems.append(problem)

    def counts(self) -> dict[str, int]:
        """Skipped rows per reason phrase."""
        return dict(Counter(p.reason.value for p in self.problems))

    def finish(self) -> dict[str, int]:
        """Raise (policy "error") or log the skip counts once (policy "skip"); return the counts."""
        if not self.problems:
            return {}
        if self.on_bad_row == "error":
            raise BadRowError(self.problems, self.what)
        counts = self.counts()
        summary = ", ".join(f"{n} x {reason}" for reason, n in sorted(counts.items()))
        logger.warning(
            "skipped %d bad row(s) while %s (%s); first: %s",
            len(self.problems),
            self.what,
            summary,
            self.problems[0],
        )
        return counts


class RowProblem(Exception):
    """Raised while reading one row; the caller adds the row index and source (see `BadRow`)."""

    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message
