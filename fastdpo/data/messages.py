"""Checking one field of a row: a plain string or a list of chat messages.

Every check raises `RowProblem` with the reason and a message naming the field, so the caller
only has to add the row index and source.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fastdpo.data.types import Message
from fastdpo.data.validation import Reason, RowProblem

KNOWN_ROLES = ("system", "user", "assistant")

Text = str | list[Message]
"""A prompt or completion: plain text or a conversation."""


def is_message_list(value: Any) -> bool:
    """True for a list (or tuple) whose items look like messages; a list of strings is not one."""
    return isinstance(value, (list, tuple)) and all(isinstance(m, dict) for m in value)


def check_string(value: Any, name: str) -> str:
    """`value` as a non-empty string (whitespace-only counts as empty)."""
    if value is None:
        raise RowProblem(Reason.MISSING_COLUMN, f"{name!r} is missing (null)")
    if not isinstance(value, str):
        raise RowProblem(
            Reason.NON_STRING_CONTENT,
            f"{name!r} has type {type(value).__name__}, expected a string",
        )
    if not value.strip():
        raise RowProblem(Reason.EMPTY_CONTENT, f"{name!r} is empty")
    return value


def check_messages(value: Any, name: str) -> list[Message]:
    """`value` as a non-empty list of {"role", "content"} messages with known roles.

    Extra keys of a message (e.g. "name") are dropped: the canonical message has role and content.
    """
    if not isinstance(value, (list, tuple)):
        raise RowProblem(
            Reason.MALFORMED, f"{name!r} is a {type(value).__name__}, expected a list of messages"
        )
    if not value:
        raise RowProblem(Reason.EMPTY_CONTENT, f"{name!r} is an empty list of messages")
    messages = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise RowProblem(
                Reason.MALFORMED,
                f"{where} is a {type(message).__name__}, expected a dict with 'role' and 'content'",
            )
        for key in ("role", "content"):
            if message.get(key) is None:
                raise RowProblem(Reason.MISSING_COLUMN, f"{where} has no {key!r}")
        role = message["role"]
        if role not in KNOWN_ROLES:
            raise RowProblem(
                Reason.UNKNOWN_ROLE, f"{where} has role {role!r}; expected one of {KNOWN_ROLES}"
            )
        content = check_string(message["content"], f"{where}.content")
        messages.append({"role": role, "content": content})
    return messages


def check_text(value: Any, name: str) -> Text:
    """A string or a list of messages, checked; anything else is a `RowProblem`."""
    if isinstance(value, (list, tuple)):
        return check_messages(value, name)
    return check_string(value, name)


def as_user_prompt(prompt: Text) -> list[Message]:
    """A prompt as messages: plain text becomes one user message."""
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def as_assistant_reply(completion: Text, name: str) -> list[Message]:
    """A completion as messages: plain text becomes one assistant message.

    A message-list completion must start and end with an assistant message (it may hold further
    user turns in between: a multi-turn continuation).
    """
    if isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    if completion[0]["role"] != "assistant" or completion[-1]["role"] != "assistant":
        raise RowProblem(
            Reason.MALFORMED,
            f"{name!r} must start and end with an assistant message "
            f"(roles: {[m['role'] for m in completion]})",
        )
    return completion


def check_label(value: Any, name: str = "label") -> bool:
    """A KTO label: a real bool (numpy bools too); 0/1 or "true" are rejected, not guessed."""
    if value is None:
        raise RowProblem(Reason.MISSING_COLUMN, f"{name!r} is missing (null)")
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise RowProblem(
        Reason.LABEL_NOT_BOOL, f"{name!r} is {value!r} ({type(value).__name__}), expected a bool"
    )


def check_score(value: Any, name: str) -> float:
    """A ranking score: a finite real number (bools are not scores)."""
    if isinstance(value, np.number) and not isinstance(value, np.complexfloating):
        value = value.item()  # numpy scalars come out of parquet / datasets rows
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowProblem(
            Reason.BAD_SCORES, f"{name} is {value!r} ({type(value).__name__}), not a number"
        )
    if math.isnan(value) or math.isinf(value):
        raise RowProblem(Reason.BAD_SCORES, f"{name} is {value}, expected a finite number")
    return float(value)
