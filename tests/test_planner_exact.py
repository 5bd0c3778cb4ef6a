"""The packing planner is best-fit decreasing, exactly: checked against a naive reference.

`best_fit_decreasing` keeps sorted free-room values and binary-searches them; the reference
here scans every open batch. Best-fit decreasing is deterministic on the multiset of free
rooms (equal sizes and equal rooms are interchangeable), so without a per-batch item cap both
must give the same batch loads, not just the same number of batches. With `shuffle=False` the
plan's order is documented (ties in index order, batches in creation order), so the plan can be
replayed item by item: every item must go to an open batch with the least room that still
fits it (an exact fit first), and a batch is opened only when no open batch fits.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdpo.data.planner import PackingStats, best_fit_decreasing


def reference_bfd_loads(sizes: list[int], budget: int) -> list[int]:
    """Sorted batch loads of textbook best-fit decreasing (a linear scan per item)."""
    rooms: list[int] = []
    for size in sorted(sizes, reverse=True):
        fitting = [b for b, room in enumerate(rooms) if room >= size]
        if fitting:
            best = min(fitting, key=lambda b: rooms[b])
            rooms[best] -= size
        else:
            rooms.append(budget - size)
    return sorted(budget - room for room in rooms)


def loads(batches: list[list[int]], sizes: list[int]) -> list[int]:
    return sorted(sum(sizes[i] for i in batch) for batch in batches)


def check_partition(batches: list[list[int]], sizes: list[int], budget: int, cap: int | None):
    assert sorted(i for batch in batches for i in batch) == list(range(len(sizes)))
    assert all(batch for batch in batches), "an empty batch"
    assert all(sum(sizes[i] for i in batch) <= budget for batch in batches)
    if cap is not None:
        assert all(len(batch) <= cap for batch in batches)


def check_no_two_could_merge(batches, sizes, budget, cap):
    """Best fit opens a batch only when the item fits no open one, so no two batches fit into
    one (by tokens, or by item count under a cap)."""
    for a, b in itertools.combinations(batches, 2):
        tokens = sum(sizes[i] for i in a) + sum(sizes[i] for i in b)
        too_many = cap is not None and len(a) + len(b) > cap
        assert tokens > budget or too_many, (a, b)


# Small budgets and sizes up to the budget: exact fits and near misses are frequent.
size_lists = st.integers(2, 40).flatmap(
    lambda budget: st.tuples(
        st.just(budget), st.lists(st.integers(1, budget), min_size=1, max_size=60)
    )
)


@settings(max_examples=150, deadline=None)
@given(case=size_lists, shuffle=st.booleans(), seed=st.integers(0, 2**31), epoch=st.integers(0, 3))
def test_same_batch_loads_as_reference_best_fit_decreasing(case, shuffle, seed, epoch):
    budget, sizes = case
    batches = best_fit_decreasing(sizes, budget, seed=seed, epoch=epoch, shuffle=shuffle)
    check_partition(batches, sizes, budget, None)
    assert loads(batches, sizes) == reference_bfd_loads(sizes, budget)
    check_no_two_could_merge(batches, sizes, budget, None)


@settings(max_examples=150, deadline=None)
@given(case=size_lists, cap=st.none() | st.integers(1, 6))
def test_each_item_goes_to_the_tightest_open_batch(case, cap):
    """Replay of an unshuffled plan: items largest first (ties by index); batch k of the plan
    is the k-th one opened. An open batch is one with room left and (under a cap) fewer than
    `cap` items."""
    budget, sizes = case
    batches = best_fit_decreasing(sizes, budget, shuffle=False, max_items_per_batch=cap)
    check_partition(batches, sizes, budget, cap)
    check_no_two_could_merge(batches, sizes, budget, cap)
    batch_of = {i: b for b, batch in enumerate(batches) for i in batch}
    rooms: list[int] = []  # free room of each opened batch, in opening order
    counts: list[int] = []
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        size, batch = sizes[index], batch_of[index]
        open_rooms = [
            room
            for room, count in zip(rooms, counts, strict=True)
            if room > 0 and (cap is None or count < cap)
        ]
        fitting = [room for room in open_rooms if room >= size]
        if batch == len(rooms):  # the plan opens a batch here
            assert not fitting, f"item {index} (size {size}) opened a batch but fits {fitting}"
            rooms.append(budget)
            counts.append(0)
        else:
            assert batch < len(rooms), f"batch {batch} used before batch {len(rooms)} was opened"
            room = rooms[batch]
            assert room >= size and (cap is None or counts[batch] < cap)
            assert room == min(fitting), (
                f"item {index} (size {size}) went to a batch with room {room}; the tightest "
                f"open batch had room {min(fitting)}"
            )
        rooms[batch] -= size
        counts[batch] += 1


@pytest.mark.parametrize("shuffle", [False, True])
def test_an_exact_fit_is_taken(shuffle):
    """Budget 7, sizes 5, 3, 3, 1 (largest first): 5 opens A (room 2), 3 opens B (room 4), 3
    goes to B (room 1); the 1 fits A and B, and fills B exactly. First fit and worst fit put it
    in A instead (loads 6 + 6 instead of 5 + 7)."""
    sizes = [3, 1, 5, 3]
    batches = best_fit_decreasing(sizes, 7, shuffle=shuffle, seed=5)
    assert sorted(sorted(sizes[i] for i in batch) for batch in batches) == [[1, 3, 3], [5]]


# ------------------------------------------------------------------------------------------------
# The rest of planner.py: defaults, refused arguments, the plan's statistics (survivors of
# `make mutate`, see tests/MUTATION.md)


def test_defaults_are_shuffled_seed_0_epoch_0():
    sizes = [5, 3, 8, 1, 7, 2, 6, 4, 9, 3, 5, 2]
    plan = best_fit_decreasing(sizes, 10)
    assert plan == best_fit_decreasing(sizes, 10, seed=0, epoch=0, shuffle=True)
    assert plan != best_fit_decreasing(sizes, 10, shuffle=False)
    assert plan != best_fit_decreasing(sizes, 10, seed=1)
    assert plan != best_fit_decreasing(sizes, 10, epoch=1)


@pytest.mark.parametrize(
    ("sizes", "budget", "options", "message"),
    [
        ([1], 0, {}, r"^budget must be >= 1, got 0$"),
        ([1], 5, {"window": 0}, r"^window must be >= 1, got 0$"),
        ([0, 3], 5, {}, r"^sizes must lie in \[1, 5\], got \[0, 3\]$"),
        ([2, 6], 5, {}, r"^sizes must lie in \[1, 5\], got \[2, 6\]$"),
    ],
)
def test_refused_arguments_say_why(sizes, budget, options, message):
    with pytest.raises(ValueError, match=message):
        best_fit_decreasing(sizes, budget, **options)


def test_budget_of_one_token():
    assert sorted(best_fit_decreasing([1, 1, 1], 1)) == [[0], [1], [2]]


def test_packing_stats_values():
    """Budget 8, batches of 3 + 4 and 6 tokens, padded to multiples of 4: every field by hand."""
    stats = PackingStats.of([[0, 1], [2]], [3, 4, 6], 8, skipped=2, pad_to_multiple=4)
    assert stats == PackingStats(
        num_examples=3,
        num_batches=2,
        num_skipped=2,
        tokens=13,
        capacity=16,
        padding_tokens=1 + 2,  # 7 -> 8, 6 -> 8
        efficiency=13 / 16,
        examples_per_batch=(1.5, 1, 2),
        tokens_per_batch=(6.5, 6, 7),
    )
    assert PackingStats.of([[0, 1], [2]], [3, 4, 5], 8).padding_tokens == 0
    assert PackingStats.of([[0, 1], [2]], [3, 4, 5], 8).num_skipped == 0
    assert PackingStats.of([], [], 8) == PackingStats(
        num_examples=0,
        num_batches=0,
        num_skipped=0,
        tokens=0,
        capacity=0,
        padding_tokens=0,
        efficiency=0.0,
        examples_per_batch=(0.0, 0, 0),
        tokens_per_batch=(0.0, 0, 0),
    )
