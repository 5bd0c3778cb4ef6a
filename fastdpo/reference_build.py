"""The reference pass: one inference pass of the reference model that writes a cache folder.

The examples are sorted by id and cut into shards of `examples_per_shard` examples; that plan
depends only on the data, never on the number of processes, so a two-rank build writes the same
shards as a one-rank build. Under `torch.distributed` rank r computes shards r, r + W, ...;
rank 0 writes the manifest once every shard has its record. A restarted build keeps every
shard whose record names this build (fingerprint and plan) and whose bytes match the record and
hold the planned examples, and computes the rest.

Inside a shard the examples are packed into token-budget micro-batches (both sequences of a
pair together) and run through `sequence_logps` under `torch.inference_mode`: no logits, no
autograd state, so the budget can be several times the training one. `share_prompt` packs each
pair with its prompt once (`fastdpo.data.shared_prompt`): the same log-probs for fewer tokens,
so it is no part of the fingerprint or the shard plan (a cache built either way serves a run
either way); the manifest's `build` part records the choice.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fastdpo.data.packing import PackedPairs, pack_pairs
from fastdpo.data.shared_prompt import SharePrompt, resolve_share_prompt, share_prompt_note
from fastdpo.data.types import PackedBatch, Role, TokenizedPair
from fastdpo.model import sequence_logps
from fastdpo.reference_fingerprint import Fingerprint, compute_fingerprint, example_digest
from fastdpo.reference_shards import (
    ReferenceCacheError,
    ShardRecord,
    build_digest,
    finalize_manifest,
    prepare_folder,
    shard_content_digest,
    shard_is_done,
    write_shard,
)

logger = logging.getLogger("fastdpo.reference")

REBUILD_HINT = (
    "`fastdpo precompute-ref --model <reference model> --data <data> --out <dir>` "
    "with the training run's tokenization settings"
)


@dataclass(kw_only=True)
class BuildOptions:
    """How the reference pass runs (none of these change the values computed)."""

    max_tokens_per_batch: int = 16384
    """Token budget of one packed micro-batch: larger than training's (no activations kept)."""
    examples_per_shard: int = 1024
    """Examples per shard file: the unit of resume and of work split between ranks."""
    per_token: bool = False
    """Also store per-token log-probs (4 bytes per completion token)."""
    overwrite: bool = False
    """Replace a cache (finished or not) that was built from other inputs or another plan."""
    num_workers: int = 0
    """DataLoader worker processes that collate batches (0: in this process)."""
    progress: bool = True
    """Show a progress bar (rank 0 only) with tokens/s and ETA."""
    command: str | None = None
    """The command line that started the build, recorded in the manifest for rebuild hints."""
    on_shard_written: Callable[[ShardRecord], None] | None = None
    """Called after each shard and its record are on disk (progress reporting, tests)."""
    share_prompt: SharePrompt = "auto"
    """Pack each pair with its prompt once: True, False or "auto" (on when the prompts are a
    large enough share of the paired examples' tokens; decided once over all examples)."""


