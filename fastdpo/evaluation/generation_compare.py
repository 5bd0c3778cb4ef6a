"""Compare models by what they generate: one judge score per answer, then win rates and a
Bradley-Terry ranking (`fastdpo eval --generate`).

    report = compare_generations(["runs/a/final", "runs/b/final"], "prompts.jsonl",
                                 "my_judges:helpfulness", num_samples=1, seed=0)
    report["ranking"]     # [{"model", "mean_score", "bt_score", ...}, ...] best first

Each model answers every prompt `num_samples` times (one model in memory at a time), and the
judge scores every answer once: n models x prompts x num_samples judge calls, never a judge
call per model pair. A model's score on a prompt is the mean of its samples' scores; model A
beats B on a prompt when its score is higher (equal scores: a tie, half a win each). From those
per-prompt outcomes:

- `win_rates[A][B]`: A's share of wins over B (ties half) on the prompts both answered;
- a Bradley-Terry fit (P(A beats B) = p_A / (p_A + p_B)) by Hunter's MM iteration
  (`fit_bradley_terry`); `bt_score` = log p, centred to mean 0. The ranking is by `bt_score`
  (then mean score).

A NaN score leaves that answer out (counted per model in `nan_scores`); a prompt with no
scored answer from a model is left out of that model's comparisons. A judge that raises is an
error naming the model and the prompt.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fastdpo.evaluation.judges import Judge, JudgeError, load_judge
from fastdpo.evaluation.sampling import (
    SamplingSettings,
    load_for_sampling,
    load_prompts,
    sample_responses,
)


def compare_generations(
    models: list[str],
    prompts: str | list,
    judge: str | Callable | Judge,
    *,
    num_samples: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """Sample every model on every prompt, judge each answer once, rank (module docstring).

    Returns a JSON-ready dict: "ranking" (best first: model, mean_score, bt_score, nan_scores,
    wins), "win_rates" ({A: {B: share}}), "judge_calls", "prompts", "sampling", "judge",
    "bt_prior" (0, or 0.5 when a model won or lost every comparison and the fit needed a
    virtual tie per compared pair to stay finite).
    """
    models = [str(m) for m in models]
    if len(models) < 2:
        raise ValueError(f"compare_generations needs two or more models, got {len(models)}")
    if len(set(models)) != len(models):
        raise ValueError(f"models: each model once, got {models}")
    sampling = SamplingSettings(
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    for path in models:  # a typo in the last model fails before the first one samples
        if path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"model {path}: no such folder")
    prompt_list = load_prompts(prompts)
    judge = load_judge(judge, device=device)
    calls_before = judge.calls
    per_prompt = np.full((len(models), len(prompt_list)), np.nan)  # [n, prompts] fp64
    means, nan_counts = [], []
    for m, path in enumerate(models):
        model, tokenizer = load_for_sampling(path, device=device)
        responses = sample_responses(model, tokenizer, prompt_list, sampling)
        del model
        items = [(p, r) for p, group in zip(prompt_list, responses, strict=True) for r in group]
        try:
            scores = np.asarray(judge.score(items), dtype=np.float64)
        except JudgeError as error:
            prompt_index = None if error.index is None else error.index // num_samples
            raise JudgeError(
                f"model {path}, prompt {prompt_index}: {error}", prompt_index
            ) from error
        scores = scores.reshape(len(prompt_list), num_samples)
        finite = ~np.isnan(scores)
        counts = finite.sum(axis=1)
        sums = np.where(finite, scores, 0.0).sum(axis=1)
        per_prompt[m] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        nan_counts.append(int((~finite).sum()))
        means.append(float(scores[finite].mean()) if finite.any() else math.nan)

    wins, compared = pairwise_outcomes(per_prompt)
    unscored = [path for m, path in enumerate(models) if not compared[m].any()]
    if unscored:
        raise ValueError(
            f"no prompt where {unscored[0]} and another model both have a scored answer (the "
            "judge gave NaN); nothing to rank it by: check the judge on its answers"
        )
    win_rates = {
        a: {
            b: (float(wins[i, j] / compared[i, j]) if compared[i, j] else None)
            for j, b in enumerate(models)
            if j != i
        }
        for i, a in enumerate(models)
    }
    prior = 0.0 if _mle_is_finite(wins, compared) else 0.5
    strengths = fit_bradley_terry(
        wins + prior * (compared > 0), compared + 2 * prior * (compared > 0)
    )
    bt = np.log(strengths)
    bt -= bt.mean()
    ranking = [
        {
            "model": path,
            "mean_score": means[m],
            "bt_score": float(bt[m]),
            "wins": float(wins[m].sum()),
            "nan_scores": nan_counts[m],
        }
        for m, path in enumerate(models)
    ]
    ranking.sort(key=lambda r: (-r["bt_score"], -_or_minus_inf(r["mean_score"])))
    return {
        "ranking": ranking,
        "win_rates": win_rates,
        "judge_calls": judge.calls - calls_before,
        "prompts": len(prompt_list),
        "num_samples": num_samples,
        "sampling": sampling.to_dict(),
        "judge": judge.name,
        "bt_prior": prior,
    }


def pairwise_outcomes(per_prompt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(wins [n, n], compared [n, n]) from fp64 scores [n models, prompts] (NaN: no score).

    `wins[i, j]`: prompts where model i scored higher than j, plus half the ties;
    `compared[i, j]`: prompts both scored (symmetric; `wins + wins.T == compared`)."""
    a = per_prompt[:, None, :]
    b = per_prompt[None, :, :]
    both = ~np.isnan(a) & ~np.isnan(b)
    wins = ((a > b) & both).sum(-1) + 0.5 * ((a == b) & both).sum(-1)
    compared = both.sum(-1).astype(np.float64)
    np.fill_diagonal(compared, 0.0)
    wins = wins.astype(np.float64)
    np.fill_diagonal(wins, 0.0)
    return wins, compared


