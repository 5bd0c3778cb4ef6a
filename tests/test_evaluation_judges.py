"""Judges (callable, reward model, implicit reward), Bradley-Terry and `compare_generations`."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdpo.evaluation.generation_compare import (
    compare_generations,
    fit_bradley_terry,
    pairwise_outcomes,
)
from fastdpo.evaluation.judges import (
    CallableJudge,
    ImplicitRewardJudge,
    JudgeError,
    RewardModelJudge,
    load_judge,
)
from fastdpo.testing.models import tiny_config, tiny_model
from fastdpo.testing.tokenizer import build_tiny_tokenizer

PROMPTS = ["What is the capital of France?", "Please write a short poem about the sea."]


def _save(model, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """Two tiny Llamas with different weights (policy and reference), saved."""
    root = tmp_path_factory.mktemp("lms")
    return tuple(
        _save(tiny_model("llama", vocab_size=len(tokenizer), seed=seed), root / f"m{seed}")
        for seed in (0, 1)
    )


# ------------------------------------------------------------------------------------------------
# Callable judges


def length_judge(prompt, response):
    return float(len(response))


def test_a_module_function_spec_is_imported_and_counts_one_call_per_response(monkeypatch):
    monkeypatch.setitem(sys.modules, "my_judges", sys.modules[__name__])
    judge = load_judge("my_judges:length_judge")
    assert isinstance(judge, CallableJudge)
    assert judge.score([("p", "abc"), ("q", ""), ("r", "hello")]) == [3.0, 0.0, 5.0]
    assert judge.score([("p", "xy")]) == [2.0]
    assert judge.calls == 4


def test_a_judge_that_raises_is_an_error_naming_the_item():
    def judge(prompt, response):
        if response == "bad":
            raise KeyError("no such answer")
        return 1.0

    with pytest.raises(JudgeError, match="raised KeyError") as error:
        CallableJudge(judge).score([("p", "ok"), ("p", "ok"), ("p", "bad")])
    assert error.value.index == 2


def test_nan_is_returned_for_the_caller_to_count_and_a_non_number_is_an_error():
    scores = CallableJudge(lambda p, r: math.nan if r == "n" else 0.5).score(
        [("p", "n"), ("p", "y")]
    )
    assert math.isnan(scores[0]) and scores[1] == 0.5
    with pytest.raises(JudgeError, match=r"returned 'good' \(str\); a judge returns a float"):
        CallableJudge(lambda p, r: "good").score([("p", "r")])
    with pytest.raises(JudgeError, match="returned True"):
        CallableJudge(lambda p, r: True).score([("p", "r")])


def test_bad_specs_and_missing_models_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        load_judge("no_such_module_xyz:judge")
    with pytest.raises(ValueError, match="has no 'nope'"):
        load_judge("math:nope")
    with pytest.raises(ValueError, match=r"'implicit:POLICY,REF'"):
        load_judge("implicit:only_one")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_judge(str(tmp_path / "missing_reward_model"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_judge(f"implicit:{tmp_path / 'a'},{tmp_path / 'b'}")


# ------------------------------------------------------------------------------------------------
# Reward model judge


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer) -> Path:
    from transformers import LlamaForSequenceClassification

    config = tiny_config("llama", vocab_size=len(tokenizer), num_labels=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = LlamaForSequenceClassification(config)
    return _save(model, tmp_path_factory.mktemp("rm") / "rm")


def test_the_reward_model_score_is_its_logit_on_the_unpadded_text(reward_model_dir, tokenizer):
    from transformers import AutoModelForSequenceClassification

    judge = load_judge(str(reward_model_dir), device="cpu")
    assert isinstance(judge, RewardModelJudge)
    judge.batch_size = 3  # two batches, different lengths padded within each
    chat = [{"role": "user", "content": "Hello! How are you today?"}]
    items = [
        (PROMPTS[0], " The capital of France is Paris."),
        (PROMPTS[1], " The sea."),
        (chat, "I am fine, thank you for asking."),
        (PROMPTS[0], " I do not know."),
    ]
    scores = judge.score(items)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    for (prompt, response), score in zip(items, scores, strict=True):
        if isinstance(prompt, str):
            ids = tokenizer(prompt + response)["input_ids"]
        else:
            text = tokenizer.apply_chat_template(
                [*prompt, {"role": "assistant", "content": response}], tokenize=False
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert text.startswith("<|bos|><|im_start|>user\nHello!")
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0, 0].item()
        assert score == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert judge.calls == 4


def test_a_classifier_with_two_labels_is_refused(tmp_path, tokenizer):
    from transformers import LlamaForSequenceClassification

    config = tiny_config("llama", vocab_size=len(tokenizer), num_labels=2)
    folder = _save(LlamaForSequenceClassification(config), tmp_path / "cls")
    with pytest.raises(ValueError, match="has 2 labels"):
        load_judge(str(folder), device="cpu")


# ------------------------------------------------------------------------------------------------
# Implicit reward judge


def _naive_completion_logp(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """Sum of log softmax(full logits) over the completion, in float64."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    logps = torch.log_softmax(logits[:-1], -1)
    targets = ids[0, 1:]
    picked = logps[torch.arange(len(targets)), targets]
    return float(picked[len(prompt_ids) - 1 :].sum())


