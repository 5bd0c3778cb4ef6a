"""`fastdpo demo`: the task and its judge, the DPO demo (a quick run), and `fastdpo demo --op`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fastdpo import cli
from fastdpo.demo import run as demo_run
from fastdpo.demo.run import MARKER, DemoResult, StageNumbers, run_demo
from fastdpo.demo.settings import DemoSettings
from fastdpo.demo.task import (
    BODIES,
    CURT,
    ITEMS,
    POLITE,
    TEMPLATES,
    corpus,
    judge,
    make_task,
    requested_item,
)

# --------------------------------------------------------------------------------------------
# the judge, on hand-written replies

SALT = "User: Can you pass me the salt?\nAssistant:"


@pytest.mark.parametrize(
    ("response", "score"),
    [
        (" Here is the salt. Have a nice day!", 1.0),
        (" The salt is on the table. Anything else I can do for you?", 1.0),
        ("here is the SALT. thank you for asking!", 1.0),  # case does not matter
        (" Here is the salt. Leave me alone.", 0.0),
        (" I found the salt. Do it yourself next time.", 0.0),
        (" Here is the salt. Enjoy! Now go away.", 0.5),  # one polite, one curt sign-off
        (" Here is the salt. Enjoy! Thank you for asking! Stop asking me.", 2 / 3),
        (" Here is the salt.", 0.0),  # no sign-off: neither style
        (" Here is the salt. Overenjoy!", 0.0),  # a phrase only counts from a word start
        (" Here is the pepper. Have a nice day!", 0.0),  # polite, but the wrong item
        (" Here is the salt and the pepper. Have a nice day!", 0.0),  # an extra item
        (" Here is the saltshaker. Have a nice day!", 0.0),  # items match whole words only
        ("", 0.0),
    ],
)
def test_judge_scores_hand_written_replies(response, score):
    assert judge(SALT, response) == pytest.approx(score, rel=1e-12)


def test_judge_reads_the_item_from_the_prompt():
    assert requested_item("User: Where is the umbrella?\nAssistant:") == "umbrella"
    assert requested_item("User: Hello?\nAssistant:") is None
    assert judge("User: Hello?\nAssistant:", " Here is the salt. Enjoy!") == 0.0
    polite = " I found the kite. Enjoy!"
    assert judge("User: Please find the kite.\nAssistant:", polite) == 1.0
    assert judge("User: Please find the lamp.\nAssistant:", polite) == 0.0


# --------------------------------------------------------------------------------------------
# the task's rows


def test_task_rows_are_deterministic_in_the_seed_and_hold_prompts_out():
    task = make_task(seed=3)
    assert make_task(seed=3) == task
    other = make_task(seed=4)
    assert set(other.heldout_prompts) != set(task.heldout_prompts)

    train_prompts = {row["prompt"] for row in task.dpo_rows}
    assert {row["prompt"] for row in task.sft_rows} == train_prompts
    assert not train_prompts & set(task.heldout_prompts)
    assert len(train_prompts) + len(task.heldout_prompts) == len(TEMPLATES) * len(ITEMS)
    assert len(task.heldout_prompts) == round(0.2 * len(TEMPLATES) * len(ITEMS))
    # every item is still seen in training, under other request templates
    assert {requested_item(p) for p in train_prompts} == set(ITEMS)


def test_task_pairs_prefer_the_polite_reply_and_share_its_first_sentence():
    task = make_task(seed=0)
    for row in task.dpo_rows + task.heldout_rows:
        assert judge(row["prompt"], row["chosen"]) == 1.0
        assert judge(row["prompt"], row["rejected"]) == 0.0
        body = row["chosen"].split(".")[0]
        assert row["rejected"].startswith(body + ".")
    # a prompt's DPO pairs are distinct
    assert len({json.dumps(row) for row in task.dpo_rows}) == len(task.dpo_rows)
    assert len(task.dpo_rows) == 2 * len({row["prompt"] for row in task.dpo_rows})


def test_warm_up_rows_show_each_prompt_in_both_styles():
    task = make_task(seed=0)
    chosen_scores: dict[str, list[float]] = {}
    for row in task.sft_rows:
        chosen_scores.setdefault(row["prompt"], []).append(judge(row["prompt"], row["chosen"]))
    assert all(sorted(scores) == [0.0, 1.0] for scores in chosen_scores.values())


def test_make_task_rejects_bad_arguments():
    with pytest.raises(ValueError, match="heldout_fraction"):
        make_task(seed=0, heldout_fraction=1.0)
    limit = len(BODIES) * len(POLITE) * len(CURT)
    with pytest.raises(ValueError, match=f"dpo_pairs_per_prompt must be in \\[1, {limit}\\]"):
        make_task(seed=0, dpo_pairs_per_prompt=limit + 1)


def test_tokenizer_round_trips_the_task_with_one_token_per_item():
    from fastdpo.demo.model import build_tokenizer

    tokenizer = build_tokenizer()
    for text in corpus():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    for item in ITEMS:
        assert len(tokenizer(" " + item, add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer(SALT)["input_ids"][0] == tokenizer.bos_token_id
    assert len(tokenizer) < 1024


# --------------------------------------------------------------------------------------------
# the DPO demo, quick version


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[DemoResult, list[str]]:
    """One quick demo run (~15-30 s on 2 CPU cores), shared by the tests below."""
    output_dir = tmp_path_factory.mktemp("demo") / "run"
    lines: list[str] = []
    result = run_demo(
        DemoSettings.quick(output_dir=str(output_dir), device="cpu"), print_fn=lines.append
    )
    return result, lines


def test_quick_demo_moves_the_preference_the_right_way(quick_run):
    result, _ = quick_run
    before, after = result.before, result.after
    # The SFT model answers in either style: about chance on 48 held-out pairs.
    assert 0.2 <= before.preference_accuracy <= 0.8
    assert 0.2 <= before.win_rate <= 0.8
    # Before DPO the policy is its own reference: every reward margin is exactly zero.
    assert before.reward_margin == 0.0 and before.reward_accuracy == 0.5
    # A quick run learns less than the real demo (>= 90%), but in the same direction.
    assert after.preference_accuracy >= before.preference_accuracy + 0.3
    assert after.reward_accuracy >= 0.8 and after.reward_margin > 0.5
    assert after.win_rate >= before.win_rate + 0.15


def test_quick_demo_reward_numbers_match_the_trainers_evaluation(quick_run):
    result, _ = quick_run
    evals = [row for row in result.dpo_history if "eval/rewards/margins" in row]
    assert evals, "the DPO run logged no evaluation of the held-out pairs"
    final = evals[-1]
    # The trainer evaluates the held-out pairs against its reference cache; the demo reloads
    # both models from their folders and computes the same margins itself.
    assert result.after.reward_margin == pytest.approx(final["eval/rewards/margins"], rel=1e-4)
    assert result.after.reward_accuracy == pytest.approx(final["eval/rewards/accuracies"])


def test_quick_demo_leaves_a_run_directory_that_loads(quick_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, _ = quick_run
    run_dir = result.run_dir
    assert (run_dir / MARKER).exists()
    for stage in ("sft", "dpo"):
        assert (run_dir / stage / "metrics.jsonl").exists()
        assert (run_dir / stage / "config.yaml").exists()
    model = AutoModelForCausalLM.from_pretrained(run_dir / "dpo" / "final")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "dpo" / "final")
    assert model.config.vocab_size == len(tokenizer)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["after"]["win_rate"] == result.after.win_rate
    assert len(summary["samples"]["after"]) == len(result.after.samples)
    rows = (run_dir / "data" / "heldout.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in rows] == make_task(seed=0).heldout_rows


def test_quick_demo_prints_the_table_samples_and_where_the_run_is(quick_run):
    result, lines = quick_run
    text = "\n".join(lines)
    accuracy_line = next(line for line in lines if "held-out preference accuracy" in line)
    before_cell, after_cell = accuracy_line.split()[3:5]
    assert before_cell == f"{100 * result.before.preference_accuracy:.0f}%"
    assert after_cell == f"{100 * result.after.preference_accuracy:.0f}%"
    assert "judge win rate of samples" in text
    assert text.count("request: ") == 2  # the quick run shows two
    assert f"run directory: {result.run_dir}/" in text
    assert math.isfinite(result.seconds["total"]) and result.seconds["total"] > 0


def test_demo_refuses_a_folder_it_did_not_write_and_replaces_its_own(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a previous demo run"):
        demo_run._prepare_run_dir(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"

    previous = tmp_path / "previous"
    demo_run._prepare_run_dir(previous)
    (previous / "old.txt").write_text("from the last run")
    demo_run._prepare_run_dir(previous)
    assert sorted(p.name for p in previous.iterdir()) == [MARKER]


# --------------------------------------------------------------------------------------------
# the command line (the run itself is replaced by a stub: the quick run above covers it)


def _stub_result(tmp_path: Path, *, after_accuracy: float) -> DemoResult:
    def numbers(accuracy: float, win_rate: float) -> StageNumbers:
        return StageNumbers(
            preference_accuracy=accuracy,
            logp_margin=0.0,
            reward_accuracy=0.5,
            reward_margin=0.0,
            win_rate=win_rate,
            samples=[],
        )

    return DemoResult(
        before=numbers(0.5, 0.5),
        after=numbers(after_accuracy, 0.9),
        run_dir=tmp_path,
        dpo_history=[],
        seconds={},
    )


@pytest.mark.parametrize(
    ("argv", "after_accuracy", "code"),
    [
        ([], 0.95, 0),
        ([], 0.85, 1),  # the full demo promises >= 90%
        (["--quick"], 0.85, 0),  # the quick one does not
    ],
)
def test_cli_runs_the_dpo_demo_with_its_options(monkeypatch, tmp_path, argv, after_accuracy, code):
    seen: list[DemoSettings] = []

    def fake_run_demo(settings, **kwargs):
        seen.append(settings)
        return _stub_result(tmp_path, after_accuracy=after_accuracy)

    monkeypatch.setattr(demo_run, "run_demo", fake_run_demo)
    out_dir = str(tmp_path / "out")
    assert cli.main(["demo", *argv, "--output-dir", out_dir, "--seed", "7"]) == code
    (settings,) = seen
    expected = (DemoSettings.quick if argv else DemoSettings)(
        output_dir=out_dir, seed=7, progress=not argv
    )
    assert settings == expected


def test_cli_reports_a_foreign_output_dir_in_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert cli.main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 2
    assert "not a previous demo run" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# `fastdpo demo --op`: the fused head op against the naive full-logits path

SMALL = ["--op", "--tokens", "96", "--hidden", "32", "--vocab", "700"]


def test_op_demo_runs_and_reports_agreement(capsys):
    assert cli.main(["demo", *SMALL, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "naive (full logits)" in out and "fastdpo (torch)" in out
    assert "N=96 tokens, H=32, V=700" in out
    assert out.count(" ok") == 3 and "MISMATCH" not in out


def test_op_demo_fails_when_the_fused_op_disagrees(monkeypatch, capsys):
    from fastdpo.demo.op import naive_logprobs
    from fastdpo.ops import linear_logprobs as op_module

    def off_by_a_bit(hidden, weight, targets, **kwargs):
        return naive_logprobs(hidden, weight, targets) + 1e-2

    monkeypatch.setattr(op_module, "linear_logprobs", off_by_a_bit)
    assert cli.main(["demo", *SMALL, "--device", "cpu"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_console_entry_point_runs_the_op_demo():
    proc = subprocess.run(
        [sys.executable, "-m", "fastdpo.cli", "demo", *SMALL],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "peak memory" in proc.stdout


def test_op_demo_rejects_non_positive_sizes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--op", "--tokens", "0"])
    assert exit_info.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_demo_parser_does_not_import_torch():
    code = (
        "import argparse, sys\n"
        "from fastdpo.demo import add_parser\n"
        "add_parser(argparse.ArgumentParser().add_subparsers())\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


@pytest.mark.gpu
def test_op_demo_on_cuda(capsys):
    assert cli.main(["demo", *SMALL, "--device", "cuda"]) == 0
    assert "MISMATCH" not in capsys.readouterr().out