def _mle_is_finite(wins: np.ndarray, compared: np.ndarray) -> bool:
    """The BT maximum-likelihood strengths are finite when the 'beats' graph (an edge i -> j
    when i has more than zero wins over j) is strongly connected (Hunter 2004, assumption 1)."""
    n = wins.shape[0]
    beats = (wins > 0) & (compared > 0)

    def reach(adjacency: np.ndarray) -> set[int]:
        seen, todo = {0}, [0]
        while todo:
            i = todo.pop()
            for j in np.flatnonzero(adjacency[i]):
                if int(j) not in seen:
                    seen.add(int(j))
                    todo.append(int(j))
        return seen

    return len(reach(beats)) == n and len(reach(beats.T)) == n


def fit_bradley_terry(
    wins: np.ndarray, compared: np.ndarray, *, tol: float = 1e-12, max_iter: int = 100_000
) -> np.ndarray:
    """fp64 [n] Bradley-Terry strengths p (geometric mean 1) maximizing
    sum_ij wins[i, j] * log(p_i / (p_i + p_j)), by Hunter's MM update
    p_i <- W_i / sum_j compared[i, j] / (p_i + p_j) (W_i = sum_j wins[i, j]).

    `wins` [n, n] may hold half-wins (ties); `compared` [n, n] is symmetric with
    `wins + wins.T == compared`. Needs a strongly connected 'beats' graph for a finite fit."""
    wins = np.asarray(wins, dtype=np.float64)
    compared = np.asarray(compared, dtype=np.float64)
    total_wins = wins.sum(axis=1)
    if np.any(total_wins <= 0):
        raise ValueError(
            "fit_bradley_terry: a model with no wins has strength 0 (log -inf); add a prior "
            "(a virtual tie per compared pair) first"
        )
    strengths = np.ones(wins.shape[0])
    for _ in range(max_iter):
        denominator = (compared / (strengths[:, None] + strengths[None, :])).sum(axis=1)
        updated = total_wins / denominator
        updated /= np.exp(np.log(updated).mean())
        change = np.max(np.abs(np.log(updated) - np.log(strengths)))
        strengths = updated
        if change < tol:
            break
    return strengths


def _or_minus_inf(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def format_ranking(report: dict[str, Any]) -> list[str]:
    """The ranking as printed: model, mean judge score, BT score, win rate over the others."""
    width = max(len(r["model"]) for r in report["ranking"])
    lines = [f"  {'model':<{width}}  {'mean score':>10}  {'BT score':>9}  {'NaN':>4}"]
    for row in report["ranking"]:
        lines.append(
            f"  {row['model']:<{width}}  {row['mean_score']:>10.4f}  {row['bt_score']:>+9.4f}"
            f"  {row['nan_scores']:>4}"
        )
    lines.append(
        f"  {report['judge_calls']} judge calls ({len(report['ranking'])} models x "
        f"{report['prompts']} prompts x {report['num_samples']} samples); ranked by "
        "Bradley-Terry score, best first"
    )
    return lines
