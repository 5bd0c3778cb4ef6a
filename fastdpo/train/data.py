"""The run's data: rows loaded and tokenized once, split into train/eval, and the step plan.

Data order is a pure function of (seed, epoch): every epoch is a permutation of the training
pairs, cut into steps of `pairs_per_step` pairs (the last step of an epoch may be smaller);
each step's pairs are packed into token-budget micro-batches. A process of a multi-process run
takes its share of every step's pairs (`rank_share`), so every rank sees the same step
boundaries and the step's loss is normalized by the global pair count.

`share_prompt` is decided once, over the training pairs, when the data is loaded
(`RunData.share_prompt`); the step's and the held-out batches are packed in that form, and
every size (the budget check, rank balance) counts the tokens of that form. The data order
does not depend on it: a step trains on the same pairs either way.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastdpo.data.packing import pack_pairs
from fastdpo.data.shared_prompt import resolve_share_prompt, share_prompt_note
from fastdpo.data.sources import load_preference_data
from fastdpo.data.tokenize import tokenize_pairs
from fastdpo.data.types import PackedBatch, PreferenceExample, TokenizedPair
from fastdpo.train.config import ConfigError, TrainConfig

logger = logging.getLogger("fastdpo.train")


@dataclass(kw_only=True)
class RunData:
    """Tokenized training and evaluation pairs of a run."""

    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    share_prompt: bool = False
    """Whether both splits are packed with each pair's prompt once (`share_prompt` resolved
    over the training pairs)."""


def load_run_data(config: TrainConfig, tokenizer: Any) -> RunData:
    """Load, split and tokenize `config.data` (and `eval_data`); errors name the key."""
    train_rows = _load(config.data, "data", config)
    if config.eval_data is not None:
        eval_rows = _load(config.eval_data, "eval_data", config)
    elif config.eval_fraction > 0:
        train_rows, eval_rows = _hold_out(train_rows, config.eval_fraction, config.seed)
    else:
        eval_rows = []
    kwargs = config.tokenization_kwargs()
    train = tokenize_pairs(
        train_rows,
        tokenizer,
        on_bad_row=config.on_bad_row,
        num_proc=config.dataset_num_proc,
        **kwargs,
    )
    eval_pairs = (
        tokenize_pairs(eval_rows, tokenizer, on_bad_row=config.on_bad_row, **kwargs)
        if eval_rows
        else []
    )
    if not train:
        raise ConfigError(f"data: no training pairs left after tokenization ({config.data!r})")
    for name, pairs in (("data", train), ("eval_data", eval_pairs)):
        if any(not p.is_paired for p in pairs):
            raise ConfigError(
                f"{name}: holds unpaired (KTO) rows; the trainer runs paired preference data "
                "(prompt, chosen, rejected)"
            )
    shared = resolve_share_prompt(config.share_prompt, train)
    logger.info("%s", share_prompt_note(config.share_prompt, shared, train))
    for name, pairs in (("data", train), ("eval_data", eval_pairs)):
        _check_fits(pairs, config.max_tokens_per_batch, name, share_prompt=shared)
    logger.info("%d training pairs, %d held-out pairs", len(train), len(eval_pairs))
    return RunData(train=list(train), eval=list(eval_pairs), share_prompt=shared)


def _load(source: Any, key: str, config: TrainConfig) -> list[PreferenceExample]:
    try:
        return load_preference_data(source, split=config.data_split, on_bad_row=config.on_bad_row)
    except FileNotFoundError as error:
        raise ConfigError(f"{key}: {error}") from None


def _hold_out(
    rows: list[PreferenceExample], fraction: float, seed: int
) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """(train, eval): a seeded random `fraction` of the rows (at least one) held out."""
    count = max(1, round(len(rows) * fraction))
    if count >= len(rows):
        raise ConfigError(
            f"eval_fraction: {fraction} of {len(rows)} rows leaves nothing to train on"
        )
    order = np.random.default_rng(seed).permutation(len(rows))
    held = set(order[:count].tolist())
    train = [row for i, row in enumerate(rows) if i not in held]
    held_out = [row for i, row in enumerate(rows) if i in held]
    return train, held_out


def _check_fits(
    pairs: Sequence[TokenizedPair], budget: int, key: str, *, share_prompt: bool = False
) -> None:
    """ConfigError unless every pair fits `budget` in the run's packed form."""
    too_long = [p for p in pairs if p.tokens_in_stream(share_prompt) > budget]
    if not too_long:
        return
    worst = max(too_long, key=lambda p: p.tokens_in_stream(share_prompt))
    needs = worst.tokens_in_stream(share_prompt)
    form = "prompt once (share_prompt on)" if share_prompt else "prompt twice"
    hint = ""
    if not share_prompt and worst.tokens_in_stream(True) <= budget:
        hint = f", set share_prompt: true ({worst.tokens_in_stream(True)} tokens with it)"
    raise ConfigError(
        f"max_tokens_per_batch: {len(too_long)} pair(s) of {key} need more than {budget} "
        f"tokens (the longest, {worst.example_id!r}, needs {needs}: {form} plus both "
        f"completions); raise max_tokens_per_batch to at least {needs}{hint} or lower max_length"
    )