def build_cache(
    model: torch.nn.Module,
    examples: Sequence[TokenizedPair],
    out_dir: str | Path,
    *,
    tokenizer: Any | None,
    tokenization: Mapping[str, Any] | Any,
    options: BuildOptions,
) -> Path:
    """Compute the reference log-probs of `examples` under `model` into `out_dir`.

    Every rank of an initialized process group must call this with the same examples and
    settings (its own replica of the model on its own device). Returns the cache folder once
    the manifest is written (on every rank).
    """
    out_dir = Path(out_dir)
    if options.max_tokens_per_batch < 1 or options.examples_per_shard < 1:
        raise ValueError("max_tokens_per_batch and examples_per_shard must be positive")
    ordered = _sorted_unique(examples)
    digests = [example_digest(p) for p in ordered]
    fingerprint = compute_fingerprint(
        model=model, tokenizer=tokenizer, tokenization=tokenization, example_digests=digests
    )
    size = options.examples_per_shard
    shard_ranges = [(s, min(s + size, len(ordered))) for s in range(0, len(ordered), size)]
    plan = {
        "num_examples": len(ordered),
        "examples_per_shard": size,
        "per_token": options.per_token,
        "shard_contents": [shard_content_digest(digests[a:b]) for a, b in shard_ranges],
    }
    build = build_digest(fingerprint, plan)
    rank, world = _rank_and_world()
    _check_ranks_agree(fingerprint, plan, world)

    prepare_error, status = None, None
    if rank == 0:
        try:
            status = prepare_folder(out_dir, fingerprint, plan, options.overwrite)
        except Exception as e:  # raised on every rank below: none is left waiting
            prepare_error = e
    _raise_if_any_rank_failed(prepare_error, world, "preparing the cache folder")
    if _broadcast(status, world) == "complete":
        logger.info("reference cache %s is complete and matches: nothing to compute", out_dir)
        return out_dir

    num_shards = len(shard_ranges)
    mine = [i for i in range(num_shards) if i % world == rank]
    todo = [i for i in mine if not shard_is_done(out_dir, i, num_shards, plan, build)]
    logger.info(
        "rank %d: %d of its %d shards already done, %d to compute",
        rank,
        len(mine) - len(todo),
        len(mine),
        len(todo),
    )
    paired = [p for p in ordered if p.is_paired]
    # Decided over the paired examples (unpaired ones have no second prompt to share); an
    # explicit True over unpaired data only is an error naming the option.
    shared = resolve_share_prompt(options.share_prompt, paired or ordered)
    if rank == 0:
        logger.info("reference pass: %s", share_prompt_note(options.share_prompt, shared, paired))
    device = next(model.parameters()).device
    total_tokens = sum(
        ordered[j].tokens_in_stream(shared) for i in todo for j in range(*shard_ranges[i])
    )
    bar = tqdm(
        total=total_tokens,
        unit="tok",
        unit_scale=True,
        desc="reference log-probs",
        disable=not options.progress or rank != 0,
    )
    was_training = model.training
    model.eval()  # no dropout: the reference values are deterministic
    started = time.perf_counter()
    compute_error = None
    try:
        results = _shard_columns(
            model,
            [ordered[slice(*shard_ranges[i])] for i in todo],
            [digests[slice(*shard_ranges[i])] for i in todo],
            max_tokens_per_batch=options.max_tokens_per_batch,
            per_token=options.per_token,
            device=device,
            num_workers=options.num_workers,
            on_batch=bar.update,
            share_prompt=shared,
        )
        for done, (position, columns) in enumerate(results, 1):
            i = todo[position]
            a, b = shard_ranges[i]
            record = write_shard(
                out_dir,
                index=i,
                num_shards=num_shards,
                example_ids=[p.example_id for p in ordered[a:b]],
                columns=columns,
                content=plan["shard_contents"][i],
                build=build,
            )
            bar.set_postfix(shards=f"{done}/{len(todo)}")
            if options.on_shard_written is not None:
                options.on_shard_written(record)
    except Exception as e:  # the other ranks must hear of it, not wait for this one forever
        compute_error = e
    finally:
        model.train(was_training)
        bar.close()
    seconds = time.perf_counter() - started
    _raise_if_any_rank_failed(compute_error, world, "computing its shards")

    finalize_error = None
    if rank == 0:  # every rank's shards and records are on disk (the exchange above waited)
        build_info = {
            "world_size": world,
            "device": str(device),
            "max_tokens_per_batch": options.max_tokens_per_batch,
            "rank0_seconds": round(seconds, 3),
            "rank0_tokens": total_tokens,
            "share_prompt": shared,  # not a fingerprint field: the values do not depend on it
            "command": options.command,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            finalize_manifest(out_dir, fingerprint, plan, num_shards, build_info)
        except Exception as e:
            finalize_error = e
    _raise_if_any_rank_failed(finalize_error, world, "writing the manifest")
    return out_dir


def compute_columns(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    digests: Sequence[tuple[str, int]],
    *,
    max_tokens_per_batch: int,
    per_token: bool,
    device: torch.device,
    num_workers: int = 0,
    on_batch: Callable[[int], Any] | None = None,
    share_prompt: bool = False,
) -> dict[str, torch.Tensor]:
    """The shard columns (see `reference_shards`) of `pairs`, in their order (one shard);
    `share_prompt` packs the paired examples with their prompt once."""
    ((_, columns),) = _shard_columns(
        model,
        [pairs],
        [digests],
        max_tokens_per_batch=max_tokens_per_batch,
        per_token=per_token,
        device=device,
        num_workers=num_workers,
        on_batch=on_batch,
        share_prompt=share_prompt,
    )
    return columns


def _shard_columns(
    model: torch.nn.Module,
    shards: Sequence[Sequence[TokenizedPair]],
    digests: Sequence[Sequence[tuple[str, int]]],
    *,
    max_tokens_per_batch: int,
    per_token: bool,
    device: torch.device,
    num_workers: int,
    on_batch: Callable[[int], Any] | None,
    share_prompt: bool = False,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(position in `shards`, shard columns) for each shard, as soon as its last batch is done.

    One batch stream (one DataLoader, so worker processes start once, not once per shard)
    covers every shard. A shard's results stay on the device until its end: one host transfer
    per shard, not per batch, so the host keeps feeding batches while the device computes.
    """
    current: _ShardResults | None = None
    batches = _batches(shards, max_tokens_per_batch, num_workers, device, share_prompt)
    for position, batch in batches:
        if current is not None and current.position != position:
            yield current.position, current.columns()
            current = None
        if current is None:
            current = _ShardResults(position, shards[position], digests[position], per_token)
        with torch.inference_mode():
            out = sequence_logps(
                model, batch.to(device, non_blocking=True), return_token_logps=per_token
            )
        current.add(batch, out)
        if on_batch is not None:
            # Counted when queued, without a sync: the device's bounded launch queue keeps
            # the host only a batch or two ahead, so the progress bar's rate still holds.
            on_batch(batch.num_tokens)
    if current is not None:
        yield current.position, current.columns()


class _ShardResults:
    """The per-sequence results of one shard's batches, turned into its columns at the end."""

    def __init__(
        self,
        position: int,
        pairs: Sequence[TokenizedPair],
        digests: Sequence[tuple[str, int]],
        per_token: bool,
    ):
        self.position = position
        self.pairs = pairs
        self.digests = digests
        self.per_token = per_token
        self.row_of = {p.example_id: i for i, p in enumerate(pairs)}
        self.seq_rows: list[torch.Tensor] = []
        self.seq_roles: list[torch.Tensor] = []
        self.seq_lengths: list[torch.Tensor] = []
        self.seq_logps: list[torch.Tensor] = []  # on the device
        self.token_logps: list[torch.Tensor] = []  # on the device

    def add(self, batch: PackedBatch, out: Any) -> None:
        rows = torch.tensor([self.row_of[e] for e in batch.example_ids], dtype=torch.int64)
        self.seq_rows.append(rows[batch.seq_pair])
        self.seq_roles.append(batch.seq_role)
        self.seq_lengths.append(batch.completion_lengths)
        self.seq_logps.append(out.logps.float())
        if self.per_token:
            self.token_logps.append(out.token_logps.float())

    def columns(self) -> dict[str, torch.Tensor]:
        pairs = self.pairs
        rows = torch.cat(self.seq_rows).numpy()
        roles = torch.cat(self.seq_roles).numpy()
        lengths = torch.cat(self.seq_lengths).numpy().astype(np.int64)
        logps = torch.cat(self.seq_logps).cpu().numpy()
        _check_each_sequence_once(pairs, rows, roles)

        n = len(pairs)
        is_rejected = roles == int(Role.REJECTED)
        paired = np.array([p.is_paired for p in pairs], dtype=np.bool_)
        chosen_logps = np.zeros(n, dtype=np.float32)
        rejected_logps = np.full(n, np.nan, dtype=np.float32)
        chosen_lengths = np.zeros(n, dtype=np.int64)
        rejected_lengths = np.zeros(n, dtype=np.int64)
        chosen_logps[rows[~is_rejected]] = logps[~is_rejected]
        chosen_lengths[rows[~is_rejected]] = lengths[~is_rejected]
        rejected_logps[rows[is_rejected]] = logps[is_rejected]
        rejected_lengths[rows[is_rejected]] = lengths[is_rejected]
        columns = {
            "example_digests": torch.tensor([d for _, d in self.digests], dtype=torch.int64),
            "paired": torch.from_numpy(paired),
            "chosen_logps": torch.from_numpy(chosen_logps),
            "rejected_logps": torch.from_numpy(rejected_logps),
            "chosen_lengths": torch.from_numpy(chosen_lengths.astype(np.int32)),
            "rejected_lengths": torch.from_numpy(rejected_lengths.astype(np.int32)),
        }
        if self.per_token:
            flat = torch.cat(self.token_logps).cpu().numpy()
            offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(chosen_lengths + rejected_lengths, out=offsets[1:])
            columns["token_offsets"] = torch.from_numpy(offsets)
            columns["token_logps"] = torch.from_numpy(
                _reorder_tokens(flat, rows, is_rejected, lengths, offsets, chosen_lengths)
            )
        return columns


class _PlannedBatches:
    """Map-style dataset: item k is (shard position, packed batch) of the k-th planned batch."""

    def __init__(self, plans: list[tuple[int, PackedPairs]]):
        self.items = [
            (position, packed, b) for position, packed in plans for b in range(len(packed))
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> tuple[int, PackedBatch]:
        position, packed, b = self.items[k]
        return position, packed[b]


def _batches(
    shards: Sequence[Sequence[TokenizedPair]],
    max_tokens_per_batch: int,
    num_workers: int,
    device: torch.device,
    share_prompt: bool = False,
) -> Iterable[tuple[int, PackedBatch]]:
    """(shard position, micro-batch) of every shard, shard after shard. Within a shard, paired
    and unpaired examples are packed apart (a batch holds one kind; `share_prompt` applies to
    the paired ones), largest batches first (planner order, so running out of memory shows at
    once); staged in pinned memory when the device is CUDA."""
    plans = []
    for position, pairs in enumerate(shards):
        for paired in (True, False):
            group = [p for p in pairs if p.is_paired == paired]
            if group:
                packed = pack_pairs(
                    group,
                    max_tokens_per_batch=max_tokens_per_batch,
                    shuffle=False,
                    share_prompt=share_prompt and paired,
                )
                plans.append((position, packed))
    planned = _PlannedBatches(plans)
    pin = device.type == "cuda"
    if num_workers > 0:
        return DataLoader(
            planned, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin
        )
    return ((position, batch.pin_memory() if pin else batch) for position, batch in planned)


def _reorder_tokens(
    flat: np.ndarray,
    rows: np.ndarray,
    is_rejected: np.ndarray,
    lengths: np.ndarray,
    offsets: np.ndarray,
    chosen_lengths: np.ndarray,
) -> np.ndarray:
    """Per-token log-probs from batch order (sequence after sequence, as computed) to shard
    order (example after example, chosen tokens then rejected tokens)."""
    src_start = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=src_start[1:])
    dest_start = offsets[rows] + np.where(is_rejected, chosen_lengths[rows], 0)
    by_dest = np.argsort(dest_start, kind="stable")
    # Destination position d of sequence s reads flat[d + (src_start[s] - dest_start[s])].
    shift = np.repeat((src_start - dest_start)[by_dest], lengths[by_dest])
    return flat[np.arange(len(flat)) + shift]


def _check_each_sequence_once(
    pairs: Sequence[TokenizedPair], rows: np.ndarray, roles: np.ndarray
) -> None:
    """Packing must have placed every sequence of every example exactly once."""
    expected = sum(2 if p.is_paired else 1 for p in pairs)
    keys = rows * 4 + roles.astype(np.int64)
    if len(keys) != expected or len(np.unique(keys)) != expected:
        raise RuntimeError(
            f"packing returned {len(keys)} sequences ({len(np.unique(keys))} distinct) for "
            f"{len(pairs)} examples that have {expected}: a bug in fastdpo.data.pack_pairs"
        )


def _sorted_unique(examples: Sequence[TokenizedPair]) -> list[TokenizedPair]:
    ordered = sorted(examples, key=lambda p: p.example_id)
    if not ordered:
        raise ValueError("no examples: the reference cache needs at least one")
    dups = [a.example_id for a, b in itertools.pairwise(ordered) if a.example_id == b.example_id]
    if dups:
        raise ValueError(
            f"{len(dups)} duplicate example ids (e.g. {sorted(set(dups))[:3]}): the cache is "
            "keyed by example id, make the ids unique"
        )
    return ordered


# ---------------------------------------------------------------------------------------------
# torch.distributed helpers (all no-ops in a single process)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(value: Any, world: int) -> Any:
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _raise_if_any_rank_failed(error: Exception | None, world: int, step: str) -> None:
    """Raise on every rank if `error` is set on any: a rank that failed raises its own error,
    the others a `ReferenceCacheError` naming it. Every rank must call this (a collective), so
    it also waits for all of them, like a barrier."""
    messages: list[Any] = [None if error is None else f"{type(error).__name__}: {error}"]
    if world > 1:
        messages = [None] * world
        dist.all_gather_object(
            messages, None if error is None else f"{type(error).__name__}: {error}"
        )
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        raise ReferenceCacheError(f"rank {rank} failed while {step}: {message}")


def _check_ranks_agree(fingerprint: Fingerprint, plan: dict[str, Any], world: int) -> None:
    """Every rank must build the same cache: same model, data and settings."""
    if world == 1:
        return
    mine = {"fingerprint": fingerprint.to_json(), "plan": plan}
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            diffs = Fingerprint.from_json(theirs["fingerprint"]).differences(
                Fingerprint.from_json(everyone[0]["fingerprint"])
            )
            fields = ", ".join(f for f, _, _ in diffs) or "shard plan"
            raise ReferenceCacheError(
                f"rank {rank} builds from other inputs than rank 0 ({fields}): every rank "
                "must load the same model, data and settings"
            )
