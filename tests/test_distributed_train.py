"""Training under torchrun: 2 processes (gloo, CPU) against 1 on the same global batches.

DDP and FSDP2 runs must log the same losses and end with the same weights as one process,
resume on 1 process from a 2-process checkpoint on the same loss curve, reuse the reference
cache the 2 processes built, write a final folder `from_pretrained` loads, and end both ranks
with the failing rank's error (not a hang) when one rank fails.

Each torchrun launch uses `--standalone` (its rendezvous store binds port 0: concurrent test
workers never share a port) and the pytest process's thread count (CPU matmuls round
differently with another one).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fastdpo.testing.models import tiny_model
from fastdpo.testing.tokenizer import build_tiny_tokenizer
from fastdpo.train.config import TrainConfig
from fastdpo.train.trainer import Trainer

# 12 rows, one held out: 11 training pairs of 45-72 tokens. 5 pairs per step gives steps of
# 5, 5, 1 pairs (the third leaves one rank without a pair); a 130-token budget packs about two
# pairs per micro-batch, so the ranks' micro-batch counts differ (FSDP2 fillers).
ROWS = [
    {
        "prompt": f"Question {i}: what is {i} + {i % 3}?",
        "chosen": f"The answer is {i + i % 3}." + " Thank you." * (i % 4),
        "rejected": "I do not know." + " Sorry." * (i % 3),
    }
    for i in range(12)
]
STEPS = 4
SETTINGS = {
    "max_steps": STEPS,
    "pairs_per_step": 5,
    "max_tokens_per_batch": 130,
    "eval_fraction": 0.1,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "linear",
    "logging_steps": 1,
    "save_steps": 2,
    "device": "cpu",
    "progress": False,
    "report_to": "none",
}
# Sums over ranks in another order than one process's: fp32 rounding, compounded by AdamW over
# 4 steps. Measured on the 2-core CPU (2026-12-03): metrics within 1.6e-6 relative, weights
# within 3e-7 absolute (2e-8 relative per tensor), for DDP and FSDP2 alike.
LOSS_TOLERANCE = {"rel": 1e-5, "abs": 1e-7}
WEIGHT_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
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


def config_values(model_dir: Path, data_file: Path, output_dir: Path, **extra) -> dict:
    return {
        "model": str(model_dir),
        "data": str(data_file),
        "output_dir": str(output_dir),
        **SETTINGS,
        **extra,
    }


@pytest.fixture(scope="module")
def one_process(model_dir, data_file, tmp_path_factory):
    """The reference run: one process, the same global steps."""
    out = tmp_path_factory.mktemp("runs") / "one"
    result = Trainer(TrainConfig(**config_values(model_dir, data_file, out))).train()
    return out, result.history


def torchrun(args: list[str], *, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def assert_same_run(got_rows: list[dict], expected_rows: list[dict]) -> None:
    """The same steps, losses, reward metrics, gradient norms and eval row."""
    assert [r["step"] for r in got_rows] == [r["step"] for r in expected_rows]
    for got, expected in zip(got_rows, expected_rows, strict=True):
        keys = [k for k in expected if k.startswith(("loss", "eval/", "rewards/", "grad_norm"))]
        assert keys
        for key in keys:
            assert got[key] == pytest.approx(expected[key], **LOSS_TOLERANCE), (got["step"], key)
        for key in ("learning_rate", "epoch"):
            if key in expected:
                assert got[key] == expected[key]


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    moved = 0
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, **WEIGHT_TOLERANCE, msg=name)
        moved += int(not torch.equal(tensor, final_weights_initial[name]))
    assert moved > len(expected) // 2  # the runs really trained


final_weights_initial: dict[str, torch.Tensor] = {}


@pytest.fixture(scope="module", autouse=True)
def _initial_weights(model_dir):
    final_weights_initial.update(load_file(model_dir / "model.safetensors"))


# ------------------------------------------------------------------------------------------------
# DDP: through the command line, `torchrun -m fastdpo train CONFIG.yaml`


def test_ddp_two_processes_match_one(model_dir, data_file, tmp_path, one_process):
    one_out, _ = one_process
    out = tmp_path / "ddp"
    config = tmp_path / "ddp.yaml"
    config.write_text(
        yaml.safe_dump(config_values(model_dir, data_file, out, strategy="ddp", save_steps=None))
    )
    proc = torchrun(["-m", "fastdpo", "train", str(config)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "strategy ddp (ddp: as configured)" in proc.stderr
    rows = metrics(out)
    assert_same_run(rows, metrics(one_out))
    train_rows = [r for r in rows if "loss" in r]
    # pairs are global: 5, 5, 1, 5 pairs in steps 1-4 (one process logs the same)
    assert [r["pairs_per_second"] > 0 for r in train_rows] == [True] * STEPS
    shares = [r["worst_rank_token_share"] for r in train_rows]
    assert all(0.5 <= s < 0.7 for s in shares[:2]) and shares[2] == 1.0  # step 3: one pair
    assert_same_weights(final_weights(out), final_weights(one_out))
    assert not (out / ".tmp-final").exists()


# ------------------------------------------------------------------------------------------------
# FSDP2: a script that watches the head weight the fused op sees and counts micro-batches

_FSDP2_SCRIPT = """
import json, sys
import torch.distributed as dist
from torch.distributed.tensor import DTensor
import fastdpo.model as model_module
from fastdpo.train import step as step_module, trainer as trainer_module
from fastdpo.train.config import TrainConfig
from fastdpo.train.trainer import Trainer

