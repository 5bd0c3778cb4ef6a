"""`fastdpo.implicit_reward` and `fastdpo score`: rewards equal beta * (log pi - log pi_ref) from a
direct full-logit float64 computation, for pairs and single responses, with a model or a cache
as the reference; bad inputs fail clearly."""

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
from fastdpo.evaluation.implicit_reward import score_rows
from fastdpo.evaluation.models import EvaluationInputError
from fastdpo.reference import ReferenceCache
from fastdpo.reference_fingerprint import tokenization_settings

PAIRS = [
    {
        "id": f"pair-{i}",
        "prompt": f"Question {i}: what is {i} + {i % 3}?",
        "chosen": f"The answer is {i + i % 3}." + " Thank you." * (i % 2),
        "rejected": "I do not know." + " Sorry." * (i % 3),
    }
    for i in range(6)
]
SINGLES = [{"prompt": f"Say {i}.", "completion": f"{i} " * (1 + i % 3)} for i in range(5)]
BETA = 0.25


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("score")
    return {"policy": save_tiny_model(root / "policy", 5), "ref": save_tiny_model(root / "ref", 6)}


def _tokenized(folder: Path, rows):
    kwargs = tokenization_kwargs()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenize_pairs(load_preference_data(rows), tokenizer, **kwargs), kwargs


def direct_sequence_logps(model_dir: Path, pairs) -> np.ndarray:
    """float64 [S] summed completion log-probs in packed sequence order (chosen, rejected per
    pair; the completion alone for single responses): unpacked, full logits, eager attention."""
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float64, attn_implementation="eager"
    ).eval()
    values = []
    with torch.no_grad():
        for pair in pairs:
            completions = [pair.chosen_ids] + ([pair.rejected_ids] if pair.is_paired else [])
            for completion in completions:
                ids = torch.tensor([pair.prompt_ids + completion])
                logp = torch.log_softmax(model(ids).logits[0], dim=-1)
                start = len(pair.prompt_ids)
                values.append(logp[start - 1 : -1].gather(1, ids[0, start:, None]).sum().item())
    return np.array(values)


def direct_rewards(folders, pairs) -> np.ndarray:
    policy = direct_sequence_logps(folders["policy"], pairs)
    return BETA * (policy - direct_sequence_logps(folders["ref"], pairs))


def _cache(folders, pairs, kwargs, out: Path) -> ReferenceCache:
    return ReferenceCache.build(
        AutoModelForCausalLM.from_pretrained(folders["ref"], dtype=torch.float32),
        pairs,
        out,
        tokenizer=AutoTokenizer.from_pretrained(folders["ref"]),
        tokenization=tokenization_settings(**kwargs),
        progress=False,
    )


