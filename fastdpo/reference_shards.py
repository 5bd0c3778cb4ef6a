"""The files of a reference cache: shards, their records, the build plan and the manifest.

Layout of a cache folder:

    manifest.json               written last, by rank 0: fingerprint, plan, one record per shard
    shards/shard-00003-of-00010.safetensors   the values of one contiguous range of examples
    shards/shard-00003-of-00010.json          (during a build) the shard's record
    build-plan.json             (during a build) the fingerprint and plan of the build under way

Every file is written to a temporary name in the same folder and renamed, so a reader (or a
resumed build) sees a whole file or none. A shard's record, written after the shard, holds its
size, sha256, planned examples and the build it belongs to; a shard without a record, or whose
bytes do not match it, is never read as data.

Through a build: `prepare_folder` (rank 0) writes the plan, or finds the cache complete, or
turns a damaged finished cache back into an unfinished build; `shard_is_done` tells a resumed
build which shards it keeps (their record names this build, their bytes match the record and
hold the planned examples); `finalize_manifest` writes the manifest and removes the plan and
the records.

Tensors of one shard of N examples (K stored per-token log-probs):

    example_digests   int64 [N]   `reference_fingerprint.example_digest` of each example
    paired            bool  [N]   False for unpaired (KTO) examples
    chosen_logps      fp32  [N]   summed log-prob of the chosen (or unpaired) completion
    rejected_logps    fp32  [N]   summed log-prob of the rejected completion; NaN if unpaired
    chosen_lengths    int32 [N]   completion tokens counted (loss-mask aware)
    rejected_lengths  int32 [N]   0 if unpaired
    token_offsets     int64 [N+1] (per-token caches) example i owns token_logps[off[i]:off[i+1]],
    token_logps       fp32  [K]   its chosen tokens first, then its rejected tokens

The example ids (strings) are in the safetensors metadata: key "fastdpo", a JSON object with
"format" and "example_ids" (in row order).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from fastdpo.reference_fingerprint import Fingerprint, describe_differences

logger = logging.getLogger("fastdpo.reference")

MANIFEST_NAME = "manifest.json"
PLAN_NAME = "build-plan.json"
SHARD_DIR = "shards"
FORMAT_NAME = "fastdpo-reference-cache"
FORMAT_VERSION = 1
METADATA_KEY = "fastdpo"

SUMMARY_COLUMNS = (
    "example_digests",
    "paired",
    "chosen_logps",
    "rejected_logps",
    "chosen_lengths",
    "rejected_lengths",
)
TOKEN_COLUMNS = ("token_offsets", "token_logps")


class ReferenceCacheError(RuntimeError):
    """A reference cache is missing, incomplete, corrupted, or was built for other inputs."""


@dataclass(frozen=True, kw_only=True)
class ShardRecord:
    """What the manifest knows about one shard file."""

    index: int
    file: str
    """Path relative to the cache folder."""
    num_examples: int
    num_token_logps: int
    """Per-token log-probs stored (0 without per-token values)."""
    bytes: int
    sha256: str
    content: str
    """`shard_content_digest` of the examples the shard was planned to hold."""
    build: str = ""
    """`build_digest` of the build that wrote it ("" in records written before it existed)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardRecord:
        return cls(**data)


def shard_name(index: int, num_shards: int) -> str:
    return f"{SHARD_DIR}/shard-{index:05d}-of-{num_shards:05d}.safetensors"


def record_path(out_dir: Path, index: int, num_shards: int) -> Path:
    return out_dir / shard_name(index, num_shards).replace(".safetensors", ".json")


def shard_content_digest(example_digests: list[tuple[str, int]]) -> str:
    """sha256 (hex) of a shard's (example id, example digest) list, in row order."""
    return hashlib.sha256(json.dumps(example_digests).encode()).hexdigest()


