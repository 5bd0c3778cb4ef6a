"""`share_prompt` through the trainer, the reference pass and `precompute-ref`.

A run packs each pair with its prompt once or twice; either way a step trains on the same
pairs with the same log-probs, and a reference cache built either way serves a run either way
(its fingerprint does not depend on the form). The attention and packing oracles are in
tests/test_shared_prompt.py; here only the wiring: the config key, the one decision per run,
the logged tokens, the cache and the command line.
"""

from __future__ import annotations

import json
import logging
import math
import random

import pytest
import torch
from evaluation_fixtures import save_tiny_model
from test_train import make_config

from fastdpo import cli, reference_build
from fastdpo.data.types import TokenizedPair
from fastdpo.model import sequence_logps
from fastdpo.reference import ReferenceCache
from fastdpo.reference_shards import MANIFEST_NAME
from fastdpo.testing.models import tiny_model
from fastdpo.testing.tokenizer import build_tiny_tokenizer
from fastdpo.train import data as train_data
from fastdpo.train.checkpoint import check_resumable
from fastdpo.train.config import ConfigError, TrainConfig
from fastdpo.train.trainer import Trainer

SYSTEM = "You are a helpful assistant. Answer the question briefly and politely. "
LONG_PROMPT_ROWS = [
    {
        "prompt": SYSTEM + f"Question {i}: what is {i} + {i % 3}?",
        "chosen": f"The answer is {i + i % 3}." + " Thank you." * (i % 2),
        "rejected": "I do not know." + " Sorry." * (i % 3),
    }
    for i in range(8)
]
SHORT_PROMPT_ROWS = [
    {
        "prompt": "Hi.",
        "chosen": "Hello! How are you today? I am fine, thank you for asking. " * 2,
        "rejected": "I do not know. Sorry, I cannot help with that. Here is a better answer. " * 2,
    }
    for _ in range(6)
]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))


# ------------------------------------------------------------------------------------------------
# The config key and the command line


def test_config_key_takes_auto_true_false_and_yaml_booleans(tmp_path):
    base = {"model": "m", "data": "d"}
    assert TrainConfig(**base).share_prompt == "auto"
    for value, expected in (("true", "true"), ("false", "false"), (True, "true"), (False, "false")):
        assert TrainConfig(**base, share_prompt=value).share_prompt == expected
    for text, expected in (("true", "true"), ("false", "false"), ("auto", "auto")):
        path = tmp_path / f"{text}.yaml"
        path.write_text(f"model: m\ndata: d\nshare_prompt: {text}\n")
        assert TrainConfig.from_yaml(path).share_prompt == expected
    for bad in ("sometimes", 1, None, "True"):
        with pytest.raises(ConfigError, match=r"^share_prompt: got .*; allowed: auto, true, false"):
            TrainConfig(**base, share_prompt=bad)


def test_share_prompt_on_the_command_line():
    parser = cli.build_parser()
    train = parser.parse_args(["train", "run.yaml", "--share-prompt", "true"])
    assert train.share_prompt == "true"
    assert "share_prompt" not in parser.parse_args(["train", "run.yaml"])  # the YAML's stands
    precompute = ["precompute-ref", "--model", "m", "--data", "d", "--out", "o"]
    assert parser.parse_args(precompute).share_prompt == "auto"
    assert parser.parse_args([*precompute, "--share-prompt", "false"]).share_prompt == "false"
    with pytest.raises(SystemExit):
        parser.parse_args([*precompute, "--share-prompt", "yes"])


def test_resume_accepts_a_changed_share_prompt(tmp_path):
    """The data order and the log-probs do not depend on the form, so a run may resume in the
    other one; a changed objective (beta) is still refused (the check is live)."""
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    saved = TrainConfig(model="m", data="d", share_prompt="true")
    saved.resolved().save_yaml(checkpoint / "config.yaml")
    check_resumable(TrainConfig(model="m", data="d", share_prompt="false"), checkpoint)
    with pytest.raises(ConfigError, match="beta"):
        check_resumable(TrainConfig(model="m", data="d", beta=0.3), checkpoint)


