"""Per-sequence sums over packed per-token values: one definition for the model and the losses."""

from __future__ import annotations

import torch


def segment_sums(
    values: torch.Tensor, offsets: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums [S] in `values`' dtype, valid-value counts [S] int64) over the segments of `values`.

    values: [M] float, differentiable. offsets: [S + 1] int32/int64, segment s is
    values[offsets[s]:offsets[s + 1]]. valid: optional bool [M]; masked values count nowhere.

    Differences of one float64 prefix sum at the offsets: no host sync, and deterministic (an
    index_add or segment_reduce may add in a different order on every CUDA run); in float64 the
    cancellation error (~1e-16 of the running sum) stays far below fp32 rounding.
    """
    offsets = offsets.to(torch.int64)
    starts, ends = offsets[:-1], offsets[1:]
    if valid is None:
        counts = ends - starts
    else:
        values = torch.where(valid, values, torch.zeros_like(values))
        valid_prefix = torch.nn.functional.pad(valid.to(torch.int64).cumsum(0), (1, 0))
        counts = valid_prefix[ends] - valid_prefix[starts]
    prefix = torch.nn.functional.pad(values.double().cumsum(0), (1, 0))
    sums = prefix.index_select(0, ends) - prefix.index_select(0, starts)
    return sums.to(values.dtype), counts
