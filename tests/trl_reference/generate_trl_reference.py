"""Writes trl_dpo_sigmoid.json: what TRL's DPOTrainer logs on the fidelity setup.

`tests/test_trl_fidelity.py` trains the same tiny Llama on the same pairs with fastdpo's Trainer
and compares every logged loss, reward accuracy, margin and gradient norm with these numbers.
TRL is not a dependency of fastdpo, so the numbers are made once, here, and stored.

Run it (about a minute on a 2-core CPU) from the repository root, in a virtual environment that
has TRL and fastdpo (editable) but keeps the CPU torch build:

    python3 -m venv /work/trl-venv
    /work/trl-venv/bin/pip install torch==2.13.0   # the CPU wheel (an unpinned torch pulls CUDA)
    /work/trl-venv/bin/pip install trl==1.16.0 transformers==5.24.0
    /work/trl-venv/bin/pip install --no-deps -e .  # fastdpo, for its tiny tokenizer and model
    /work/trl-venv/bin/python tests/trl_reference/generate_trl_reference.py

The stored numbers were made with TRL 1.16.0, transformers 5.24.0, accelerate 1.16.0, torch
2.13.0+cpu, tokenizers 0.23.3 (the JSON records the versions and the date).

What is run, four times (`RUNS`: the reference is the initial policy or a separate reference
model, each live and with `precompute_ref_log_probs=True`): `fidelity_setup.SETTINGS`, i.e.
sigmoid loss, beta 0.1, one optimizer step = all 14 pairs (`per_device_train_batch_size=14`,
no accumulation), the HF default optimizer (torch AdamW, fused; weight decay 0), a constant
learning rate of 3e-4, no clipping (`max_grad_norm=0`: HF clips only when it is > 0, and
still logs the norm), fp32 (`bf16=False`; TRL defaults to bf16), gradient checkpointing off
(it recomputes the same fp32 math), 6 steps, a log row every step. HF logs a step's loss as
computed before that step's update, as fastdpo does.

Besides the logs, the JSON holds each pair's token ids as TRL tokenized them (TRL tokenizes
prompt and prompt + completion + EOS text jointly and splits at the common prefix; fastdpo
tokenizes the completion separately and appends the EOS id): this script fails unless fastdpo's
`tokenize_pairs` gives the same ids, and the test asserts it again before training. It also
holds, per step, every pair's reward margin (sorted, TRL's batch order is shuffled), recorded
from the tensors `DPOTrainer` gathers for its metrics: a step whose smallest |margin| is at
rounding level (step 1, where the policy is the reference) has a reward accuracy decided by
rounding, which the test then does not compare exactly.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "trl_dpo_sigmoid.json"

# Everything is local: never ask the Hub for anything.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(HERE))

import fidelity_setup  # noqa: E402
import torch  # noqa: E402

RUNS = (
    # (name, reference model, precompute_ref_log_probs)
    ("policy_reference_live", "policy", False),
    ("policy_reference_precomputed", "policy", True),
    ("separate_reference_live", "separate", False),
    ("separate_reference_precomputed", "separate", True),
)
"""The reference is the policy's initial weights (TRL's default, a copy of the model) or the
separate reference model of `fidelity_setup` (`ref_model=`), live or precomputed."""

LOGGED_KEYS = (
    "loss",
    "grad_norm",
    "learning_rate",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def fastdpo_token_ids(tokenizer) -> list[dict[str, list[int]]]:
    """Each pair's ids as fastdpo tokenizes it (the Trainer's defaults: add_eos, no cuts)."""
    from fastdpo import load_preference_data, tokenize_pairs

    examples = load_preference_data(fidelity_setup.PAIRS)
    pairs = tokenize_pairs(examples, tokenizer, max_length=fidelity_setup.SETTINGS["max_length"])
    return [
        {
            "prompt_ids": list(p.prompt_ids),
            "chosen_ids": list(p.chosen_ids),
            "rejected_ids": list(p.rejected_ids),
        }
        for p in pairs
    ]


def run_trl(
    model_dir: Path, output_dir: Path, *, precompute: bool, ref_model_dir: Path | None = None
) -> dict:
    """One TRL run (reference: `ref_model_dir`, or TRL's copy of the policy when None);
    returns its logged rows, per-step sorted margins and its token ids."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    settings = fidelity_setup.SETTINGS
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = DPOConfig(
        output_dir=str(output_dir),
        loss_type=settings["loss"],
        beta=settings["beta"],
        per_device_train_batch_size=len(fidelity_setup.PAIRS),
        gradient_accumulation_steps=1,
        max_steps=settings["steps"],
        learning_rate=settings["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=settings["weight_decay"],
        adam_beta1=settings["adam_beta1"],
        adam_beta2=settings["adam_beta2"],
        adam_epsilon=settings["adam_epsilon"],
        max_grad_norm=0.0,
        max_length=settings["max_length"],
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        precompute_ref_log_probs=precompute,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.float32},
    )
    ref_model = None
    if ref_model_dir is not None:
        ref_model = AutoModelForCausalLM.from_pretrained(ref_model_dir, dtype=torch.float32)
    trainer = _recording_trainer_class()(
        model=str(model_dir),
        ref_model=ref_model,
        args=args,
        train_dataset=Dataset.from_list(fidelity_setup.PAIRS),
        processing_class=tokenizer,
    )
    token_ids = [
        {key: list(row[key]) for key in ("prompt_ids", "chosen_ids", "rejected_ids")}
        for row in trainer.train_dataset
    ]
    trainer.train()
    rows = [
        {"step": row["step"], **{key: row[key] for key in LOGGED_KEYS}}
        for row in trainer.state.log_history
        if "loss" in row
    ]
    if [row["step"] for row in rows] != list(range(1, settings["steps"] + 1)):
        raise RuntimeError(f"expected one log row per step, got steps {[r['step'] for r in rows]}")
    if len(trainer.step_margins) != settings["steps"]:
        raise RuntimeError(f"recorded {len(trainer.step_margins)} steps of margins")
    for row, margins in zip(rows, trainer.step_margins, strict=True):
        row["sorted_pair_margins"] = margins
    return {
        "optimizer": type(trainer.optimizer.optimizer).__name__
        + (" (fused)" if trainer.optimizer.defaults.get("fused") else ""),
        "optim": str(args.optim),
        "token_ids": token_ids,
        "log": rows,
    }


def _recording_trainer_class():
    from trl import DPOTrainer

    class RecordingDPOTrainer(DPOTrainer):
        """DPOTrainer that keeps each training step's per-pair reward margins.

        `_compute_loss` ends by gathering, in this order, the per-pair chosen rewards, rejected
        rewards, accuracies, margins and chosen / rejected log-probs for its metrics; wrapping
        `accelerator.gather` for the call records them without copying TRL's loss code (the
        recorded margins are checked against chosen - rejected, so a change of that order in
        TRL fails loudly here).
        """

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.step_margins: list[list[float]] = []

        def _compute_loss(self, model, inputs, return_outputs):
            gathered: list[torch.Tensor] = []
            original = self.accelerator.gather

            def gather(tensor):
                gathered.append(tensor.detach().clone())
                return original(tensor)

            self.accelerator.gather = gather
            try:
                result = super()._compute_loss(model, inputs, return_outputs)
            finally:
                del self.accelerator.gather  # back to the class's method
            if self.model.training:
                # The last six: chosen, rejected rewards, accuracies, margins, chosen and
                # rejected log-probs (gather_for_metrics calls gather too, for token counts).
                chosen, rejected, _, margins = gathered[-6:-2]
                if not torch.equal(margins, chosen - rejected):
                    raise RuntimeError("TRL gathered its metrics in an unexpected order")
                self.step_margins.append(sorted(margins.double().tolist()))
            return result

    return RecordingDPOTrainer


def main() -> None:
    import transformers
    from transformers import AutoTokenizer

    torch.set_num_threads(1)  # the same reductions whatever the machine's core count
    with tempfile.TemporaryDirectory(prefix="trl_reference_") as tmp:
        tmp = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(tmp / "datasets-cache")
        model_dir, checksum = fidelity_setup.write_model_dir(tmp / "model")
        ref_dir, ref_checksum = fidelity_setup.write_model_dir(tmp / "reference", reference=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ours = fastdpo_token_ids(tokenizer)
        runs = {}
        for name, reference, precompute in RUNS:
            runs[name] = run_trl(
                model_dir,
                tmp / name,
                precompute=precompute,
                ref_model_dir=ref_dir if reference == "separate" else None,
            )
            theirs = runs[name].pop("token_ids")
            if theirs != ours:
                for index, (a, b) in enumerate(zip(theirs, ours, strict=True)):
                    if a != b:
                        raise SystemExit(
                            f"pair {index}: TRL tokenizes {a}, fastdpo {b}: change the data"
                        )
    record = {
        "description": "TRL DPOTrainer logs on tests/trl_reference/fidelity_setup.py "
        "(written by generate_trl_reference.py; see its docstring)",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {
            "trl": metadata.version("trl"),
            "transformers": transformers.__version__,
            "accelerate": metadata.version("accelerate"),
            "torch": torch.__version__,
            "tokenizers": metadata.version("tokenizers"),
            "datasets": metadata.version("datasets"),
        },
        "settings": fidelity_setup.SETTINGS,
        "num_pairs": len(fidelity_setup.PAIRS),
        "weights_checksum": checksum,
        "reference_weights_checksum": ref_checksum,
        "token_ids": ours,
        "runs": runs,
    }
    OUTPUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUTPUT}")
    for name, run in runs.items():
        print(name, run["optimizer"])
        for row in run["log"]:
            print(
                f"  step {row['step']}: loss {row['loss']:.6f} acc {row['rewards/accuracies']:.4f} "
                f"margin {row['rewards/margins']:.6f} grad_norm {row['grad_norm']:.5f} "
                f"min |pair margin| {min(abs(m) for m in row['sorted_pair_margins']):.2e}"
            )


if __name__ == "__main__":
    main()
