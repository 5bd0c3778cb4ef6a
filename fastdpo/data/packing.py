"""`pack_pairs`: tokenized pairs -> token-budget micro-batches, as a DataLoader-ready dataset.

The plan (which examples share a batch) comes from `fastdpo.data.planner` (best-fit decreasing,
pairs never split, deterministic per (seed, epoch)); each batch is built by `collate_pairs` when
it is asked for, so worker processes of a `torch.utils.data.DataLoader` do the collation:

    packed = fastdpo.pack_pairs(pairs, max_tokens_per_batch=16384, seed=0, epoch=epoch)
    for batch in packed.loader(num_workers=2, pin_memory=True):
        batch = batch.to("cuda", non_blocking=True)

An example longer than the budget on its own is an error by default (`on_oversized="error"`),
or left out and reported (`"skip"`); it is never dropped silently.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch.utils.data import DataLoader, Dataset

from fastdpo.data.collate import collate_pairs
from fastdpo.data.planner import PackingStats, best_fit_decreasing
from fastdpo.data.shared_prompt import SharePrompt, resolve_share_prompt
from fastdpo.data.types import PackedBatch, TokenizedPair

logger = logging.getLogger("fastdpo.data")

__all__ = ["PackedPairs", "collate_pairs", "pack_pairs"]

OnOversized = Literal["error", "skip"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackingOptions:
    """Everything besides the examples that decides an epoch's batches."""

    max_tokens_per_batch: int
    """Most real tokens in one batch (with padding, T never exceeds it either)."""
    seed: int = 0
    epoch: int = 0
    shuffle: bool = True
    """Shuffle the batch order (and tie-breaks) per (seed, epoch); False keeps planner order."""
    pad_to_multiple: int | None = None
    """Pad each batch's stream to a multiple of this (must divide max_tokens_per_batch)."""
    pad_token_id: int = 0
    max_pairs_per_batch: int | None = None
    """Cap on examples per batch (bounds the number of sequences), None for no cap."""
    plan_window: int | None = None
    """Plan this many shuffled examples at a time, so batch membership changes per epoch
    (None: plan all at once, the fullest batches; only their order and tie-breaks change)."""
    on_oversized: OnOversized = "error"
    """An example longer than the budget on its own: "error", or "skip" (logged, counted)."""
    share_prompt: bool = False
    """Pack each pair as one shared-prompt group (`fastdpo.data.shared_prompt`): its prompt
    counts once against the budget."""

    def __post_init__(self) -> None:
        if self.max_tokens_per_batch < 2:
            raise ValueError(f"max_tokens_per_batch must be >= 2, got {self.max_tokens_per_batch}")
        multiple = self.pad_to_multiple
        if multiple is not None and (multiple < 1 or self.max_tokens_per_batch % multiple):
            raise ValueError(
                f"pad_to_multiple ({multiple}) must be >= 1 and divide max_tokens_per_batch "
                f"({self.max_tokens_per_batch}), so padded batches stay within the budget"
            )
        if self.max_pairs_per_batch is not None and self.max_pairs_per_batch < 1:
            raise ValueError(f"max_pairs_per_batch must be >= 1, got {self.max_pairs_per_batch}")
        if self.plan_window is not None and self.plan_window < 1:
            raise ValueError(f"plan_window must be >= 1, got {self.plan_window}")
        if self.on_oversized not in ("error", "skip"):
            raise ValueError(f"on_oversized must be 'error' or 'skip', got {self.on_oversized!r}")


