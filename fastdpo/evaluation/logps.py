"""Per-example summed completion log-probs of one model, or of a reference cache.

    policy = model_logps(model, pairs, max_tokens_per_batch=4096)   # packed, fused head
    ref = cache_logps(cache, pairs)                                  # no forward at all

Every forward goes through `fastdpo.sequence_logps` on packed micro-batches (no padding, no
`[tokens, vocab]` logits); results are scattered back to the order of `pairs`, so the policy's
and the reference's values line up example by example whatever the packing did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastdpo.data.packing import pack_pairs
from fastdpo.data.types import Role, TokenizedPair
from fastdpo.evaluation.models import EvaluationInputError, module_device
from fastdpo.model import sequence_logps
from fastdpo.reference import ReferenceCache
from fastdpo.reference_fingerprint import describe_differences, expected_fields
from fastdpo.reference_shards import ReferenceCacheError


@dataclass(kw_only=True)
class ExampleLogps:
    """Summed completion log-probs per example, in the order of the tokenized examples.

    N examples. Unpaired examples (one completion) keep it in `chosen`; `rejected` is NaN there.
    """

    chosen: torch.Tensor
    """fp32 [N] (CPU)."""
    rejected: torch.Tensor
    """fp32 [N] (CPU); NaN for unpaired examples."""
    chosen_lengths: torch.Tensor
    """int64 [N] completion tokens counted in `chosen`."""
    rejected_lengths: torch.Tensor
    """int64 [N]; 0 for unpaired examples."""


def check_one_kind(pairs: Sequence[TokenizedPair]) -> bool:
    """True if all examples are paired, False if all are unpaired; an error if mixed or empty."""
    kinds = {p.is_paired for p in pairs}
    if not kinds:
        raise EvaluationInputError("data: no examples to score")
    if len(kinds) > 1:
        raise EvaluationInputError("data: paired and single-response rows are mixed; split them")
    return kinds.pop()


@torch.no_grad()
def model_logps(
    model: nn.Module,
    pairs: Sequence[TokenizedPair],
    *,
    max_tokens_per_batch: int,
    autocast: Any = None,
) -> ExampleLogps:
    """Summed completion log-probs of every example under `model` (in eval mode, no grad).

    Args:
        model: a causal LM made of attention layers (see `fastdpo.sequence_logps`).
        pairs: tokenized examples, all paired or all unpaired.
        max_tokens_per_batch: packed micro-batch token budget; an example longer than it is an
            error naming the example (never skipped).
        autocast: a context manager factory for the forward (e.g. bf16 autocast), or None.
    """
    check_one_kind(pairs)
    device = module_device(model)
    count = len(pairs)
    values = torch.full((2, count), float("nan"), dtype=torch.float32)
    lengths = torch.zeros((2, count), dtype=torch.int64)
    # Pairs with long prompts run them once (same values, fewer tokens); unpaired: plain.
    packed = pack_pairs(
        pairs, max_tokens_per_batch=max_tokens_per_batch, shuffle=False, share_prompt="auto"
    )
    for index, plan in enumerate(packed.plan):
        batch = packed[index]
        with autocast() if autocast is not None else contextlib.nullcontext():
            out = sequence_logps(model, batch.to(device))
        # sequence s belongs to example plan[seq_pair[s]]; a rejected sequence fills slot 1
        examples = torch.tensor(plan, dtype=torch.int64)[batch.seq_pair]
        slot = (batch.seq_role == Role.REJECTED).long()
        values[slot, examples] = out.logps.detach().float().cpu()
        lengths[slot, examples] = out.lengths.cpu().long()
    return ExampleLogps(
        chosen=values[0], rejected=values[1], chosen_lengths=lengths[0], rejected_lengths=lengths[1]
    )


def open_reference_cache(
    cache: str | ReferenceCache,
    pairs: Sequence[TokenizedPair],
    *,
    tokenizer: Any,
    settings: dict[str, Any],
) -> ReferenceCache:
    """The cache, checked against this evaluation's tokenizer, tokenization settings and
    examples (the fingerprint checks of training); `EvaluationInputError` says what differs
    and how to rebuild."""
    expect = expected_fields(tokenizer=tokenizer, tokenization=settings)
    try:
        if isinstance(cache, ReferenceCache):
            diffs = cache.fingerprint.differences(expect)
            if diffs:
                raise ReferenceCacheError(
                    f"reference cache {cache.path} was built for different inputs: "
                    f"{describe_differences(diffs)} (cache vs this evaluation). Rebuild it for "
                    "this data with `fastdpo precompute-ref` and the same tokenization options"
                )
        else:
            cache = ReferenceCache.open(cache, expect=expect)
        cache.check_coverage(pairs)
    except ReferenceCacheError as error:
        raise EvaluationInputError(f"ref: {error}") from None
    return cache


def cache_logps(cache: ReferenceCache, pairs: Sequence[TokenizedPair]) -> ExampleLogps:
    """The cached reference values of `pairs`, in their order (call `open_reference_cache`
    first: it checks that the cache covers these exact token ids)."""
    entries = [cache.lookup(p.example_id) for p in pairs]
    return ExampleLogps(
        chosen=torch.tensor([e.chosen_logp for e in entries], dtype=torch.float32),
        rejected=torch.tensor(
            [e.rejected_logp if e.paired else float("nan") for e in entries], dtype=torch.float32
        ),
        chosen_lengths=torch.tensor([e.chosen_length for e in entries], dtype=torch.int64),
        rejected_lengths=torch.tensor(
            [e.rejected_length if e.paired else 0 for e in entries], dtype=torch.int64
        ),
    )


def default_budget(device: torch.device, max_length: int) -> int:
    """Token budget of an evaluation pass: as `fastdpo precompute-ref`'s (no activations are
    kept), and always room for the longest possible pair."""
    from fastdpo.precompute import CPU_BUDGET, CUDA_BUDGET

    return max(CUDA_BUDGET if device.type == "cuda" else CPU_BUDGET, 2 * max_length)
