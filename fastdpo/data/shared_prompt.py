"""The shared-prompt form: each pair's prompt in the stream once, `[prompt, chosen, rejected]`.

A plain packed pair runs its prompt twice (prompt + chosen, prompt + rejected). Here the
rejected tokens attend to the prompt and to themselves instead, with positions continuing
from the prompt's end, so every completion token sees what it would see unshared while the
prompt's tokens go through the model once. The layout is documented on `PackedBatch`
(`fastdpo/data/types.py`); the attention that reads it is `fastdpo.attention.shared_prompt`.

    batch = collate_pairs(pairs, share_prompt=True)          # one batch
    packed = pack_pairs(pairs, max_tokens_per_batch=16384, share_prompt="auto")

`share_prompt="auto"` turns the form on when the prompt share of the examples' tokens (what
sharing saves) reaches `AUTO_MIN_PROMPT_SHARE`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from fastdpo.data.collate import check_examples, pad_stream
from fastdpo.data.types import PackedBatch, Role, SharedPromptLayout, TokenizedPair

SharePrompt = bool | Literal["auto", "true", "false"]

AUTO_MIN_PROMPT_SHARE = 0.10
"""`share_prompt="auto"` shares when prompt tokens are at least this share of the tokens the
plain form would pack (sum of prompts / sum of (2 x prompt + chosen + rejected)). Measured
(benchmarks/bench_prefix_sharing.py, 2-core CPU, 2026-12-03): the step speedup is ~0.95x the
ideal token ratio at short prompts, so break-even is near 0.05 (0.98x at 0.055, 1.00x at
0.018, within the +-4% noise) and 0.10 gained 1.07x; 0.10 keeps a noise-sized margin."""


def prompt_share(pairs: Sequence[TokenizedPair]) -> float:
    """The share of the plain form's tokens that sharing saves: prompts / all tokens (paired
    examples; 0 for unpaired ones, which have one sequence each)."""
    saved = sum(len(p.prompt_ids) for p in pairs if p.is_paired)
    total = sum(p.num_tokens for p in pairs)
    return saved / total if total else 0.0


def resolve_share_prompt(setting: SharePrompt, pairs: Sequence[TokenizedPair]) -> bool:
    """Whether `pairs` are packed in the shared-prompt form under `setting`.

    True / "true" requires paired examples; "auto" is on for paired examples whose prompt
    share (see `prompt_share`) is at least `AUTO_MIN_PROMPT_SHARE`.
    """
    if isinstance(setting, str):
        if setting not in ("auto", "true", "false"):
            raise ValueError(f"share_prompt must be 'auto', 'true' or 'false', got {setting!r}")
        if setting != "auto":
            setting = setting == "true"
    paired = all(p.is_paired for p in pairs)
    if setting == "auto":
        return bool(pairs) and paired and prompt_share(pairs) >= AUTO_MIN_PROMPT_SHARE
    if setting and not paired:
        raise ValueError(
            "share_prompt=True needs paired examples (prompt, chosen, rejected); unpaired (KTO) "
            "examples have one completion per prompt, so there is nothing to share"
        )
    return bool(setting)


def share_prompt_note(setting: SharePrompt, shared: bool, pairs: Sequence[TokenizedPair]) -> str:
    """The decision as logged: "share_prompt auto: on (prompts are 41% of the tokens)"."""
    state = "on" if shared else "off"
    share = prompt_share(pairs)
    return f"share_prompt {str(setting).lower()}: {state} (prompts are {share:.0%} of the tokens)"


def collate_shared_prompt(
    pairs: Sequence[TokenizedPair], *, pad_to_multiple: int | None = None, pad_token_id: int = 0
) -> PackedBatch:
    """One shared-prompt `PackedBatch` holding `pairs` in order (paired examples only)."""
    if not check_examples(pairs):
        raise ValueError(
            "the shared-prompt form needs paired examples (prompt, chosen, rejected); unpaired "
            "(KTO) examples have one completion per prompt, so there is nothing to share"
        )
    prompt_len = np.array([len(p.prompt_ids) for p in pairs], dtype=np.int64)
    chosen_len = np.array([len(p.chosen_ids) for p in pairs], dtype=np.int64)
    rejected_len = np.array([len(p.rejected_ids) for p in pairs], dtype=np.int64)
    groups = len(pairs)
    prefix_starts = np.concatenate([[0], np.cumsum(prompt_len + chosen_len)])
    rejected_start = int(prefix_starts[-1])
    rejected_starts = rejected_start + np.concatenate([[0], np.cumsum(rejected_len)])
    num_real = int(rejected_starts[-1])

    input_ids = np.empty(num_real, dtype=np.int64)
    position_ids = np.empty(num_real, dtype=np.int64)
    token_branch = np.empty(num_real, dtype=np.int8)
    target_positions, target_ids, target_counts = [], [], []
    for g, pair in enumerate(pairs):
        start, middle = prefix_starts[g], prefix_starts[g] + prompt_len[g]
        end, r_start = prefix_starts[g + 1], rejected_starts[g]
        r_end = rejected_starts[g + 1]
        input_ids[start:middle], input_ids[middle:end] = pair.prompt_ids, pair.chosen_ids
        input_ids[r_start:r_end] = pair.rejected_ids
        position_ids[start:end] = np.arange(end - start)
        position_ids[r_start:r_end] = prompt_len[g] + np.arange(r_end - r_start)
        token_branch[start:middle], token_branch[middle:end] = 0, 1
        token_branch[r_start:r_end] = 2
        last_prompt = middle - 1
        # A completion token at offset k is predicted from offset k - 1 of the same completion,
        # the first one from the prompt's last position.
        for first, ids, mask in (
            (middle, pair.chosen_ids, pair.chosen_loss_mask),
            (r_start, pair.rejected_ids, pair.rejected_loss_mask),
        ):
            offsets = np.arange(len(ids)) if mask is None else np.flatnonzero(mask)
            predicting = first + offsets - 1
            predicting[offsets == 0] = last_prompt
            target_positions.append(predicting)
            target_ids.append(np.asarray(ids, dtype=np.int64)[offsets])
            target_counts.append(len(offsets))
    target_cu = np.concatenate([[0], np.cumsum(target_counts)])

    starts = np.concatenate([prefix_starts, rejected_starts[1:]])
    input_ids, position_ids, cu_seqlens, padding = pad_stream(
        input_ids, position_ids, starts, pad_to_multiple, pad_token_id
    )
    total = num_real + padding
    token_branch = np.concatenate([token_branch, np.zeros(padding, dtype=np.int8)])
    token_group = np.concatenate(
        [
            np.repeat(np.arange(groups), prompt_len + chosen_len),
            np.repeat(np.arange(groups), rejected_len),
            np.full(padding, groups),
        ]
    )
    key_parts = []
    for g in range(groups):
        key_parts.append(np.arange(prefix_starts[g], prefix_starts[g] + prompt_len[g]))
        key_parts.append(np.arange(rejected_starts[g], rejected_starts[g + 1]))
    key_parts.append(np.arange(num_real, total))
    key_lengths = list(prompt_len + rejected_len) + ([padding] if padding else [])
    rejected_lengths = list(rejected_len) + ([padding] if padding else [])
    max_seqlen = int(np.max(prompt_len + np.maximum(chosen_len, rejected_len)))

    def offsets(lengths) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    layout = SharedPromptLayout(
        rejected_start=rejected_start,
        rejected_cu_seqlens=offsets(rejected_lengths),
        key_index=torch.from_numpy(np.concatenate(key_parts).astype(np.int64)),
        key_cu_seqlens=offsets(key_lengths),
        token_group=torch.from_numpy(token_group.astype(np.int32)),
        token_branch=torch.from_numpy(token_branch),
    )
    seq_role = [int(Role.CHOSEN), int(Role.REJECTED)] * groups
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        cu_seqlens=torch.from_numpy(cu_seqlens.astype(np.int32)),
        max_seqlen=max(max_seqlen, padding),
        target_positions=torch.from_numpy(np.concatenate(target_positions).astype(np.int64)),
        target_ids=torch.from_numpy(np.concatenate(target_ids).astype(np.int64)),
        target_cu=torch.from_numpy(target_cu.astype(np.int32)),
        seq_pair=torch.arange(groups, dtype=torch.int64).repeat_interleave(2),
        seq_role=torch.tensor(seq_role, dtype=torch.int8),
        seq_label=torch.zeros(2 * groups, dtype=torch.bool),
        example_ids=[p.example_id for p in pairs],
        num_padding=padding,
        shared_prompt=layout,
    )