def build_digest(fingerprint: Fingerprint, plan: dict[str, Any]) -> str:
    """sha256 (hex) of a build's format version, fingerprint and plan: a shard record carries it,
    so a resumed build keeps only shards written for the same inputs and the same plan, even when
    the build-plan.json that guards the folder is gone (deleted, or an overwrite killed half-way
    left another build's shards behind)."""
    payload = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint.to_json(), "plan": plan}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)  # the rename itself survives a power cut
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _fsync_folder(folder: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows: folders cannot be opened for fsync
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReferenceCacheError(f"{path} is not valid JSON ({e}): delete it and rebuild") from e


def write_shard(
    out_dir: Path,
    *,
    index: int,
    num_shards: int,
    example_ids: list[str],
    columns: Mapping[str, torch.Tensor],
    content: str,
    build: str,
) -> ShardRecord:
    """Write one shard and then its record (each atomically); return the record."""
    expected = set(SUMMARY_COLUMNS) | ({*TOKEN_COLUMNS} if "token_logps" in columns else set())
    if set(columns) != expected:
        raise ValueError(f"shard columns {sorted(columns)} differ from {sorted(expected)}")
    tensors = {name: t.detach().cpu().contiguous() for name, t in columns.items()}
    # One metadata key: safetensors writes several in a per-process random order, and equal
    # shards must be equal bytes (their checksums are compared across builds).
    header = {"format": FORMAT_NAME, "example_ids": example_ids}
    data = safetensors_bytes(tensors, metadata={METADATA_KEY: json.dumps(header)})
    name = shard_name(index, num_shards)
    write_atomic(out_dir / name, data)
    record = ShardRecord(
        index=index,
        file=name,
        num_examples=len(example_ids),
        num_token_logps=int(tensors["token_logps"].numel()) if "token_logps" in tensors else 0,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        content=content,
        build=build,
    )
    write_json_atomic(record_path(out_dir, index, num_shards), record.to_json())
    return record


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def shard_problem(out_dir: Path, record: ShardRecord, *, checksum: bool = True) -> str | None:
    """Why the shard file does not match its record (missing, truncated, corrupted), or None.

    `checksum=False` checks only the size (no read of the data).
    """
    path = out_dir / record.file
    if not path.is_file():
        return f"{record.file} is missing"
    size = path.stat().st_size
    if size != record.bytes:
        return f"{record.file} has {size} bytes, its record says {record.bytes} (truncated?)"
    if checksum and file_sha256(path) != record.sha256:
        return f"{record.file} does not match its sha256 checksum (corrupted)"
    return None


def read_shard(path: Path, *, with_tokens: bool) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The example ids and the summary columns of a shard (and its token offsets if asked).

    The per-token log-probs themselves are not loaded: see `memmap_column`.
    """
    names = list(SUMMARY_COLUMNS) + (["token_offsets"] if with_tokens else [])
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if METADATA_KEY not in metadata:
            raise ReferenceCacheError(f"{path} is not a fastdpo reference-cache shard")
        example_ids = json.loads(metadata[METADATA_KEY])["example_ids"]
        columns = {name: f.get_tensor(name) for name in names}
    return example_ids, columns


_NUMPY_DTYPES = {"F32": np.float32, "I64": np.int64, "I32": np.int32, "BOOL": np.bool_}


def memmap_column(path: Path, name: str) -> np.ndarray:
    """A read-only memory map of one 1-D tensor of a safetensors file (no copy, no full read).

    Reads the safetensors header (8-byte little-endian length, then JSON with each tensor's
    dtype, shape and byte range after the header) to find where the tensor lies.
    """
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    info = header[name]
    begin, end = info["data_offsets"]
    dtype = np.dtype(_NUMPY_DTYPES[info["dtype"]])
    count = (end - begin) // dtype.itemsize
    if count == 0:  # numpy cannot map zero bytes
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=8 + header_len + begin, shape=(count,))


# ---------------------------------------------------------------------------------------------
# the folder through a build: prepare (or resume, or repair), keep finished shards, finalize


def prepare_folder(
    out_dir: Path, fingerprint: Fingerprint, plan: dict[str, Any], overwrite: bool
) -> str:
    """Make `out_dir` ready for a build (rank 0 only). Returns "complete" or "build".

    A finished cache with this fingerprint and plan is "complete" if every shard checks out;
    otherwise its good shards are kept and the bad ones recomputed. A cache or an interrupted
    build for other inputs raises `ReferenceCacheError`, or is deleted with `overwrite`.
    """
    manifest_path, plan_path = out_dir / MANIFEST_NAME, out_dir / PLAN_NAME
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    wanted = {**header, "fingerprint": fingerprint.to_json(), "plan": plan}
    for path in (manifest_path, plan_path):
        if not path.exists():
            continue
        existing = read_json(path)
        same = {k: existing.get(k) for k in wanted} == wanted
        if same:
            continue
        if not overwrite:
            raise ReferenceCacheError(_mismatch_message(out_dir, path, existing, fingerprint, plan))
        logger.warning("deleting %s: it was built from other inputs (overwrite=True)", out_dir)
        for name in (MANIFEST_NAME, PLAN_NAME):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / SHARD_DIR, ignore_errors=True)
        break

    if manifest_path.exists():
        manifest = read_json(manifest_path)
        records = [ShardRecord.from_json(r) for r in manifest["shards"]]
        problems = [p for r in records if (p := shard_problem(out_dir, r)) is not None]
        if not problems:
            _remove_build_files(out_dir, len(records))  # left if a build died while finalizing
            return "complete"
        logger.warning("recomputing damaged shards of %s: %s", out_dir, "; ".join(problems))
        # Back to an unfinished build: the plan and one record per shard (a damaged shard's
        # record will not match its bytes, so it gets recomputed), then no manifest.
        write_json_atomic(plan_path, wanted)
        for r in records:
            write_json_atomic(record_path(out_dir, r.index, len(records)), r.to_json())
        manifest_path.unlink()
    else:
        write_json_atomic(plan_path, wanted)
    (out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    for folder in (out_dir, out_dir / SHARD_DIR):  # temporary files left by a killed build
        for tmp in folder.glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)
    return "build"


def _mismatch_message(
    out_dir: Path, path: Path, existing: dict, fingerprint: Fingerprint, plan: dict
) -> str:
    what = "a reference cache" if path.name == MANIFEST_NAME else "an unfinished build"
    reasons = []
    if existing.get("format_version") != FORMAT_VERSION:
        reasons.append(f"format_version ({existing.get('format_version')} vs {FORMAT_VERSION})")
    try:
        theirs = Fingerprint.from_json(existing["fingerprint"])
        reasons.append(describe_differences(theirs.differences(fingerprint)))
    except (KeyError, TypeError, ValueError):
        reasons.append("fingerprint (unreadable)")
    old_plan = existing.get("plan", {})
    plan_diffs = [
        (k, old_plan.get(k), plan[k])
        for k in ("examples_per_shard", "per_token")
        if old_plan.get(k) != plan[k]
    ]
    reasons.append(describe_differences(plan_diffs))
    reasons = [r for r in reasons if r]
    return (
        f"{out_dir} holds {what} for other inputs: {', '.join(reasons) or 'shard plan'} "
        "(there vs here). Pass overwrite=True (`--overwrite`) to replace it, or choose another "
        "output folder."
    )


def shard_is_done(
    out_dir: Path, index: int, num_shards: int, plan: dict[str, Any], build: str
) -> bool:
    """Whether shard `index` of a resumed build (`build`: its `build_digest`) can be kept.

    Nothing in the folder is taken on trust: the record must name this build and this shard's
    file and planned examples, the bytes must match the record (full checksum), and the
    examples stored in the shard must be the planned ones. Logs why a shard is recomputed.
    """
    path = record_path(out_dir, index, num_shards)
    if not path.exists():
        return False
    try:
        record = ShardRecord.from_json(read_json(path))
    except (ReferenceCacheError, TypeError) as e:
        logger.warning("recomputing shard %d: unreadable record %s (%s)", index, path, e)
        return False
    planned = plan["shard_contents"][index]
    if record.build != build:
        problem = "its record is from another build (other inputs or shard plan)"
    elif record.file != shard_name(index, num_shards) or record.content != planned:
        problem = "its record is for other examples"
    else:
        problem = shard_problem(out_dir, record) or _stored_examples_problem(
            out_dir, record, planned
        )
    if problem is not None:
        logger.warning("recomputing shard %d: %s", index, problem)
        return False
    return True


def _stored_examples_problem(out_dir: Path, record: ShardRecord, planned: str) -> str | None:
    """Why the examples stored in a shard are not the `planned` ones (ids and digests), or None."""
    try:
        example_ids, columns = read_shard(out_dir / record.file, with_tokens=False)
    except Exception as e:  # any unreadable shard is recomputed, whatever the library raises
        return f"{record.file} is unreadable ({type(e).__name__}: {e})"
    digests = columns["example_digests"].tolist()
    if len(digests) != len(example_ids):
        return f"{record.file} holds {len(example_ids)} ids for {len(digests)} rows"
    if shard_content_digest(list(zip(example_ids, digests, strict=True))) != planned:
        return f"{record.file} holds other examples than planned"
    return None


def finalize_manifest(
    out_dir: Path,
    fingerprint: Fingerprint,
    plan: dict[str, Any],
    num_shards: int,
    build_info: dict[str, Any],
) -> None:
    """Rank 0, after every rank finished: check every record and write the manifest."""
    build = build_digest(fingerprint, plan)
    records = []
    for i in range(num_shards):
        path = record_path(out_dir, i, num_shards)
        if not path.exists():
            raise ReferenceCacheError(
                f"shard {i} of {num_shards} has no record {path}: under torch.distributed the "
                "output folder must be one folder shared by every rank (same filesystem)"
            )
        record = ShardRecord.from_json(read_json(path))
        # The writer hashed the bytes it wrote; here only the size is re-checked (cheap).
        problem = shard_problem(out_dir, record, checksum=False)
        if problem is None and record.build != build:
            problem = "record is from another build (other inputs or shard plan)"
        if problem is None and record.content != plan["shard_contents"][i]:
            problem = "record is for other examples"
        if problem is not None:
            raise ReferenceCacheError(f"shard {i}: {problem}")
        records.append(record)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint.to_json(),
        "plan": plan,
        "shards": [r.to_json() for r in records],
        "build": build_info,
    }
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    _remove_build_files(out_dir, num_shards)


def _remove_build_files(out_dir: Path, num_shards: int) -> None:
    """The plan and the shard records: once the manifest is written, it holds what they held."""
    for i in range(num_shards):
        record_path(out_dir, i, num_shards).unlink(missing_ok=True)
    (out_dir / PLAN_NAME).unlink(missing_ok=True)