# ------------------------------------------------------------------------------------------------
# One decision per run, and the budget check in the run's form


def test_auto_is_decided_once_over_the_training_pairs(tmp_path, caplog):
    tokenizer = build_tiny_tokenizer()
    caplog.set_level(logging.INFO, logger="fastdpo.train")
    decided = {}
    for name, rows in (("long", LONG_PROMPT_ROWS), ("short", SHORT_PROMPT_ROWS)):
        data = write_rows(tmp_path / f"{name}.jsonl", rows)
        config = TrainConfig(model="m", data=str(data), eval_fraction=0.25, max_length=256)
        run = train_data.load_run_data(config, tokenizer)
        saved = sum(len(p.prompt_ids) for p in run.train)
        share = saved / sum(p.num_tokens for p in run.train)
        decided[name] = (run.share_prompt, share)
        state = "on" if run.share_prompt else "off"
        assert f"share_prompt auto: {state} (prompts are {share:.0%} of the tokens)" in caplog.text
    assert decided["long"][0] and decided["long"][1] >= 0.10
    assert not decided["short"][0] and decided["short"][1] < 0.10


def test_budget_check_counts_the_runs_form():
    pair = TokenizedPair(
        example_id="a", prompt_ids=[5] * 30, chosen_ids=[6] * 10, rejected_ids=[7] * 10
    )
    assert (pair.tokens_in_stream(False), pair.tokens_in_stream(True)) == (80, 50)
    train_data._check_fits([pair], 60, "data", share_prompt=True)  # fits once shared
    with pytest.raises(ConfigError) as info:
        train_data._check_fits([pair], 60, "data", share_prompt=False)
    message = str(info.value)
    assert "needs 80: prompt twice plus both completions" in message
    assert "at least 80, set share_prompt: true (50 tokens with it)" in message
    with pytest.raises(ConfigError, match=r"needs 50: prompt once .* at least 50 or lower"):
        train_data._check_fits([pair], 40, "data", share_prompt=True)


# ------------------------------------------------------------------------------------------------
# Training in both forms


def test_runs_with_and_without_sharing_train_alike_and_share_one_cache(model_dir, tmp_path):
    """Same pairs per step and the same log-probs (fp32, CPU: 1e-5 relative), fewer tokens in
    the stream with sharing; the second run reuses the first run's cache (built shared)."""
    data = write_rows(tmp_path / "prefs.jsonl", LONG_PROMPT_ROWS)
    budget = 1024  # every step is one micro-batch in both forms: the capacities are equal
    runs = {}
    for name, setting in (("shared", "true"), ("plain", "false")):
        config = make_config(
            model_dir,
            data,
            tmp_path / name,
            share_prompt=setting,
            max_steps=3,
            max_tokens_per_batch=budget,
            max_length=256,
        )
        trainer = Trainer(config)
        runs[name] = (trainer, [r for r in trainer.train().history if "loss" in r])
    (shared, shared_rows), (plain, plain_rows) = runs["shared"], runs["plain"]
    assert shared.data.share_prompt and not plain.data.share_prompt

    assert [r["step"] for r in shared_rows] == [r["step"] for r in plain_rows] == [1, 2, 3]
    assert shared_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    for a, b in zip(shared_rows, plain_rows, strict=True):
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)

    # Tokens are the stream's real tokens: one micro-batch per step, so packing efficiency
    # times the budget is the step's token count in each form.
    step_pairs = [shared.data.train[i] for i in shared.plan.step_pairs(0, 0)]
    streams = {form: sum(p.tokens_in_stream(form) for p in step_pairs) for form in (True, False)}
    assert shared_rows[0]["packing_efficiency"] * budget == pytest.approx(streams[True])
    assert plain_rows[0]["packing_efficiency"] * budget == pytest.approx(streams[False])
    saved = sum(len(p.prompt_ids) for p in step_pairs)
    assert shared_rows[0]["prompt_tokens_saved"] == streams[False] - streams[True] == saved > 0
    assert plain_rows[0]["prompt_tokens_saved"] == 0

    # The plain run found the shared run's cache by fingerprint and used it as it is.
    assert shared.reference.built and not plain.reference.built
    assert plain.reference.train.path == shared.reference.train.path
    assert shared.reference.train.manifest["build"]["share_prompt"] is True


