"""The reference log-prob cache: the reference model's log-probs, computed once, read in training.

    # once (or `fastdpo precompute-ref`):
    cache = ReferenceCache.build(ref_model, tokenized, "ref-cache", tokenizer=tok,
                                 tokenization=tokenization_settings(max_length=1024))
    # in training:
    cache = ReferenceCache.open("ref-cache", expect=expected_fields(tokenizer=tok, ...))
    cache.check_coverage(train_pairs)           # before the first step: every example is cached
    ref = cache.for_batch(batch, device="cuda")  # ref.chosen [P], ref.rejected [P] on the device

Files and their format: `fastdpo.reference_shards`. The pass that writes them (resume,
distributed): `fastdpo.reference_build`. Fingerprint fields: `fastdpo.reference_fingerprint`.

Opening a cache reads the manifest, checks each shard's size and (by default) sha256, loads the
per-example columns (summed log-probs, token counts, digests: 26 bytes per example) into memory,
and memory-maps the per-token log-probs, which are read only for the rows a batch needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdpo.data.shared_prompt import SharePrompt
from fastdpo.data.types import PackedBatch, Role, TokenizedPair
from fastdpo.reference_build import REBUILD_HINT, BuildOptions, build_cache
from fastdpo.reference_fingerprint import (
    Fingerprint,
    dataset_digest,
    describe_differences,
    example_digest,
    expected_fields,
    tokenization_settings,
)
from fastdpo.reference_shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PLAN_NAME,
    ReferenceCacheError,
    ShardRecord,
    memmap_column,
    read_json,
    read_shard,
    shard_problem,
)

__all__ = [
    "FingerprintMismatchError",
    "ReferenceCache",
    "ReferenceCacheError",
    "ReferenceEntry",
    "ReferenceLogps",
    "expected_fields",
    "tokenization_settings",
]

_LISTED_IDS = 5
"""How many example ids an error message lists."""


class FingerprintMismatchError(ReferenceCacheError):
    """The cache was built from other inputs; `fields` names each differing field."""

    def __init__(self, message: str, fields: list[str]):
        super().__init__(message)
        self.fields = fields


@dataclass(frozen=True, kw_only=True)
class ReferenceEntry:
    """The cached reference values of one example."""

    example_id: str
    paired: bool
    chosen_logp: float
    """Summed log-prob of the chosen (or, unpaired, the only) completion."""
    rejected_logp: float
    """Summed log-prob of the rejected completion; NaN for an unpaired example."""
    chosen_length: int
    """Completion tokens counted (loss mask applied)."""
    rejected_length: int
    chosen_token_logps: np.ndarray | None
    """fp32 [chosen_length], only in caches built with per-token values."""
    rejected_token_logps: np.ndarray | None


@dataclass(kw_only=True)
class ReferenceLogps:
    """Reference values of one `PackedBatch`, in its order, on its device.

    Shapes as in `PackedBatch`: P examples, S sequences, M completion targets.
    """

    chosen: torch.Tensor
    """fp32 [P] summed log-prob of each example's chosen (unpaired: only) completion."""
    rejected: torch.Tensor
    """fp32 [P]; NaN for unpaired examples."""
    chosen_lengths: torch.Tensor
    """int32 [P] completion tokens counted."""
    rejected_lengths: torch.Tensor
    """int32 [P]; 0 for unpaired examples."""
    logps: torch.Tensor
    """fp32 [S] per sequence, in stream order (sequence s of example p: chosen or rejected)."""
    token_logps: torch.Tensor | None
    """fp32 [M] per completion target, aligned with `batch.target_ids`; None unless the cache
    holds per-token values and they were asked for."""


