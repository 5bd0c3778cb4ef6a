"""Row formats and sources: every format normalizes to the expected canonical example."""

import json
import re

import pytest

from fastdpo.data.formats import FormatOptions, content_id, row_to_examples
from fastdpo.data.ranking import rank_pairs
from fastdpo.data.sources import load_preference_data
from fastdpo.data.validation import BadRowError, Reason


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def one(row, **options):
    fmt, examples = row_to_examples(row, FormatOptions(**options))
    assert len(examples) == 1
    return fmt, examples[0]


def test_explicit_strings():
    fmt, e = one({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."})
    assert fmt == "explicit"
    assert (e.prompt, e.chosen, e.rejected, e.completion) == ("Hi?", "Hello.", "Go.", None)
    assert e.is_paired


def test_conversational_multi_turn_with_system_prompt():
    prompt = [system("Be brief."), user("Hi"), assistant("Hello!"), user("Capital of France?")]
    fmt, e = one({"prompt": prompt, "chosen": "Paris.", "rejected": "Rome."})
    assert fmt == "conversational"
    assert e.prompt == prompt
    # string replies to a message prompt are promoted to assistant messages
    assert (e.chosen, e.rejected) == ([assistant("Paris.")], [assistant("Rome.")])


def test_conversational_string_prompt_is_a_user_turn():
    fmt, e = one({"prompt": "Hi", "chosen": [assistant("a")], "rejected": [assistant("b")]})
    assert fmt == "conversational"
    assert e.prompt == [user("Hi")]


def test_conversational_replies_may_mix_strings_and_messages():
    multi = [assistant("a"), user("More?"), assistant("b")]
    fmt, e = one({"prompt": [user("Hi")], "chosen": multi, "rejected": "No."})
    assert fmt == "conversational"
    assert (e.chosen, e.rejected) == (multi, [assistant("No.")])


def test_whole_conversation_recovers_shared_prompt():
    shared = [system("Be brief."), user("Hi"), assistant("Hello!"), user("Capital?")]
    chosen = [*shared, assistant("Paris.")]
    rejected = [*shared, assistant("Rome."), user("Sure?"), assistant("Yes.")]
    # UltraFeedback-binarized also has a string prompt column: it is not what splits the rows.
    fmt, e = one({"prompt": "Capital?", "chosen": chosen, "rejected": rejected})
    assert fmt == "whole_conversation"
    assert e.prompt == shared
    assert e.chosen == [assistant("Paris.")]
    assert e.rejected == [assistant("Rome."), user("Sure?"), assistant("Yes.")]


def test_whole_conversation_cuts_back_to_assistant_start():
    # They share a user and an assistant turn, then differ in a user turn: the prompt is cut
    # back to the last point where both continue with an assistant message.
    chosen = [user("a"), assistant("b"), user("c"), assistant("d")]
    rejected = [user("a"), assistant("b"), user("x"), assistant("y")]
    fmt, e = one({"chosen": chosen, "rejected": rejected})
    assert fmt == "whole_conversation"
    assert e.prompt == [user("a")]
    assert e.chosen == chosen[1:]
    assert e.rejected == rejected[1:]


def test_whole_conversation_with_message_prompt_column():
    prompt = [user("a"), assistant("b"), user("c")]
    chosen = [*prompt, assistant("d")]
    rejected = [*prompt, assistant("e")]
    _, e = one({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    assert e.prompt == prompt and e.chosen == [assistant("d")] and e.rejected == [assistant("e")]


def test_implicit_prompt_hh_multi_turn():
    history = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Capital of France?\n\nAssistant:"
    fmt, e = one({"chosen": history + " Paris.", "rejected": history + " Paris? No idea."})
    assert fmt == "implicit_prompt"
    assert e.prompt == history
    assert (e.chosen, e.rejected) == (" Paris.", " Paris? No idea.")


def test_implicit_prompt_custom_marker():
    _, e = one({"chosen": "Q: x\nA: yes", "rejected": "Q: x\nA: no"}, assistant_marker="\nA:")
    assert e.prompt == "Q: x\nA:" and e.chosen == " yes"


def test_unpaired_text_and_messages():
    fmt, e = one({"prompt": "Hi", "completion": "Hello", "label": True})
    assert fmt == "unpaired" and not e.is_paired
    assert (e.prompt, e.completion, e.label, e.chosen) == ("Hi", "Hello", True, None)
    _, e = one({"prompt": [user("Hi")], "completion": [assistant("Go")], "label": False})
    assert e.completion == [assistant("Go")] and e.label is False


@pytest.mark.parametrize(
    ("pairing", "gap", "expected"),
    [
        ("best_vs_worst", 0.0, [(1, 3)]),
        ("best_vs_each", 0.0, [(1, 0), (1, 2), (1, 3)]),
        ("all_pairs", 0.0, [(1, 2), (1, 0), (1, 3), (2, 0), (2, 3), (0, 3)]),
        ("all_pairs", 1.5, [(1, 0), (1, 3), (2, 3)]),
    ],
)
def test_ranking_policies(pairing, gap, expected):
    scores = [2.0, 4.0, 3.0, 1.0]
    assert rank_pairs(scores, pairing, gap) == expected


def test_ranking_ties_form_no_pair_and_earlier_wins():
    assert rank_pairs([1.0, 1.0], "best_vs_worst") == []
    assert rank_pairs([2.0, 2.0, 1.0], "best_vs_each") == [(0, 2)]


def test_ranked_row_ids_from_id_column():
    row = {"id": "q7", "prompt": "Hi", "responses": ["a", "b", "c"], "scores": [1, 3, 2]}
    fmt, examples = row_to_examples(row, FormatOptions(pairing="best_vs_each"))
    assert fmt == "ranked"
    assert [(e.example_id, e.chosen, e.rejected) for e in examples] == [
        ("q7:1>0", "b", "a"),
        ("q7:1>2", "b", "c"),
    ]


def test_ranked_message_responses():
    row = {
        "prompt": [system("s"), user("q")],
        "responses": [[assistant("x")], [assistant("y")]],
        "scores": [0.5, 0.1],
    }
    _, examples = row_to_examples(row, FormatOptions())
    assert examples[0].chosen == [assistant("x")] and examples[0].rejected == [assistant("y")]


def test_ids_stable_unique_and_from_id_column():
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "b"},  # duplicate content
        {"prompt": "q", "chosen": "a", "rejected": "b"},
    ]
    first = load_preference_data(rows)
    again = load_preference_data([dict(r) for r in rows])
    ids = [e.example_id for e in first]
    assert ids == [e.example_id for e in again]
    assert len(set(ids)) == 3 and ids[1] == ids[0] + "#1"
    assert first.report.renamed_ids == 1
    with_ids = load_preference_data([{**r, "id": 10 + i} for i, r in enumerate(rows)])
    assert [e.example_id for e in with_ids] == ["10", "11", "12"]
    ignored = load_preference_data([{**r, "id": 1} for r in rows], columns={"id": None})
    assert [e.example_id for e in ignored] == ids


def test_column_mapping_and_report():
    rows = [{"question": "Hi", "good": "Hello", "bad": "Go", "label": "not a kto label"}]
    data = load_preference_data(
        rows, columns={"prompt": "question", "chosen": "good", "rejected": "bad", "label": None}
    )
    assert (data[0].prompt, data[0].chosen, data[0].rejected) == ("Hi", "Hello", "Go")
    assert data.report.formats == {"explicit": 1} and data.report.rows == 1
    with pytest.raises(ValueError, match="unknown canonical names"):
        load_preference_data(rows, columns={"question": "prompt"})


ROWS = [
    {"prompt": "Hi", "chosen": "Hello", "rejected": "Go"},
    {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "A"}],
        "rejected": [{"role": "assistant", "content": "B"}],
    },
]


