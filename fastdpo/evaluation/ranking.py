"""`evaluate`: rank models on the same preference pairs, with bootstrap confidence intervals.

    report = fastdpo.evaluate(["runs/a/final", "runs/b/final"], "heldout.jsonl", ref="base")
    report["ranking"][0]["model"]       # the best model by the headline accuracy

Per model, on the same pairs (one model in memory at a time; the reference, a model or a cache,
is read once and reused for every model):

- `logp_accuracy`: fraction of pairs whose chosen completion has the higher summed log-prob;
- `normalized_logp_accuracy`: the same with log-probs divided by completion length;
- with a reference, DPO's implicit reward `r = beta * (log pi - log pi_ref)`:
  `reward_accuracy` (r_chosen > r_rejected), `reward_margin` (mean r_chosen - r_rejected),
  `chosen_reward`, `rejected_reward` (means) and `loss` (mean DPO sigmoid loss
  `-log sigmoid(r_chosen - r_rejected)`).

A margin of exactly 0 (a tie) counts as half a correct pair. Each accuracy gets a 95% interval
from a percentile bootstrap over pairs: `n_boot` resamples drawn from `seed`, the same
resamples for every model and metric, so intervals of different models are paired.

The ranking is best first by the headline accuracy: `reward_accuracy` with a reference,
`logp_accuracy` without (ties keep the order the models were given). Metrics are computed in
float64 from the fp32 summed log-probs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastdpo.evaluation.data import (
    EvalData,
    is_pretokenized,
    prepare_data,
    tokenization_kwargs,
)
from fastdpo.evaluation.logps import (
    ExampleLogps,
    cache_logps,
    check_one_kind,
    default_budget,
    model_logps,
    open_reference_cache,
)
from fastdpo.evaluation.models import (
    EvaluationInputError,
    check_local_paths,
    load_tokenizer,
    model_specs,
    opened,
    resolve_device,
    resolve_dtype,
)
from fastdpo.reference import ReferenceCache

ACCURACIES = ("logp_accuracy", "normalized_logp_accuracy", "reward_accuracy")
"""The accuracy metrics, each reported with a `<name>_ci95` interval."""


def evaluate(
    models: Any,
    pairs: Any,
    *,
    ref: str | nn.Module | ReferenceCache | None = None,
    beta: float = 0.1,
    tokenizer: Any = None,
    max_length: int | None = None,
    tokenization: Mapping[str, Any] | None = None,
    device: str | torch.device | None = "auto",
    dtype: str = "auto",
    attention: str = "auto",
    max_tokens_per_batch: int | None = None,
    on_bad_row: str = "error",
    split: str = "train",
    seed: int = 0,
    n_boot: int = 1000,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Rank `models` on preference `pairs` (see the module docstring for the metrics).

    Args:
        models: a model folder / Hub id / loaded `nn.Module`, a list of them, or a mapping
            name -> one of them. Paths are loaded one at a time and freed after scoring.
        pairs: preference data: a path, rows, a Dataset, `PreferenceExample`s or
            `TokenizedPair`s (paired only).
        ref: the reference: a model (folder, Hub id or module; scored once) or a reference
            cache (folder or `ReferenceCache`) built for these pairs with the same tokenizer
            and tokenization settings. None: no reward metrics.
        beta: the implicit reward's beta (> 0).
        tokenizer: a tokenizer; default: loaded from the first model path (or `ref`).
        max_length, tokenization: tokenization options (`TOKENIZATION_FIELDS`, TrainConfig's
            defaults), the same as training's so a training cache matches.
        device, dtype, attention: where and how loaded models run ("auto": CUDA when present;
            bf16 weights on CUDA, fp32 on the CPU; packed-attention backend). Modules stay
            where they are.
        max_tokens_per_batch: packed micro-batch budget (default: the reference pass's).
        on_bad_row: "error" or "skip" (skipped and truncated rows are counted in the report).
        seed, n_boot: bootstrap resamples (0: no intervals).

    Returns:
        the report: {"ranking": [{"rank", "model", "metric", "accuracy", "ci95"}, ...] best
        first, "models": {name: metrics}, "pairs": N, "data": counts, "settings": {...}}.
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise EvaluationInputError(f"beta: got {beta!r}; allowed: a finite number > 0")
    if n_boot < 0:
        raise EvaluationInputError(f"n_boot: got {n_boot}; allowed: an integer >= 0")
    specs = model_specs(models)
    ref_is_cache = isinstance(ref, ReferenceCache) or (
        isinstance(ref, (str, os.PathLike)) and (Path(ref) / "manifest.json").exists()
    )
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    checks = [(f"model {s.name!r}", s.source) for s in specs]
    if isinstance(ref, str) and not ref_is_cache:
        checks.append(("ref", ref))
    check_local_paths(checks)
    run_device = resolve_device(device)
    weights_dtype = resolve_dtype(dtype, run_device)
    tokenize = tokenization_kwargs(max_length, tokenization)
    if tokenizer is None and not is_pretokenized(pairs):
        tokenizer = _default_tokenizer(specs, ref, ref_is_cache)
    data = prepare_data(pairs, tokenizer, tokenize=tokenize, on_bad_row=on_bad_row, split=split)
    if not check_one_kind(data.pairs):
        raise EvaluationInputError(
            "data: evaluation needs preference pairs (chosen and rejected); these rows are "
            "single responses: score them with `fastdpo score`"
        )
    budget = max_tokens_per_batch or default_budget(run_device, tokenize["max_length"])
    load = dict(
        device=run_device,
        dtype=weights_dtype,
        attention=attention,
        trust_remote_code=trust_remote_code,
    )

    ref_logps = None
    if ref is not None:
        if ref_is_cache:
            cache = open_reference_cache(
                ref, data.pairs, tokenizer=tokenizer, settings=data.settings
            )
            ref_logps = cache_logps(cache, data.pairs)
        else:
            with opened(ref, **load, what="ref") as ref_model:
                ref_logps = model_logps(ref_model, data.pairs, max_tokens_per_batch=budget)

    scores: dict[str, dict[str, np.ndarray]] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for spec in specs:
        with opened(spec.source, **load, what=f"model {spec.name!r}") as model:
            policy = model_logps(model, data.pairs, max_tokens_per_batch=budget)
        metrics[spec.name], scores[spec.name] = pair_metrics(policy, ref_logps, beta)
    add_intervals(metrics, scores, n_boot=n_boot, seed=seed)
    headline = "reward_accuracy" if ref is not None else "logp_accuracy"
    return {
        "ranking": rank(metrics, headline),
        "models": metrics,
        "pairs": len(data.pairs),
        "data": data.counts,
        "settings": _settings(
            data, ref, ref_is_cache, beta, budget, run_device, weights_dtype, seed, n_boot
        ),
    }


def _default_tokenizer(specs, ref, ref_is_cache: bool):
    paths = [s.source for s in specs if isinstance(s.source, str)]
    if isinstance(ref, str) and not ref_is_cache:
        paths.append(ref)
    if not paths:
        raise EvaluationInputError(
            "tokenizer: the models are all loaded modules; pass tokenizer= (or tokenized pairs)"
        )
    return load_tokenizer(paths[0])


def pair_metrics(
    policy: ExampleLogps, ref: ExampleLogps | None, beta: float
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metrics, per-pair scores of each accuracy: fp64 [N] of 1, 0.5 (tie) or 0)."""
    chosen, rejected = _f64(policy.chosen), _f64(policy.rejected)
    margin = chosen - rejected
    normalized = chosen / np.maximum(policy.chosen_lengths.numpy(), 1) - rejected / np.maximum(
        policy.rejected_lengths.numpy(), 1
    )
    scores = {"logp_accuracy": _correct(margin), "normalized_logp_accuracy": _correct(normalized)}
    metrics: dict[str, Any] = {
        "mean_logp_margin": float(margin.mean()),
        "mean_normalized_logp_margin": float(normalized.mean()),
        "chosen_logp": float(chosen.mean()),
        "rejected_logp": float(rejected.mean()),
    }
    ties = {"logp_accuracy": int((margin == 0).sum()), "normalized_logp_accuracy": 0}
    ties["normalized_logp_accuracy"] = int((normalized == 0).sum())
    if ref is not None:
        chosen_reward = beta * (chosen - _f64(ref.chosen))
        rejected_reward = beta * (rejected - _f64(ref.rejected))
        reward_margin = chosen_reward - rejected_reward
        scores["reward_accuracy"] = _correct(reward_margin)
        ties["reward_accuracy"] = int((reward_margin == 0).sum())
        metrics.update(
            reward_margin=float(reward_margin.mean()),
            chosen_reward=float(chosen_reward.mean()),
            rejected_reward=float(rejected_reward.mean()),
            # -log sigmoid(x) = log(1 + exp(-x)), stable for large |x|
            loss=float(np.logaddexp(0.0, -reward_margin).mean()),
        )
    for name, values in scores.items():
        metrics[name] = float(values.mean())
    metrics["ties"] = ties
    return metrics, scores