@pytest.mark.parametrize("path", ["implicit_reward module", "own sequence_logps fallback"])
def test_the_implicit_reward_is_beta_times_the_log_ratio(lm_dirs, tokenizer, monkeypatch, path):
    from transformers import AutoModelForCausalLM

    if path.startswith("own"):  # the judge computes it itself where the module is absent
        monkeypatch.setitem(sys.modules, "fastdpo.evaluation.implicit_reward", None)

    policy_dir, ref_dir = lm_dirs
    judge = load_judge(f"implicit:{policy_dir},{ref_dir}", device="cpu", beta=0.25)
    assert isinstance(judge, ImplicitRewardJudge)
    chat = [{"role": "user", "content": "Hello!"}]
    items = [(PROMPTS[0], " Paris."), (PROMPTS[1], " The sea and the sun."), (chat, "I am fine.")]
    scores = judge.score(items)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    ref = AutoModelForCausalLM.from_pretrained(ref_dir).eval()
    for (prompt, response), score in zip(items, scores, strict=True):
        if isinstance(prompt, str):
            prompt_ids = tokenizer(prompt)["input_ids"]
            completion = tokenizer(response, add_special_tokens=False)["input_ids"]
            completion = [*completion, tokenizer.eos_token_id]  # training appends EOS
        else:
            rendered = tokenizer.apply_chat_template(
                prompt, tokenize=False, add_generation_prompt=True
            )
            prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
            full = tokenizer.apply_chat_template(
                [*prompt, {"role": "assistant", "content": response}], tokenize=False
            )
            full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            assert full_ids[: len(prompt_ids)] == prompt_ids
            completion = full_ids[len(prompt_ids) :]
        expected = 0.25 * (
            _naive_completion_logp(policy, prompt_ids, completion)
            - _naive_completion_logp(ref, prompt_ids, completion)
        )
        assert score == pytest.approx(expected, rel=1e-5, abs=2e-5)
    assert judge.calls == 3


# ------------------------------------------------------------------------------------------------
# Bradley-Terry


def _direct_bt_fit(wins: np.ndarray, compared: np.ndarray) -> np.ndarray:
    """Newton's method on the BT log-likelihood in theta = log p (theta_0 fixed at 0)."""
    n = wins.shape[0]
    theta = np.zeros(n)
    for _ in range(100):
        p = 1 / (1 + np.exp(theta[None, :] - theta[:, None]))  # P(i beats j)
        gradient = wins.sum(1) - (compared * p).sum(1)
        weights = compared * p * (1 - p)
        hessian = weights - np.diag(weights.sum(1))
        step = np.linalg.solve(hessian[1:, 1:], gradient[1:])
        theta[1:] -= step
        if np.max(np.abs(step)) < 1e-14:
            break
    return theta - theta.mean()


def test_bradley_terry_equals_a_direct_newton_fit():
    wins = np.array([[0, 7, 9, 4.5], [3, 0, 6, 2], [1, 4, 0, 5], [5.5, 8, 5, 0]], dtype=np.float64)
    compared = wins + wins.T
    strengths = fit_bradley_terry(wins, compared)
    theta = np.log(strengths)
    np.testing.assert_allclose(theta - theta.mean(), _direct_bt_fit(wins, compared), atol=1e-9)
    # The MLE's score equations: each model's wins equal its expected wins.
    p = strengths[:, None] / (strengths[:, None] + strengths[None, :])
    np.testing.assert_allclose((compared * p).sum(1), wins.sum(1), rtol=1e-10)


