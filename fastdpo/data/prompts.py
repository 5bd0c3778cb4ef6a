"""Recovering the shared prompt from two full transcripts (chosen and rejected).

Two layouts store no separate prompt:
- whole conversations as message lists (UltraFeedback-binarized style): the prompt is the
  longest common run of messages, cut back so that each completion starts with an assistant
  message;
- plain-text transcripts (Anthropic HH-RLHF style, "\\n\\nHuman: ...\\n\\nAssistant: ..."): the
  prompt is the longest common prefix, cut back to the end of the last assistant marker inside it.
"""

from __future__ import annotations

import os

from fastdpo.data.types import Message
from fastdpo.data.validation import Reason, RowProblem

HH_ASSISTANT_MARKER = "\n\nAssistant:"
"""Where an assistant turn starts in HH-RLHF transcripts; the prompt ends right after it."""


def split_shared_conversation(
    chosen: list[Message], rejected: list[Message]
) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt, chosen completion, rejected completion) from two whole conversations.

    The prompt is the longest common prefix of messages that ends just before an assistant
    message in both; raises `RowProblem` when there is none (the transcripts differ from
    the first turn, or the shared part holds no user turn).
    """
    common = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        common += 1
    # Cut back: the completions must start with an assistant message in both transcripts.
    cut = common
    while cut > 0 and not (
        cut < len(chosen)
        and cut < len(rejected)
        and chosen[cut]["role"] == "assistant"
        and rejected[cut]["role"] == "assistant"
    ):
        cut -= 1
    if cut == 0 or all(m["role"] != "user" for m in chosen[:cut]):
        raise RowProblem(
            Reason.NO_SHARED_PROMPT,
            "'chosen' and 'rejected' share no prompt: their common leading messages "
            f"({common}) hold no user turn followed by an assistant reply in both",
        )
    return chosen[:cut], chosen[cut:], rejected[cut:]


def split_shared_text(
    chosen: str, rejected: str, assistant_marker: str = HH_ASSISTANT_MARKER
) -> tuple[str, str, str]:
    """(prompt, chosen completion, rejected completion) from two plain-text transcripts.

    The prompt is the common prefix up to and including the last `assistant_marker` inside it, so
    the completions begin right after the marker (usually with a space).
    """
    # commonprefix is a plain string function (in C), whatever its module suggests.
    common = len(os.path.commonprefix([chosen, rejected]))  # noqa: RUF071
    end = chosen.rfind(assistant_marker, 0, common)
    if end < 0:
        raise RowProblem(
            Reason.NO_SHARED_PROMPT,
            f"'chosen' and 'rejected' share no prompt: no {assistant_marker!r} marker in their "
            f"common prefix ({common} characters); pass the marker your data uses, or a "
            "'prompt' column",
        )
    end += len(assistant_marker)
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text[end:].strip():  # the other transcript is this one plus a reply
            raise RowProblem(
                Reason.EMPTY_CONTENT,
                f"{name!r} has no reply after the shared prompt {chosen[:end][-40:]!r}",
            )
    return chosen[:end], chosen[end:], rejected[end:]