def _canonical(data):
    return [(e.prompt, e.chosen, e.rejected) for e in data]


def test_null_cells_are_absent_columns(tmp_path):
    """Columnar sources give every row every column: a null cell must not change the format."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    columns = {
        "prompt": ["Hi", "Yo"],
        "chosen": ["Hello", None],
        "rejected": ["Go", None],
        "completion": [None, "Hey"],
        "label": [None, True],
    }
    pq.write_table(pa.Table.from_pydict(columns), tmp_path / "mixed.parquet")
    data = load_preference_data(tmp_path / "mixed.parquet")
    assert data.report.formats == {"explicit": 1, "unpaired": 1}
    assert (data[0].chosen, data[1].completion, data[1].label) == ("Hello", "Hey", True)


def test_swapped_column_mapping_is_named_right_in_messages():
    rows = [{"prompt": "Hi", "chosen": "Go", "rejected": " "}]
    with pytest.raises(ValueError, match=r"'rejected' \(as 'chosen'\) is empty"):
        load_preference_data(rows, columns={"chosen": "rejected", "rejected": "chosen"})


def test_jsonl_and_json_files(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    data = load_preference_data(path)
    assert _canonical(data) == _canonical(load_preference_data(ROWS))
    assert data[1].source == str(path) and data[1].row == 1
    array = tmp_path / "data.json"
    array.write_text(json.dumps(ROWS))
    assert _canonical(load_preference_data(str(array))) == _canonical(data)


def test_parquet_folder_and_glob(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    explicit = [ROWS[0], {"prompt": "Yo", "chosen": "Hey", "rejected": "No"}]
    pq.write_table(pa.Table.from_pylist(explicit), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist([ROWS[1]]), tmp_path / "b.parquet")
    expected = _canonical(load_preference_data([*explicit, ROWS[1]]))
    assert _canonical(load_preference_data(tmp_path)) == expected
    assert _canonical(load_preference_data(str(tmp_path / "*.parquet"))) == expected
    single = load_preference_data(tmp_path / "b.parquet")
    assert _canonical(single) == expected[2:]


def test_datasets_object_and_saved_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_list([ROWS[1], ROWS[1]])
    assert _canonical(load_preference_data(dataset)) == _canonical(
        load_preference_data([ROWS[1]] * 2)
    )
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(folder)
    assert len(load_preference_data(folder)) == 2
    assert len(load_preference_data(str(folder), split="test")) == 1
    with pytest.raises(KeyError, match="no split 'dev'"):
        load_preference_data(folder, split="dev")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_preference_data(tmp_path / "nope.jsonl")
    with pytest.raises(TypeError, match="cannot read preference data"):
        load_preference_data(42)


def test_pretty_printed_json_object_is_a_clear_error(tmp_path):
    path = tmp_path / "squad_style.json"
    path.write_text(json.dumps({"version": 1, "data": ROWS}, indent=2))
    with pytest.raises(ValueError, match="one JSON object spread over lines"):
        load_preference_data(path)


# ------------------------------------------------------------------------------------------------
# Survivors of `make mutate` (see tests/MUTATION.md): behaviour no test above pinned down


def test_whole_conversation_prompt_column_decides_the_split():
    """The transcripts share an assistant turn too: the common prefix alone would put it in the
    prompt, the prompt column makes it part of multi-turn replies."""
    prompt = [user("Hi")]
    chosen = [user("Hi"), assistant("Hello"), user("More?"), assistant("x")]
    rejected = [user("Hi"), assistant("Hello"), user("More?"), assistant("y")]
    _, e = one({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    assert e.prompt == prompt and e.chosen == chosen[1:] and e.rejected == rejected[1:]
    _, e = one({"chosen": chosen, "rejected": rejected})  # without the column: common prefix
    assert e.prompt == chosen[:3] and e.chosen == [assistant("x")]


def test_unpaired_rows_keep_their_id_and_promote_to_messages():
    _, e = one({"id": "k1", "prompt": "Hi", "completion": [assistant("Go")], "label": True})
    assert e.example_id == "k1"
    assert (e.prompt, e.completion) == ([user("Hi")], [assistant("Go")])
    _, e = one({"prompt": [user("Hi")], "completion": "Go", "label": False})
    assert (e.prompt, e.completion) == ([user("Hi")], [assistant("Go")])


def test_ranked_examples_carry_the_prompt_and_honour_min_score_gap():
    row = {"id": "q", "prompt": "Hi", "responses": ["a", "b", "c"], "scores": [3, 2.5, 1]}
    examples = load_preference_data([row], pairing="all_pairs", min_score_gap=0.6)
    assert [(e.example_id, e.prompt, e.chosen, e.rejected) for e in examples] == [
        ("q:0>2", "Hi", "a", "c"),
        ("q:1>2", "Hi", "b", "c"),
    ]
    _, examples = row_to_examples({**row, "prompt": [user("Hi")]}, FormatOptions())
    assert examples[0].prompt == [user("Hi")] and examples[0].chosen == [assistant("a")]
    # A gap exactly at min_score_gap is kept; the default gap is 0.
    assert rank_pairs([2.0, 1.5], "best_vs_worst", 0.5) == [(0, 1)]
    assert rank_pairs([2.0, 1.5], "best_vs_worst") == [(0, 1)]


def test_format_detection_from_any_one_column():
    """One column of a format is enough to pick it; the missing ones are then named."""
    cases = [
        ({"prompt": "Hi", "scores": [1, 0]}, "missing column 'responses'"),
        ({"prompt": "Hi", "responses": ["a", "b"]}, "missing column 'scores'"),
        ({"responses": ["a", "b"], "scores": [1, 0]}, "missing column 'prompt'"),
        ({"prompt": "Hi", "label": True}, "missing column 'completion'"),
        ({"prompt": "Hi", "completion": "a"}, "missing column 'label'"),
        ({"completion": "a", "label": True}, "missing column 'prompt'"),
        ({"prompt": "Hi", "rejected": "a"}, "missing column 'chosen'"),
        ({"prompt": "Hi", "chosen": "a"}, "missing column 'rejected'"),
        ({"prompt": "Hi"}, "the row matches no known format: expected columns chosen + rejected"),
    ]
    for row, message in cases:
        with pytest.raises(BadRowError) as info:
            load_preference_data([row])
        (problem,) = info.value.problems
        assert problem.reason is Reason.MISSING_COLUMN and problem.row == 0
        assert problem.message.startswith(message), problem.message


@pytest.mark.parametrize(
    ("fields", "reason", "message"),
    [
        ({"responses": "ab", "scores": [1]}, Reason.MALFORMED, "'responses' must be a list of"),
        (
            {"responses": [assistant("a"), assistant("b")], "scores": [1, 0]},
            Reason.MALFORMED,
            "'responses' must be a list of texts or of replies",
        ),
        ({"responses": ["a", "b"], "scores": 1}, Reason.BAD_SCORES, r"\(2\), got int$"),
        ({"responses": ["a", "b"], "scores": [1]}, Reason.BAD_SCORES, r"\(2\), got 1$"),
        (
            {"responses": ["a", [user("b"), assistant("c")]], "scores": [1, 0]},
            Reason.MALFORMED,
            "'responses' must all be strings or all be message lists",
        ),
        (
            {"responses": [[assistant("a")], [user("b"), assistant("c")]], "scores": [1, 0]},
            Reason.MALFORMED,
            r"'responses\[1\]' must start and end with an assistant message",
        ),
        (
            {"responses": [[user("b"), assistant("c")], [assistant("a")]], "scores": [1, 0]},
            Reason.MALFORMED,
            r"'responses\[0\]' must start and end with an assistant message",
        ),
        (  # the same reply, its keys in another order, scored differently
            {
                "responses": [[assistant("a")], [{"content": "a", "role": "assistant"}]],
                "scores": [1, 0],
            },
            Reason.IDENTICAL,
            r"responses\[0\] is identical to responses\[1\]",
        ),
    ],
)
def test_bad_ranked_rows_name_the_problem(fields, reason, message):
    with pytest.raises(BadRowError) as info:
        load_preference_data([{"prompt": [user("Hi")], **fields}])
    (problem,) = info.value.problems
    assert problem.reason is reason and problem.row == 0
    assert re.search(message, problem.message), problem.message


def test_conversational_replies_are_named_in_errors():
    prompt = [user("Hi")]
    for name in ("chosen", "rejected"):
        row = {"prompt": prompt, "chosen": [assistant("a")], "rejected": [assistant("b")]}
        row[name] = [assistant("y"), user("x")]
        with pytest.raises(BadRowError, match=f"'{name}' must start and end with an assistant"):
            load_preference_data([row])


def test_mixed_kinds_of_paired_texts_are_malformed():
    with pytest.raises(BadRowError) as info:
        load_preference_data([{"chosen": "a", "rejected": [assistant("b")]}])
    (problem,) = info.value.problems
    assert problem.reason is Reason.MALFORMED
    assert problem.message == "'chosen' and 'rejected' must both be strings or both be messages"


def test_content_ids_are_stable_across_key_order_and_versions():
    """Ids key the tokenization cache and the reference cache, so the scheme must not drift:
    the same content in any key order gives the same 16 hex digits, and this one (non-ASCII
    text included) is pinned."""
    a = content_id(prompt="Grüß dich", chosen="a", rejected="b")
    assert a == content_id(rejected="b", chosen="a", prompt="Grüß dich")
    assert a == "8cbef6921570e6d4"


def test_pairing_options_are_checked():
    with pytest.raises(ValueError, match=r"^pairing must be one of \('best_vs_worst', "):
        FormatOptions(pairing="best")
    with pytest.raises(ValueError, match=r"^min_score_gap must be >= 0, got -1$"):
        FormatOptions(min_score_gap=-1)


def test_whole_conversation_prompt_column_that_does_not_fit_is_ignored():
    chosen = [user("Hi"), assistant("Hello"), user("More?"), assistant("x")]
    rejected = [user("Hi"), assistant("Hello"), user("More?"), assistant("y")]
    _, e = one({"prompt": [user("Other")], "chosen": chosen, "rejected": rejected})
    assert e.prompt == chosen[:3] and e.chosen == [assistant("x")]
    # The column is all of one transcript: that one has no reply, a bad row (not a crash).
    row = {"prompt": chosen[:3], "chosen": chosen[:3], "rejected": rejected}
    with pytest.raises(BadRowError) as info:
        load_preference_data([row])
    (problem,) = info.value.problems
    assert problem.reason is Reason.MALFORMED
    assert problem.message.startswith("'chosen' must start and end with an assistant message")


def test_ranked_pairs_without_an_id_get_content_ids():
    row = {"prompt": "Hi", "responses": ["a", "b", "c"], "scores": [3, 2, 1]}
    examples = load_preference_data([row], pairing="best_vs_each")
    assert [e.example_id for e in examples] == [
        content_id(prompt="Hi", chosen="a", rejected=r) for r in ("b", "c")
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": " ", "completion": "a", "label": True}, "'prompt' is empty"),
        ({"prompt": "Hi", "completion": "", "label": True}, "'completion' is empty"),
        (
            {"prompt": [user("Hi")], "completion": [user("a"), assistant("b")], "label": True},
            "'completion' must start and end with an assistant message",
        ),
        ({"prompt": "", "responses": ["a", "b"], "scores": [1, 0]}, "'prompt' is empty"),
        ({"prompt": "Hi", "responses": ["a", ""], "scores": [1, 0]}, "'responses[1]' is empty"),
        (
            {"prompt": [user("Hi")], "responses": [[user("a"), assistant("b")], "c"]}
            | {"scores": [1, 0]},
            "'responses' must all be strings or all be message lists",
        ),
        (
            {"prompt": [{"role": "bot", "content": "Hi"}]}
            | {"chosen": [user("Hi"), assistant("a")], "rejected": [user("Hi"), assistant("b")]},
            "prompt[0] has role 'bot'",
        ),
        (
            {"chosen": [user("Hi"), assistant("a"), user("x")]}
            | {"rejected": [user("Hi"), assistant("b")]},
            "'chosen' must start and end with an assistant message",
        ),
        (
            {"chosen": [user("Hi"), assistant("a")]}
            | {"rejected": [user("Hi"), assistant("b"), user("x")]},
            "'rejected' must start and end with an assistant message",
        ),
        ({"chosen": [assistant("a")], "rejected": [assistant("b")]}, "missing column 'prompt'"),
    ],
)
def test_row_errors_name_the_field(row, message):
    with pytest.raises(BadRowError) as info:
        load_preference_data([row])
    assert info.value.problems[0].message.startswith(message), info.value.problems[0].message