def test_pairwise_outcomes_count_wins_ties_and_skip_nan():
    scores = np.array([[1.0, 2.0, 0.5, np.nan], [1.0, 1.0, 0.7, 3.0], [0.0, 5.0, np.nan, 1.0]])
    wins, compared = pairwise_outcomes(scores)
    # model 0 vs 1: tie, win for 0, loss, (prompt 3 unscored by 0) -> 1.5 of 3
    assert wins[0, 1] == 1.5 and wins[1, 0] == 1.5 and compared[0, 1] == 3
    # model 1 vs 2: win, loss, (2 unscored), win -> 2 of 3
    assert wins[1, 2] == 2 and wins[2, 1] == 1 and compared[1, 2] == 3
    np.testing.assert_array_equal(wins + wins.T, compared)
    assert np.all(np.diag(wins) == 0)


def test_the_fit_refuses_a_model_without_wins():
    with pytest.raises(ValueError, match="no wins"):
        fit_bradley_terry(np.array([[0, 2.0], [0, 0]]), np.array([[0, 2.0], [2, 0]]))


# ------------------------------------------------------------------------------------------------
# compare_generations


@pytest.fixture(scope="module")
def eos_models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Three tiny Phi models (Phi's head has a bias): 'short' always ends at once (EOS bias
    +100), 'long' never ends (-100), 'plain' samples freely."""
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    root = tmp_path_factory.mktemp("eos")
    folders = {}
    for name, shift in (("short", 100.0), ("plain", 0.0), ("long", -100.0)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = PhiForCausalLM(config).eval()
        with torch.no_grad():
            model.lm_head.bias[tokenizer.eos_token_id] = shift
        folders[name] = _save(model, root / name)
    return folders


def test_compare_generations_ranks_by_judge_scores_with_n_x_prompts_judge_calls(eos_models):
    calls = []

    def judge(prompt, response):
        calls.append((prompt, response))
        return float(len(response))

    models = [str(eos_models[name]) for name in ("short", "plain", "long")]
    report = compare_generations(
        models, PROMPTS, judge, num_samples=2, max_new_tokens=6, seed=0, device="cpu"
    )
    assert report["judge_calls"] == len(calls) == 3 * len(PROMPTS) * 2
    by_model = {row["model"]: row for row in report["ranking"]}
    short, plain, long = models
    assert by_model[short]["mean_score"] == 0.0  # EOS first: every answer empty
    assert by_model[long]["mean_score"] > 0 and by_model[plain]["mean_score"] > 0
    assert report["ranking"][-1]["model"] == short
    assert report["win_rates"][long][short] == 1.0 and report["win_rates"][short][long] == 0.0
    assert report["win_rates"][plain][short] == 1.0
    assert report["bt_prior"] == 0.5  # 'short' never wins: the MLE alone would be -inf
    assert report["ranking"][0]["bt_score"] > report["ranking"][-1]["bt_score"]
    # The scores the report gives are those of the judge's calls, model by model.
    lengths = [float(len(r)) for _, r in calls]
    assert by_model[plain]["mean_score"] == pytest.approx(np.mean(lengths[4:8]), rel=1e-12)


def test_compare_generations_names_the_model_and_prompt_a_judge_failed_on(eos_models):
    def judge(prompt, response):
        if prompt == PROMPTS[1]:
            raise RuntimeError("judge down")
        return 1.0

    models = [str(eos_models["short"]), str(eos_models["plain"])]
    with pytest.raises(JudgeError, match=r"model .*short, prompt 1: .*judge down"):
        compare_generations(models, PROMPTS, judge, max_new_tokens=2, device="cpu")


def test_compare_generations_refuses_a_missing_model_before_sampling_and_an_unscored_one(
    eos_models, tmp_path
):
    calls = []

    def judge(prompt, response):
        calls.append(response)
        return math.nan if len(calls) <= 2 * len(PROMPTS) else 1.0

    models = [str(eos_models["short"]), str(eos_models["plain"])]
    with pytest.raises(ValueError, match=r"no prompt where .*short and another model both"):
        compare_generations(models, PROMPTS, judge, num_samples=2, max_new_tokens=2, device="cpu")

    calls.clear()
    with pytest.raises(FileNotFoundError, match="nope: no such folder"):
        compare_generations(
            [str(eos_models["short"]), str(tmp_path / "nope")],
            PROMPTS,
            judge,
            max_new_tokens=2,
            device="cpu",
        )
    assert calls == []  # refused before the first model sampled
