"""`fastdpo.evaluate` and `fastdpo eval`: metrics equal a direct full-logit float64 computation,
a trained model ranks first, a cache reference equals a model reference, bad inputs fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from evaluation_fixtures import save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import fastdpo
from fastdpo import cli
from fastdpo.data.sources import load_preference_data
from fastdpo.data.tokenize import tokenize_pairs
from fastdpo.evaluation.data import tokenization_kwargs
from fastdpo.evaluation.logps import ExampleLogps
from fastdpo.evaluation.models import EvaluationInputError
from fastdpo.evaluation.ranking import pair_metrics
from fastdpo.reference import ReferenceCache
from fastdpo.reference_fingerprint import tokenization_settings
from fastdpo.train.config import TrainConfig
from fastdpo.train.trainer import Trainer

ROWS = [
    {
        "prompt": f"Question {i}: what is {i} + {i % 3}?",
        "chosen": f"The answer is {i + i % 3}." + " Thank you." * (i % 2),
        "rejected": "I do not know." + " Sorry." * (i % 3),
    }
    for i in range(12)
]
BETA = 0.1


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    data = root / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {
        "a": save_tiny_model(root / "model_a", 0),
        "b": save_tiny_model(root / "model_b", 1),
        "ref": save_tiny_model(root / "model_ref", 2),
        "data": data,
        "root": root,
    }


def _tokenized(folder: Path, data, **tokenize):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    kwargs = tokenization_kwargs(tokenization=tokenize)
    return tokenize_pairs(load_preference_data(data), tokenizer, **kwargs), kwargs


def direct_logps(model_dir: Path, pairs) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Summed completion log-probs per pair: one unpacked forward per sequence, full logits,
    float64, the model's own (eager) attention."""
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float64, attn_implementation="eager"
    ).eval()
    out = np.zeros((4, len(pairs)))
    with torch.no_grad():
        for k, pair in enumerate(pairs):
            for slot, completion in enumerate((pair.chosen_ids, pair.rejected_ids)):
                ids = torch.tensor([pair.prompt_ids + completion])
                logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
                start = len(pair.prompt_ids)
                targets = ids[0, start:]
                out[slot, k] = logp[start - 1 : -1].gather(1, targets[:, None]).sum().item()
                out[2 + slot, k] = len(completion)
    return out[0], out[1], out[2], out[3]


def direct_metrics(policy, ref, beta):
    chosen, rejected, chosen_len, rejected_len = policy
    margin = chosen - rejected
    normalized = chosen / chosen_len - rejected / rejected_len
    reward = beta * ((chosen - ref[0]) - (rejected - ref[1]))

    def accuracy(m):
        return np.mean([1.0 if x > 0 else 0.5 if x == 0 else 0.0 for x in m])

    return {
        "logp_accuracy": accuracy(margin),
        "normalized_logp_accuracy": accuracy(normalized),
        "reward_accuracy": accuracy(reward),
        "mean_logp_margin": margin.mean(),
        "reward_margin": reward.mean(),
        "loss": np.mean([-np.log(1.0 / (1.0 + np.exp(-x))) for x in reward]),
        "chosen_reward": (beta * (chosen - ref[0])).mean(),
    }, {"logp_accuracy": margin, "normalized_logp_accuracy": normalized, "reward_accuracy": reward}


def test_metrics_and_intervals_equal_a_direct_computation(folders):
    report = fastdpo.evaluate(
        [str(folders["a"]), str(folders["b"])],
        str(folders["data"]),
        ref=str(folders["ref"]),
        beta=BETA,
        device="cpu",
        seed=3,
        n_boot=200,
    )
    pairs, _ = _tokenized(folders["a"], folders["data"])
    assert report["pairs"] == len(ROWS) == len(pairs)
    ref = direct_logps(folders["ref"], pairs)
    margins = {}
    for key in ("a", "b"):
        expected, margins[key] = direct_metrics(direct_logps(folders[key], pairs), ref, BETA)
        got = report["models"][str(folders[key])]
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, name)
    # The bootstrap: resample b draws rng.integers(0, N, N) in order; same indices for all.
    rng = np.random.default_rng(3)
    draws = [rng.integers(0, len(pairs), size=len(pairs)) for _ in range(200)]
    for key in ("a", "b"):
        got = report["models"][str(folders[key])]
        for name, margin in margins[key].items():
            correct = (margin > 0) + 0.5 * (margin == 0)
            means = [correct[idx].mean() for idx in draws]
            low, high = np.percentile(means, [2.5, 97.5])
            assert got[f"{name}_ci95"] == pytest.approx([low, high], abs=1e-12), (key, name)
    ranking = report["ranking"]
    assert [e["metric"] for e in ranking] == ["reward_accuracy"] * 2
    accuracies = [e["accuracy"] for e in ranking]
    assert accuracies == sorted(accuracies, reverse=True)
    assert report["settings"]["beta"] == BETA and report["settings"]["ref_kind"] == "model"


