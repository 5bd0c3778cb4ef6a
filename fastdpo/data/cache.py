"""A content-addressed on-disk cache of tokenized pairs.

The key hashes everything the token ids depend on: the tokenizer (its full serialized model,
special tokens and chat template), the tokenization options, and every example's id and content.
Same inputs, same file; any change, a new file. A file is one `.npz` (no pickle): the token ids
of all examples concatenated, their lengths, the loss masks, and the ids and report as JSON.
Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fastdpo.data.types import PreferenceExample, TokenizedPair

CACHE_FORMAT = "fastdpo-tokenized-v1"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A sha256 hex digest that changes whenever the tokenizer would encode anything differently.

    Covers the tokenizer class, its serialized model (fast tokenizers) or vocabulary (slow
    ones), special tokens and chat template.
    """
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {
        "special": getattr(tokenizer, "special_tokens_map", {}),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
    }
    h.update(json.dumps(specials, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(tokenizer_digest: str, options: dict, examples: Iterable[PreferenceExample]) -> str:
    h = hashlib.sha256()
    h.update(CACHE_FORMAT.encode())
    h.update(tokenizer_digest.encode())
    h.update(json.dumps(options, sort_keys=True).encode())
    for e in examples:
        content = [e.example_id, e.prompt, e.chosen, e.rejected, e.completion, e.label]
        h.update(json.dumps(content, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def save_tokenized(path: Path, pairs: list[TokenizedPair], report: dict) -> None:
    """Write `pairs` and a JSON-able `report` to `path` atomically."""
    lengths = np.zeros((len(pairs), 3), dtype=np.int64)
    has_mask = np.zeros((len(pairs), 2), dtype=bool)
    labels = np.full(len(pairs), -1, dtype=np.int8)
    tokens: list[int] = []
    masks: list[bool] = []
    for i, p in enumerate(pairs):
        segments = [p.prompt_ids, p.chosen_ids, p.rejected_ids]
        lengths[i] = [-1 if s is None else len(s) for s in segments]
        for s in segments:
            tokens.extend(s or ())
        for k, mask in enumerate((p.chosen_loss_mask, p.rejected_loss_mask)):
            if mask is not None:
                has_mask[i, k] = True
                masks.extend(mask)
        if p.label is not None:
            labels[i] = int(p.label)
    meta = {"format": CACHE_FORMAT, "ids": [p.example_id for p in pairs], "report": report}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                tokens=np.asarray(tokens, dtype=np.int64),
                lengths=lengths,
                has_mask=has_mask,
                masks=np.asarray(masks, dtype=bool),
                labels=labels,
                meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tokenized(path: Path) -> tuple[list[TokenizedPair], dict]:
    """(pairs, report) from a file written by `save_tokenized`."""
    with np.load(path, allow_pickle=False) as f:
        tokens = f["tokens"].tolist()
        lengths, has_mask = f["lengths"], f["has_mask"]
        masks = f["masks"].tolist()
        labels = f["labels"]
        meta = json.loads(f["meta"].tobytes().decode())
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path}: not a {CACHE_FORMAT} cache file")
    pairs = []
    t = m = 0
    for i, example_id in enumerate(meta["ids"]):
        segments = []
        for n in lengths[i].tolist():
            segments.append(None if n < 0 else tokens[t : t + n])
            t += max(n, 0)
        loss_masks = []
        for k, completion in enumerate(segments[1:]):
            if has_mask[i, k]:
                loss_masks.append(masks[m : m + len(completion)])
                m += len(completion)
            else:
                loss_masks.append(None)
        label = None if labels[i] < 0 else bool(labels[i])
        pairs.append(
            TokenizedPair(
                example_id=example_id,
                prompt_ids=segments[0],
                chosen_ids=segments[1],
                rejected_ids=segments[2],
                label=label,
                chosen_loss_mask=loss_masks[0],
                rejected_loss_mask=loss_masks[1],
            )
        )
    return pairs, meta["report"]
