"""`generate_pairs` / `fastdpo generate-pairs`: sampling, judging, pairing, skips, output."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from evaluation_fixtures import save_tiny_model

import fastdpo
from fastdpo.cli import main
from fastdpo.evaluation.judges import JudgeError
from fastdpo.evaluation.pair_generation import generate_pairs, summary_path
from fastdpo.evaluation.sampling import (
    SamplingSettings,
    encode_prompt,
    load_for_sampling,
    load_prompts,
    sample_responses,
)

TEXT_PROMPTS = ["What is the capital of France?", "Please write a short poem.", "Hello!"]
CHAT_PROMPT = [{"role": "user", "content": "How are you today?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))


def length_judge(prompt, response):
    return float(len(response))


SAMPLING = SamplingSettings(num_samples=4, max_new_tokens=8, seed=0)


def test_pairs_load_back_as_best_vs_worst_with_scores_and_settings(model_dir, tmp_path):
    out = tmp_path / "pairs.jsonl"
    prompts = [*TEXT_PROMPTS, CHAT_PROMPT]
    result = generate_pairs(str(model_dir), prompts, length_judge, out=out, sampling=SAMPLING)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == result.rows and len(rows) == 4 == result.summary.pairs
    for index, row in enumerate(rows):
        scores = result.scores[index]
        group = result.responses[index]
        best, worst = row["generation"]["samples"]
        # best: highest score (earliest among equals); worst: lowest (latest among equals)
        assert best == min(range(4), key=lambda i: (-scores[i], i))
        assert worst == max(range(4), key=lambda i: (-scores[i], i))
        assert row["chosen_score"] == scores[best] > row["rejected_score"] == scores[worst]
        assert row["generation"]["scores"] == scores
        assert row["generation"]["sampling"] == SAMPLING.to_dict()
        assert row["generation"]["pairing"] == "best_vs_worst"
        text = row["chosen"] if index < 3 else row["chosen"][0]["content"]
        assert text == group[best]
    assert rows[3]["chosen"] == [{"role": "assistant", "content": result.responses[3][best]}]
    assert rows[3]["prompt"] == CHAT_PROMPT

    examples = fastdpo.load_preference_data(str(out))
    assert examples.report.formats == {"explicit": 3, "conversational": 1}
    assert [e.example_id for e in examples] == [row["id"] for row in rows]
    assert examples[3].prompt == CHAT_PROMPT
    summary = json.loads(summary_path(out).read_text())
    assert summary["pairs"] == 4 and summary["judge_calls"] == 16 and summary["skipped"] == {}
    all_scores = [s for group in result.scores for s in group]
    assert summary["mean_score"] == pytest.approx(sum(all_scores) / 16, rel=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl", "pairs.summary.json"]


def test_the_same_seed_gives_the_same_pairs_and_another_seed_other_samples(model_dir, tmp_path):
    first = generate_pairs(
        str(model_dir), TEXT_PROMPTS, length_judge, out=tmp_path / "a.jsonl", sampling=SAMPLING
    )
    again = generate_pairs(
        str(model_dir), TEXT_PROMPTS, length_judge, out=tmp_path / "b.jsonl", sampling=SAMPLING
    )
    other = generate_pairs(
        str(model_dir),
        TEXT_PROMPTS,
        length_judge,
        out=tmp_path / "c.jsonl",
        sampling=SamplingSettings(num_samples=4, max_new_tokens=8, seed=1),
    )
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert first.responses == again.responses != other.responses


@pytest.mark.parametrize(
    ("pairing", "expected"),
    [
        ("best_vs_worst", [(0, 3)]),
        ("best_vs_each", [(0, 1), (0, 3)]),
        ("all_pairs", [(0, 1), (0, 3), (2, 1), (2, 3), (1, 3)]),
    ],
)
def test_pairing_policies_pair_by_score_and_never_pair_ties(
    model_dir, tmp_path, monkeypatch, pairing, expected
):
    texts = ["best", "mid", "best too", "worst"]
    scores = {"best": 3.0, "best too": 3.0, "mid": 2.0, "worst": 1.0}
    monkeypatch.setattr(
        "fastdpo.evaluation.pair_generation.sample_responses",
        lambda model, tokenizer, prompts, settings: [list(texts) for _ in prompts],
    )
    result = generate_pairs(
        str(model_dir),
        ["p"],
        lambda p, r: scores[r],
        out=tmp_path / "o.jsonl",
        pairing=pairing,
        sampling=SAMPLING,
    )
    assert [tuple(r["generation"]["samples"]) for r in result.rows] == expected
    assert all(r["chosen_score"] > r["rejected_score"] for r in result.rows)
    assert len(fastdpo.load_preference_data(str(tmp_path / "o.jsonl"))) == len(expected)


def test_all_equal_groups_and_nan_scores_are_counted_never_dropped_silently(
    model_dir, tmp_path, monkeypatch
):
    groups = {"tie": ["a", "b", "c"], "nan": ["x", "nan", "yy"], "allnan": ["nan", "nan", "q"]}
    monkeypatch.setattr(
        "fastdpo.evaluation.pair_generation.sample_responses",
        lambda model, tokenizer, prompts, settings: [groups[p] for p in prompts],
    )

    def judge(prompt, response):
        if response == "nan":
            return math.nan
        return 1.0 if prompt == "tie" else float(len(response))

    out = tmp_path / "o.jsonl"
    result = generate_pairs(
        str(model_dir),
        ["tie", "nan", "allnan"],
        judge,
        out=out,
        sampling=SamplingSettings(num_samples=3),
    )
    summary = result.summary
    assert summary.skipped == {"all_equal": 1, "nan_score": 3, "too_few_scored": 1}
    assert summary.pairs == 1 and result.rows[0]["chosen"] == "yy"
    assert result.rows[0]["generation"]["scores"] == [1.0, None, 2.0]
    reasons = [(e["prompt_index"], e["reason"]) for e in summary.skipped_examples]
    assert reasons == [(0, "all_equal"), (1, "nan_score"), (2, "nan_score"), (2, "too_few_scored")]
    assert summary.mean_score == pytest.approx((1 + 1 + 1 + 1 + 2 + 1) / 6)
    assert json.loads(summary_path(out).read_text())["skipped"] == summary.skipped


def test_a_judge_that_raises_names_the_prompt_or_is_a_counted_skip(model_dir, tmp_path):
    def judge(prompt, response):
        if prompt == TEXT_PROMPTS[1]:
            raise ZeroDivisionError("division by zero")
        return float(len(response))

    with pytest.raises(JudgeError, match=r"prompt 1, sample 0: .*ZeroDivisionError.*skip"):
        generate_pairs(
            str(model_dir), TEXT_PROMPTS, judge, out=tmp_path / "o.jsonl", sampling=SAMPLING
        )
    assert not (tmp_path / "o.jsonl").exists()
    result = generate_pairs(
        str(model_dir),
        TEXT_PROMPTS,
        judge,
        out=tmp_path / "o.jsonl",
        sampling=SAMPLING,
        on_judge_error="skip",
    )
    assert result.summary.skipped == {"judge_error": 1}
    assert [r["generation"]["prompt_index"] for r in result.rows] == [0, 2]


def test_empty_prompt_file_and_missing_model_are_clear_errors(model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no prompts"):
        generate_pairs(str(model_dir), str(empty), length_judge, out=tmp_path / "o.jsonl")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(str(blank))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        generate_pairs(str(tmp_path / "nope"), TEXT_PROMPTS, length_judge, out=tmp_path / "o")
    no_prompt = tmp_path / "rows.jsonl"
    no_prompt.write_text('{"question": "hi"}\n')
    with pytest.raises(ValueError, match=r"row 0: no 'prompt' column \(columns: \['question'\]\)"):
        load_prompts(str(no_prompt))


def test_load_prompts_reads_preference_rows_and_text_files_once_per_prompt(tmp_path):
    rows = tmp_path / "prefs.jsonl"
    rows.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"prompt": "a", "chosen": "x", "rejected": "y"},
                {"prompt": CHAT_PROMPT, "chosen": "x", "rejected": "y"},
                {"prompt": "a", "chosen": "z", "rejected": "y"},
            ]
        )
    )
    assert load_prompts(str(rows)) == ["a", CHAT_PROMPT]
    text = tmp_path / "p.txt"
    text.write_text("first\n\nsecond\nfirst\n")
    assert load_prompts(str(text)) == ["first", "second"]


def test_batched_left_padded_greedy_samples_equal_one_prompt_at_a_time(model_dir):
    model, tokenizer = load_for_sampling(str(model_dir), device="cpu")
    prompts = [*TEXT_PROMPTS, CHAT_PROMPT]
    greedy = SamplingSettings(num_samples=2, max_new_tokens=6, temperature=0.0, batch_size=4)
    batched = sample_responses(model, tokenizer, prompts, greedy)
    for prompt, responses in zip(prompts, batched, strict=True):
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])
        output = model.generate(
            ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        expected = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
        assert responses == [expected, expected]
    chat_ids = encode_prompt(tokenizer, CHAT_PROMPT)
    assert tokenizer.decode(chat_ids).endswith("<|im_start|>assistant\n")
    assert chat_ids[0] == tokenizer.bos_token_id and chat_ids[1] != tokenizer.bos_token_id


def test_the_command_writes_pairs_and_reports_user_mistakes_in_one_line(
    model_dir, tmp_path, monkeypatch, capsys
):
    (tmp_path / "judges_for_cli.py").write_text(
        "def length(prompt, response):\n    return float(len(response))\n"
        "def constant(prompt, response):\n    return 1.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TEXT_PROMPTS) + "\n")
    out = tmp_path / "out" / "pairs.jsonl"
    argv = [
        "generate-pairs",
        "--model",
        str(model_dir),
        "--prompts",
        str(prompts),
        "--num-samples",
        "3",
        "--max-new-tokens",
        "6",
        "--out",
        str(out),
    ]
    assert main([*argv, "--judge", "judges_for_cli:length"]) == 0
    printed = capsys.readouterr().out
    assert "generated 3 pairs from 3 of 3 prompts (9 samples, 9 judge calls" in printed
    assert len(fastdpo.load_preference_data(str(out))) == 3

    assert main([*argv, "--judge", "judges_for_cli:constant"]) == 1
    captured = capsys.readouterr()
    assert "skipped: all_equal 3" in captured.out and "no pair could be formed" in captured.err

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    argv[argv.index(str(prompts))] = str(empty)
    assert main([*argv, "--judge", "judges_for_cli:length"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdpo generate-pairs: error: prompts:") and err.count("\n") == 1
    assert main([*argv, "--judge", "no_module_here:judge"]) == 2
    assert "cannot import module 'no_module_here'" in capsys.readouterr().err
    del sys.modules["judges_for_cli"]
