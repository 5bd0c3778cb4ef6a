"""DPO's implicit reward: a DPO-trained policy scores responses, `r = beta * (log pi - log pi_ref)`.

    rewards = fastdpo.implicit_reward(policy, ref, batch, beta=0.1)   # fp32 [S], one per sequence
    rows = score_rows("runs/a/final", "ref-cache/", "responses.jsonl", beta=0.1)

`log pi` and `log pi_ref` are the summed log-probs of each sequence's completion (packed
forward through the fused head, no logits). The reference is a model or a `ReferenceCache`
built for the same tokenized examples. `score_rows` (behind `fastdpo score`) scores a data set:
pairs get `reward_chosen`, `reward_rejected` and `margin`, single responses (prompt +
completion) get `reward`; each row keeps its id, source and row index.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastdpo.data.types import PackedBatch, Role
from fastdpo.evaluation.data import is_pretokenized, prepare_data, tokenization_kwargs
from fastdpo.evaluation.logps import (
    ExampleLogps,
    cache_logps,
    default_budget,
    model_logps,
    open_reference_cache,
)
from fastdpo.evaluation.models import (
    EvaluationInputError,
    check_local_paths,
    load_tokenizer,
    module_device,
    opened,
    resolve_device,
    resolve_dtype,
)
from fastdpo.model import sequence_logps
from fastdpo.reference import ReferenceCache


def implicit_reward(
    model: nn.Module, ref: nn.Module | ReferenceCache, batch: PackedBatch, beta: float
) -> torch.Tensor:
    """`beta * (log pi(y|x) - log pi_ref(y|x))` of every sequence of a packed batch.

    Args:
        model: the policy (a causal LM; see `fastdpo.sequence_logps`). Runs under the caller's
            grad mode, so the rewards can be differentiated w.r.t. its parameters.
        ref: the reference model (run without grad, on its own device) or a `ReferenceCache`
            holding this batch's examples tokenized the same way (checked: the cached
            completion lengths must equal the batch's).
        batch: a `PackedBatch` on the policy's device, paired (S = 2P: sequence 2p is pair p's
            chosen, 2p + 1 its rejected) or unpaired (S = P).
        beta: the DPO beta the policy was trained with (> 0).

    Returns:
        fp32 [S] rewards in the batch's sequence order, on the policy's device.
    """
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta: got {beta!r}; allowed: a finite number > 0")
    policy = sequence_logps(model, batch).logps
    if isinstance(ref, ReferenceCache):
        cached = ref.for_batch(batch, device=policy.device)
        rejected = batch.seq_role.to(policy.device) == Role.REJECTED
        pair = batch.seq_pair.to(policy.device)
        cached_lengths = torch.where(
            rejected, cached.rejected_lengths[pair], cached.chosen_lengths[pair]
        )
        lengths = batch.completion_lengths.to(policy.device)
        # One sync per batch: rewards against another tokenization would be silently wrong.
        if not torch.equal(cached_lengths.long(), lengths.long()):
            raise ValueError(
                f"reference cache {ref.path}: its completion lengths differ from the batch's "
                "for some examples: the data was tokenized differently from the cached data; "
                "rebuild the cache for this data (`fastdpo precompute-ref`) or tokenize with "
                "the cache's settings"
            )
        ref_logps = cached.logps
    elif isinstance(ref, nn.Module):
        with torch.no_grad():
            ref_logps = sequence_logps(ref, batch.to(module_device(ref))).logps
        ref_logps = ref_logps.to(policy.device)
    else:
        raise TypeError(f"ref must be a torch.nn.Module or a ReferenceCache, got {type(ref)}")
    return (beta * (policy.float() - ref_logps.float())).float()


def score_rows(
    model: str | nn.Module,
    ref: str | nn.Module | ReferenceCache,
    data: Any,
    *,
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
    trust_remote_code: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Implicit rewards of every row of `data`; returns (rows in data order, counts).

    Rows are pairs (prompt, chosen, rejected, in any format `load_preference_data` reads) or
    single responses (prompt + completion, a label is optional and ignored). Each output row:
    {"id", "source", "row", "reward_chosen", "reward_rejected", "margin"} for pairs,
    {"id", "source", "row", "reward"} for single responses (rewards in float64 from the fp32
    summed log-probs). The reference model (or cache) is read first, then the policy: one
    model in memory at a time. `counts` says what was read, skipped and truncated.
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise EvaluationInputError(f"beta: got {beta!r}; allowed: a finite number > 0")
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    ref_is_cache = isinstance(ref, ReferenceCache) or (
        isinstance(ref, str) and (Path(ref) / "manifest.json").exists()
    )
    checks = [("model", model)] + ([("ref", ref)] if not ref_is_cache else [])
    check_local_paths(checks)
    run_device = resolve_device(device)
    load = dict(
        device=run_device,
        dtype=resolve_dtype(dtype, run_device),
        attention=attention,
        trust_remote_code=trust_remote_code,
    )
    tokenize = tokenization_kwargs(max_length, tokenization)
    if tokenizer is None and not is_pretokenized(data):
        tokenizer = _tokenizer_of(model if isinstance(model, str) else ref)
    prepared = prepare_data(
        data,
        tokenizer,
        tokenize=tokenize,
        on_bad_row=on_bad_row,
        split=split,
        single_responses=True,
    )
    budget = max_tokens_per_batch or default_budget(run_device, tokenize["max_length"])
    # pack_pairs takes one kind at a time: pairs and single responses are scored apart
    groups = [
        [p for p in prepared.pairs if p.is_paired],
        [p for p in prepared.pairs if not p.is_paired],
    ]
    groups = [g for g in groups if g]
    ref_values: list[ExampleLogps] = []
    if ref_is_cache:
        cache = open_reference_cache(
            ref, prepared.pairs, tokenizer=tokenizer, settings=prepared.settings
        )
        ref_values = [cache_logps(cache, g) for g in groups]
    else:
        with opened(ref, **load, what="ref") as ref_model:
            ref_values = [model_logps(ref_model, g, max_tokens_per_batch=budget) for g in groups]
    with opened(model, **load, what="model") as policy_model:
        policy_values = [model_logps(policy_model, g, max_tokens_per_batch=budget) for g in groups]

    by_id: dict[str, dict[str, Any]] = {}
    for group, policy, reference in zip(groups, policy_values, ref_values, strict=True):
        chosen = beta * (policy.chosen.double() - reference.chosen.double())
        rejected = beta * (policy.rejected.double() - reference.rejected.double())
        for k, pair in enumerate(group):
            source, row = prepared.origin.get(pair.example_id, (None, None))
            out: dict[str, Any] = {"id": pair.example_id, "source": source, "row": row}
            if pair.is_paired:
                out.update(
                    reward_chosen=float(chosen[k]),
                    reward_rejected=float(rejected[k]),
                    margin=float(chosen[k] - rejected[k]),
                )
            else:
                out["reward"] = float(chosen[k])
            by_id[pair.example_id] = out
    rows = [by_id[p.example_id] for p in prepared.pairs]
    return rows, prepared.counts


def _tokenizer_of(source: Any):
    if not isinstance(source, str):
        raise EvaluationInputError(
            "tokenizer: the model and reference are loaded modules; pass tokenizer="
        )
    return load_tokenizer(source)