values = json.loads(open(sys.argv[1]).read())
head_seen, fillers = [], []
original_op, original_step = model_module.linear_logprobs, step_module.train_step

def watch_op(hidden, weight, *args, **kwargs):
    head_seen.append([type(weight).__name__, list(weight.shape)])
    return original_op(hidden, weight, *args, **kwargs)

def watch_step(model, batches, **kwargs):
    batches = list(batches)
    fillers.append([len(batches), len(list(kwargs.get("filler_batches", ())))])
    return original_step(model, batches, **kwargs)

model_module.linear_logprobs = watch_op
trainer_module.train_step = watch_step
trainer = Trainer(TrainConfig(**values))
head_seen.clear()  # the reference pass (rank 0 computes the only shard) is not training
head = trainer.model.lm_head.weight
before = [type(head).__name__, list(head.to_local().shape)]
trainer.train()
head = trainer.model.lm_head.weight  # after training: sharded again
after = [type(head).__name__, list(head.to_local().shape), list(head.shape)]
rank = trainer.rank
with open(values["output_dir"] + f"/../fsdp2-rank{rank}.json", "w") as f:
    json.dump({"head_seen": head_seen, "before": before, "after": after,
               "micro_batches": fillers, "strategy": trainer.parallel.strategy}, f)
trainer.parallel.shutdown()
"""


@pytest.fixture(scope="module")
def fsdp2_run(model_dir, data_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    out = root / "run"
    spec = root / "spec.json"
    spec.write_text(json.dumps(config_values(model_dir, data_file, out, strategy="fsdp2")))
    script = root / "run_fsdp2.py"
    script.write_text(textwrap.dedent(_FSDP2_SCRIPT))
    proc = torchrun([str(script), str(spec)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((root / f"fsdp2-rank{r}.json").read_text()) for r in (0, 1)]
    return out, ranks


def test_fsdp2_two_processes_match_one(fsdp2_run, one_process):
    out, ranks = fsdp2_run
    one_out, _ = one_process
    assert [r["strategy"] for r in ranks] == ["fsdp2", "fsdp2"]
    assert_same_run(metrics(out), metrics(one_out))
    assert_same_weights(final_weights(out), final_weights(one_out))


def test_fsdp2_unshards_the_head_for_the_fused_op_and_reshards_it(fsdp2_run, model_dir):
    _, ranks = fsdp2_run
    vocab, hidden = final_weights_initial["lm_head.weight"].shape
    rows = [(vocab + 1) // 2, vocab - (vocab + 1) // 2]  # dim-0 chunks (the vocab is odd)
    for rank, local_rows in zip(ranks, rows, strict=True):
        # outside the forward: this rank's chunk of the rows, as a DTensor
        assert rank["before"] == ["DTensor", [local_rows, hidden]]
        assert rank["after"] == ["DTensor", [local_rows, hidden], [vocab, hidden]]
        # inside: the fused op got the full weight, a plain tensor, on every call
        assert rank["head_seen"] and all(
            s == ["Parameter", [vocab, hidden]] for s in rank["head_seen"]
        )


def test_fsdp2_ranks_run_the_same_number_of_micro_batches(fsdp2_run):
    _, ranks = fsdp2_run
    per_rank = [rank["micro_batches"] for rank in ranks]
    totals = [[real + fill for real, fill in steps] for steps in per_rank]
    assert totals[0] == totals[1]  # every forward all-gathers: the counts must agree
    fillers = [fill for steps in per_rank for _, fill in steps]
    assert any(fillers), per_rank  # the uneven case happened (step 3: one pair, one rank)
    # forwards seen by the fused op: training micro-batches + the eval batches, equal too
    assert len(ranks[0]["head_seen"]) == len(ranks[1]["head_seen"])


def test_resume_on_one_process_from_a_two_process_checkpoint(
    fsdp2_run, one_process, model_dir, data_file, tmp_path
):
    """FSDP2 shards saved by 2 ranks, resharded onto 1: steps 3-4 continue the same curve;
    the reference cache the 2 ranks built serves the 1-rank run."""
    out, _ = fsdp2_run
    _, one_history = one_process
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(out, resumed_dir)
    for later in ("checkpoint-4", "final"):
        shutil.rmtree(resumed_dir / later)
    checkpoint = str(resumed_dir / "checkpoint-2")
    config = TrainConfig(
        **config_values(model_dir, data_file, resumed_dir, resume_from_checkpoint=checkpoint)
    )
    trainer = Trainer(config)
    assert trainer.parallel.world_size == 1
    assert not trainer.reference.built  # reused by fingerprint
    manifest = json.loads((resumed_dir / "reference" / "train" / "manifest.json").read_text())
    assert manifest["build"]["world_size"] == 2
    result = trainer.train()
    expected = {r["step"]: r for r in one_history if "loss" in r}
    got = {r["step"]: r for r in result.history if "loss" in r}
    assert sorted(got) == [1, 2, 3, 4]  # 1-2 kept from the 2-process run's metrics
    for step in (3, 4):
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], **LOSS_TOLERANCE)
        assert got[step]["learning_rate"] == expected[step]["learning_rate"]


def test_final_folder_loads_with_from_pretrained(fsdp2_run, model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = fsdp2_run
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    AutoTokenizer.from_pretrained(out / "final")
    state = model.state_dict()
    for name, tensor in final_weights(out).items():
        assert torch.equal(state[name], tensor)
    assert sorted(final_weights(out)) == sorted(final_weights_initial)


# ------------------------------------------------------------------------------------------------
# A failure on one rank

_FAILING_SCRIPT = """
import sys
import time
from fastdpo.cli import main
from fastdpo.train.trainer import Trainer