class ReferenceCache:
    """A finished reference cache folder, opened for reading (use `open` or `build`)."""

    def __init__(self, path: Path, manifest: dict[str, Any], shards: list[ShardRecord]):
        self.path = path
        self.manifest = manifest
        self.fingerprint = Fingerprint.from_json(manifest["fingerprint"])
        self.per_token: bool = bool(manifest["plan"]["per_token"])
        self._load(shards)

    # -- building and opening ----------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        dataset: Sequence[TokenizedPair],
        out_dir: str | Path,
        *,
        tokenizer: Any | None,
        tokenization: Mapping[str, Any] | Any,
        max_tokens_per_batch: int = 16384,
        examples_per_shard: int = 1024,
        per_token: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        on_shard_written: Callable[[ShardRecord], None] | None = None,
        share_prompt: SharePrompt = "auto",
        options: BuildOptions | None = None,
    ) -> ReferenceCache:
        """Run `model` (the reference, on its device) over `dataset` and write a cache folder.

        `tokenizer` and `tokenization` (the settings `dataset` was tokenized with, as a dict:
        `tokenization_settings(max_length=1024, ...)` makes it from `tokenize_pairs` arguments)
        go into the fingerprint; pass `tokenizer=None` for data tokenized elsewhere. Run again
        with the same arguments after a crash: finished shards are kept. Under
        `torch.distributed` every rank calls this with the same data and its own model
        replica. `on_shard_written` is called with each shard's record once it is on disk.
        `share_prompt` (True, False or "auto") packs each pair with its prompt once: the same
        values for fewer tokens, so it is not fingerprinted (the manifest's `build` records it).
        `options` (a `BuildOptions`, which has a few more settings) replaces the keyword
        settings when given. Returns the opened cache (after checksum verification).
        """
        if options is None:
            options = BuildOptions(
                max_tokens_per_batch=max_tokens_per_batch,
                examples_per_shard=examples_per_shard,
                per_token=per_token,
                overwrite=overwrite,
                progress=progress,
                on_shard_written=on_shard_written,
                share_prompt=share_prompt,
            )
        path = build_cache(
            model, dataset, out_dir, tokenizer=tokenizer, tokenization=tokenization, options=options
        )
        return cls.open(path)

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        expect: Fingerprint | Mapping[str, Any] | None = None,
        verify: bool = True,
    ) -> ReferenceCache:
        """Open a finished cache, checking it against the run's expected fingerprint.

        `expect`: a `Fingerprint`, or flat field -> value (see `expected_fields`) to check some
        fields only; a differing field raises `FingerprintMismatchError` naming it. `verify`
        checks every shard's sha256 (a full read of the cache; without it only sizes are
        checked). A damaged shard raises `ReferenceCacheError`; it is never read as data.
        """
        path = Path(path)
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.exists():
            if (path / PLAN_NAME).exists():
                raise ReferenceCacheError(
                    f"{path} is an unfinished reference cache (a build was interrupted): run "
                    "the same `fastdpo precompute-ref` command again to finish it (finished "
                    "shards are kept)"
                )
            raise ReferenceCacheError(
                f"no reference cache at {path} (no {MANIFEST_NAME}): build one with {REBUILD_HINT}"
            )
        manifest = read_json(manifest_path)
        version = manifest.get("format_version")
        if manifest.get("format") != FORMAT_NAME or version != FORMAT_VERSION:
            raise ReferenceCacheError(
                f"{manifest_path}: format {manifest.get('format')!r} version "
                f"{version!r}, this fastdpo reads {FORMAT_NAME!r} "
                f"version {FORMAT_VERSION}: rebuild with {REBUILD_HINT}"
            )
        if expect is not None:
            _check_fingerprint(path, manifest, expect)
        shards = [ShardRecord.from_json(r) for r in manifest["shards"]]
        problems = [p for r in shards if (p := shard_problem(path, r, checksum=verify))]
        if problems:
            raise ReferenceCacheError(
                f"reference cache {path} is damaged: {'; '.join(problems)}. Run the "
                "`fastdpo precompute-ref` command that built it again: it recomputes only the "
                "damaged shards"
            )
        return cls(path, manifest, shards)

    def _load(self, shards: list[ShardRecord]) -> None:
        ids: list[str] = []
        columns: dict[str, list[torch.Tensor]] = {}
        self._token_logps: list[np.ndarray] = []
        token_starts, shard_of_row = [], []
        for shard_index, record in enumerate(shards):
            shard_path = self.path / record.file
            shard_ids, shard_columns = read_shard(shard_path, with_tokens=self.per_token)
            if len(shard_ids) != record.num_examples:
                raise ReferenceCacheError(
                    f"{record.file}: {len(shard_ids)} examples, the manifest says "
                    f"{record.num_examples}: rebuild with {REBUILD_HINT}"
                )
            ids += shard_ids
            for name, tensor in shard_columns.items():
                columns.setdefault(name, []).append(tensor)
            shard_of_row.append(np.full(len(shard_ids), shard_index, dtype=np.int32))
            if self.per_token:
                token_starts.append(shard_columns["token_offsets"][:-1].numpy())
                self._token_logps.append(memmap_column(shard_path, "token_logps"))
        merged = {name: torch.cat(parts) for name, parts in columns.items()}
        self._paired = merged["paired"]
        self._logps = torch.stack([merged["chosen_logps"], merged["rejected_logps"]])  # [2, N]
        self._lengths = torch.stack([merged["chosen_lengths"], merged["rejected_lengths"]])
        self._digests = merged["example_digests"].numpy()
        self._row_of = {example_id: row for row, example_id in enumerate(ids)}
        self._ids = ids
        if self.per_token:
            self._shard_of_row = np.concatenate(shard_of_row)
            self._token_start = np.concatenate(token_starts)
        # The shards together must hold exactly the examples the fingerprint was computed on:
        # no example twice, none missing (catches shards mixed in from another build).
        stored = dataset_digest(zip(ids, self._digests.tolist(), strict=True))
        if len(self._row_of) != len(ids) or stored != self.fingerprint.dataset:
            raise ReferenceCacheError(
                f"reference cache {self.path}: its shards do not hold the examples its "
                f"manifest was built for (shards from different builds?): rebuild with "
                f"{REBUILD_HINT}"
            )

    # -- reading -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, example_id: object) -> bool:
        return example_id in self._row_of

    @property
    def example_ids(self) -> list[str]:
        """Every cached example id (sorted)."""
        return list(self._ids)

    def lookup(self, example_id: str) -> ReferenceEntry:
        """The cached values of one example; KeyError naming the id if it is not cached."""
        row = self._row_of.get(example_id)
        if row is None:
            raise KeyError(f"example {example_id!r} is not in the reference cache {self.path}")
        chosen_len, rejected_len = (int(v) for v in self._lengths[:, row])
        chosen_tokens = rejected_tokens = None
        if self.per_token:
            tokens = self._tokens_of_row(row, chosen_len + rejected_len)
            chosen_tokens = np.array(tokens[:chosen_len])
            rejected_tokens = np.array(tokens[chosen_len:])
        return ReferenceEntry(
            example_id=example_id,
            paired=bool(self._paired[row]),
            chosen_logp=float(self._logps[0, row]),
            rejected_logp=float(self._logps[1, row]),
            chosen_length=chosen_len,
            rejected_length=rejected_len,
            chosen_token_logps=chosen_tokens,
            rejected_token_logps=rejected_tokens if bool(self._paired[row]) else None,
        )

    def _tokens_of_row(self, row: int, count: int) -> np.ndarray:
        start = int(self._token_start[row])
        return self._token_logps[int(self._shard_of_row[row])][start : start + count]

    def rows(self, example_ids: Sequence[str]) -> torch.Tensor:
        """int64 [len(example_ids)] rows of these examples; KeyError listing missing ids."""
        try:
            return torch.tensor([self._row_of[e] for e in example_ids], dtype=torch.int64)
        except KeyError:
            missing = [e for e in example_ids if e not in self._row_of]
            raise KeyError(
                f"{len(missing)} example(s) not in the reference cache {self.path}: "
                f"{missing[:_LISTED_IDS]} (call check_coverage before training)"
            ) from None

    def for_batch(
        self,
        batch: PackedBatch,
        *,
        device: torch.device | str | None = None,
        with_tokens: bool = False,
        non_blocking: bool = True,
    ) -> ReferenceLogps:
        """The reference values of `batch`, in its order, moved to `device` with the batch.

        `device` defaults to the batch's device. The lookup runs on the host from the batch's
        example ids; per-sequence values are gathered on the device with the batch's own
        `seq_pair` / `seq_role`, so nothing here waits for the device. With pinned staging
        (when `device` is CUDA) the copies are asynchronous. `with_tokens` also gathers the
        per-token values (cache built with `per_token=True`), aligned with `batch.target_ids`.
        """
        device = torch.device(device) if device is not None else batch.input_ids.device
        rows = self.rows(batch.example_ids)
        logps = self._logps[:, rows]  # fp32 [2, P]
        lengths = self._lengths[:, rows]  # int32 [2, P]
        tokens = self._batch_tokens(rows, batch) if with_tokens else None
        staged = [logps, lengths] + ([tokens] if tokens is not None else [])
        if device.type == "cuda":
            staged = [t.pin_memory() for t in staged]
        moved = [t.to(device, non_blocking=non_blocking) for t in staged]
        logps, lengths = moved[0], moved[1]
        seq_pair = batch.seq_pair.to(device, non_blocking=non_blocking)
        seq_is_rejected = batch.seq_role.to(device, non_blocking=non_blocking) == Role.REJECTED
        return ReferenceLogps(
            chosen=logps[0],
            rejected=logps[1],
            chosen_lengths=lengths[0],
            rejected_lengths=lengths[1],
            logps=logps[seq_is_rejected.long(), seq_pair],
            token_logps=moved[2] if tokens is not None else None,
        )

    def _batch_tokens(self, rows: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """fp32 [M] per-token values of `batch`: example after example, chosen then rejected
        (the batch's target order, since example p owns sequences 2p, 2p + 1)."""
        if not self.per_token:
            raise ReferenceCacheError(
                f"reference cache {self.path} holds no per-token log-probs: rebuild it with "
                "per_token=True (`fastdpo precompute-ref --per-token`)"
            )
        rows_np = rows.numpy()
        counts = self._lengths[:, rows].sum(0).numpy().astype(np.int64)  # tokens per example
        # Output position j belongs to example e(j) and reads its token j - out_start[e(j)].
        out_start = np.zeros(len(rows_np), dtype=np.int64)
        np.cumsum(counts[:-1], out=out_start[1:])
        example_of = np.repeat(np.arange(len(rows_np)), counts)
        source = self._token_start[rows_np][example_of] + (
            np.arange(int(counts.sum())) - out_start[example_of]
        )
        shard_of = self._shard_of_row[rows_np][example_of]
        values = np.empty(len(source), dtype=np.float32)
        for shard in np.unique(shard_of):  # one gather per shard the batch touches
            where = shard_of == shard
            values[where] = self._token_logps[shard][source[where]]
        flat = torch.from_numpy(values)
        if flat.numel() != batch.target_ids.numel():
            raise ReferenceCacheError(
                f"the batch has {batch.target_ids.numel()} completion targets, the reference "
                f"cache {self.path} has {flat.numel()} for its examples: the data was tokenized "
                f"differently (call check_coverage with the tokenized pairs to find which)"
            )
        return flat

    # -- checks ------------------------------------------------------------------------------

    def check_coverage(self, examples: Iterable[TokenizedPair] | Iterable[str]) -> None:
        """Raise `ReferenceCacheError` unless every example has an entry; run before training.

        With `TokenizedPair`s each example's tokens must also equal the cached example's
        (compared by digest), so a cache for differently tokenized data is caught here too.
        The error counts the missing and differing examples and lists a few ids of each.
        """
        total, missing, differing = 0, [], []
        for item in examples:
            total += 1
            example_id = item if isinstance(item, str) else item.example_id
            row = self._row_of.get(example_id)
            if row is None:
                missing.append(example_id)
            elif not isinstance(item, str) and example_digest(item)[1] != self._digests[row]:
                differing.append(example_id)
        if not missing and not differing:
            return
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} of {total} training examples have no entry "
                f"(e.g. {missing[:_LISTED_IDS]})"
            )
        if differing:
            parts.append(
                f"{len(differing)} of {total} are tokenized differently from the cached ones "
                f"(e.g. {differing[:_LISTED_IDS]})"
            )
        raise ReferenceCacheError(
            f"reference cache {self.path} does not cover the training data: "
            f"{'; '.join(parts)}. Rebuild it for this data with {REBUILD_HINT}"
        )


def _check_fingerprint(
    path: Path, manifest: dict[str, Any], expect: Fingerprint | Mapping[str, Any]
) -> None:
    cached = Fingerprint.from_json(manifest["fingerprint"])
    diffs = cached.differences(expect)
    if not diffs:
        return
    details = describe_differences(diffs)
    built_with = (manifest.get("build") or {}).get("command")
    hint = f" (it was built with: {built_with})" if built_with else ""
    raise FingerprintMismatchError(
        f"reference cache {path} was built for different inputs: {details} (cache vs this "
        f"run). Rebuild it with {REBUILD_HINT}{hint}",
        [name for name, _, _ in diffs],
    )
