"""Preference pairs from a model's own samples: sample K responses per prompt, judge, pair.

    result = generate_pairs("path/to/model", "prompts.jsonl", "my_judges:length_judge",
                            out="pairs.jsonl", sampling=SamplingSettings(num_samples=4))
    fastdpo.load_preference_data("pairs.jsonl")   # reads them back

Each prompt gets `num_samples` responses (`fastdpo.evaluation.sampling`), the judge scores each
response once, and the scored group becomes pairs by a pairing policy, the same named policies
`load_preference_data` applies to ranked rows (`fastdpo.data.ranking`):

- "best_vs_worst" (default): one pair per prompt, the best response against the worst;
- "best_vs_each": the best against every response scored lower;
- "all_pairs": every pair with a positive score gap.

A pair needs a positive score gap of at least `min_score_gap`; ties are never paired. What
cannot become a pair is skipped and counted, never dropped silently: a group whose scores are
all equal ("all_equal"), a group whose gaps are all below `min_score_gap` ("gap_below_min"),
responses the judge scored NaN ("nan_score", per response; a group left with fewer than two
scored responses is "too_few_scored"), identical texts scored differently ("identical", per
pair), and, with `on_judge_error="skip"`, prompts whose judging raised ("judge_error").
With `on_judge_error="error"` (default) a judge that raises stops the run naming the prompt.

Output rows (JSONL, written atomically) are what `load_preference_data` reads: `prompt` as given
(text, or chat messages), `chosen` / `rejected` in the same kind (text, or one assistant
message), an `id` (`<prompt index>:<chosen sample>><rejected sample>`), `chosen_score`,
`rejected_score`, and `generation`: every sample's score of the prompt, the sampling settings,
the pairing policy, the model and the judge. (The scores of the group are not a top-level
`scores` column: with one, the loader would read the row as a ranked row.) A summary of the
counts is written next to the output as `<out stem>.summary.json`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastdpo.data.ranking import PAIRING_POLICIES, rank_pairs
from fastdpo.evaluation.judges import Judge, JudgeError, load_judge
from fastdpo.evaluation.sampling import (
    SamplingSettings,
    load_for_sampling,
    load_prompts,
    sample_responses,
)

ON_JUDGE_ERROR = ("error", "skip")


@dataclass(kw_only=True)
class PairGenerationSummary:
    """What `generate_pairs` did: counts, written next to the output as JSON."""

    prompts: int
    """Distinct prompts read."""
    samples: int
    """Responses sampled (prompts x num_samples)."""
    judge_calls: int
    """Responses the judge scored (one call per response)."""
    pairs: int
    """Pairs written."""
    prompts_with_pairs: int
    """Prompts that gave at least one pair."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Reason -> count (see the module docstring for the reasons and what they count)."""
    skipped_examples: list[dict[str, Any]] = field(default_factory=list)
    """The first skipped prompts: {"prompt_index", "reason", "detail"}."""
    mean_score: float = math.nan
    """Mean judge score of the responses it scored (NaN scores left out)."""
    pairing: str = "best_vs_worst"
    sampling: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    judge: str = ""
    output: str = ""

    def lines(self) -> list[str]:
        """The summary as printed by `fastdpo generate-pairs`."""
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        return [
            f"generated {self.pairs} pairs from {self.prompts_with_pairs} of {self.prompts} "
            f"prompts ({self.samples} samples, {self.judge_calls} judge calls, pairing "
            f"{self.pairing})",
            f"  mean judge score {self.mean_score:.4f}; skipped: {skipped}",
            f"  written to {self.output} (summary: {summary_path(self.output)})",
        ]


_LISTED_SKIPS = 20


@dataclass(kw_only=True)
class PairGenerationResult:
    """The summary, the rows written and every sample's score, per prompt."""

    summary: PairGenerationSummary
    rows: list[dict[str, Any]]
    scores: list[list[float]]
    """[prompt][sample] judge scores (NaN where the judge said NaN or raised and was skipped)."""
    responses: list[list[str]]
    """[prompt][sample] sampled responses."""