original = Trainer._run_step

def run_step(self):
    if self.rank == 1 and self.state.global_step == 1:
        raise RuntimeError("injected failure on rank 1 at step 2")
    if len(sys.argv) > 3 and self.rank == 0 and self.state.global_step == 1:
        time.sleep(600)  # stands in for a collective that never fails
    return original(self)

Trainer._run_step = run_step
sys.exit(main(["train", sys.argv[1], "--strategy", sys.argv[2]]))
"""


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_failure_on_one_rank_ends_both_with_its_error(strategy, model_dir, data_file, tmp_path):
    config = tmp_path / "run.yaml"
    # a long collective timeout: ending in seconds shows the error travelled, not the timeout
    values = config_values(model_dir, data_file, tmp_path / "run", distributed_timeout=600)
    config.write_text(yaml.safe_dump(values))
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(_FAILING_SCRIPT))
    started = time.monotonic()
    proc = torchrun([str(script), str(config), strategy], timeout=180)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert elapsed < 120, elapsed
    message = "rank 1 failed: RuntimeError: injected failure on rank 1 at step 2"
    assert f"fastdpo train: [rank 0] stopped: {message}" in proc.stderr, proc.stderr[-4000:]
    assert "[rank 1] fastdpo.train: rank 1 failed: RuntimeError: injected" in proc.stderr


def test_a_rank_stuck_when_a_peer_fails_is_ended_with_the_peers_error(
    model_dir, data_file, tmp_path
):
    """Rank 0 blocked where no collective fails (a sleep stands in): the failure watch thread
    reports rank 1's error and ends it within its grace time, long before the timeout."""
    config = tmp_path / "run.yaml"
    values = config_values(model_dir, data_file, tmp_path / "run", distributed_timeout=600)
    config.write_text(yaml.safe_dump(values))
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(_FAILING_SCRIPT))
    started = time.monotonic()
    proc = torchrun([str(script), str(config), "ddp", "stuck"], timeout=180)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert elapsed < 120, elapsed
    message = "rank 1 failed: RuntimeError: injected failure on rank 1 at step 2"
    assert f"fastdpo train: [rank 0] stopped: {message}" in proc.stderr, proc.stderr[-4000:]


