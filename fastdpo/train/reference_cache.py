"""The run's reference log-probs: a cache opened, reused by fingerprint, or built before step 1.

`reference: auto` looks for a finished cache whose fingerprint matches this run (same reference
weights and config, tokenizer, tokenization settings and examples) in the run directory and
in sibling run directories (a sweep over beta or loss next to each other reuses one pass); if
none matches it loads the reference model, builds the cache into `output_dir/reference/`, and
frees the model before training starts. `reference: <folder>` opens that cache and checks it
against the tokenizer, settings and data. `reference: none` (reference-free losses) skips it.
Train and eval pairs get one cache each (`train/`, `eval/`), so their example ids never mix.

`ld_alpha` (LD-DPO) reweights the reference's tokens past each pair's shared length, so it needs
the reference's per-token log-probs: with it the cache is built with them, a cache found
without them is not reused, and a given one without them is refused (naming the command that
rebuilds it).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastdpo.data.types import TokenizedPair
from fastdpo.reference import ReferenceCache
from fastdpo.reference_fingerprint import expected_fields, model_dtype, tokenization_settings
from fastdpo.reference_shards import ReferenceCacheError
from fastdpo.train.config import ConfigError, TrainConfig

logger = logging.getLogger("fastdpo.train")

SPLITS = ("train", "eval")


@dataclass(kw_only=True)
class RunReference:
    """Opened caches per split (None where the run has no such data or needs no reference)."""

    train: ReferenceCache | None = None
    eval: ReferenceCache | None = None
    built: bool = False
    """True if this run computed the caches (False: reused or given)."""

    def paths(self) -> dict[str, str]:
        """Split -> cache folder, for the run's records."""
        return {
            name: str(cache.path)
            for name, cache in (("train", self.train), ("eval", self.eval))
            if cache is not None
        }


def prepare_reference(
    config: TrainConfig,
    tokenizer: Any,
    splits: dict[str, list[TokenizedPair]],
    *,
    device: torch.device,
    load_model,
    autocast=contextlib.nullcontext,
    share_prompt: bool = False,
) -> RunReference:
    """The caches the run reads; `load_model(path)` loads the reference model when needed and
    the pass runs under `autocast()` (the policy's precision), packed in the run's form
    (`share_prompt`, resolved over the training pairs: every pair then fits the pass's budget
    as it fits training's). A cache found or given is used whichever form built it."""
    if not config.needs_reference:
        return RunReference()
    if config.reference == "none":  # validated: only for reference-free losses
        return RunReference()
    settings = tokenization_settings(**config.tokenization_kwargs())
    wanted = {name: pairs for name, pairs in splits.items() if pairs}
    if config.reference != "auto":
        return RunReference(
            **_open_given(Path(config.reference), tokenizer, settings, wanted, config)
        )

    per_token = needs_per_token(config)
    candidates = _candidate_roots(Path(config.output_dir))
    model = load_model(config.ref_model_path)
    try:
        caches: dict[str, ReferenceCache] = {}
        for name, pairs in wanted.items():
            expect = expected_fields(
                model=model, tokenizer=tokenizer, tokenization=settings, examples=pairs
            )
            expect["dtype"] = model_dtype(model)  # a bf16 pass is not an fp32 one
            found = _find_matching(candidates, name, expect, per_token=per_token)
            if found is not None:
                logger.info("reusing the %s reference cache %s (fingerprint matches)", name, found)
                caches[name] = found
        built = False
        for name, pairs in wanted.items():
            if name in caches:
                continue
            out = Path(config.output_dir) / "reference" / name
            logger.info(
                "computing reference log-probs of %d %s pairs into %s", len(pairs), name, out
            )
            with autocast():
                caches[name] = _build(
                    model,
                    pairs,
                    out,
                    tokenizer,
                    settings,
                    config,
                    device,
                    per_token=per_token,
                    share_prompt=share_prompt,
                )
            built = True
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for name, pairs in wanted.items():
        caches[name].check_coverage(pairs)
    return RunReference(**caches, built=built)


def needs_per_token(config: TrainConfig) -> bool:
    """True if the run's loss reads the reference's per-token log-probs (ld_alpha is set)."""
    return config.loss_params.get("ld_alpha") is not None


def _build(
    model,
    pairs,
    out,
    tokenizer,
    settings,
    config,
    device,
    *,
    per_token: bool = False,
    share_prompt: bool = False,
) -> ReferenceCache:
    budget = config.reference_max_tokens_per_batch or 4 * config.max_tokens_per_batch
    return ReferenceCache.build(
        model.to(device),
        pairs,
        out,
        tokenizer=tokenizer,
        tokenization=settings,
        max_tokens_per_batch=max(budget, config.max_tokens_per_batch),
        per_token=per_token,
        overwrite=True,
        progress=config.progress,
        share_prompt=share_prompt,
    )


def _candidate_roots(output_dir: Path) -> list[Path]:
    """Folders that may hold `<split>/` caches: this run's, then its siblings' (sorted)."""
    roots = [output_dir / "reference"]
    parent = output_dir.parent
    if parent.is_dir():
        for sibling in sorted(parent.iterdir()):
            if sibling.resolve() != output_dir.resolve() and (sibling / "reference").is_dir():
                roots.append(sibling / "reference")
    return roots


def _find_matching(
    roots: list[Path], split: str, expect: dict, *, per_token: bool = False
) -> ReferenceCache | None:
    for root in roots:
        path = root / split
        if not (path / "manifest.json").exists():
            continue
        try:
            cache = ReferenceCache.open(path, expect=expect)
        except ReferenceCacheError as error:  # another run's inputs, or damaged: not ours
            logger.info("not reusing %s: %s", path, error)
            continue
        if per_token and not cache.per_token:
            logger.info("not reusing %s: no per-token log-probs (ld_alpha needs them)", path)
            continue
        return cache
    return None


def _open_given(
    path: Path,
    tokenizer: Any,
    settings: dict,
    wanted: dict[str, list[TokenizedPair]],
    config: TrainConfig,
) -> dict[str, ReferenceCache]:
    """`reference: <folder>`: a cache for the training pairs (the folder itself, or its
    `train/`), and `eval/` beside it for held-out pairs."""
    if not path.is_dir():
        raise ConfigError(
            f"reference: {path} does not exist; build it with `fastdpo precompute-ref` or use "
            "reference: auto"
        )
    caches = {}
    per_token = needs_per_token(config)
    for name, pairs in wanted.items():
        folder = path / name if (path / name / "manifest.json").exists() else path
        expect = expected_fields(tokenizer=tokenizer, tokenization=settings)
        try:
            cache = ReferenceCache.open(folder, expect=expect)
            cache.check_coverage(pairs)
        except ReferenceCacheError as error:
            raise ConfigError(f"reference: {error}") from None
        if per_token and not cache.per_token:
            raise ConfigError(
                f"reference: {folder} holds no per-token log-probs, which ld_alpha (LD-DPO) "
                "needs: rebuild it with `fastdpo precompute-ref --per-token` (same model, data "
                "and tokenization options), or use reference: auto"
            )
        caches[name] = cache
    return caches