def _f64(values: torch.Tensor) -> np.ndarray:
    return values.double().numpy()


def _correct(margin: np.ndarray) -> np.ndarray:
    """1 where the margin is positive, 0.5 where it is exactly 0 (a tie), 0 otherwise."""
    return (margin > 0).astype(np.float64) + 0.5 * (margin == 0)


def bootstrap_means(
    scores: np.ndarray, *, n_boot: int, seed: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Means of `scores` ([K, N] fp64) over `n_boot` resamples of the N columns: fp64
    [n_boot, K]. Resample b takes `rng.integers(0, N, size=N)` of `np.random.default_rng(seed)`,
    in order, so the same seed gives the same resamples for every row."""
    rng = np.random.default_rng(seed)
    count = scores.shape[1]
    means = np.empty((n_boot, scores.shape[0])) if out is None else out
    for b in range(n_boot):
        means[b] = scores[:, rng.integers(0, count, size=count)].mean(axis=1)
    return means


def add_intervals(
    metrics: dict[str, dict[str, Any]],
    scores: dict[str, dict[str, np.ndarray]],
    *,
    n_boot: int,
    seed: int,
) -> None:
    """Set `<accuracy>_ci95` = [2.5th, 97.5th percentile] of the bootstrap means (None when
    n_boot is 0), every model and accuracy resampled with the same pair indices."""
    keys = [(model, name) for model, per in scores.items() for name in per]
    if n_boot == 0:
        for model, name in keys:
            metrics[model][f"{name}_ci95"] = None
        return
    stacked = np.stack([scores[model][name] for model, name in keys])  # [K, N]
    means = bootstrap_means(stacked, n_boot=n_boot, seed=seed)
    low, high = np.percentile(means, [2.5, 97.5], axis=0)
    for k, (model, name) in enumerate(keys):
        metrics[model][f"{name}_ci95"] = [float(low[k]), float(high[k])]


def rank(metrics: dict[str, dict[str, Any]], headline: str) -> list[dict[str, Any]]:
    """Models best first by `headline` (a stable sort: ties keep the given order)."""
    order = sorted(metrics, key=lambda name: -metrics[name][headline])
    return [
        {
            "rank": position + 1,
            "model": name,
            "metric": headline,
            "accuracy": metrics[name][headline],
            "ci95": metrics[name][f"{headline}_ci95"],
        }
        for position, name in enumerate(order)
    ]


def _settings(data: EvalData, ref, ref_is_cache, beta, budget, device, dtype, seed, n_boot):
    if ref is None:
        ref_text = None
    elif isinstance(ref, ReferenceCache):
        ref_text = str(ref.path)
    elif isinstance(ref, nn.Module):
        ref_text = type(ref).__name__
    else:
        ref_text = str(ref)
    return {
        "ref": ref_text,
        "ref_kind": None if ref is None else ("cache" if ref_is_cache else "model"),
        "beta": beta,
        "tokenization": data.settings,
        "max_tokens_per_batch": budget,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "seed": seed,
        "n_boot": n_boot,
        "ties": "a pair whose margin is exactly 0 counts as half correct",
    }


# ------------------------------------------------------------------------------------------------
# Output


def format_table(report: dict[str, Any]) -> str:
    """The ranking as a fixed-width text table (one row per model, best first)."""
    has_ref = report["settings"]["ref"] is not None
    header = [
        "rank",
        "model",
        report["ranking"][0]["metric"] if report["ranking"] else "",
        "95% CI",
    ]
    header += ["logp acc", "norm. acc"]
    if has_ref:
        header += ["reward margin", "loss"]
    rows = [header]
    for entry in report["ranking"]:
        m = report["models"][entry["model"]]
        ci = entry["ci95"]
        row = [
            str(entry["rank"]),
            entry["model"],
            f"{entry['accuracy']:.4f}",
            "-" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]",
            f"{m['logp_accuracy']:.4f}",
            f"{m['normalized_logp_accuracy']:.4f}",
        ]
        if has_ref:
            row += [f"{m['reward_margin']:.4f}", f"{m['loss']:.4f}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)