class PackedPairs(Dataset):
    """One epoch of packed micro-batches: `len()` batches, item i is a `PackedBatch`.

    Iterate it directly (collation in this process), or use `loader()` for worker processes and
    pinned memory. `plan[i]` lists the indices (into the tokenized pairs) of batch i, in
    sequence order; `stats` says how full the batches are.
    """

    def __init__(self, pairs: Sequence[TokenizedPair], options: PackingOptions):
        self.pairs = pairs
        self.options = options
        sizes = [p.tokens_in_stream(options.share_prompt) for p in pairs]
        budget = options.max_tokens_per_batch
        oversized = [i for i, n in enumerate(sizes) if n > budget]
        if oversized and options.on_oversized == "error":
            listed = ", ".join(
                f"{pairs[i].example_id!r} ({sizes[i]} tokens)" for i in oversized[:5]
            )
            raise ValueError(
                f"{len(oversized)} example(s) do not fit max_tokens_per_batch={budget} on their "
                f"own: {listed}; raise max_tokens_per_batch to at least {max(sizes)}, lower "
                "max_length in tokenize_pairs, or pass on_oversized='skip'"
            )
        kept = [i for i, n in enumerate(sizes) if n <= budget]
        batches = best_fit_decreasing(
            [sizes[i] for i in kept],
            budget,
            seed=options.seed,
            epoch=options.epoch,
            shuffle=options.shuffle,
            max_items_per_batch=options.max_pairs_per_batch,
            window=options.plan_window,
        )
        self.plan: list[list[int]] = [[kept[j] for j in batch] for batch in batches]
        self.skipped: list[int] = oversized
        self.stats = PackingStats.of(
            self.plan,
            sizes,
            budget,
            skipped=len(oversized),
            pad_to_multiple=options.pad_to_multiple,
        )
        if oversized:
            logger.warning(
                "skipped %d example(s) longer than max_tokens_per_batch=%d on their own (first: "
                "%r, %d tokens)",
                len(oversized),
                budget,
                pairs[oversized[0]].example_id,
                sizes[oversized[0]],
            )

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> PackedBatch:
        batch = collate_pairs(
            [self.pairs[i] for i in self.plan[index]],
            pad_to_multiple=self.options.pad_to_multiple,
            pad_token_id=self.options.pad_token_id,
            share_prompt=self.options.share_prompt,
        )
        batch.metadata.update(batch_index=index, epoch=self.options.epoch)
        return batch

    def __iter__(self) -> Iterator[PackedBatch]:
        for index in range(len(self)):
            yield self[index]

    def with_epoch(self, epoch: int) -> PackedPairs:
        """The same examples planned for another epoch (a different, deterministic order)."""
        return PackedPairs(self.pairs, dataclasses.replace(self.options, epoch=epoch))

    def loader(
        self, *, num_workers: int = 2, pin_memory: bool | None = None, prefetch_factor: int = 2
    ) -> DataLoader:
        """A DataLoader yielding this epoch's batches in plan order.

        Workers collate in parallel; `pin_memory` (default: when CUDA is available) puts each
        batch in page-locked memory so `batch.to("cuda", non_blocking=True)` overlaps the copy.
        """
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        return DataLoader(
            self,
            batch_size=None,  # items are whole batches already
            shuffle=False,  # the plan's order is the epoch's order
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
        )


def pack_pairs(
    tokenized: Sequence[TokenizedPair],
    *,
    max_tokens_per_batch: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    pad_to_multiple: int | None = None,
    pad_token_id: int = 0,
    max_pairs_per_batch: int | None = None,
    plan_window: int | None = None,
    on_oversized: OnOversized = "error",
    share_prompt: SharePrompt = False,
) -> PackedPairs:
    """Plan one epoch of micro-batches over `tokenized`; see `PackingOptions` for the arguments.

    Every example appears in exactly one batch (except oversized ones under
    `on_oversized="skip"`); both sequences of a pair share the batch. Examples must be all
    paired or all unpaired. `share_prompt`: True packs each pair's prompt once (the
    shared-prompt form, which `sequence_logps` takes unchanged), "auto" does so when the
    prompts are a large enough share of the tokens (`fastdpo.data.shared_prompt`).
    """
    if not tokenized:
        raise ValueError("pack_pairs got no examples")
    if len({p.is_paired for p in tokenized}) > 1:
        raise ValueError(
            "pack_pairs got both paired and unpaired (KTO) examples; pack them separately"
        )
    options = PackingOptions(
        max_tokens_per_batch=max_tokens_per_batch,
        seed=seed,
        epoch=epoch,
        shuffle=shuffle,
        pad_to_multiple=pad_to_multiple,
        pad_token_id=pad_token_id,
        max_pairs_per_batch=max_pairs_per_batch,
        plan_window=plan_window,
        on_oversized=on_oversized,
        share_prompt=resolve_share_prompt(share_prompt, tokenized),
    )
    return PackedPairs(tokenized, options)
