"""`fastdpo demo`: DPO teaches a small model, built on the spot, to sign off politely.

The flow (everything local, nothing downloaded):

1. a byte-level BPE tokenizer trained on the task's text and a random small Llama
   (`fastdpo.demo.model`), saved to `RUN/base`;
2. an SFT warm-up (`loss="sft"`, no reference) on rows where each training request is answered
   once politely and once curtly, so the model learns to answer either way: `RUN/sft`;
3. DPO from the SFT model (`reference="auto"`: the SFT model's log-probs are cached once, then
   only the policy trains) on pairs polite (chosen) vs curt (rejected), with an NLL term on the
   chosen replies (RPO; see `DemoSettings.nll_weight` for why): `RUN/dpo`;
4. before (SFT model) and after (DPO model), on requests no training row used: how often the
   model's log-prob ranks the polite reply above the curt one, the DPO reward margin, and how
   many sampled replies `task.judge` finds polite and on topic. Models are loaded fresh from
   their folders for this, as a user would.

It prints the before/after table, a few held-out samples side by side, and where the run is.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fastdpo.demo.model import save_base_model
from fastdpo.demo.settings import DemoSettings
from fastdpo.demo.task import judge, make_task

MARKER = ".fastdpo-demo"
"""File that marks a folder as a demo run directory (so a rerun may replace it)."""


@dataclass(kw_only=True)
class StageNumbers:
    """The held-out numbers of one model (the SFT model "before", the DPO model "after")."""

    preference_accuracy: float
    """Share of held-out pairs whose polite reply has the higher log-prob (ties count half)."""
    logp_margin: float
    """Mean over held-out pairs of log p(polite) - log p(curt), nats."""
    reward_accuracy: float
    """Share of held-out pairs with a positive DPO reward margin (ties count half; 0.5 when
    the model is its own reference)."""
    reward_margin: float
    """Mean DPO reward margin, beta * ((log p - log p_ref)(polite) - (same)(curt))."""
    win_rate: float
    """Mean `judge` score of the sampled replies (1 = polite and on topic)."""
    samples: list[tuple[str, str, float]]
    """(prompt, sampled reply, judge score) for every sample, in prompt order."""


@dataclass(kw_only=True)
class DemoResult:
    """What the demo measured and where it left things."""

    before: StageNumbers
    after: StageNumbers
    run_dir: Path
    dpo_history: list[dict[str, Any]]
    """The DPO run's metrics.jsonl rows."""
    seconds: dict[str, float]
    """Wall time per stage: setup, sft, dpo, measure, total."""

    @property
    def learned(self) -> bool:
        """DPO did what the demo promises: >= 90% held-out accuracy, more polite samples."""
        return self.after.preference_accuracy >= 0.9 and self.after.win_rate > self.before.win_rate


