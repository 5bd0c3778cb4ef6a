"""fastdpo's Trainer logs the same DPO training curve as TRL's DPOTrainer.

Both trainers train the tiny Llama of `trl_reference/fidelity_setup.py` on its 14 pairs: sigmoid
loss, beta 0.1, one optimizer step = all pairs (so data order cannot matter), AdamW at a
constant learning rate, no clipping, fp32, 6 steps. TRL's logs were recorded once by
`trl_reference/generate_trl_reference.py` (TRL is not a dependency; versions in the JSON), with
the reference model live and precomputed; fastdpo always reads the reference from its cache.
Every logged loss, reward, margin, log-prob and gradient norm must match, and every reward
accuracy exactly, with the reference being the initial policy or a separate model, and with
the step in one micro-batch or split into several (accumulation must not change a number).

Where the numbers could differ by design they cannot here: tokenization (TRL tokenizes prompt +
completion jointly, fastdpo separately; the data is chosen so the ids agree, and the test
checks the ids first), attention (padded batch vs packed sequences: the same math in fp32).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

TRL_REFERENCE = Path(__file__).resolve().parent / "trl_reference"
sys.path.insert(0, str(TRL_REFERENCE))

import fidelity_setup  # noqa: E402

RECORD = json.loads((TRL_REFERENCE / "trl_dpo_sigmoid.json").read_text())
SETTINGS = fidelity_setup.SETTINGS

# fp32 on both sides; what differs is summation order (padded vs packed attention, fused vs
# single-tensor AdamW, one vs several micro-batches). Largest differences measured over the 6
# steps of all 16 comparisons (torch 2.13 CPU): loss 3.0e-7, rewards 7.2e-7 (absolute), log-probs
# 2.2e-7, gradient norm 6.0e-7 (relative). The bounds are ~5x those.
LOSS_ATOL = 2e-6
REWARD_ATOL = 4e-6
"""rewards/chosen, rewards/rejected, rewards/margins (beta x log-ratios, ~0.1-1)."""
LOGPS_RTOL = 1e-6
"""logps/chosen, logps/rejected (sums of ~10-20 token log-probs, ~-70)."""
GRAD_NORM_RTOL = 3e-6
TIE_MARGIN = 1e-4
"""Below this smallest |pair margin| (TRL's, per step) a reward accuracy is decided by rounding
(step 1 with the policy as reference: every margin is exactly 0), so it is not compared."""

CLOSE_KEYS = {
    "loss": ("abs", LOSS_ATOL),
    "rewards/chosen": ("abs", REWARD_ATOL),
    "rewards/rejected": ("abs", REWARD_ATOL),
    "rewards/margins": ("abs", REWARD_ATOL),
    "logps/chosen": ("rel", LOGPS_RTOL),
    "logps/rejected": ("rel", LOGPS_RTOL),
    "grad_norm": ("rel", GRAD_NORM_RTOL),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """The policy and the separate reference model, saved as Hugging Face folders."""
    root = tmp_path_factory.mktemp("trl_fidelity")
    policy, checksum = fidelity_setup.write_model_dir(root / "policy")
    reference, ref_checksum = fidelity_setup.write_model_dir(root / "reference", reference=True)
    # The weights come from torch's CPU generator alone; if it ever draws differently, the TRL
    # numbers no longer describe this model.
    assert (checksum, ref_checksum) == (
        RECORD["weights_checksum"],
        RECORD["reference_weights_checksum"],
    ), "the rebuilt tiny models differ from the recorded ones: rerun generate_trl_reference.py"
    return {"policy": policy, "separate": reference}


def _tokenized(model_dir: Path):
    from transformers import AutoTokenizer

    from fastdpo import load_preference_data, tokenize_pairs

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_preference_data(fidelity_setup.PAIRS)
    return tokenize_pairs(examples, tokenizer, max_length=SETTINGS["max_length"])


def test_fastdpo_tokenizes_the_pairs_as_trl_did(model_dirs):
    pairs = _tokenized(model_dirs["policy"])
    ours = [
        {"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}
        for p in pairs
    ]
    ours = [{key: [int(i) for i in ids] for key, ids in pair.items()} for pair in ours]
    assert ours == RECORD["token_ids"]
    # Sanity of the data itself: every completion ends with EOS, and the prompt starts with BOS.
    eos, bos = 2, 1
    assert all(p["chosen_ids"][-1] == p["rejected_ids"][-1] == eos for p in ours)
    assert all(p["prompt_ids"][0] == bos for p in ours)


def _small_budget(model_dir: Path) -> int:
    """A micro-batch budget that splits the step into several micro-batches."""
    from fastdpo import pack_pairs

    pairs = _tokenized(model_dir)
    budget = max(p.num_tokens for p in pairs) + 8
    count = len(list(pack_pairs(pairs, max_tokens_per_batch=budget)))
    assert count >= 4, f"budget {budget} gives only {count} micro-batches"
    return budget


def _train_fastdpo(model_dirs, reference: str, budget: int, output_dir: Path) -> list[dict]:
    from fastdpo import TrainConfig, Trainer

    config = TrainConfig(
        model=str(model_dirs["policy"]),
        ref_model=str(model_dirs["separate"]) if reference == "separate" else None,
        data=[dict(pair) for pair in fidelity_setup.PAIRS],
        output_dir=str(output_dir),
        loss=SETTINGS["loss"],
        beta=SETTINGS["beta"],
        max_length=SETTINGS["max_length"],
        max_tokens_per_batch=budget,
        pairs_per_step=len(fidelity_setup.PAIRS),
        max_steps=SETTINGS["steps"],
        learning_rate=SETTINGS["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=SETTINGS["weight_decay"],
        adam_beta1=SETTINGS["adam_beta1"],
        adam_beta2=SETTINGS["adam_beta2"],
        adam_epsilon=SETTINGS["adam_epsilon"],
        max_grad_norm=None,
        seed=0,
        dtype="float32",
        device="cpu",
        reference="auto",
        logging_steps=1,
        progress=False,
        report_to="none",
    )
    result = Trainer(config).train()
    return [row for row in result.history if "loss" in row]


def _compare(ours: list[dict], trl_log: list[dict]) -> list[str]:
    """Every mismatch between fastdpo's log rows and TRL's, as readable lines."""
    problems = []
    if [row["step"] for row in ours] != [row["step"] for row in trl_log]:
        return [f"logged steps {[row['step'] for row in ours]}, TRL logged every step"]
    for mine, theirs in zip(ours, trl_log, strict=True):
        step = theirs["step"]
        for key, (kind, tolerance) in CLOSE_KEYS.items():
            a, b = mine[key], theirs[key]
            error = abs(a - b) if kind == "abs" else abs(a - b) / abs(b)
            if not error <= tolerance:  # also catches NaN
                problems.append(f"step {step} {key}: fastdpo {a!r}, TRL {b!r} ({kind} {error:.2e})")
        if not math.isclose(mine["learning_rate"], theirs["learning_rate"], rel_tol=1e-12):
            problems.append(f"step {step} learning_rate: {mine['learning_rate']} vs TRL's")
        if min(abs(m) for m in theirs["sorted_pair_margins"]) > TIE_MARGIN:
            # Exactly the same pairs ranked right. Both logs hold an fp32 mean of 0/1 values,
            # whose last bit depends on how it was summed (fastdpo weights micro-batches), so
            # the count of pairs is what is compared: it must be an integer and the same.
            pairs = len(theirs["sorted_pair_margins"])
            mine_count = mine["rewards/accuracies"] * pairs
            their_count = theirs["rewards/accuracies"] * pairs
            if not (
                abs(mine_count - round(mine_count)) < 1e-4
                and round(mine_count) == round(their_count)
            ):
                problems.append(
                    f"step {step} rewards/accuracies: fastdpo {mine['rewards/accuracies']} "
                    f"({mine_count:.4f} of {pairs} pairs), TRL {theirs['rewards/accuracies']}"
                )
        else:  # a tie: both must see margins of zero
            if abs(mine["rewards/margins"]) > 1e-6:
                problems.append(
                    f"step {step}: TRL's margins are 0, fastdpo's mean margin is "
                    f"{mine['rewards/margins']}"
                )
    return problems


@pytest.mark.parametrize(
    ("reference", "split"),
    [("policy", False), ("policy", True), ("separate", False), ("separate", True)],
    ids=[
        "policy-ref-one-micro-batch",
        "policy-ref-split",
        "separate-ref-one-micro-batch",
        "separate-ref-split",
    ],
)
def test_training_curve_matches_trl(model_dirs, tmp_path, reference, split):
    torch.manual_seed(0)
    budget = _small_budget(model_dirs["policy"]) if split else 4096
    ours = _train_fastdpo(model_dirs, reference, budget, tmp_path / "run")
    assert len(ours) == SETTINGS["steps"]
    for mode in ("live", "precomputed"):
        trl_log = RECORD["runs"][f"{reference}_reference_{mode}"]["log"]
        problems = _compare(ours, trl_log)
        assert not problems, f"against TRL ({mode} reference):\n" + "\n".join(problems)
    # The curve moved: the test would see a trainer that does not train.
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.1