# ------------------------------------------------------------------------------------------------
# Pieces that need no second process


def test_auto_strategy_picks_fsdp2_only_when_a_replica_does_not_fit(monkeypatch, caplog):
    from fastdpo.train import distributed

    model = tiny_model("llama")
    needed = distributed.training_state_bytes(model)
    # every weight fp32, each trainable one with a gradient and two AdamW moments: 16 bytes
    assert needed == 16 * sum(p.numel() for p in model.parameters())
    config = TrainConfig(model="m", data="d")
    parallel = distributed.Parallel(rank=0, world_size=2)
    cpu = torch.device("cpu")
    for budget, expected in ((2 * needed, "ddp"), (2 * needed - 1, "fsdp2")):
        monkeypatch.setattr(distributed, "device_memory_bytes", lambda *_, b=budget: b)
        with caplog.at_level("INFO", logger="fastdpo.train"):
            assert parallel.choose_strategy(config, model, cpu) == expected
        assert f"strategy {expected} (auto: weights + gradients + AdamW state need" in caplog.text
        caplog.clear()
    one = distributed.Parallel()
    assert one.choose_strategy(config, model, cpu) == "none"


def test_strategy_settings_that_cannot_run_are_refused():
    from fastdpo.train.config import ConfigError
    from fastdpo.train.distributed import Parallel

    model = tiny_model("llama")
    two = Parallel(rank=0, world_size=2)
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="offload: needs strategy fsdp2"):
        two.choose_strategy(
            TrainConfig(model="m", data="d", strategy="ddp", offload=True), model, cpu
        )
    with pytest.raises(ConfigError, match="fsdp2 with LoRA"):
        two.choose_strategy(
            TrainConfig(model="m", data="d", strategy="fsdp2", lora_r=4), model, cpu
        )
    with pytest.raises(ConfigError, match="strategy: got 'zero3'; allowed: auto, ddp, fsdp2"):
        TrainConfig(model="m", data="d", strategy="zero3")


def test_rank_shares_are_known_everywhere_and_report_the_busiest_rank():
    from fastdpo.train.data import rank_share, rank_shares, worst_rank_share

    sizes = [50, 10, 40, 30, 20, 60]
    step = [5, 0, 3, 1, 4]
    shares = rank_shares(step, sizes, 2)
    assert sorted(i for share in shares for i in share) == sorted(step)  # each pair once
    assert [rank_share(step, sizes, r, 2) for r in range(2)] == shares
    assert all(share == [i for i in step if i in share] for share in shares)  # step order
    loads = [sum(sizes[i] for i in share) for share in shares]
    assert worst_rank_share(shares, sizes) == max(loads) / sum(loads) == 90 / 170
    assert worst_rank_share(rank_shares([1], sizes, 2), sizes) == 1.0  # one pair: one rank


def test_trainer_refuses_a_rank_that_is_not_the_process_group_s(tmp_path):
    with pytest.raises(ValueError, match=r"Trainer\(rank=1\) but the process group says 0"):
        Trainer(TrainConfig(model="m", data="d", output_dir=str(tmp_path)), rank=1)