def test_ties_count_half_and_the_loss_is_the_dpo_loss():
    policy = ExampleLogps(
        chosen=torch.tensor([-1.0, -2.0, -3.0, -4.0]),
        rejected=torch.tensor([-2.0, -2.0, -1.0, -4.0]),
        chosen_lengths=torch.tensor([2, 2, 3, 4]),
        rejected_lengths=torch.tensor([2, 2, 1, 4]),
    )
    metrics, scores = pair_metrics(policy, policy, beta=0.5)
    # margins 1, 0, -2, 0 -> (1 + 0.5 + 0 + 0.5) / 4
    assert metrics["logp_accuracy"] == 0.5
    assert scores["logp_accuracy"].tolist() == [1.0, 0.5, 0.0, 0.5]
    assert metrics["ties"]["logp_accuracy"] == 2
    # normalized: -0.5 - -1 = 0.5, then -1 - -1 = 0 three times
    assert metrics["normalized_logp_accuracy"] == (1 + 0.5 * 3) / 4
    assert metrics["ties"]["normalized_logp_accuracy"] == 3
    # the policy as its own reference: every reward is 0, every pair a tie, loss log 2
    assert metrics["reward_accuracy"] == 0.5
    assert metrics["loss"] == pytest.approx(np.log(2.0), rel=1e-15)


def test_a_model_trained_on_the_pairs_ranks_above_the_untrained_one(folders, tmp_path):
    config = TrainConfig(
        model=str(folders["a"]),
        data=str(folders["data"]),
        output_dir=str(tmp_path / "run"),
        max_steps=8,
        pairs_per_step=4,
        max_tokens_per_batch=256,
        learning_rate=1e-3,
        device="cpu",
        progress=False,
        report_to="none",
    )
    final = Trainer(config).train().final_dir
    untrained = str(folders["a"])
    for ref in (untrained, None):
        report = fastdpo.evaluate(
            {"untrained": untrained, "trained": str(final)},
            str(folders["data"]),
            ref=ref,
            device="cpu",
            n_boot=100,
        )
        ranking = report["ranking"]
        assert [e["model"] for e in ranking] == ["trained", "untrained"]
        assert ranking[0]["accuracy"] > ranking[1]["accuracy"]
    # the untrained policy against itself: every reward margin is exactly 0
    with_ref = fastdpo.evaluate(
        [untrained], str(folders["data"]), ref=untrained, device="cpu", n_boot=0
    )
    only = with_ref["models"][untrained]
    assert only["reward_accuracy"] == 0.5 and only["ties"]["reward_accuracy"] == len(ROWS)
    assert only["reward_accuracy_ci95"] is None


