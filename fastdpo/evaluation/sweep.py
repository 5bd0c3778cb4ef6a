"""`fastdpo sweep`: one training run per (beta, loss) on one reference cache, compared held out.

    result = run_sweep(TrainConfig.from_yaml("dpo.yaml"), betas=[0.01, 0.1, 0.5],
                       losses=["sigmoid", "ipo"])
    result.best.name, result.table_lines()

Every combination trains with `fastdpo.Trainer` in `output_dir/<name>/` (name:
`beta<beta>-<loss>`), the config's `output_dir` being the sweep's folder. The reference cache
is computed once: the first run builds it, and every later run finds it in its sibling's folder
by fingerprint (the fingerprint covers the reference model, tokenizer, tokenization and
examples, not beta or the loss; see `fastdpo.train.reference_cache`). Each run records
whether it built the cache (`reference_built`), so the sweep can show it was built once.

After training, each policy is measured on the held-out pairs (`eval_data` or `eval_fraction`,
required) against the reference cache, per pair (summed log-probs, fp64):

- reward accuracy: share of pairs with (log pi - log pi_ref)(chosen) > (same)(rejected);
- reward margin: beta x the mean of that difference (the run's own beta), and the log-ratio
  margin without beta (comparable across betas);
- drift: mean (log pi - log pi_ref) on chosen and on rejected, and `drift_abs`, the mean of
  |log pi - log pi_ref| over all held-out sequences (how far the policy moved at all).

The best run: highest held-out reward accuracy; among equal accuracies, the lowest
`drift_abs` (the one that got there moving least from the reference). The table is printed and
written to `sweep.json`; `sweep.png` plots accuracy, margin and drift against beta per loss
(skipped with a message without matplotlib).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastdpo.evaluation.pair_generation import write_json_atomic
from fastdpo.train.config import ConfigError, TrainConfig

logger = logging.getLogger("fastdpo.sweep")

BEST_RULE = "highest held-out reward accuracy; ties: lowest drift_abs"


@dataclass(kw_only=True)
class SweepRun:
    """One combination: where it ran and what it measured."""

    name: str
    beta: float
    loss: Any
    output_dir: str
    reference_built: bool = False
    """True if this run computed the reference cache (only one run of a sweep should)."""
    reference_caches: dict[str, str] = field(default_factory=dict)
    """Split -> the cache folder the run read."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Held-out numbers (see the module docstring)."""


@dataclass(kw_only=True)
class SweepResult:
    runs: list[SweepRun]
    best: SweepRun
    output_dir: Path
    plot: Path | None = None

    def table_lines(self) -> list[str]:
        """The printed table, best run marked with '*'."""
        head = (
            f"  {'run':<24}{'reward acc':>11}{'margin':>9}{'log-ratio':>10}"
            f"{'drift ch':>10}{'drift rej':>10}{'|drift|':>9}{'eval loss':>10}"
        )
        lines = [head]
        for run in self.runs:
            m = run.metrics
            mark = "*" if run is self.best else " "
            lines.append(
                f"{mark} {run.name:<24}{m['reward_accuracy']:>11.4f}{m['reward_margin']:>+9.4f}"
                f"{m['logratio_margin']:>+10.4f}{m['drift_chosen']:>+10.4f}"
                f"{m['drift_rejected']:>+10.4f}{m['drift_abs']:>9.4f}"
                f"{m.get('eval_loss', math.nan):>10.4f}"
            )
        built = [run.name for run in self.runs if run.reference_built]
        lines += [
            f"  best (*): {self.best.name} (rule: {BEST_RULE})",
            f"  reference cache computed {len(built)} time(s) ({', '.join(built) or 'given'}), "
            f"shared by all {len(self.runs)} runs",
        ]
        return lines


def parse_list(text: str, convert, name: str) -> list:
    """'0.01,0.1,0.5' -> [0.01, 0.1, 0.5]; an empty item or bad value names the option."""
    items = [item.strip() for item in str(text).split(",")]
    if not items or any(not item for item in items):
        raise ValueError(f"--{name}: got {text!r}; give comma-separated values, e.g. 0.01,0.1")
    try:
        values = [convert(item) for item in items]
    except ValueError:
        raise ValueError(f"--{name}: cannot read {text!r} as {convert.__name__} values") from None
    if len(set(values)) != len(values):
        raise ValueError(f"--{name}: {text!r} repeats a value")
    return values


def loss_label(loss: Any) -> str:
    """A loss as a short name: its registry name, or a mapping's names joined by '+'."""
    return loss if isinstance(loss, str) else "+".join(loss)


def run_name(beta: float, loss: Any) -> str:
    """The run's folder name: beta<beta>-<loss label>."""
    return f"beta{beta:g}-{loss_label(loss)}"


