"""`collate_pairs`: tokenized pairs -> one `PackedBatch` (no planning: the pairs given, in order).

The layout is documented on `PackedBatch` (fastdpo/data/types.py). Each sequence is its
example's prompt followed by one completion; paired example p gives sequences 2p (chosen) and
2p + 1 (rejected); an unpaired example p gives sequence p. A completion token at stream
position j that counts in the loss becomes a target: position j - 1, id input_ids[j]. Since
every sequence starts with at least one prompt token, j - 1 always lies in the same sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fastdpo.data.types import PackedBatch, Role, TokenizedPair


def collate_pairs(
    pairs: Sequence[TokenizedPair],
    *,
    pad_to_multiple: int | None = None,
    pad_token_id: int = 0,
    share_prompt: bool = False,
) -> PackedBatch:
    """One `PackedBatch` holding `pairs` in order (all paired, or all unpaired).

    Args:
        pairs: the examples; at least one.
        pad_to_multiple: if set, T is padded up to a multiple of it with one trailing segment
            (positions restarting at 0, no targets), as `PackedBatch` documents.
        pad_token_id: the token id written in the padding.
        share_prompt: the shared-prompt form (each pair's prompt once; paired examples only),
            see `fastdpo.data.shared_prompt`.
    """
    paired = check_examples(pairs)
    if share_prompt:
        from fastdpo.data.shared_prompt import collate_shared_prompt

        return collate_shared_prompt(
            pairs, pad_to_multiple=pad_to_multiple, pad_token_id=pad_token_id
        )
    prompts, completions, masks, seq_pair, seq_role, seq_label = [], [], [], [], [], []
    for index, pair in enumerate(pairs):
        if paired:
            parts = [
                (pair.chosen_ids, pair.chosen_loss_mask, Role.CHOSEN),
                (pair.rejected_ids, pair.rejected_loss_mask, Role.REJECTED),
            ]
        else:
            parts = [(pair.chosen_ids, pair.chosen_loss_mask, Role.UNPAIRED)]
        for ids, mask, role in parts:
            prompts.append(pair.prompt_ids)
            completions.append(ids)
            masks.append(mask)
            seq_pair.append(index)
            seq_role.append(int(role))
            seq_label.append(bool(pair.label) if role == Role.UNPAIRED else False)

    prompt_lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    completion_lengths = np.array([len(c) for c in completions], dtype=np.int64)
    seq_lengths = prompt_lengths + completion_lengths
    starts = np.concatenate([[0], np.cumsum(seq_lengths)])
    num_real = int(starts[-1])

    input_ids = np.empty(num_real, dtype=np.int64)
    is_target = np.zeros(num_real, dtype=bool)
    for s, (prompt, completion, mask) in enumerate(zip(prompts, completions, masks, strict=True)):
        start, middle, end = starts[s], starts[s] + prompt_lengths[s], starts[s + 1]
        input_ids[start:middle] = prompt
        input_ids[middle:end] = completion
        is_target[middle:end] = True if mask is None else mask
    target_stream = np.flatnonzero(is_target)
    targets_before = np.concatenate([[0], np.cumsum(is_target, dtype=np.int64)])
    target_cu = targets_before[starts]  # targets before each sequence start, then the total
    position_ids = np.arange(num_real, dtype=np.int64) - np.repeat(starts[:-1], seq_lengths)

    input_ids, position_ids, cu_seqlens, padding = pad_stream(
        input_ids, position_ids, starts, pad_to_multiple, pad_token_id
    )
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        cu_seqlens=torch.from_numpy(cu_seqlens.astype(np.int32)),
        max_seqlen=int(np.diff(cu_seqlens).max()),
        target_positions=torch.from_numpy(target_stream - 1),
        target_ids=torch.from_numpy(input_ids[target_stream]),
        target_cu=torch.from_numpy(target_cu.astype(np.int32)),
        seq_pair=torch.tensor(seq_pair, dtype=torch.int64),
        seq_role=torch.tensor(seq_role, dtype=torch.int8),
        seq_label=torch.tensor(seq_label, dtype=torch.bool),
        example_ids=[p.example_id for p in pairs],
        num_padding=padding,
    )


def check_examples(pairs: Sequence[TokenizedPair]) -> bool:
    """Refuse what no layout can hold; return whether the examples are paired."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one example")
    paired = pairs[0].is_paired
    if any(p.is_paired != paired for p in pairs):
        raise ValueError(
            "a batch cannot mix paired and unpaired (KTO) examples: the sequence layout differs; "
            "pack them separately"
        )
    for pair in pairs:
        if not pair.prompt_ids:
            raise ValueError(
                f"example {pair.example_id!r} has an empty prompt: every sequence needs a prompt "
                "token (the hidden state that predicts its first completion token)"
            )
        completions = [(pair.chosen_ids, pair.chosen_loss_mask)]
        if paired:
            completions.append((pair.rejected_ids, pair.rejected_loss_mask))
        for ids, mask in completions:
            if mask is not None and len(mask) != len(ids):
                raise ValueError(
                    f"example {pair.example_id!r}: loss mask has {len(mask)} entries for "
                    f"{len(ids)} completion tokens"
                )
    return paired


def pad_stream(
    input_ids: np.ndarray,
    position_ids: np.ndarray,
    starts: np.ndarray,
    pad_to_multiple: int | None,
    pad_token_id: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(input_ids, position_ids, cu_seqlens, padding): the stream padded up to a multiple of
    `pad_to_multiple` with one trailing segment (positions from 0), `starts` ending at T."""
    num_real = int(starts[-1])
    padding = -num_real % pad_to_multiple if pad_to_multiple else 0
    if not padding:
        return input_ids, position_ids, starts, 0
    input_ids = np.concatenate([input_ids, np.full(padding, pad_token_id, dtype=np.int64)])
    position_ids = np.concatenate([position_ids, np.arange(padding, dtype=np.int64)])
    return input_ids, position_ids, np.concatenate([starts, [num_real + padding]]), padding