# ------------------------------------------------------------------------------------------------
# The step plan


@dataclass(frozen=True, kw_only=True)
class StepPlan:
    """Which pairs each optimizer step trains on: deterministic per (seed, epoch)."""

    num_pairs: int
    pairs_per_step: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_pairs / self.pairs_per_step)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """int64 [num_pairs]: the pair indices of `epoch`, in training order."""
        return _permutation(self.seed, epoch, self.num_pairs)

    def step_pairs(self, epoch: int, step_in_epoch: int) -> list[int]:
        """Indices of the pairs of one step (global, before splitting across ranks)."""
        order = self.epoch_order(epoch)
        start = step_in_epoch * self.pairs_per_step
        return order[start : start + self.pairs_per_step].tolist()

    def position(self, global_step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of the step after `global_step` finished steps."""
        return divmod(global_step, self.steps_per_epoch)


@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, count: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(count)
    order.flags.writeable = False  # shared by every step of the epoch
    return order


def total_steps(config: TrainConfig, plan: StepPlan) -> int:
    """Optimizer steps of the run: max_steps, else ceil(epochs x steps per epoch)."""
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.num_train_epochs * plan.steps_per_epoch))


def rank_share(pair_indices: list[int], sizes: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's pairs of a step (see `rank_shares`). One rank: all of them."""
    if world == 1:
        return list(pair_indices)
    return rank_shares(pair_indices, sizes, world)[rank]


def rank_shares(pair_indices: list[int], sizes: Sequence[int], world: int) -> list[list[int]]:
    """Every rank's pairs of a step: greedy longest-first onto the least-loaded rank (tokens),
    so ranks carry about the same tokens; pairs are never split. Each share keeps the step's
    order. Every rank computes all shares (no communication): the step's balance and who has
    nothing are known everywhere."""
    loads = [0] * world
    owned: list[list[int]] = [[] for _ in range(world)]
    for index in sorted(pair_indices, key=lambda i: (-sizes[i], i)):
        target = min(range(world), key=lambda r: (loads[r], r))
        loads[target] += sizes[index]
        owned[target].append(index)
    position = {index: n for n, index in enumerate(pair_indices)}
    return [sorted(share, key=position.__getitem__) for share in owned]


def worst_rank_share(shares: list[list[int]], sizes: Sequence[int]) -> float:
    """The largest share of a step's tokens any rank carries (1 / world when balanced)."""
    loads = [sum(sizes[i] for i in share) for share in shares]
    return max(loads) / max(sum(loads), 1)


def micro_batches(
    pairs: Sequence[TokenizedPair],
    indices: list[int],
    *,
    max_tokens_per_batch: int,
    seed: int,
    epoch: int,
    share_prompt: bool = False,
) -> Iterator[PackedBatch]:
    """The packed micro-batches of one step's (rank's) pairs (`share_prompt`: the run's
    resolved form, never "auto": a step's few pairs must not decide it on their own)."""
    if not indices:
        return iter(())
    chosen = [pairs[i] for i in indices]
    return iter(
        pack_pairs(
            chosen,
            max_tokens_per_batch=max_tokens_per_batch,
            seed=seed,
            epoch=epoch,
            share_prompt=share_prompt,
        )
    )


def eval_batches(
    pairs: Sequence[TokenizedPair], *, max_tokens_per_batch: int, share_prompt: bool = False
) -> list[PackedBatch]:
    """Held-out pairs packed once, in a fixed order (`share_prompt`: the run's form)."""
    if not pairs:
        return []
    return list(
        pack_pairs(
            pairs,
            max_tokens_per_batch=max_tokens_per_batch,
            shuffle=False,
            share_prompt=share_prompt,
        )
    )
