"""`fastdpo sweep` (one reference cache for every run, held-out comparison) and `fastdpo iterate`
(sample -> judge -> train rounds; on the demo's task the judge's mean score rises)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from evaluation_fixtures import save_tiny_model

from fastdpo.cli import main
from fastdpo.evaluation.iterate import IterateSettings, run_iterate
from fastdpo.evaluation.sampling import SamplingSettings
from fastdpo.evaluation.sweep import SweepRun, parse_list, pick_best, run_sweep
from fastdpo.reference import ReferenceCache
from fastdpo.train.config import ConfigError, TrainConfig

ROWS = [
    {
        "prompt": f"Question {i}: what is {i} + {i % 3}?",
        "chosen": f"The answer is {i + i % 3}." + " Thank you." * (i % 2),
        "rejected": "I do not know." + " Sorry." * (i % 3),
    }
    for i in range(16)
]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    return _write_jsonl(root / "train.jsonl", ROWS[:12]), _write_jsonl(
        root / "eval.jsonl", ROWS[12:]
    )


def base_config(model_dir, data_files, output_dir, **overrides) -> TrainConfig:
    values = {
        "model": str(model_dir),
        "data": str(data_files[0]),
        "eval_data": str(data_files[1]),
        "output_dir": str(output_dir),
        "max_steps": 2,
        "pairs_per_step": 4,
        "max_tokens_per_batch": 256,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "device": "cpu",
        "progress": False,
        "report_to": "none",
        **overrides,
    }
    return TrainConfig(**values)


# ------------------------------------------------------------------------------------------------
# sweep


def _naive_logps(model, tokenizer, rows) -> torch.Tensor:
    """fp64 [P, 2] summed completion log-probs (chosen, rejected) from full logits."""
    out = torch.zeros(len(rows), 2, dtype=torch.float64)
    for p, row in enumerate(rows):
        prompt = tokenizer(row["prompt"])["input_ids"]
        for c, key in enumerate(("chosen", "rejected")):
            completion = tokenizer(row[key], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + completion + [tokenizer.eos_token_id]])
            with torch.no_grad():
                logps = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            picked = logps[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
            out[p, c] = picked[len(prompt) - 1 :].sum()
    return out


def test_a_sweep_builds_the_reference_once_and_measures_each_run_held_out(
    model_dir, data_files, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    builds = []
    original_build = ReferenceCache.build.__func__

    def counting_build(cls, *args, **kwargs):
        builds.append(Path(args[2] if len(args) > 2 else kwargs["out"]))
        return original_build(cls, *args, **kwargs)

    monkeypatch.setattr(ReferenceCache, "build", classmethod(counting_build))
    config = base_config(model_dir, data_files, tmp_path / "sweep")
    printed = []
    result = run_sweep(config, betas=[0.1, 0.5], losses=["sigmoid", "ipo"], print_fn=printed.append)

    names = [run.name for run in result.runs]
    assert names == ["beta0.1-sigmoid", "beta0.1-ipo", "beta0.5-sigmoid", "beta0.5-ipo"]
    # One reference pass (train + eval split) for the four runs; the others reuse it.
    first = tmp_path / "sweep" / "beta0.1-sigmoid" / "reference"
    assert sorted(builds) == [first / "eval", first / "train"]
    assert [run.reference_built for run in result.runs] == [True, False, False, False]
    for run in result.runs:
        assert run.reference_caches == {"train": str(first / "train"), "eval": str(first / "eval")}

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = _naive_logps(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, ROWS[12:])
    for run in result.runs:
        final = AutoModelForCausalLM.from_pretrained(Path(run.output_dir) / "final")
        logratio = _naive_logps(final, tokenizer, ROWS[12:]) - reference
        margin = logratio[:, 0] - logratio[:, 1]
        assert margin.abs().min() > 1e-3  # accuracies below are not decided by rounding
        m = run.metrics
        assert m["reward_accuracy"] == float((margin > 0).double().mean())
        assert m["logratio_margin"] == pytest.approx(float(margin.mean()), abs=1e-4)
        assert m["reward_margin"] == pytest.approx(run.beta * float(margin.mean()), abs=1e-4)
        assert m["drift_chosen"] == pytest.approx(float(logratio[:, 0].mean()), abs=1e-4)
        assert m["drift_rejected"] == pytest.approx(float(logratio[:, 1].mean()), abs=1e-4)
        assert m["drift_abs"] == pytest.approx(float(logratio.abs().mean()), abs=1e-4)
        assert m["drift_abs"] > 0  # the policies moved

    assert result.best is pick_best(result.runs)
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved["best"] == result.best.name and len(saved["runs"]) == 4
    assert result.plot == tmp_path / "sweep" / "sweep.png" and result.plot.exists()
    table = "\n".join(result.table_lines())
    assert f"* {result.best.name}" in table
    assert "reference cache computed 1 time(s) (beta0.1-sigmoid), shared by all 4 runs" in table


def test_the_best_run_has_the_highest_accuracy_then_the_least_drift():
    def run(name, accuracy, drift):
        return SweepRun(
            name=name,
            beta=0.1,
            loss="sigmoid",
            output_dir=name,
            metrics={"reward_accuracy": accuracy, "drift_abs": drift},
        )

    runs = [run("a", 0.75, 0.1), run("b", 0.875, 0.9), run("c", 0.875, 0.4), run("d", 0.5, 0.0)]
    assert pick_best(runs).name == "c"
    assert pick_best([run("x", 0.5, 0.2), run("y", 0.5, 0.2)]).name == "x"


def test_sweep_mistakes_are_clear_errors(model_dir, data_files, tmp_path, capsys):
    with pytest.raises(ValueError, match="--beta: cannot read"):
        parse_list("0.1,big", float, "beta")
    with pytest.raises(ValueError, match="repeats a value"):
        parse_list("0.1,0.1", float, "beta")
    with pytest.raises(ValueError, match="comma-separated"):
        parse_list("0.1,", float, "beta")
    no_eval = base_config(model_dir, data_files, tmp_path / "s", eval_data=None)
    with pytest.raises(ConfigError, match="set eval_data"):
        run_sweep(no_eval, betas=[0.1])
    with pytest.raises(ConfigError, match="unknown loss 'ipoo'"):
        run_sweep(base_config(model_dir, data_files, tmp_path / "s"), losses=["ipoo"])
    with pytest.raises(ConfigError, match="'simpo' is reference-free"):
        run_sweep(base_config(model_dir, data_files, tmp_path / "s"), losses=["simpo"])
    assert not (tmp_path / "s").exists()  # every combination is checked before any trains

    config_file = tmp_path / "sweep.yaml"
    config_file.write_text(
        yaml.safe_dump(base_config(model_dir, data_files, tmp_path / "c").to_dict())
    )
    assert main(["sweep", str(config_file), "--beta", "0.1,x"]) == 2
    assert (
        capsys.readouterr().err
        == "fastdpo sweep: error: --beta: cannot read '0.1,x' as float values\n"
    )
    assert main(["sweep", str(config_file), "--beta", "0.2", "--loss", "hinge"]) == 0
    out = capsys.readouterr().out
    assert "* beta0.2-hinge" in out and "sweep.json" in out


# ------------------------------------------------------------------------------------------------
# iterate


def length_judge(prompt, response):
    return float(len(response))


def test_iterate_rounds_write_pairs_models_and_records(model_dir, data_files, tmp_path):
    config = base_config(model_dir, data_files, tmp_path / "it", max_steps=1, eval_data=None)
    settings = IterateSettings(
        rounds=2,
        judge=length_judge,
        sampling=SamplingSettings(num_samples=3, max_new_tokens=6, seed=5),
        reference="original",
    )
    result = run_iterate(config, settings, print_fn=lambda line: None)
    root = tmp_path / "it"
    for k in (1, 2):
        folder = root / f"round_{k}"
        record = json.loads((folder / "round.json").read_text())
        pairs = json.loads((folder / "pairs.summary.json").read_text())
        assert record["mean_score"] == pairs["mean_score"] == result.mean_scores[k - 1]
        assert record["pairs"] == pairs["pairs"] > 0
        # seeds move on by one per round, so rounds draw different samples
        assert pairs["sampling"]["seed"] == 5 + k - 1
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert saved["data"] == str(folder / "pairs.jsonl")
        assert saved["ref_model"] == str(model_dir)  # reference="original"
        assert (folder / "final" / "config.json").exists()
    assert result.rounds[1].policy == str(root / "round_1" / "final")
    summary = json.loads((root / "iterate.json").read_text())
    assert summary["mean_scores"] == result.mean_scores and len(result.mean_scores) == 3
    assert summary["final_model"] == str(root / "round_2" / "final")
    assert (root / "iterate.png").exists()


def test_iterate_from_the_command_line_with_the_round_start_reference(
    model_dir, data_files, tmp_path, monkeypatch, capsys
):
    (tmp_path / "iterate_judges.py").write_text(
        "def length(prompt, response):\n    return float(len(response))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = base_config(model_dir, data_files, tmp_path / "cli", max_steps=1, eval_data=None)
    config_file = tmp_path / "it.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    argv = [
        "iterate",
        str(config_file),
        "--rounds",
        "2",
        "--judge",
        "iterate_judges:length",
        "--num-samples",
        "2",
        "--max-new-tokens",
        "4",
    ]
    assert main(argv) == 0
    assert "after round" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "cli" / "round_2" / "config.yaml").read_text())
    assert saved["ref_model"] == saved["model"] == str(tmp_path / "cli" / "round_1" / "final")
    assert (
        main(
            [
                *argv[:4],
                "--judge",
                "iterate_judges:length",
                "--prompts",
                str(tmp_path / "none.jsonl"),
                "--output-dir",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "none.jsonl does not exist" in capsys.readouterr().err


def test_two_rounds_on_the_demo_task_raise_the_judges_mean_score(tmp_path):
    """The demo's toy task: a warm-up model answers politely about half the time; two rounds
    of sampling, judging with the task's program judge and DPO (+NLL) make it more polite."""
    from fastdpo.demo.model import save_base_model
    from fastdpo.demo.settings import ModelSize
    from fastdpo.demo.task import judge, make_task
    from fastdpo.train.trainer import Trainer

    task = make_task(seed=0)
    base = save_base_model(tmp_path / "base", ModelSize(), seed=0)
    common = {
        "max_length": 64,
        "max_tokens_per_batch": 4096,
        "device": "cpu",
        "progress": False,
        "report_to": "none",
        "logging_steps": 5,
        "seed": 0,
    }
    sft = Trainer(
        TrainConfig(
            model=str(base),
            data=str(_write_jsonl(tmp_path / "sft.jsonl", task.sft_rows)),
            output_dir=str(tmp_path / "sft"),
            loss="sft",
            reference="none",
            num_train_epochs=10.0,
            learning_rate=3e-3,
            warmup_ratio=0.05,
            pairs_per_step=16,
            **common,
        )
    ).train()
    prompts = task.heldout_prompts[:40]
    config = TrainConfig(
        model=str(sft.final_dir),
        data=str(tmp_path / "sft.jsonl"),
        output_dir=str(tmp_path / "it"),
        loss={"sigmoid": 1.0, "sft": 1.0},
        beta=0.1,
        learning_rate=3e-4,
        num_train_epochs=8.0,
        pairs_per_step=8,
        **common,
    )
    settings = IterateSettings(
        rounds=2,
        judge=judge,
        prompts=prompts,
        sampling=SamplingSettings(num_samples=4, max_new_tokens=24),
    )
    result = run_iterate(config, settings, print_fn=lambda line: None)
    start, after_one, after_two = result.mean_scores
    assert 0.3 < start < 0.6  # the warm-up model signs off either way
    assert after_one > start and after_two > start + 0.15
    assert all(record.pairs >= 20 for record in result.rounds)
