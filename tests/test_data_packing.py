"""Pair-aware packing: the PackedBatch layout, planner invariants (hypothesis), efficiency."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdpo.data.packing import collate_pairs, pack_pairs
from fastdpo.data.planner import best_fit_decreasing
from fastdpo.data.sources import load_preference_data
from fastdpo.data.tokenize import tokenize_pairs
from fastdpo.data.types import PackedBatch, Role, TokenizedPair
from fastdpo.testing.tokenizer import build_tiny_tokenizer


def pair(example_id, prompt, chosen, rejected=None, *, label=None, chosen_mask=None):
    return TokenizedPair(
        example_id=example_id,
        prompt_ids=prompt,
        chosen_ids=chosen,
        rejected_ids=rejected,
        label=label,
        chosen_loss_mask=chosen_mask,
    )


def test_collate_layout_by_hand():
    pairs = [
        pair("a", [1, 5, 6], [7, 8], [9], chosen_mask=[False, True]),
        pair("b", [1], [3, 4, 5], [6, 7]),
    ]
    batch = collate_pairs(pairs, pad_to_multiple=8)
    # sequences: [1 5 6 7 8] [1 5 6 9] [1 3 4 5] [1 6 7]: 16 tokens, a multiple of 8, no padding
    assert batch.input_ids.tolist() == [1, 5, 6, 7, 8, 1, 5, 6, 9, 1, 3, 4, 5, 1, 6, 7]
    assert batch.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]
    assert batch.cu_seqlens.tolist() == [0, 5, 9, 13, 16] and batch.num_padding == 0
    assert batch.max_seqlen == 5
    assert batch.target_positions.tolist() == [3, 7, 9, 10, 11, 13, 14]
    assert batch.target_ids.tolist() == [8, 9, 3, 4, 5, 6, 7]
    assert batch.target_cu.tolist() == [0, 1, 2, 5, 7]
    assert batch.completion_lengths.tolist() == [1, 1, 3, 2]
    assert batch.seq_pair.tolist() == [0, 0, 1, 1]
    assert batch.seq_role.tolist() == [Role.CHOSEN, Role.REJECTED] * 2
    assert batch.example_ids == ["a", "b"] and batch.num_tokens == 16
    dtypes = (batch.input_ids.dtype, batch.cu_seqlens.dtype, batch.target_cu.dtype)
    assert dtypes == (torch.int64, torch.int32, torch.int32)
    assert batch.seq_role.dtype == torch.int8 and batch.seq_label.dtype == torch.bool


def test_collate_tail_padding_is_one_extra_segment():
    batch = collate_pairs([pair("a", [1, 2], [3], [4, 5])], pad_to_multiple=8, pad_token_id=0)
    assert batch.input_ids.tolist() == [1, 2, 3, 1, 2, 4, 5, 0]
    assert batch.cu_seqlens.tolist() == [0, 3, 7, 8]  # S + 2 entries
    assert batch.position_ids.tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert batch.num_padding == 1 and batch.num_tokens == 7 and batch.num_sequences == 2
    assert batch.target_cu.tolist() == [0, 1, 3]  # the padding owns no targets
    assert batch.max_seqlen == 4


def test_collate_unpaired_layout():
    pairs = [pair("a", [1], [2, 3], label=True), pair("b", [1, 4], [5], label=False)]
    batch = collate_pairs(pairs)
    assert batch.seq_pair.tolist() == [0, 1]
    assert batch.seq_role.tolist() == [Role.UNPAIRED] * 2
    assert batch.seq_label.tolist() == [True, False]
    with pytest.raises(ValueError, match="cannot mix paired and unpaired"):
        collate_pairs([pairs[0], pair("c", [1], [2], [3])])


def test_collate_rejects_empty_prompt():
    with pytest.raises(ValueError, match="empty prompt"):
        collate_pairs([pair("a", [], [2], [3])])


# ---- invariants, property-based --------------------------------------------------------------

token = st.integers(3, 99)


@st.composite
def tokenized_pairs(draw):
    """All paired or all unpaired (KTO) examples, with and without loss masks."""
    n = draw(st.integers(1, 24))
    paired = draw(st.booleans())
    pairs = []
    for i in range(n):
        prompt = draw(st.lists(token, min_size=1, max_size=12))
        chosen = draw(st.lists(token, min_size=1, max_size=16))
        mask = draw(st.none() | st.lists(st.booleans(), min_size=len(chosen), max_size=len(chosen)))
        if paired:
            rejected = draw(st.lists(token, min_size=1, max_size=16))
            pairs.append(pair(f"ex{i}", prompt, chosen, rejected, chosen_mask=mask))
        else:
            label = draw(st.booleans())
            pairs.append(pair(f"ex{i}", prompt, chosen, label=label, chosen_mask=mask))
    return pairs


def sequences_of(example: TokenizedPair) -> list[tuple[Role, list[int], list[bool] | None]]:
    """(role, completion ids, loss mask) of each sequence an example contributes, in order."""
    if not example.is_paired:
        return [(Role.UNPAIRED, example.chosen_ids, example.chosen_loss_mask)]
    return [
        (Role.CHOSEN, example.chosen_ids, example.chosen_loss_mask),
        (Role.REJECTED, example.rejected_ids, example.rejected_loss_mask),
    ]


def check_batch(batch: PackedBatch, by_id: dict[str, TokenizedPair], budget: int) -> None:
    assert batch.input_ids.shape[0] <= budget
    cu = batch.cu_seqlens.tolist()
    num_sequences = sum(len(sequences_of(by_id[e])) for e in batch.example_ids)
    assert batch.num_sequences == num_sequences
    assert cu[0] == 0 and cu[-1] == batch.input_ids.shape[0]
    assert len(cu) == num_sequences + 1 + (batch.num_padding > 0)
    assert cu[-1] - cu[num_sequences] == batch.num_padding  # the tail segment is the padding
    assert batch.max_seqlen == max(np.diff(cu))
    assert batch.num_tokens == sum(by_id[e].num_tokens for e in batch.example_ids)
    ids = batch.input_ids.tolist()
    positions = batch.position_ids.tolist()
    targets = batch.target_positions.tolist()
    target_ids = batch.target_ids.tolist()
    target_cu = batch.target_cu.tolist()
    assert target_cu[-1] == len(targets) and len(target_cu) == num_sequences + 1
    for s in range(len(cu) - 1):
        start, end = cu[s], cu[s + 1]
        assert positions[start:end] == list(range(end - start))
    s = 0
    for p, example_id in enumerate(batch.example_ids):
        example = by_id[example_id]
        for role, completion, mask in sequences_of(example):
            # an example's sequences sit side by side (a pair: chosen, then rejected)
            assert batch.seq_pair[s] == p and batch.seq_role[s] == role
            assert batch.seq_label[s] == (role == Role.UNPAIRED and example.label)
            start, end = cu[s], cu[s + 1]
            assert ids[start:end] == example.prompt_ids + completion
            mine = targets[target_cu[s] : target_cu[s + 1]]
            # targets stay inside the sequence and predict exactly the counted completion tokens
            assert all(start <= t and t + 1 < end for t in mine)
            first = start + len(example.prompt_ids)
            counted = [k for k in range(len(completion)) if mask is None or mask[k]]
            assert mine == [first + k - 1 for k in counted]
            assert target_ids[target_cu[s] : target_cu[s + 1]] == [completion[k] for k in counted]
            s += 1


@settings(max_examples=40, deadline=None)
@given(
    pairs=tokenized_pairs(),
    slack=st.integers(0, 120),
    seed=st.integers(0, 3),
    epoch=st.integers(0, 3),
    pad=st.sampled_from([None, 1, 4]),
)
def test_packing_invariants(pairs, slack, seed, epoch, pad):
    largest = max(p.num_tokens for p in pairs)
    budget = largest + slack
    if pad:
        budget += -budget % pad  # padding must divide the budget
    packed = pack_pairs(
        pairs, max_tokens_per_batch=budget, seed=seed, epoch=epoch, pad_to_multiple=pad
    )
    # every pair exactly once per epoch
    placed = sorted(i for batch in packed.plan for i in batch)
    assert placed == list(range(len(pairs)))
    by_id = {p.example_id: p for p in pairs}
    seen = []
    for batch in packed:
        check_batch(batch, by_id, budget)
        if pad:
            assert batch.input_ids.shape[0] % pad == 0
        seen.extend(batch.example_ids)
    assert sorted(seen) == sorted(by_id)
    # deterministic per (seed, epoch)
    again = pack_pairs(
        pairs, max_tokens_per_batch=budget, seed=seed, epoch=epoch, pad_to_multiple=pad
    )
    assert again.plan == packed.plan
    stats = packed.stats
    assert stats.num_examples == len(pairs) and stats.num_batches == len(packed)
    assert stats.tokens == sum(p.num_tokens for p in pairs)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 64), min_size=1, max_size=80),
    budget=st.integers(64, 200),
    cap=st.none() | st.integers(1, 5),
    window=st.none() | st.integers(1, 30),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_planner_invariants(sizes, budget, cap, window, shuffle, seed):
    options = dict(seed=seed, epoch=1, shuffle=shuffle, max_items_per_batch=cap, window=window)
    batches = best_fit_decreasing(sizes, budget, **options)
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in b) <= budget for b in batches)
    if cap is not None:
        assert all(len(b) <= cap for b in batches)
    assert batches == best_fit_decreasing(sizes, budget, **options)
    # best fit never leaves two batches (of one planning window) that could have been merged
    loads = sorted(sum(sizes[i] for i in b) for b in batches)
    if cap is None and (window is None or not shuffle) and len(loads) > 1:
        assert loads[0] + loads[1] > budget


def test_epochs_reorder_deterministically():
    pairs = [
        pair(f"ex{i}", [1] * (1 + i % 7), [2] * (1 + i % 5), [3] * (2 + i % 3)) for i in range(60)
    ]
    plans = {e: pack_pairs(pairs, max_tokens_per_batch=64, epoch=e).plan for e in range(3)}
    assert plans[0] != plans[1] != plans[2]
    packed = pack_pairs(pairs, max_tokens_per_batch=64, epoch=0)
    assert packed.with_epoch(1).plan == plans[1]

    # a planning window changes batch membership between epochs
    def groups(plan):
        return sorted(sorted(batch) for batch in plan)

    windowed = [pack_pairs(pairs, max_tokens_per_batch=64, epoch=e, plan_window=20) for e in (0, 1)]
    assert groups(windowed[0].plan) != groups(windowed[1].plan)
    assert windowed[0].stats.efficiency > 0.8
    unshuffled = pack_pairs(pairs, max_tokens_per_batch=64, shuffle=False, seed=5).plan
    assert unshuffled == pack_pairs(pairs, max_tokens_per_batch=64, shuffle=False, seed=9).plan


def test_efficiency_on_lognormal_lengths():
    """Log-normal prompt and completion lengths with long tails, clipped to max_length."""
    rng = np.random.default_rng(0)
    n, max_length, budget = 2000, 2048, 8192
    prompts = np.minimum(rng.lognormal(5.0, 0.9, n).astype(int) + 1, 1024)
    completions = rng.lognormal(5.5, 0.9, (n, 2)).astype(int) + 1
    completions = np.minimum(completions, max_length - prompts[:, None])
    pairs = [
        pair(
            f"ex{i}",
            [1] * int(prompts[i]),
            [2] * int(completions[i, 0]),
            [3] * int(completions[i, 1]),
        )
        for i in range(n)
    ]
    stats = pack_pairs(pairs, max_tokens_per_batch=budget).stats
    print(f"\npacking efficiency on log-normal lengths: {stats}")
    assert stats.efficiency >= 0.95
    assert stats.tokens_per_batch[2] <= budget


def test_oversized_example_error_or_reported_skip(caplog):
    pairs = [pair("small", [1], [2], [3]), pair("huge", [1] * 10, [2] * 10, [3] * 10)]
    with pytest.raises(ValueError, match=r"'huge' \(40 tokens\).*at least 40"):
        pack_pairs(pairs, max_tokens_per_batch=16)
    packed = pack_pairs(pairs, max_tokens_per_batch=16, on_oversized="skip")
    assert packed.plan == [[0]] and packed.skipped == [1] and packed.stats.num_skipped == 1
    assert "skipped 1 example(s)" in caplog.text


def test_bad_options():
    pairs = [pair("a", [1], [2], [3])]
    with pytest.raises(ValueError, match="must be >= 1 and divide"):
        pack_pairs(pairs, max_tokens_per_batch=100, pad_to_multiple=64)
    with pytest.raises(ValueError, match="pack them separately"):
        pack_pairs([*pairs, pair("b", [1], [2], label=True)], max_tokens_per_batch=100)


def test_loader_with_workers_matches_direct_iteration():
    pairs = [pair(f"ex{i}", [1] * (1 + i % 4), [2] * (1 + i % 6), [3] * 2) for i in range(40)]
    packed = pack_pairs(pairs, max_tokens_per_batch=48, pad_to_multiple=16)
    direct = list(packed)
    loaded = list(packed.loader(num_workers=2, pin_memory=False))
    assert len(loaded) == len(direct)
    for a, b in zip(direct, loaded, strict=True):
        assert a.example_ids == b.example_ids
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.target_cu, b.target_cu)
        assert b.metadata["batch_index"] == a.metadata["batch_index"]
    moved = direct[0].to("cpu", non_blocking=True)
    assert isinstance(moved, PackedBatch) and torch.equal(moved.cu_seqlens, direct[0].cu_seqlens)


@pytest.mark.gpu
def test_pinned_loader_to_cuda():
    pairs = [pair(f"ex{i}", [1, 2], [3] * (1 + i % 3), [4]) for i in range(10)]
    batch = next(iter(pack_pairs(pairs, max_tokens_per_batch=32).loader(num_workers=1)))
    assert batch.input_ids.is_pinned()
    on_gpu = batch.to("cuda", non_blocking=True)
    assert on_gpu.input_ids.is_cuda and on_gpu.target_ids.is_cuda


def test_end_to_end_targets_are_the_reply_tokens():
    tok = build_tiny_tokenizer()
    rows = [
        {
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ],
            "chosen": "Hello.",
            "rejected": "Go away.",
        },
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Yes.",
            "rejected": "\n\nHuman: Hi\n\nAssistant: No.",
        },
    ]
    pairs = tokenize_pairs(load_preference_data(rows), tok, max_length=64)
    (batch,) = pack_pairs(pairs, max_tokens_per_batch=256, shuffle=False)
    texts = []
    for s in range(batch.num_sequences):
        lo, hi = batch.target_cu[s], batch.target_cu[s + 1]
        texts.append(tok.decode(batch.target_ids[lo:hi].tolist()))
    order = [pairs.index(next(p for p in pairs if p.example_id == e)) for e in batch.example_ids]
    expected = {
        0: ["Hello.<|im_end|>\n", "Go away.<|im_end|>\n"],
        1: [" Yes.<|eos|>", " No.<|eos|>"],
    }
    assert texts == [t for i in order for t in expected[i]]
