"""The trainer: accumulation, data order, resume, checkpoints, final model, logs, refusals."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml

from fastdpo.testing.models import tiny_model
from fastdpo.testing.tokenizer import build_tiny_tokenizer
from fastdpo.train import data as train_data
from fastdpo.train.config import ConfigError, TrainConfig
from fastdpo.train.step import LossSettings, train_step
from fastdpo.train.trainer import NonFiniteLossError, Trainer

ROWS = [
    {
        "prompt": f"Question {i}: what is {i} + {i % 3}?",
        "chosen": f"The answer is {i + i % 3}." + " Thank you." * (i % 2),
        "rejected": "I do not know." + " Sorry." * (i % 3),
    }
    for i in range(12)
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama and its tokenizer, saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("model")
    tokenizer = build_tiny_tokenizer()
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def make_config(model_dir, data_file, output_dir, **overrides) -> TrainConfig:
    values = {
        "model": str(model_dir),
        "data": str(data_file),
        "output_dir": str(output_dir),
        "max_steps": 4,
        "pairs_per_step": 4,
        "max_tokens_per_batch": 256,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "linear",
        "logging_steps": 1,
        "device": "cpu",
        "progress": False,
        "report_to": "none",
        **overrides,
    }
    return TrainConfig(**values)


def train_losses(history) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in history if "loss" in row}


# ------------------------------------------------------------------------------------------------
# Config


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'betta'; did you mean 'beta'"):
        TrainConfig.from_dict({"model": "m", "data": "d", "betta": 0.1})
    with pytest.raises(ConfigError, match=r"loss_type.*equivalent is loss"):
        TrainConfig.from_dict({"model": "m", "data": "d", "loss_type": "sigmoid"})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("beta", -1.0, "beta: got -1.0; allowed: a finite number > 0"),
        ("pairs_per_step", 0, "pairs_per_step: got 0; allowed: an integer >= 1"),
        ("dtype", "fp8", "dtype: got 'fp8'; allowed: auto, float32, bfloat16"),
        ("lr_scheduler_type", "cosinus", "lr_scheduler_type: got 'cosinus'; allowed: linear"),
        ("max_length", "long", "max_length: got 'long' (str); allowed: int"),
        ("add_eos", 1, "add_eos: got 1 (int); allowed: bool"),
        ("loss", "dpo", "loss: unknown loss 'dpo'"),
        ("reference", "none", "reference: 'none' is allowed only for reference-free losses"),
        ("label_smoothing", 0.1, None),
        ("gamma", 0.5, "gamma: not a parameter of loss 'sigmoid'"),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_is_allowed(key, value, expected):
    values = {"model": "m", "data": "d", key: value}
    if expected is None:
        assert TrainConfig.from_dict(values).loss_params == {key: value}
        return
    with pytest.raises(ConfigError) as error:
        TrainConfig.from_dict(values)
    assert str(error.value).startswith(expected)


def test_yaml_scientific_notation_and_schedulers(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: d\nlearning_rate: 5e-7\nadam_epsilon: 1e-8\n")
    config = TrainConfig.from_yaml(path)  # PyYAML reads 5e-7 (no dot) as a string
    assert (config.learning_rate, config.adam_epsilon) == (5e-7, 1e-8)
    with pytest.raises(ConfigError, match="reduce_lr_on_plateau' needs arguments"):
        TrainConfig(model="m", data="d", lr_scheduler_type="reduce_lr_on_plateau")
    from transformers import SchedulerType

    from fastdpo.train.optim import build_optimizer, build_scheduler

    model = torch.nn.Linear(2, 2)
    for kind in SchedulerType:
        try:
            config = TrainConfig(model="m", data="d", lr_scheduler_type=kind.value)
        except ConfigError:
            continue
        optimizer = build_optimizer(model, config)
        scheduler = build_scheduler(optimizer, config, total_steps=4)
        optimizer.step()
        scheduler.step()  # every accepted name steps without extra arguments


def test_yaml_with_overrides_round_trips(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {"model": "m", "data": "d.jsonl", "beta": 0.3, "gamma": 1.0, "loss": "simpo"}
        )
    )
    config = TrainConfig.from_yaml(path, {"beta": 0.5, "max_length": 64})
    assert (config.beta, config.max_length, config.loss_params) == (0.5, 64, {"gamma": 1.0})
    config.save_yaml(tmp_path / "saved.yaml")
    assert TrainConfig.from_yaml(tmp_path / "saved.yaml") == config


# ------------------------------------------------------------------------------------------------
# Data order


def test_every_pair_once_per_epoch_and_the_order_is_a_function_of_seed_and_epoch():
    plan = train_data.StepPlan(num_pairs=10, pairs_per_step=4, seed=3)
    assert plan.steps_per_epoch == 3
    for epoch in range(3):
        steps = [plan.step_pairs(epoch, s) for s in range(plan.steps_per_epoch)]
        assert [len(s) for s in steps] == [4, 4, 2]
        assert sorted(i for s in steps for i in s) == list(range(10))
        assert steps == [plan.step_pairs(epoch, s) for s in range(3)]
    assert plan.step_pairs(0, 0) != plan.step_pairs(1, 0) or plan.step_pairs(
        0, 1
    ) != plan.step_pairs(1, 1)
    other_seed = train_data.StepPlan(num_pairs=10, pairs_per_step=4, seed=4)
    assert plan.epoch_order(0).tolist() != other_seed.epoch_order(0).tolist()
    assert plan.position(7) == (2, 1)


def test_rank_shares_split_a_step_without_splitting_pairs_and_balance_tokens():
    sizes = [100, 90, 80, 30, 20, 10, 5, 5]
    indices = list(range(8))
    shares = [train_data.rank_share(indices, sizes, r, 2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == indices
    loads = [sum(sizes[i] for i in share) for share in shares]
    assert abs(loads[0] - loads[1]) <= max(sizes)
    assert train_data.rank_share(indices, sizes, 0, 1) == indices


# ------------------------------------------------------------------------------------------------
# Gradient accumulation


def _pairs(tokenizer):
    from fastdpo import load_preference_data, tokenize_pairs

    return tokenize_pairs(load_preference_data(ROWS[:8]), tokenizer, max_length=64)


@pytest.mark.parametrize(
    ("loss", "params"),
    [
        ("sigmoid", {}),
        ("ipo", {}),
        ("simpo", {"gamma": 0.5}),
        ("orpo", {}),  # token-mean NLL over the step's chosen tokens
        ({"sigmoid": 1.0, "sft": 1.0}, {}),  # RPO
    ],
    ids=["sigmoid", "ipo", "simpo", "orpo", "rpo"],
)
def test_one_micro_batch_and_four_give_the_same_loss_and_gradient(loss, params):
    tokenizer = build_tiny_tokenizer()
    pairs = _pairs(tokenizer)
    reference = _FixedReference(pairs)
    grads, losses, counts = [], [], []
    largest = max(p.num_tokens for p in pairs)
    for budget in (4096, largest + 8):  # everything in one batch; then about one pair each
        model = tiny_model("llama", vocab_size=len(tokenizer))
        model.train()
        batches = list(
            train_data.micro_batches(
                pairs, list(range(8)), max_tokens_per_batch=budget, seed=0, epoch=0
            )
        )
        counts.append(len(batches))
        out = train_step(
            model,
            batches,
            step_pairs=8,
            reference=reference,
            settings=LossSettings(loss=loss, beta=0.1, params=params),
            device=torch.device("cpu"),
            autocast=_no_autocast,
        )
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        losses.append(out.loss)
        assert out.pairs == 8
    assert counts[0] == 1 and counts[1] >= 4
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)
    # fp32 summation order only: elements far below the largest differ by rounding of it
    scale = float(grads[0].abs().max())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6 * scale)
    assert grads[0].abs().sum() > 0


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()


class _FixedReference:
    """Stand-in cache: distinct reference log-probs per example (so the loss is not log 2)."""

    def __init__(self, pairs):
        self.values = {p.example_id: (-1.0 - i, -2.0 + 0.5 * i) for i, p in enumerate(pairs)}

    def for_batch(self, batch):
        from types import SimpleNamespace

        chosen = torch.tensor([self.values[e][0] for e in batch.example_ids])
        rejected = torch.tensor([self.values[e][1] for e in batch.example_ids])
        return SimpleNamespace(chosen=chosen, rejected=rejected)


def test_the_nll_of_a_split_step_is_the_token_mean_of_the_whole_step():
    """Pairs with very different chosen lengths: a mean of per-batch token means would differ."""
    tokenizer = build_tiny_tokenizer()
    pairs = _pairs(tokenizer)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    batches = list(
        train_data.micro_batches(pairs, list(range(8)), max_tokens_per_batch=60, seed=0, epoch=0)
    )
    assert len(batches) > 2
    out = train_step(
        model,
        batches,
        step_pairs=8,
        reference=None,
        settings=LossSettings(loss="sft"),
        device=torch.device("cpu"),
        autocast=_no_autocast,
    )
    with torch.no_grad():
        logps = [fastdpo_sequence_logps(model, b) for b in batches]
    total = sum(float(o.chosen.sum()) for o in logps)
    tokens = sum(int(o.chosen_lengths.sum()) for o in logps)
    assert float(out.loss) == pytest.approx(-total / tokens, rel=1e-6)
    assert float(out.metrics["nll_loss"]) == pytest.approx(-total / tokens, rel=1e-6)


def fastdpo_sequence_logps(model, batch):
    from fastdpo import sequence_logps

    return sequence_logps(model, batch)


# ------------------------------------------------------------------------------------------------
# Whole runs


def test_a_run_learns_and_writes_what_it_promises(model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    config = make_config(
        model_dir,
        data_file,
        out,
        eval_fraction=0.25,
        eval_steps=2,
        save_steps=2,
        save_total_limit=1,
        report_to="auto",
    )
    result = Trainer(config).train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == result.history
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for key in (
        "epoch",
        "learning_rate",
        "grad_norm",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "tokens_per_second",
        "pairs_per_second",
        "packing_efficiency",
        "peak_memory_mb",
    ):
        assert all(isinstance(r[key], (int, float)) for r in train_rows), key
    assert train_rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # policy == reference
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.05
    assert train_rows[0]["epoch"] == pytest.approx(1 / 3)  # 9 pairs, 3 steps an epoch
    assert 0 < train_rows[0]["packing_efficiency"] <= 1
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in eval_rows] == [2, 4]
    assert all("eval/rewards/accuracies" in r for r in eval_rows)
    # checkpoints: only the newest kept; the config saved beside the run and inside it
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-4"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["beta"] == 0.1 and saved == yaml.safe_load(
        (out / "checkpoint-4" / "config.yaml").read_text()
    )
    assert (out / "curves.png").stat().st_size > 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # the final model loads with plain transformers and prefers the chosen held-out answers
    assert eval_rows[-1]["eval/rewards/margins"] > 0.05
    assert eval_rows[-1]["eval/loss"] < 0.693147 - 0.02
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert AutoTokenizer.from_pretrained(result.final_dir).pad_token == "<|pad|>"
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    moved = sum(
        (a - b).abs().sum() for a, b in zip(final.parameters(), start.parameters(), strict=True)
    )
    assert moved > 0


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-dropout"])
def test_a_resumed_run_logs_the_same_rows_as_an_uninterrupted_one(
    model_dir, data_file, tmp_path, lora
):
    """Resumed at step 3, inside a logging window of 2 steps (the window is in the checkpoint),
    with LoRA dropout drawing from the restored RNG in the LoRA case."""
    import shutil

    extra = {"lora_r": 4, "lora_dropout": 0.3} if lora else {}
    settings = dict(max_steps=6, save_steps=1, logging_steps=2, **extra)
    whole = Trainer(make_config(model_dir, data_file, tmp_path / "a", **settings)).train()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for later in ("checkpoint-4", "checkpoint-5", "checkpoint-6", "final"):
        shutil.rmtree(tmp_path / "b" / later)
    config = make_config(
        model_dir,
        data_file,
        tmp_path / "b",
        **settings,
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"),
    )
    resumed = Trainer(config).train()
    expected = {r["step"]: r for r in whole.history}
    got = {r["step"]: r for r in resumed.history}
    assert sorted(got) == [2, 4, 6]
    for step in (4, 6):
        for key in ("loss", "grad_norm", "rewards/margins", "learning_rate"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-6, abs=1e-7), (
                step,
                key,
            )
    assert got[6]["loss"] < got[2]["loss"]  # the steps really trained


def test_a_resume_with_other_data_order_settings_is_refused(model_dir, data_file, tmp_path):
    Trainer(make_config(model_dir, data_file, tmp_path, max_steps=1)).train()
    with pytest.raises(ConfigError, match=r"seed \(42 -> 7\)"):
        Trainer(
            make_config(
                model_dir, data_file, tmp_path, max_steps=2, seed=7, resume_from_checkpoint="latest"
            )
        )


def test_a_fresh_run_over_another_run_is_refused_unless_overwrite(model_dir, data_file, tmp_path):
    Trainer(make_config(model_dir, data_file, tmp_path, max_steps=1)).train()
    with pytest.raises(ConfigError, match=r"output_dir: .* holds another run"):
        Trainer(make_config(model_dir, data_file, tmp_path, max_steps=1))
    trainer = Trainer(
        make_config(model_dir, data_file, tmp_path, max_steps=2, overwrite_output_dir=True)
    )
    assert not trainer.reference.built  # the kept cache matched
    assert not (tmp_path / "checkpoint-1").exists()
    trainer.train()
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2]


def test_latest_resumes_from_the_newest_checkpoint(model_dir, data_file, tmp_path):
    Trainer(make_config(model_dir, data_file, tmp_path, max_steps=2, save_steps=1)).train()
    trainer = Trainer(
        make_config(model_dir, data_file, tmp_path, max_steps=3, resume_from_checkpoint="latest")
    )
    assert trainer.state.global_step == 2
    assert trainer.reference.built is False  # the run directory's cache matched: reused


def test_a_crash_while_saving_leaves_the_previous_checkpoint_usable(
    model_dir, data_file, tmp_path, monkeypatch
):
    from fastdpo.train import checkpoint as checkpoint_module

    trainer = Trainer(make_config(model_dir, data_file, tmp_path, max_steps=2, save_steps=1))
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if "checkpoint-2" in str(path) and str(path).endswith("scheduler.pt"):
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    assert [p.name for p in checkpoint_module.checkpoint_dirs(tmp_path)] == ["checkpoint-1"]
    monkeypatch.undo()
    resumed = Trainer(
        make_config(model_dir, data_file, tmp_path, max_steps=2, resume_from_checkpoint="latest")
    )
    assert resumed.state.global_step == 1


def test_sigterm_saves_a_checkpoint_and_returns(model_dir, data_file, tmp_path, monkeypatch):
    from fastdpo.train import trainer as trainer_module

    real_step = trainer_module.train_step
    calls = {"n": 0}

    def step_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGTERM)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", step_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    result = Trainer(make_config(model_dir, data_file, tmp_path, max_steps=4)).train()
    assert result.interrupted and result.stop_signal == signal.SIGTERM
    assert result.global_step == 2 and result.final_dir is None
    assert result.last_checkpoint == tmp_path / "checkpoint-2"
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_signal_during_the_last_step_lets_the_run_finish(
    model_dir, data_file, tmp_path, monkeypatch
):
    from fastdpo.train import trainer as trainer_module

    real_step = trainer_module.train_step
    calls = {"n": 0}

    def signal_in_last_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", signal_in_last_step)
    result = Trainer(make_config(model_dir, data_file, tmp_path, max_steps=2)).train()
    assert not result.interrupted and result.final_dir == tmp_path / "final"


def test_a_non_finite_gradient_names_the_last_good_checkpoint(
    model_dir, data_file, tmp_path, monkeypatch
):
    from fastdpo.train import trainer as trainer_module

    trainer = Trainer(make_config(model_dir, data_file, tmp_path, max_steps=3, save_steps=1))
    real_step = trainer_module.train_step
    calls = {"n": 0}

    def poison_gradients_in_step_2(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            next(trainer.model.parameters()).grad[0, 0] = float("inf")
        return out

    monkeypatch.setattr(trainer_module, "train_step", poison_gradients_in_step_2)
    with pytest.raises(NonFiniteLossError) as error:
        trainer.train()
    message = str(error.value)
    assert message.startswith("step 2: non-finite gradient norm")
    assert f"last good checkpoint: {tmp_path / 'checkpoint-1'}" in message


def test_a_non_finite_loss_stops_the_run_naming_step_and_examples(
    model_dir, data_file, tmp_path, monkeypatch
):
    from fastdpo.train import step as step_module

    real_loss = step_module.preference_loss

    def nan_loss(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        return loss * float("nan"), metrics

    trainer = Trainer(make_config(model_dir, data_file, tmp_path, max_steps=3, save_steps=1))
    monkeypatch.setattr(step_module, "preference_loss", nan_loss)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(NonFiniteLossError) as error:
        trainer.train()
    message = str(error.value)
    assert message.startswith("step 1: non-finite loss")
    ids = trainer.plan.step_pairs(0, 0)
    assert all(trainer.data.train[i].example_id in message for i in ids)
    assert "last good checkpoint: none saved yet" in message
    after = list(trainer.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_reference_free_losses_skip_the_reference(model_dir, data_file, tmp_path):
    config = make_config(
        model_dir, data_file, tmp_path, loss="simpo", max_steps=1, loss_params={"gamma": 0.5}
    )
    trainer = Trainer(config)
    assert trainer.reference.train is None
    assert not (tmp_path / "reference").exists()
    trainer.train()


def test_a_sibling_runs_cache_is_reused_by_fingerprint(model_dir, data_file, tmp_path):
    first = Trainer(make_config(model_dir, data_file, tmp_path / "beta0.1", max_steps=1))
    assert first.reference.built
    second = Trainer(make_config(model_dir, data_file, tmp_path / "beta0.5", max_steps=1, beta=0.5))
    assert not second.reference.built
    assert second.reference.train.path == tmp_path / "beta0.1" / "reference" / "train"
    # another tokenization: the fingerprint differs, so the cache is not reused
    third = Trainer(
        make_config(model_dir, data_file, tmp_path / "short", max_steps=1, max_length=24)
    )
    assert third.reference.built


def test_lora_trains_adapters_only_with_a_frozen_head(model_dir, data_file, tmp_path):
    pytest.importorskip("peft")
    config = make_config(model_dir, data_file, tmp_path, max_steps=2, lora_r=4, save_merged=True)
    trainer = Trainer(config)
    head = trainer.model.get_base_model().lm_head.weight
    assert not head.requires_grad
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    result = trainer.train()
    assert (result.final_dir / "adapter_model.safetensors").exists()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(result.final_dir / "merged")
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    assert torch.equal(merged.lm_head.weight, start.lm_head.weight)
    q_moved = (
        (
            merged.model.layers[0].self_attn.q_proj.weight
            - start.model.layers[0].self_attn.q_proj.weight
        )
        .abs()
        .sum()
    )
    assert q_moved > 0


def test_a_pair_longer_than_the_budget_is_an_error_naming_the_key(model_dir, data_file, tmp_path):
    with pytest.raises(ConfigError, match=r"max_tokens_per_batch: .* raise max_tokens_per_batch"):
        Trainer(make_config(model_dir, data_file, tmp_path, max_tokens_per_batch=20))
