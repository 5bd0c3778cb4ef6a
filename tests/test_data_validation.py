"""Bad rows: every reason, under on_bad_row="error" and "skip"; nothing is dropped silently."""

import json
import logging

import pytest

from fastdpo.data.ranking import PAIRING_POLICIES
from fastdpo.data.sources import load_preference_data
from fastdpo.data.tokenize import tokenize_pairs
from fastdpo.data.validation import BadRow, BadRowError, BadRowLog, Reason
from fastdpo.testing.tokenizer import build_tiny_tokenizer

GOOD = {"prompt": "Hi", "chosen": "Hello", "rejected": "Go"}

# (reason, bad row, what the message must say), one case per way a row can be bad
BAD_ROWS = {
    "missing_column": (
        Reason.MISSING_COLUMN,
        {"prompt": "Hi", "chosen": "Hello"},
        "missing column 'rejected'",
    ),
    "null_column": (  # a null cell is an absent column (columnar sources give every row every
        Reason.MISSING_COLUMN,  # column): this row is explicit, not unpaired
        {"prompt": "Hi", "chosen": "Hello", "rejected": None, "completion": None, "label": None},
        "missing column 'rejected'",
    ),
    "empty_content": (
        Reason.EMPTY_CONTENT,
        {"prompt": "Hi", "chosen": "  ", "rejected": "Go"},
        "'chosen' is empty",
    ),
    "empty_reply_after_shared_prompt": (  # one transcript is the other plus a reply
        Reason.EMPTY_CONTENT,
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Yo", "rejected": "\n\nHuman: Hi\n\nAssistant: "},
        "'rejected' has no reply after the shared prompt",
    ),
    "non_string_content": (
        Reason.NON_STRING_CONTENT,
        {"prompt": "Hi", "chosen": "Hello", "rejected": 3},
        "'rejected' has type int",
    ),
    "unknown_role": (
        Reason.UNKNOWN_ROLE,
        {
            "prompt": [{"role": "human", "content": "Hi"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
        "prompt[0] has role 'human'",
    ),
    "malformed": (
        Reason.MALFORMED,
        {"prompt": "Hi", "chosen": ["a"], "rejected": ["b"]},
        "chosen[0] is a str, expected a dict",
    ),
    "no_shared_prompt": (
        Reason.NO_SHARED_PROMPT,
        {"chosen": "Human: a Assistant: b", "rejected": "Human: c Assistant: d"},
        "share no prompt",
    ),
    "identical": (
        Reason.IDENTICAL,
        {"prompt": "Hi", "chosen": "Same", "rejected": "Same"},
        "'chosen' is identical to 'rejected'",
    ),
    "identical_after_promotion": (  # a string reply is the same as one assistant message
        Reason.IDENTICAL,
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "chosen": "Same",
            "rejected": [{"role": "assistant", "content": "Same"}],
        },
        "'chosen' is identical to 'rejected'",
    ),
    "label_not_bool": (
        Reason.LABEL_NOT_BOOL,
        {"prompt": "Hi", "completion": "a", "label": 1},
        "'label' is 1",
    ),
    "bad_scores": (
        Reason.BAD_SCORES,
        {"prompt": "Hi", "responses": ["a", "b"], "scores": [1.0, float("nan")]},
        "scores[1] is nan",
    ),
    "no_pair": (
        Reason.NO_PAIR,
        {"prompt": "Hi", "responses": ["a", "b"], "scores": [1, 1]},
        "forms no pair",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_error_policy_names_file_row_and_reason(case, tmp_path):
    reason, bad, message = BAD_ROWS[case]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [GOOD, bad, GOOD]))
    with pytest.raises(BadRowError) as info:
        load_preference_data(path)
    (problem,) = info.value.problems
    assert problem.reason is reason and problem.row == 1
    assert f"{path}, row 1: " in str(info.value) and message in str(info.value)
    assert "on_bad_row='skip'" in str(info.value)


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_skip_policy_reports_counts(case, caplog):
    reason, bad, _ = BAD_ROWS[case]
    other_bad = {"prompt": "Hi", "chosen": "x", "rejected": "x"}
    with caplog.at_level(logging.WARNING, logger="fastdpo.data"):
        data = load_preference_data([GOOD, bad, bad, other_bad], on_bad_row="skip")
    assert [e.prompt for e in data] == ["Hi"] and data[0].row == 0
    expected = {reason.value: 2}
    expected[Reason.IDENTICAL.value] = expected.get(Reason.IDENTICAL.value, 0) + 1
    assert data.report.skipped == expected
    assert data.report.rows == 4
    assert "skipped 3 bad row(s)" in caplog.text and reason.value in caplog.text


def test_error_lists_first_problems_and_counts_the_rest():
    rows = [{"prompt": "Hi", "chosen": "x", "rejected": "x"}] * 8
    with pytest.raises(BadRowError) as info:
        load_preference_data(rows)
    text = str(info.value)
    assert "8 bad row(s)" in text and "8 x chosen identical to rejected" in text
    assert "row 4" in text and "row 5" not in text and "and 3 more" in text


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    # a byte-order mark before the first row is not an error
    path.write_text("\ufeff" + json.dumps(GOOD) + "\n{not json\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(BadRowError, match=r"rows\.jsonl, row 1: line 2 is not JSON: Expecting"):
        load_preference_data(path)
    data = load_preference_data(path, on_bad_row="skip")
    assert len(data) == 2 and data.report.skipped == {Reason.INVALID_JSON.value: 1}


def test_mapped_column_names_appear_in_messages():
    with pytest.raises(BadRowError, match=r"'good' \(as 'chosen'\) is empty"):
        load_preference_data(
            [{"q": "Hi", "good": "", "bad": "x"}],
            columns={"prompt": "q", "chosen": "good", "rejected": "bad"},
        )


def test_prompt_longer_than_max_length_both_policies(caplog):
    tokenizer = build_tiny_tokenizer()
    data = load_preference_data(
        [GOOD, {"prompt": "Hi " * 40, "chosen": "a", "rejected": "b"}, GOOD],
        on_bad_row="error",
    )
    with pytest.raises(BadRowError, match=r"row 1: example \w+: prompt has \d+ tokens"):
        tokenize_pairs(data, tokenizer, max_length=16)
    with caplog.at_level(logging.WARNING, logger="fastdpo.data"):
        pairs = tokenize_pairs(data, tokenizer, max_length=16, on_bad_row="skip")
    assert [p.example_id for p in pairs] == [data[0].example_id, data[2].example_id]
    assert pairs.report.skipped == {Reason.PROMPT_TOO_LONG.value: 1}
    assert "prompt longer than max_length" in caplog.text


def test_bad_policy_name_is_rejected():
    with pytest.raises(ValueError, match="on_bad_row must be one of"):
        load_preference_data([GOOD], on_bad_row="ignore")


def _reply(text):
    return [{"role": "assistant", "content": text}]


# Ranked rows in which two responses are the same text with different scores: the row
# contradicts itself whether or not the pairing forms the pair of the two.
CONTRADICTORY_RANKED_ROWS = {
    "the_pair_itself": ({"responses": ["Same", "Same"], "scores": [1, 0]}, 0, 1),
    "never_paired_by_best_vs_worst": (
        {"responses": ["Same", "b", "Same", "c"], "scores": [3, 2, 1, 0]},
        0,
        2,
    ),
    "gap_too_small_for_any_pair": ({"responses": ["x", "y", "x"], "scores": [1, 0.95, 0.9]}, 0, 2),
    "message_replies": (
        {"responses": [_reply("x"), _reply("y"), _reply("x")], "scores": [0.5, 0.9, 0.1]},
        0,
        2,
    ),
}


@pytest.mark.parametrize("pairing", PAIRING_POLICIES)
@pytest.mark.parametrize("case", list(CONTRADICTORY_RANKED_ROWS))
def test_identical_ranked_responses_scored_differently_are_a_bad_row(case, pairing, tmp_path):
    fields, i, j = CONTRADICTORY_RANKED_ROWS[case]
    bad = {"prompt": "Hi", **fields}
    good = {"prompt": "Hi", "responses": ["a", "b"], "scores": [1, 0]}
    path = tmp_path / "ranked.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [good, bad, good]))
    with pytest.raises(BadRowError) as info:
        load_preference_data(path, pairing=pairing, min_score_gap=0.2)
    (problem,) = info.value.problems
    assert problem.reason is Reason.IDENTICAL and problem.row == 1
    scores = fields["scores"]
    assert (
        f"{path}, row 1: responses[{i}] is identical to responses[{j}] but they are scored "
        f"differently ({float(scores[i])} vs {float(scores[j])})"
    ) in str(info.value)
    data = load_preference_data(path, pairing=pairing, min_score_gap=0.2, on_bad_row="skip")
    assert [e.row for e in data] == [0, 2]
    assert data.report.skipped == {Reason.IDENTICAL.value: 1}


@pytest.mark.parametrize("pairing", PAIRING_POLICIES)
def test_identical_ranked_responses_scored_alike_are_not_a_bad_row(pairing):
    """Same text, same score: no contradiction; the pairing just never pairs the two."""
    row = {"id": "r", "prompt": "Hi", "responses": ["a", "b", "a"], "scores": [2, 1, 2]}
    data = load_preference_data([row], pairing=pairing)
    assert all((e.chosen, e.rejected) == ("a", "b") for e in data)
    pairs = {"best_vs_worst": ["r:0>1"], "best_vs_each": ["r:0>1"], "all_pairs": ["r:0>1", "r:2>1"]}
    assert [e.example_id for e in data] == pairs[pairing]


def test_ranked_responses_of_mixed_kinds_are_malformed():
    """Strings and message lists mixed, even in a response no pair uses."""
    row = {"prompt": "Hi", "responses": ["a", "b", _reply("c")], "scores": [2, 0, 1]}
    with pytest.raises(BadRowError, match="row 0: 'responses' must all be strings or all be"):
        load_preference_data([row])


@pytest.mark.parametrize(
    ("count", "more"), [(5, None), (6, "  ... and 1 more"), (7, "  ... and 2 more")]
)
def test_error_lists_at_most_five_and_counts_the_rest(count, more):
    problems = [BadRow(Reason.IDENTICAL, f"problem {i}", row=i) for i in range(count)]
    lines = str(BadRowError(problems, "loading x")).splitlines()
    assert (
        lines[0] == f"{count} bad row(s) while loading x ({count} x chosen identical to rejected):"
    )
    assert lines[1:6] == [f"  - row {i}: problem {i}" for i in range(5)]
    assert lines[6:-1] == ([more] if more else [])
    assert lines[-1] == (
        "Fix the data, or pass on_bad_row='skip' to drop these rows (counts are logged)."
    )


def test_error_summary_counts_each_reason():
    problems = [
        BadRow(Reason.IDENTICAL, "a"),
        BadRow(Reason.NO_PAIR, "b"),
        BadRow(Reason.NO_PAIR, "c"),
    ]
    first = str(BadRowError(problems, "loading x")).splitlines()[0]
    assert first == (
        "3 bad row(s) while loading x (2 x no pair from ranking, 1 x chosen identical to rejected):"
    )


def test_bad_row_text_names_what_is_known():
    assert str(BadRow(Reason.MALFORMED, "m")) == "m"
    assert str(BadRow(Reason.MALFORMED, "m", row=3)) == "row 3: m"
    assert str(BadRow(Reason.MALFORMED, "m", row=3, source="f.jsonl")) == "f.jsonl, row 3: m"


def test_skip_log_line_says_what_was_skipped(caplog):
    log = BadRowLog("skip", "loading f.jsonl")
    assert log.finish() == {}
    log.add(BadRow(Reason.IDENTICAL, "same", row=2, source="f.jsonl"))
    log.add(BadRow(Reason.NO_PAIR, "tie", row=5, source="f.jsonl"))
    with caplog.at_level(logging.WARNING, logger="fastdpo.data"):
        counts = log.finish()
    assert counts == {Reason.IDENTICAL.value: 1, Reason.NO_PAIR.value: 1}
    assert caplog.messages == [
        "skipped 2 bad row(s) while loading f.jsonl (1 x chosen identical to rejected, "
        "1 x no pair from ranking); first: f.jsonl, row 2: same"
    ]
    error_log = BadRowLog("error", "loading g")
    error_log.add(BadRow(Reason.NO_PAIR, "tie", row=0))
    with pytest.raises(BadRowError, match=r"^1 bad row\(s\) while loading g ") as info:
        error_log.finish()
    assert info.value.problems == error_log.problems
