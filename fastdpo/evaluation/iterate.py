"""`fastdpo iterate`: rounds of sample -> judge -> pair -> train (online / iterative DPO).

    settings = IterateSettings(rounds=2, judge="fastdpo.demo.task:judge", prompts="p.jsonl")
    result = run_iterate(TrainConfig.from_yaml("dpo.yaml", {"data": "p.jsonl"}), settings)
    result.mean_scores        # judge mean score of the policy's samples: start, round 1, ...

Round k (in `output_dir/round_<k>/`):
1. the current policy (the config's `model` in round 1, then the previous round's final model)
   samples `num_samples` responses per prompt; the judge scores each; the scored groups become
   pairs (`generate_pairs`: pairing policy, skips counted) in `round_<k>/pairs.jsonl`;
2. the reference is the round's starting policy (`reference="round_start"`, default: each
   round is a DPO step away from the last) or the config's original `ref_model`/`model`
   (`reference="original"`: every round is held to the same anchor); its log-probs are cached
   as in any run;
3. `fastdpo.Trainer` trains on those pairs with the config's settings, writing its usual
   config.yaml, metrics.jsonl and final/ in `round_<k>/`;
4. `round_<k>/round.json` records the round: sampling, skip counts, mean judge score of the
   samples it trained on, the trainer's last metrics.

The mean judge score of the samples of round k is the score of the policy after k - 1 rounds;
after the last round the final policy is sampled once more (same prompts and settings, so
the scores are comparable), giving R + 1 points. `iterate.json` and the printed table list
them; `iterate.png` plots them (skipped with a message without matplotlib).

Prompts default to the `prompt` column of the config's `data`. The config's `data` is replaced
by each round's pairs; held-out data (`eval_data`) is used as given.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastdpo.evaluation.judges import Judge, load_judge
from fastdpo.evaluation.pair_generation import (
    PairGenerationSummary,
    generate_pairs,
    write_json_atomic,
)
from fastdpo.evaluation.sampling import SamplingSettings
from fastdpo.train.config import ConfigError, TrainConfig

logger = logging.getLogger("fastdpo.iterate")

REFERENCE_CHOICES = ("round_start", "original")


class NoPairsError(RuntimeError):
    """A round's samples gave no pair to train on (every prompt skipped; the counts say why)."""


@dataclass(kw_only=True)
class IterateSettings:
    """What `fastdpo iterate` adds to a `TrainConfig` (command options, not config keys)."""

    rounds: int
    """Rounds of sample -> judge -> train."""
    judge: Any
    """A judge spec (see `fastdpo.evaluation.judges`), a callable or a `Judge`."""
    prompts: Any = None
    """Prompts to sample on (default: the `prompt` column of the config's `data`)."""
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(num_samples=4))
    """Samples per prompt, length, temperature, top_p, seed (the seed moves on by one per round:
    a round's draws differ from the last one's)."""
    pairing: str = "best_vs_worst"
    """How scored samples become pairs (`fastdpo.data.ranking`)."""
    min_score_gap: float = 0.0
    """Smallest score gap of a pair."""
    on_judge_error: str = "error"
    """A judge that raises: "error" stops, "skip" counts the prompt and goes on."""
    reference: str = "round_start"
    """The reference of each round: "round_start" (the policy the round starts from) or
    "original" (the config's ref_model, or model)."""
    judge_beta: float = 0.1
    """Beta of an implicit-reward judge."""

    def __post_init__(self) -> None:
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds: got {self.rounds!r}; allowed: an integer >= 1")
        if self.reference not in REFERENCE_CHOICES:
            raise ValueError(
                f"reference: got {self.reference!r}; allowed: {', '.join(REFERENCE_CHOICES)}"
            )


@dataclass(kw_only=True)
class RoundRecord:
    """One round as written to round_<k>/round.json."""

    round: int
    policy: str
    """The model that sampled (the round's starting policy)."""
    reference: str
    """The model whose log-probs the round's cache holds."""
    mean_score: float
    """Judge mean score of the round's samples (of `policy`)."""
    pairs: int
    skipped: dict[str, int]
    final_model: str
    train_metrics: dict[str, float] = field(default_factory=dict)
    """The trainer's last logged training row (loss, rewards/accuracies, ...)."""


@dataclass(kw_only=True)
class IterateResult:
    rounds: list[RoundRecord]
    final_mean_score: float
    """Judge mean score of the final policy's samples."""
    output_dir: Path
    plot: Path | None = None

    @property
    def mean_scores(self) -> list[float]:
        """Judge mean score per policy: the start, then after each round."""
        return [r.mean_score for r in self.rounds] + [self.final_mean_score]

    def table_lines(self) -> list[str]:
        lines = [f"  {'after round':<12}{'judge mean score':>17}{'pairs trained':>15}  policy"]
        for k, score in enumerate(self.mean_scores):
            pairs = f"{self.rounds[k].pairs}" if k < len(self.rounds) else "-"
            policy = self.rounds[k].policy if k < len(self.rounds) else self.rounds[-1].final_model
            lines.append(f"  {k:<12}{score:>17.4f}{pairs:>15}  {policy}")
        return lines