@pytest.mark.parametrize("rows", [PAIRS, SINGLES], ids=["pairs", "single_responses"])
def test_implicit_reward_of_a_batch_equals_the_direct_computation(folders, rows, tmp_path):
    rows = rows if rows is PAIRS else [{**r, "label": True} for r in rows]
    pairs, kwargs = _tokenized(folders["policy"], rows)
    expected = direct_rewards(folders, pairs)
    policy = AutoModelForCausalLM.from_pretrained(folders["policy"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(folders["ref"], dtype=torch.float32)
    cache = _cache(folders, pairs, kwargs, tmp_path / "cache")
    batch = fastdpo.collate_pairs(list(pairs))
    for reference in (ref, cache):
        rewards = fastdpo.implicit_reward(policy, reference, batch, BETA)
        assert rewards.dtype == torch.float32 and rewards.shape == (len(expected),)
        got = rewards.detach().double().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # differentiable w.r.t. the policy
    fastdpo.implicit_reward(policy, cache, batch, BETA).sum().backward()
    assert policy.lm_head.weight.grad is not None


def test_implicit_reward_refuses_a_cache_of_other_token_ids(folders, tmp_path):
    pairs, kwargs = _tokenized(folders["policy"], PAIRS)
    cache = _cache(folders, pairs, kwargs, tmp_path / "cache")
    longer = [
        type(p)(
            example_id=p.example_id,
            prompt_ids=p.prompt_ids,
            chosen_ids=[*p.chosen_ids, 5],
            rejected_ids=p.rejected_ids,
        )
        for p in pairs
    ]
    policy = AutoModelForCausalLM.from_pretrained(folders["policy"], dtype=torch.float32)
    with pytest.raises(ValueError, match="tokenized differently"):
        fastdpo.implicit_reward(policy, cache, fastdpo.collate_pairs(longer), BETA)
    with pytest.raises(ValueError, match="beta"):
        fastdpo.implicit_reward(policy, cache, fastdpo.collate_pairs(pairs), 0.0)


def test_score_rows_equal_the_direct_computation_and_keep_ids_and_rows(folders, tmp_path):
    data = tmp_path / "mixed.jsonl"
    rows = [*PAIRS[:3], *SINGLES, *PAIRS[3:]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored, counts = score_rows(
        str(folders["policy"]), str(folders["ref"]), str(data), beta=BETA, device="cpu"
    )
    assert counts["rows"] == len(rows) == len(scored) == counts["pairs"]
    assert [s["row"] for s in scored] == list(range(len(rows)))
    assert {s["source"] for s in scored} == {str(data)}
    assert [s["id"] for s in scored[:3]] == ["pair-0", "pair-1", "pair-2"]
    labelled = [r if "completion" not in r else {**r, "label": True} for r in rows]
    pairs, _ = _tokenized(folders["policy"], labelled)
    direct = direct_rewards(folders, pairs)
    position = 0
    for out, pair in zip(scored, pairs, strict=True):
        assert out["id"] == pair.example_id
        if pair.is_paired:
            chosen, rejected = direct[position], direct[position + 1]
            position += 2
            assert out["reward_chosen"] == pytest.approx(chosen, rel=1e-5, abs=1e-6)
            assert out["reward_rejected"] == pytest.approx(rejected, rel=1e-5, abs=1e-6)
            assert out["margin"] == pytest.approx(chosen - rejected, rel=1e-5, abs=1e-6)
        else:
            assert out["reward"] == pytest.approx(direct[position], rel=1e-5, abs=1e-6)
            assert "margin" not in out
            position += 1


def test_score_command_with_a_cache_equals_it_with_the_model(folders, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    pairs, kwargs = _tokenized(folders["policy"], PAIRS)
    cache = _cache(folders, pairs, kwargs, tmp_path / "cache")
    outputs = {}
    for name, ref in (("model", folders["ref"]), ("cache", cache.path)):
        out = tmp_path / f"scores-{name}.jsonl"
        args = ["score", "--model", str(folders["policy"]), "--ref", str(ref)]
        args += ["--data", str(data), "--beta", str(BETA), "--out", str(out), "--device", "cpu"]
        assert cli.main(args) == 0
        assert f"scored {len(PAIRS)} rows" in capsys.readouterr().out
        outputs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    for by_model, by_cache in zip(outputs["model"], outputs["cache"], strict=True):
        assert by_model["id"] == by_cache["id"]
        for key in ("reward_chosen", "reward_rejected", "margin"):
            assert by_cache[key] == pytest.approx(by_model[key], rel=1e-5, abs=1e-7)
    assert sorted(p.name for p in tmp_path.glob("scores-*")) == [
        "scores-cache.jsonl",
        "scores-model.jsonl",
    ]


def test_score_bad_inputs(folders, tmp_path, capsys):
    missing = str(tmp_path / "gone")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    with pytest.raises(EvaluationInputError, match="ref: no such model folder"):
        score_rows(str(folders["policy"]), missing, str(data), device="cpu")
    args = ["score", "--model", missing, "--ref", str(folders["ref"]), "--data", str(data)]
    assert cli.main([*args, "--out", str(tmp_path / "o.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"fastdpo score: error: model: no such model folder {missing!r}"
    )
    assert not (tmp_path / "o.jsonl").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(EvaluationInputError, match="no rows"):
        score_rows(str(folders["policy"]), str(folders["ref"]), str(empty), device="cpu")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PAIRS[0]) + "\n{not json\n" + json.dumps(SINGLES[0]) + "\n")
    with pytest.raises(ValueError, match="row 1"):
        score_rows(str(folders["policy"]), str(folders["ref"]), str(bad), device="cpu")
    scored, counts = score_rows(
        str(folders["policy"]), str(folders["ref"]), str(bad), device="cpu", on_bad_row="skip"
    )
    assert [s["row"] for s in scored] == [0, 2]
    assert sum(counts["skipped_loading"].values()) == 1