def summary_path(out: str | Path) -> Path:
    """Where the summary of `out` goes: `<stem>.summary.json` beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".summary.json")


def generate_pairs(
    model: str,
    prompts: Any,
    judge: str | Judge | Any,
    *,
    out: str | Path,
    sampling: SamplingSettings | None = None,
    pairing: str = "best_vs_worst",
    min_score_gap: float = 0.0,
    on_judge_error: str = "error",
    device: str | None = None,
) -> PairGenerationResult:
    """Sample, judge, pair and write (see the module docstring).

    Args:
        model: the model that samples (a folder or Hub id).
        prompts: anything `load_prompts` reads (a file, a list of prompts).
        judge: a `Judge`, a callable (prompt, response) -> float, or a judge spec string.
        out: the JSONL file to write (its folder is created).
        sampling: samples per prompt, length, temperature, top_p, seed (`SamplingSettings`).
        pairing: "best_vs_worst", "best_vs_each" or "all_pairs".
        min_score_gap: the smallest score gap a pair may have (>= 0; a gap must be > 0).
        on_judge_error: "error" stops naming the prompt; "skip" counts the prompt and goes on.
        device: where the model runs (default: CUDA when available).
    """
    sampling = sampling or SamplingSettings()
    if pairing not in PAIRING_POLICIES:
        raise ValueError(f"pairing: got {pairing!r}; allowed: {', '.join(PAIRING_POLICIES)}")
    if on_judge_error not in ON_JUDGE_ERROR:
        raise ValueError(f"on_judge_error: got {on_judge_error!r}; allowed: error, skip")
    if not (math.isfinite(min_score_gap) and min_score_gap >= 0):
        raise ValueError(f"min_score_gap: got {min_score_gap}; allowed: >= 0")
    prompt_list = load_prompts(prompts)
    judge = load_judge(judge, device=device)
    policy, tokenizer = load_for_sampling(model, device=device)
    responses = sample_responses(policy, tokenizer, prompt_list, sampling)
    del policy

    calls_before = judge.calls
    skipped: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    all_scores: list[list[float]] = []
    generation = {"sampling": sampling.to_dict(), "pairing": pairing, "model": str(model)}
    generation["judge"] = judge.name

    def skip(index: int, reason: str, detail: str, count: int = 1) -> None:
        skipped[reason] += count
        if len(examples) < _LISTED_SKIPS:
            examples.append({"prompt_index": index, "reason": reason, "detail": detail})

    for index, (prompt, group) in enumerate(zip(prompt_list, responses, strict=True)):
        try:
            scores = judge.score([(prompt, response) for response in group])
        except JudgeError as error:
            where = f"prompt {index}, sample {error.index}"
            if on_judge_error == "error":
                raise JudgeError(
                    f"{where}: {error} (prompt {_short(prompt)}); fix the judge or pass "
                    "--on-judge-error skip to count and skip such prompts",
                    index,
                ) from error
            skip(index, "judge_error", f"{where}: {error}")
            all_scores.append([math.nan] * len(group))
            continue
        all_scores.append(scores)
        finite = [i for i, s in enumerate(scores) if not math.isnan(s)]
        if len(finite) < len(scores):
            skip(
                index,
                "nan_score",
                f"samples {sorted(set(range(len(scores))) - set(finite))}",
                len(scores) - len(finite),
            )
        if len(finite) < 2:
            skip(index, "too_few_scored", f"{len(finite)} of {len(scores)} samples scored")
            continue
        kept = [scores[i] for i in finite]
        pairs = [(finite[a], finite[b]) for a, b in rank_pairs(kept, pairing, min_score_gap)]
        if not pairs:
            reason = "all_equal" if len(set(kept)) == 1 else "gap_below_min"
            skip(index, reason, f"scores {kept}")
            continue
        for chosen, rejected in pairs:
            if group[chosen] == group[rejected]:  # a judge that scores one text two ways
                skip(index, "identical", f"samples {chosen} and {rejected} are the same text")
                continue
            rows.append(_row(prompt, group, scores, chosen, rejected, index, generation))

    summary = PairGenerationSummary(
        prompts=len(prompt_list),
        samples=sum(len(g) for g in responses),
        judge_calls=judge.calls - calls_before,
        pairs=len(rows),
        prompts_with_pairs=len({row["generation"]["prompt_index"] for row in rows}),
        skipped=dict(skipped),
        skipped_examples=examples,
        mean_score=_finite_mean(s for group in all_scores for s in group),
        pairing=pairing,
        sampling=sampling.to_dict(),
        model=str(model),
        judge=judge.name,
        output=str(out),
    )
    write_jsonl_atomic(out, rows)
    write_json_atomic(summary_path(out), asdict(summary))
    return PairGenerationResult(summary=summary, rows=rows, scores=all_scores, responses=responses)


def _row(prompt, group, scores, chosen, rejected, index, generation) -> dict[str, Any]:
    """One output row; replies are messages when the prompt is (see the module docstring)."""

    def reply(text: str) -> Any:
        return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]

    return {
        "id": f"{index}:{chosen}>{rejected}",
        "prompt": prompt,
        "chosen": reply(group[chosen]),
        "rejected": reply(group[rejected]),
        "chosen_score": scores[chosen],
        "rejected_score": scores[rejected],
        "generation": {
            **generation,
            "prompt_index": index,
            "samples": [chosen, rejected],
            "scores": [None if math.isnan(s) else s for s in scores],
        },
    }


def _finite_mean(values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return math.fsum(kept) / len(kept) if kept else math.nan


def _short(prompt: Any, limit: int = 60) -> str:
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def write_jsonl_atomic(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write `rows` as JSON lines: a temporary file in the same folder, then a rename."""
    _write_atomic(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json_atomic(path: str | Path, value: Any) -> None:
    """Write `value` as indented JSON, atomically."""
    _write_atomic(Path(path), json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