# ------------------------------------------------------------------------------------------------
# The reference cache in both forms


def random_pairs(count: int, *, seed: int = 0, vocab: int = 96) -> list[TokenizedPair]:
    rng = random.Random(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]

    return [
        TokenizedPair(
            example_id=f"row-{i}",
            prompt_ids=ids(1, 20),
            chosen_ids=ids(1, 12),
            rejected_ids=ids(1, 12),
            chosen_loss_mask=None,
        )
        for i in range(count)
    ]


def test_a_cache_built_either_way_holds_the_same_values_and_fingerprint(tmp_path, monkeypatch):
    model = tiny_model("llama", vocab_size=96)
    pairs = random_pairs(24)
    forms_run = []  # the form of every batch the pass ran

    def spy(model, batch, **kwargs):
        forms_run.append(batch.shared_prompt is not None)
        return sequence_logps(model, batch, **kwargs)

    monkeypatch.setattr(reference_build, "sequence_logps", spy)
    caches = {}
    for form in (True, False):
        forms_run.clear()
        caches[form] = ReferenceCache.build(
            model,
            pairs,
            tmp_path / str(form),
            tokenizer=None,
            tokenization={"max_length": 64},
            examples_per_shard=10,
            max_tokens_per_batch=160,
            per_token=True,
            progress=False,
            share_prompt=form,
        )
        assert forms_run and set(forms_run) == {form}
    shared, plain = caches[True], caches[False]
    assert shared.fingerprint.to_json() == plain.fingerprint.to_json()
    assert shared.manifest["plan"] == plain.manifest["plan"]
    assert (shared.manifest["build"]["share_prompt"], plain.manifest["build"]["share_prompt"]) == (
        True,
        False,
    )
    # Opened with the other build's fingerprint as the expectation: it serves either run.
    ReferenceCache.open(shared.path, expect=plain.fingerprint)
    for pair in pairs:
        a, b = shared.lookup(pair.example_id), plain.lookup(pair.example_id)
        assert (a.chosen_length, a.rejected_length) == (b.chosen_length, b.rejected_length)
        for x, y in ((a.chosen_logp, b.chosen_logp), (a.rejected_logp, b.rejected_logp)):
            assert x == pytest.approx(y, rel=1e-5, abs=1e-6)
        for x, y in (
            (a.chosen_token_logps, b.chosen_token_logps),
            (a.rejected_token_logps, b.rejected_token_logps),
        ):
            torch.testing.assert_close(
                torch.from_numpy(x), torch.from_numpy(y), rtol=1e-5, atol=1e-6
            )


def test_precompute_ref_auto_stays_off_for_short_prompts(model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fastdpo.reference")
    data = write_rows(tmp_path / "short.jsonl", SHORT_PROMPT_ROWS)
    argv = ["precompute-ref", "--model", str(model_dir), "--data", str(data), "--no-progress"]
    assert cli.main([*argv, "--out", str(tmp_path / "auto"), "--max-length", "256"]) == 0
    manifest = json.loads((tmp_path / "auto" / MANIFEST_NAME).read_text())
    assert manifest["build"]["share_prompt"] is False
    assert "reference pass: share_prompt auto: off (prompts are" in caplog.text
    assert "share_prompt" not in json.dumps(manifest["fingerprint"])