def plan_runs(config: TrainConfig, betas: list[float], losses: list[Any]) -> list[TrainConfig]:
    """One checked `TrainConfig` per combination (all validated before anything trains)."""
    if not betas or not losses:
        raise ValueError("sweep: give at least one beta and one loss")
    if config.eval_data is None and config.eval_fraction <= 0:
        raise ConfigError(
            "sweep compares runs on held-out pairs: set eval_data (a file) or eval_fraction "
            "(e.g. 0.1) in the config"
        )
    root = Path(config.output_dir)
    values = config.to_dict()
    configs = []
    for beta, loss in itertools.product(betas, losses):
        run = TrainConfig.from_dict(
            {**values, "beta": beta, "loss": loss, "output_dir": str(root / run_name(beta, loss))}
        )
        if not run.needs_reference or run.reference == "none":
            raise ConfigError(
                f"loss {loss!r} is reference-free: a sweep measures reward accuracy and drift "
                "against the reference; sweep losses that use one (sigmoid, ipo, hinge, ...)"
            )
        configs.append(run)
    return configs


def run_sweep(
    config: TrainConfig,
    *,
    betas: list[float] | None = None,
    losses: list[Any] | None = None,
    print_fn=print,
) -> SweepResult:
    """Train, measure and compare every combination (see the module docstring)."""
    from fastdpo.train.trainer import Trainer

    configs = plan_runs(config, betas or [config.beta], losses or [config.loss])
    root = Path(config.output_dir)
    runs: list[SweepRun] = []
    for index, run_config in enumerate(configs, start=1):
        name = Path(run_config.output_dir).name
        print_fn(f"[{index}/{len(configs)}] {name}")
        trainer = Trainer(run_config)
        result = trainer.train()
        run = SweepRun(
            name=name,
            beta=run_config.beta,
            loss=run_config.loss,
            output_dir=run_config.output_dir,
            reference_built=trainer.reference.built,
            reference_caches=trainer.reference.paths(),
            metrics=heldout_metrics(trainer),
        )
        eval_rows = [row for row in result.history if "eval/loss" in row]
        if eval_rows:
            run.metrics["eval_loss"] = eval_rows[-1]["eval/loss"]
        runs.append(run)
        del trainer
    best = pick_best(runs)
    sweep = SweepResult(runs=runs, best=best, output_dir=root)
    sweep.plot = _plot(runs, root / "sweep.png")
    write_json_atomic(
        root / "sweep.json",
        {
            "rule": BEST_RULE,
            "best": best.name,
            "runs": [dataclasses.asdict(run) for run in runs],
            "plot": str(sweep.plot) if sweep.plot else None,
        },
    )
    return sweep


def pick_best(runs: list[SweepRun]) -> SweepRun:
    """The run with the highest reward accuracy; among equals, the lowest drift_abs (then the
    earlier run)."""
    return min(runs, key=lambda r: (-r.metrics["reward_accuracy"], r.metrics["drift_abs"]))


@torch.no_grad()
def heldout_metrics(trainer) -> dict[str, float]:
    """Reward accuracy, margins and drift of the trainer's policy on its held-out pairs."""
    from fastdpo.model import sequence_logps
    from fastdpo.train.data import eval_batches

    model, reference = trainer.model, trainer.reference.eval
    batches = eval_batches(
        trainer.data.eval,
        max_tokens_per_batch=trainer.config.max_tokens_per_batch,
        share_prompt=trainer.data.share_prompt,
    )
    policy, ref = [], []
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = batch.to(trainer.device)
            with trainer._autocast():
                out = sequence_logps(model, batch)
            ref_values = reference.for_batch(batch)
            policy.append(torch.stack([out.chosen, out.rejected], 1).double().cpu())
            ref.append(torch.stack([ref_values.chosen, ref_values.rejected], 1).double().cpu())
    finally:
        model.train(was_training)
    logratio = torch.cat(policy) - torch.cat(ref)  # fp64 [P, 2]: log pi - log pi_ref
    margin = logratio[:, 0] - logratio[:, 1]
    beta = trainer.config.beta
    return {
        "pairs": float(logratio.shape[0]),
        "reward_accuracy": float((margin > 0).double().mean()),
        "reward_margin": float(beta * margin.mean()),
        "logratio_margin": float(margin.mean()),
        "drift_chosen": float(logratio[:, 0].mean()),
        "drift_rejected": float(logratio[:, 1].mean()),
        "drift_abs": float(logratio.abs().mean()),
    }


def _plot(runs: list[SweepRun], path: Path) -> Path | None:
    """sweep.png: accuracy, margin, drift against beta, one line per loss; None without
    matplotlib (a message says so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("no sweep.png: matplotlib is not installed (pip install 'fastdpo[plot]')")
        return None
    panels = (
        ("held-out reward accuracy", ("reward_accuracy",)),
        ("log-ratio margin (chosen - rejected)", ("logratio_margin",)),
        ("drift: mean log pi - log pi_ref", ("drift_chosen", "drift_rejected")),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    losses = list(dict.fromkeys(loss_label(r.loss) for r in runs))
    for axis, (title, keys) in zip(axes, panels, strict=True):
        for loss in losses:
            mine = sorted(
                (r for r in runs if loss_label(r.loss) == loss),
                key=lambda r: r.beta,
            )
            for key in keys:
                label = loss if len(keys) == 1 else f"{loss} {key.split('_')[1]}"
                axis.plot([r.beta for r in mine], [r.metrics[key] for r in mine], "o-", label=label)
        axis.set_xscale("log")
        axis.set_xlabel("beta")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