def _prepare_run_dir(path: Path) -> None:
    """Creates `path`, replacing a previous demo run there, refusing any other non-empty one."""
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).exists():
            raise FileExistsError(
                f"output directory {str(path)!r} is not empty and is not a previous demo run: "
                "pass another --output-dir"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("written by `fastdpo demo`; a new demo run replaces this folder\n")


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> str:
    """Writes `rows` as JSON lines to `path`; returns the path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _train(config_values: dict[str, Any]):
    """Runs one `Trainer` and returns its `TrainResult`."""
    from fastdpo.train import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(**config_values))
    return trainer.train()


def _load(folder: Path, device: torch.device):
    """A saved model (eval mode) and its tokenizer, loaded fresh from `folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


@torch.no_grad()
def _sample(model, tokenizer, prompts: list[str], *, per_prompt: int, seed: int) -> list[str]:
    """`per_prompt` sampled replies per prompt (temperature 1, full vocabulary), decoded."""
    tokenizer.padding_side = "left"  # generation appends on the right
    repeated = [p for p in prompts for _ in range(per_prompt)]
    encoded = tokenizer(repeated, return_tensors="pt", padding=True).to(model.device)
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(seed)  # the same draws for the model before and after DPO
        output = model.generate(
            **encoded,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=32,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    replies = output[:, encoded["input_ids"].shape[1] :]
    return tokenizer.batch_decode(replies, skip_special_tokens=True)


@torch.no_grad()
def _heldout_logps(model, tokenizer, rows: list[dict[str, str]]) -> torch.Tensor:
    """fp64 [P, 2]: summed log-probs of (chosen, rejected) of each held-out row, in row order."""
    from fastdpo import load_preference_data, pack_pairs, sequence_logps, tokenize_pairs

    pairs = tokenize_pairs(load_preference_data(rows), tokenizer, max_length=128)
    position = {pair.example_id: index for index, pair in enumerate(pairs)}
    logps = torch.zeros(len(pairs), 2, dtype=torch.float64)
    for batch in pack_pairs(pairs, max_tokens_per_batch=4096, shuffle=False):
        result = sequence_logps(model, batch.to(model.device))
        rows_here = [position[example_id] for example_id in batch.example_ids]
        logps[rows_here, 0] = result.chosen.double().cpu()
        logps[rows_here, 1] = result.rejected.double().cpu()
    return logps


def _share_positive(values: torch.Tensor) -> float:
    """Share of entries > 0, ties (== 0) counting half."""
    return float(((values > 0).double() + 0.5 * (values == 0).double()).mean())


def _measure(
    folder: Path,
    reference_logps: torch.Tensor | None,
    rows: list[dict[str, str]],
    settings: DemoSettings,
    device: torch.device,
) -> tuple[StageNumbers, torch.Tensor]:
    """Held-out numbers of the model in `folder`; also returns its logps [P, 2] (fp64)."""
    model, tokenizer = _load(folder, device)
    prompts = list(dict.fromkeys(row["prompt"] for row in rows))
    # Sample first: `sequence_logps` switches this instance's attention to packed-only.
    replies = _sample(
        model,
        tokenizer,
        prompts,
        per_prompt=settings.samples_per_prompt,
        seed=settings.seed,
    )
    repeated = [p for p in prompts for _ in range(settings.samples_per_prompt)]
    scores = [judge(p, r) for p, r in zip(repeated, replies, strict=True)]
    logps = _heldout_logps(model, tokenizer, rows)
    reference = logps if reference_logps is None else reference_logps
    logp_margins = logps[:, 0] - logps[:, 1]
    reward_margins = settings.beta * (logp_margins - (reference[:, 0] - reference[:, 1]))
    numbers = StageNumbers(
        preference_accuracy=_share_positive(logp_margins),
        logp_margin=float(logp_margins.mean()),
        reward_accuracy=_share_positive(reward_margins),
        reward_margin=float(reward_margins.mean()),
        win_rate=statistics.fmean(scores),
        samples=list(zip(repeated, replies, scores, strict=True)),
    )
    return numbers, logps


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_demo(settings: DemoSettings, *, print_fn: Callable[[str], None] = print) -> DemoResult:
    """Runs the whole demo (see the module docstring), prints the report, returns the numbers."""
    from transformers.utils import logging as hf_logging

    threads = torch.get_num_threads()
    hf_bars = hf_logging.is_progress_bar_enabled()
    # transformers' own bars (loading and writing each small model) would bury the report.
    hf_logging.disable_progress_bar()
    if _resolve_device(settings.device).type == "cpu":
        # The model is tiny: every op is too small to gain from a second thread, and with other
        # work on the machine two threads wait on each other. 15 SFT steps on a 2-core CPU
        # under load ~6: 2.3-4.5 s with one thread, 65 s with two.
        torch.set_num_threads(1)
    try:
        return _run(settings, print_fn)
    finally:
        torch.set_num_threads(threads)
        if hf_bars:
            hf_logging.enable_progress_bar()


def _run(settings: DemoSettings, print_fn: Callable[[str], None]) -> DemoResult:
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    device = _resolve_device(settings.device)
    run_dir = Path(settings.output_dir)
    _prepare_run_dir(run_dir)
    task = make_task(seed=settings.seed, heldout_fraction=settings.heldout_fraction)
    print_fn(
        f"fastdpo demo: teaching a {settings.model.num_hidden_layers}-layer Llama "
        f"(hidden {settings.model.hidden_size}) to sign off politely, on {device.type}"
    )
    print_fn(
        f"  task: {len(task.sft_rows)} warm-up rows (each request answered once politely, once "
        f"curtly), {len(task.dpo_rows)} DPO pairs (polite > curt), "
        f"{len(task.heldout_rows)} held-out requests"
    )
    base_dir = save_base_model(run_dir / "base", settings.model, seed=settings.seed)
    # Rows go to files, so each stage's config.yaml reruns it: `fastdpo train RUN/dpo/config.yaml`.
    data = {
        name: _write_jsonl(run_dir / "data" / f"{name}.jsonl", rows)
        for name, rows in (
            ("sft", task.sft_rows),
            ("dpo", task.dpo_rows),
            ("heldout", task.heldout_rows),
        )
    }
    common = {
        "max_length": 128,
        "pairs_per_step": settings.pairs_per_step,
        "max_tokens_per_batch": 4096,
        "seed": settings.seed,
        "device": device.type,
        "logging_steps": 5,
        "progress": settings.progress,
        "report_to": "none",
    }
    seconds["setup"] = time.perf_counter() - start

    print_fn("[1/3] SFT warm-up: the model learns to answer, in either style")
    mark = time.perf_counter()
    sft = _train(
        {
            **common,
            "model": str(base_dir),
            "data": data["sft"],
            "output_dir": str(run_dir / "sft"),
            "loss": "sft",
            "reference": "none",
            "num_train_epochs": settings.sft_epochs,
            "learning_rate": settings.sft_learning_rate,
            "warmup_ratio": 0.05,
        }
    )
    seconds["sft"] = time.perf_counter() - mark

    loss = f"DPO (sigmoid, beta {settings.beta:g})"
    if settings.nll_weight:
        loss += f" + {settings.nll_weight:g} x NLL of the chosen replies (RPO)"
    print_fn(f"[2/3] {loss} from the SFT model: reference log-prob cache, then the policy trains")
    mark = time.perf_counter()
    dpo = _train(
        {
            **common,
            "model": str(sft.final_dir),
            "data": data["dpo"],
            "eval_data": data["heldout"],
            "output_dir": str(run_dir / "dpo"),
            "loss": (
                {"sigmoid": 1.0, "sft": settings.nll_weight} if settings.nll_weight else "sigmoid"
            ),
            "beta": settings.beta,
            "reference": "auto",
            "num_train_epochs": settings.dpo_epochs,
            "learning_rate": settings.dpo_learning_rate,
        }
    )
    seconds["dpo"] = time.perf_counter() - mark

    print_fn("[3/3] held-out requests: log-probs and sampled replies, before and after DPO")
    mark = time.perf_counter()
    before, sft_logps = _measure(sft.final_dir, None, task.heldout_rows, settings, device)
    after, _ = _measure(dpo.final_dir, sft_logps, task.heldout_rows, settings, device)
    seconds["measure"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - start

    result = DemoResult(
        before=before, after=after, run_dir=run_dir, dpo_history=dpo.history, seconds=seconds
    )
    _write_summary(result, settings)
    for line in report_lines(result, settings):
        print_fn(line)
    return result


def _write_summary(result: DemoResult, settings: DemoSettings) -> None:
    summary = {
        "settings": asdict(settings),
        "before": {k: v for k, v in asdict(result.before).items() if k != "samples"},
        "after": {k: v for k, v in asdict(result.after).items() if k != "samples"},
        "samples": {
            "before": asdict(result.before)["samples"],
            "after": asdict(result.after)["samples"],
        },
        "seconds": result.seconds,
    }
    (result.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def report_lines(result: DemoResult, settings: DemoSettings) -> list[str]:
    """The printed report: the before/after table, samples side by side, where things are."""
    before, after = result.before, result.after
    samples = len(after.samples)
    rows = [
        (
            "held-out preference accuracy",
            _percent(before.preference_accuracy),
            _percent(after.preference_accuracy),
            "log p(polite reply) > log p(curt reply)",
        ),
        (
            "log-prob margin polite - curt",
            f"{before.logp_margin:+.2f}",
            f"{after.logp_margin:+.2f}",
            "nats, mean over held-out pairs",
        ),
        (
            "DPO reward accuracy",
            _percent(before.reward_accuracy),
            _percent(after.reward_accuracy),
            "reward margin > 0 (before: the model is its own reference)",
        ),
        (
            "DPO reward margin",
            f"{before.reward_margin:+.2f}",
            f"{after.reward_margin:+.2f}",
            f"beta={settings.beta:g} x log-ratio margin vs the SFT model",
        ),
        (
            "judge win rate of samples",
            _percent(before.win_rate),
            _percent(after.win_rate),
            f"{samples} sampled replies judged polite and on topic",
        ),
    ]
    lines = ["", f"  {'held-out requests':<32}{'before DPO':>12}{'after DPO':>12}"]
    lines += [f"  {name:<32}{b:>12}{a:>12}   {note}" for name, b, a, note in rows]

    lines += ["", "  samples (held-out requests, same random draws before and after):"]
    step = settings.samples_per_prompt
    for index in range(0, min(settings.show_samples * step, samples), step):
        prompt = before.samples[index][0]
        request = prompt.removeprefix("User: ").split("\n")[0]
        lines.append(f"    request: {request}")
        for label, numbers in (("before", before), ("after ", after)):
            _, reply, score = numbers.samples[index]
            lines.append(f"      {label} [{score:.1f}] {reply.strip()!r}")

    s = result.seconds
    # The trainer draws curves.png only where matplotlib is installed (it says so itself).
    curves = "curves.png, " if (result.run_dir / "dpo" / "curves.png").exists() else ""
    lines += [
        "",
        f"  time: {s['total']:.0f} s (set-up {s['setup']:.0f} s, SFT {s['sft']:.0f} s, "
        f"DPO {s['dpo']:.0f} s, held-out measurements {s['measure']:.0f} s)",
        f"  run directory: {result.run_dir}/  (data/: the rows; base/, sft/, dpo/: config.yaml, "
        f"metrics.jsonl, {curves}final/ model + tokenizer; summary.json: these numbers and "
        "every sample)",
    ]
    if result.learned:
        lines.append("  DPO learned the preference: held-out accuracy >= 90%, more polite replies.")
    else:
        lines.append(
            "  DPO did NOT reach the expected result (held-out accuracy >= 90% and a higher win "
            "rate): see the metrics in the run directory."
        )
    return lines
