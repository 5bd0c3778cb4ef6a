"""The packing planner: which examples go into which micro-batch, under a token budget.

Best-fit decreasing: examples are taken largest first and each goes into the open batch whose
free room is the smallest that still fits it (a new batch when none fits). An example is a
whole preference pair (both sequences), so a pair is never split across batches. Ties between
equal sizes follow a permutation drawn from (seed, epoch), and the finished batches are
shuffled with the same generator: the plan is a pure function of (sizes, budget, seed, epoch,
window). Optionally the examples are planned in shuffled windows, so batch membership also
changes between epochs.

Finding the best-fitting batch is a binary search over the distinct free-room values (at most
`budget + 1` of them), so planning n examples into b batches costs O(n log n + n * budget) in
the worst case and about O(n log n) in practice.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator behind one epoch's plan (independent streams per (seed, epoch))."""
    return np.random.default_rng([seed, epoch])


def best_fit_decreasing(
    sizes: Sequence[int],
    budget: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    max_items_per_batch: int | None = None,
    window: int | None = None,
) -> list[list[int]]:
    """Batches of indices into `sizes`; every index exactly once, no batch above `budget`.

    Every size must be in [1, budget] (the caller handles oversized examples). With
    `shuffle=False` the ties keep index order and batches come in creation order.

    `window`: if set (and shuffling), the examples are shuffled and planned `window` at a time,
    so which examples share a batch changes from epoch to epoch (plain best-fit decreasing
    groups the same examples every epoch, only tie-breaks differ); efficiency drops a little
    at the end of each window.
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.size and (sizes.min() < 1 or sizes.max() > budget):
        raise ValueError(f"sizes must lie in [1, {budget}], got [{sizes.min()}, {sizes.max()}]")
    if not shuffle:
        return _pack(sizes, np.arange(len(sizes)), budget, max_items_per_batch)
    rng = epoch_rng(seed, epoch)
    order = rng.permutation(len(sizes))
    window = window or max(len(sizes), 1)
    batches = []
    for start in range(0, len(sizes), window):
        members = order[start : start + window]  # in shuffled order: ties follow it
        planned = _pack(sizes[members], np.arange(len(members)), budget, max_items_per_batch)
        batches.extend([members[b].tolist() for b in planned])
    return [batches[i] for i in rng.permutation(len(batches)).tolist()]


def _pack(
    sizes: np.ndarray, tie_break: np.ndarray, budget: int, max_items: int | None
) -> list[list[int]]:
    """Best-fit decreasing over `sizes` (indices into it), equal sizes in `tie_break` order."""
    order = np.lexsort((tie_break, -sizes))  # largest first
    batches: list[list[int]] = []
    rooms: list[int] = []  # sorted distinct free-room values that have an open batch
    open_by_room: dict[int, list[int]] = {}  # free room -> open batch ids (a stack)
    for index in order.tolist():
        size = int(sizes[index])
        at = bisect.bisect_left(rooms, size)
        if at == len(rooms):
            batch, room = len(batches), budget
            batches.append([])
        else:
            room = rooms[at]
            stack = open_by_room[room]
            batch = stack.pop()
            if not stack:
                del open_by_room[room], rooms[at]
        batches[batch].append(index)
        room -= size
        full = room == 0 or (max_items is not None and len(batches[batch]) >= max_items)
        if not full:
            if room not in open_by_room:
                open_by_room[room] = []
                bisect.insort(rooms, room)
            open_by_room[room].append(batch)
    return batches


@dataclass(frozen=True, kw_only=True)
class PackingStats:
    """How well a plan fills its batches (tokens are real tokens, padding excluded)."""

    num_examples: int
    num_batches: int
    num_skipped: int
    """Examples left out because they alone exceed the budget (on_oversized="skip")."""
    tokens: int
    capacity: int
    """num_batches * budget."""
    padding_tokens: int
    efficiency: float
    """tokens / capacity."""
    examples_per_batch: tuple[float, int, int]
    """(mean, min, max)"""
    tokens_per_batch: tuple[float, int, int]
    """(mean, min, max)"""

    @classmethod
    def of(
        cls,
        batches: list[list[int]],
        sizes: Sequence[int],
        budget: int,
        *,
        skipped: int = 0,
        pad_to_multiple: int | None = None,
    ) -> PackingStats:
        counts = np.array([len(b) for b in batches], dtype=np.int64)
        sizes = np.asarray(sizes, dtype=np.int64)
        tokens = np.array([int(sizes[b].sum()) for b in batches], dtype=np.int64)
        padding = 0
        if pad_to_multiple:
            padding = int((-tokens % pad_to_multiple).sum())

        def spread(x: np.ndarray) -> tuple[float, int, int]:
            return (float(x.mean()), int(x.min()), int(x.max())) if x.size else (0.0, 0, 0)

        capacity = len(batches) * budget
        return cls(
            num_examples=int(counts.sum()),
            num_batches=len(batches),
            num_skipped=skipped,
            tokens=int(tokens.sum()),
            capacity=capacity,
            padding_tokens=padding,
            efficiency=float(tokens.sum()) / capacity if capacity else 0.0,
            examples_per_batch=spread(counts),
            tokens_per_batch=spread(tokens),
        )

    def __str__(self) -> str:
        mean_e, min_e, max_e = self.examples_per_batch
        mean_t, min_t, max_t = self.tokens_per_batch
        return (
            f"{self.num_examples} examples in {self.num_batches} batches, efficiency "
            f"{self.efficiency:.1%}, examples/batch {mean_e:.1f} [{min_e}, {max_e}], tokens/batch "
            f"{mean_t:.0f} [{min_t}, {max_t}], skipped {self.num_skipped}, padding "
            f"{self.padding_tokens}"
        )