def test_a_cache_reference_equals_the_model_reference(folders, tmp_path):
    pairs, kwargs = _tokenized(folders["a"], folders["data"])
    ref_model = AutoModelForCausalLM.from_pretrained(folders["ref"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folders["ref"])
    cache = ReferenceCache.build(
        ref_model,
        pairs,
        tmp_path / "cache",
        tokenizer=tokenizer,
        tokenization=tokenization_settings(**kwargs),
        max_tokens_per_batch=512,
        progress=False,
    )
    model, data = [str(folders["a"])], str(folders["data"])
    common = dict(device="cpu", n_boot=50, beta=BETA)
    by_model = fastdpo.evaluate(model, data, ref=str(folders["ref"]), **common)
    by_path = fastdpo.evaluate(model, data, ref=str(cache.path), **common)
    by_object = fastdpo.evaluate(model, data, ref=cache, **common)
    expected = by_model["models"][str(folders["a"])]
    for report in (by_path, by_object):
        got = report["models"][str(folders["a"])]
        assert report["settings"]["ref_kind"] == "cache"
        for name in ("reward_accuracy", "reward_margin", "loss", "chosen_reward"):
            assert got[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-7), name


def test_a_cache_for_other_tokenization_is_refused_naming_the_difference(folders, tmp_path):
    pairs, kwargs = _tokenized(folders["a"], folders["data"], max_length=64)
    model = AutoModelForCausalLM.from_pretrained(folders["ref"], dtype=torch.float32)
    ReferenceCache.build(
        model,
        pairs,
        tmp_path / "cache64",
        tokenizer=AutoTokenizer.from_pretrained(folders["ref"]),
        tokenization=tokenization_settings(**kwargs),
        progress=False,
    )
    with pytest.raises(EvaluationInputError, match=r"tokenization.max_length.*precompute-ref"):
        fastdpo.evaluate(
            [str(folders["a"])], str(folders["data"]), ref=str(tmp_path / "cache64"), device="cpu"
        )


def test_rows_dropped_by_truncation_are_counted(folders):
    long_row = {"prompt": "Why? " * 40, "chosen": "Because. " * 40, "rejected": "No. " * 40}
    rows = [*ROWS, long_row]
    kwargs = dict(device="cpu", n_boot=0, tokenization={"max_prompt_length": None})
    with pytest.raises(ValueError, match="bad row"):
        fastdpo.evaluate([str(folders["a"])], rows, max_length=48, **kwargs)
    report = fastdpo.evaluate([str(folders["a"])], rows, max_length=48, on_bad_row="skip", **kwargs)
    data = report["data"]
    assert data["rows"] == len(rows) and report["pairs"] == data["pairs"] < len(rows)
    assert sum(data["skipped_tokenizing"].values()) == len(rows) - report["pairs"]


def test_bad_inputs_are_clear_errors(folders, tmp_path, capsys):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(EvaluationInputError, match="no such model folder"):
        fastdpo.evaluate([str(folders["a"]), missing], str(folders["data"]), device="cpu")
    code = cli.main(["eval", "--model", missing, "--data", str(folders["data"])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err == f"fastdpo eval: error: model {missing!r}: no such model folder {missing!r}"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no usable preference examples"):
        fastdpo.evaluate([str(folders["a"])], str(empty), device="cpu")
    singles = [{"prompt": "Hi?", "completion": "Hello.", "label": True}]
    with pytest.raises(EvaluationInputError, match="fastdpo score"):
        fastdpo.evaluate([str(folders["a"])], singles, device="cpu")
    with pytest.raises(EvaluationInputError, match="beta"):
        fastdpo.evaluate([str(folders["a"])], ROWS, beta=0.0, device="cpu")
    assert cli.main(["eval", "--model", str(folders["a"]), "--data", str(empty)]) == 2
    assert "no usable preference examples" in capsys.readouterr().err


def test_eval_command_prints_the_ranking_and_writes_the_report(folders, tmp_path, capsys):
    out = tmp_path / "reports" / "report.json"
    args = ["eval", "--model", str(folders["a"]), "--model", str(folders["b"])]
    args += ["--data", str(folders["data"]), "--ref", str(folders["ref"]), "--device", "cpu"]
    args += ["--n-boot", "50", "--report", str(out)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [e["rank"] for e in report["ranking"]] == [1, 2]
    assert {e["model"] for e in report["ranking"]} == {str(folders["a"]), str(folders["b"])}
    assert f"data: {len(ROWS)} rows; {len(ROWS)} kept" in printed
    best = report["ranking"][0]
    assert f"1     {best['model']}" in printed or best["model"] in printed.splitlines()[3]
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind


def test_loaded_modules_and_tokenized_pairs_equal_paths(folders):
    pairs, _ = _tokenized(folders["a"], folders["data"])
    model = AutoModelForCausalLM.from_pretrained(folders["a"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(folders["ref"], dtype=torch.float32)
    model.train()
    by_modules = fastdpo.evaluate({"a": model}, pairs, ref=ref, n_boot=20)
    assert model.training  # its mode is restored
    by_paths = fastdpo.evaluate(
        {"a": str(folders["a"])}, str(folders["data"]), ref=str(folders["ref"]), n_boot=20
    )
    for name in ("logp_accuracy", "reward_accuracy", "reward_margin", "loss"):
        got, expected = by_modules["models"]["a"][name], by_paths["models"]["a"][name]
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-7), name


def test_eval_generate_hands_models_prompts_judge_and_sampling_to_compare_generations(
    monkeypatch, tmp_path, capsys
):
    from fastdpo.evaluation import generation_compare

    calls = []

    def fake(models, prompts, judge, **kwargs):
        calls.append((models, prompts, judge, kwargs))
        ranking = [
            {"model": m, "mean_score": 1.0 - i, "bt_score": -float(i)} for i, m in enumerate(models)
        ]
        return {"ranking": ranking, "win_rates": {}, "judge_calls": 6}

    monkeypatch.setattr(generation_compare, "compare_generations", fake)
    assert cli.main(["eval", "--generate", "--model", "m1", "--judge", "j:f"]) == 2
    assert "--generate needs --prompts and --judge" in capsys.readouterr().err
    out = tmp_path / "gen.json"
    args = ["eval", "--generate", "--model", "m1", "--model", "m2", "--prompts", "p.txt"]
    args += ["--judge", "j:f", "--temperature", "0.5", "--seed", "4", "--report", str(out)]
    assert cli.main(args) == 0
    sampling = {"seed": 4, "device": None, "temperature": 0.5}
    assert calls == [(["m1", "m2"], "p.txt", "j:f", sampling)]
    assert "judge calls: 6" in capsys.readouterr().out
    assert json.loads(out.read_text())["judge_calls"] == 6