def run_iterate(config: TrainConfig, settings: IterateSettings, *, print_fn=print) -> IterateResult:
    """Run the rounds (see the module docstring); returns the per-round records."""
    from fastdpo.train.trainer import Trainer

    root = Path(config.output_dir)
    prompts = settings.prompts if settings.prompts is not None else config.data
    if prompts is None:
        raise ConfigError("iterate: give --prompts, or data (its prompt column) in the config")
    original_reference = config.ref_model_path
    judge: Judge = load_judge(settings.judge, device=_device(config), beta=settings.judge_beta)
    policy = config.model
    rounds: list[RoundRecord] = []
    values = config.to_dict()
    for k in range(1, settings.rounds + 1):
        folder = root / f"round_{k}"
        sampling = dataclasses.replace(settings.sampling, seed=settings.sampling.seed + k - 1)
        print_fn(f"[round {k}/{settings.rounds}] sampling from {policy}")
        generated = generate_pairs(
            policy,
            prompts,
            judge,
            out=folder / "pairs.jsonl",
            sampling=sampling,
            pairing=settings.pairing,
            min_score_gap=settings.min_score_gap,
            on_judge_error=settings.on_judge_error,
            device=_device(config),
        )
        summary = generated.summary
        print_fn(f"  judge mean score {summary.mean_score:.4f}; {summary.pairs} pairs")
        if not generated.rows:
            raise NoPairsError(
                f"round {k}: no pair could be formed from the samples ({_skips(summary)}); "
                "sample more per prompt, raise the temperature, or use a judge that tells "
                "the samples apart"
            )
        reference = policy if settings.reference == "round_start" else original_reference
        round_config = TrainConfig.from_dict(
            {
                **values,
                "model": policy,
                "ref_model": reference,
                "tokenizer": config.tokenizer,
                "data": str(folder / "pairs.jsonl"),
                "output_dir": str(folder),
                "reference": "auto",
            }
        )
        trainer = Trainer(round_config)
        result = trainer.train()
        del trainer
        train_rows = [row for row in result.history if "loss" in row]
        record = RoundRecord(
            round=k,
            policy=str(policy),
            reference=str(reference),
            mean_score=summary.mean_score,
            pairs=summary.pairs,
            skipped=summary.skipped,
            final_model=str(result.final_dir),
            train_metrics={
                key: value
                for key, value in (train_rows[-1] if train_rows else {}).items()
                if isinstance(value, (int, float))
            },
        )
        write_json_atomic(folder / "round.json", dataclasses.asdict(record))
        rounds.append(record)
        policy = str(result.final_dir)

    print_fn(f"[final] sampling from {policy}")
    final_sampling = dataclasses.replace(
        settings.sampling, seed=settings.sampling.seed + settings.rounds
    )
    final = generate_pairs(
        policy,
        prompts,
        judge,
        out=root / "final_pairs.jsonl",
        sampling=final_sampling,
        pairing=settings.pairing,
        min_score_gap=settings.min_score_gap,
        on_judge_error=settings.on_judge_error,
        device=_device(config),
    )
    judge.close()
    result = IterateResult(
        rounds=rounds, final_mean_score=final.summary.mean_score, output_dir=root
    )
    result.plot = _plot(result.mean_scores, root / "iterate.png")
    write_json_atomic(
        root / "iterate.json",
        {
            "mean_scores": result.mean_scores,
            "rounds": [dataclasses.asdict(r) for r in rounds],
            "final_model": policy,
            "reference": settings.reference,
            "sampling": settings.sampling.to_dict(),
            "pairing": settings.pairing,
            "judge": judge.name,
            "plot": str(result.plot) if result.plot else None,
        },
    )
    return result


def _device(config: TrainConfig) -> str | None:
    return None if config.device == "auto" else config.device


def _skips(summary: PairGenerationSummary) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(summary.skipped.items())) or "no skips"


def _plot(scores: list[float], path: Path) -> Path | None:
    """iterate.png: judge mean score per round; None without matplotlib (a message says so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("no iterate.png: matplotlib is not installed (pip install 'fastdpo[plot]')")
        return None
    figure, axis = plt.subplots(figsize=(5, 3.6))
    finite = [(k, s) for k, s in enumerate(scores) if not math.isnan(s)]
    if finite:
        axis.plot(*zip(*finite, strict=True), "o-")
    axis.set_xlabel("rounds of training")
    axis.set_ylabel("judge mean score of samples")
    axis.set_xticks(range(len(scores)))
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
