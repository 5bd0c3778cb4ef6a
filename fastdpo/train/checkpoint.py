"""Checkpoints: `output_dir/checkpoint-STEP/`, written to a temporary folder and renamed.

A checkpoint holds the trainable weights and the AdamW state as a `torch.distributed.checkpoint`
(DCP) folder, `distcp/`: every process writes its own shards (under FSDP2 its slice of every
tensor; under DDP the replicated tensors once), and loading reshards to whatever the resuming
run has, so a run saved with 2 processes resumes with 1, or with 8, or the other way round.
With LoRA only the adapters are saved (frozen weights come from `model` again). Beside it:
scheduler and RNG states (rank 0's), the data position, the tokenizer, the model's config and
the resolved run config. All processes write into the same folder, so with several machines
`output_dir` must be on a shared filesystem.

A crash mid-write leaves only a `.tmp-checkpoint-STEP` folder behind, never a partial
checkpoint, so the previous one stays usable: rank 0 renames the folder once every rank's
shards and DCP's metadata are on disk. Loading uses `torch.load(weights_only=True)`: nothing
but tensors and plain containers is unpickled.

The final model is different: `save_final_model` gathers the full weights to rank 0, which
writes one Hugging Face folder (safetensors) that `from_pretrained` loads.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from fastdpo.train.config import TOKENIZATION_FIELDS

logger = logging.getLogger("fastdpo.train")

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
DCP_DIR = "distcp"
"""The sharded weights + optimizer state inside a checkpoint."""

# Frozen weights (LoRA's base model) are not training state: they are loaded from `model`.
_TRAINING_STATE = StateDictOptions(ignore_frozen_params=True)


@dataclass(kw_only=True)
class TrainerState:
    """Where a run is: enough to continue it exactly."""

    global_step: int = 0
    """Optimizer steps finished."""
    epoch: float = 0.0
    """Epochs done, fractional (global_step / steps per epoch)."""
    total_steps: int = 0
    best_metric: float | None = None
    bco_mean: float | None = None
    """BCO's running reward mean (float64 as a Python float) and its count."""
    bco_count: float | None = None
    window: dict[str, Any] | None = None
    """The logging window in progress (`LogWindow.to_state()`), None at a logged step."""
    reference_caches: dict[str, str] | None = None
    """The reference cache folder each split read (it may be another run's, by fingerprint)."""


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints of a run, oldest (lowest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).exists()]


def resolve_checkpoint(spec: str, output_dir: str | Path) -> Path:
    """`resume_from_checkpoint` -> a checkpoint folder ("latest": the newest in output_dir)."""
    from fastdpo.train.config import ConfigError

    if spec == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise ConfigError(
                f"resume_from_checkpoint: 'latest' but {output_dir} holds no checkpoint"
            )
        return found[-1]
    path = Path(spec)
    if not (path / STATE_FILE).exists():
        raise ConfigError(
            f"resume_from_checkpoint: {path} is not a finished checkpoint (no {STATE_FILE})"
        )
    return path


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _to_plain(random.getstate()),
        "numpy": _to_plain(np.random.get_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_plain(value: Any) -> Any:
    """Tuples/arrays as lists of Python scalars (loadable with weights_only=True)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_to_plain(v) for v in value]
    return value


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainerState,
    config_yaml: str | None,
    save_total_limit: int | None = None,
    parallel: Any = None,
) -> Path:
    """Write `checkpoint-<global_step>` atomically; prune old ones beyond `save_total_limit`.

    Every process calls this (`parallel`: the run's `Parallel`; None: one process). `model`
    is the bare model (under FSDP2 its parameters are the sharded DTensors); `config_yaml`
    is needed on rank 0 only. Returns the checkpoint folder on every rank."""
    is_main = parallel is None or parallel.is_main
    root = Path(output_dir)
    final = root / f"checkpoint-{state.global_step}"
    tmp = root / f".tmp-checkpoint-{state.global_step}"
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier(parallel)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_TRAINING_STATE)
    dcp.save(
        {"model": model_state, "optimizer": optimizer_state},
        checkpoint_id=tmp / DCP_DIR,
        no_dist=not _process_group(),
    )
    if is_main:
        _model_config(model).save_pretrained(tmp)  # which architecture the weights are for
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng_state.pt")
        (tmp / "config.yaml").write_text(config_yaml or "")
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        _fsync_tree(tmp)
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(root)
        logger.info("saved %s", final)
        if save_total_limit is not None:
            for old in checkpoint_dirs(root)[:-save_total_limit]:
                shutil.rmtree(old)
    _barrier(parallel)  # nobody reads or prunes a checkpoint rank 0 has not finished
    return final


def load_training_state(
    path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> TrainerState:
    """Restore the weights, optimizer, scheduler and RNG states from a checkpoint (every process
    calls it; the DCP shards are resharded onto this run's layout); return its state."""
    if not (path / DCP_DIR / ".metadata").exists():
        from fastdpo.train.config import ConfigError

        raise ConfigError(
            f"resume_from_checkpoint: {path} has no {DCP_DIR}/ (written by an older fastdpo, "
            "or not a checkpoint); start from its weights with model: <that folder> instead"
        )
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_TRAINING_STATE)
    loaded = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(loaded, checkpoint_id=path / DCP_DIR, no_dist=not _process_group())
    set_state_dict(
        model,
        optimizer,
        model_state_dict=loaded["model"],
        optim_state_dict=loaded["optimizer"],
        # strict=False: the frozen weights are absent by design; every trainable one was
        # in `loaded`, and dcp.load above raises for any the checkpoint lacks.
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )

    # map_location: a checkpoint written on a GPU resumes on the CPU too.
    def load(name: str):
        return torch.load(path / name, weights_only=True, map_location="cpu")

    scheduler.load_state_dict(load("scheduler.pt"))
    _set_rng_state(load("rng_state.pt"))
    return TrainerState(**json.loads((path / STATE_FILE).read_text()))


def save_final_model(
    folder: Path, *, model: torch.nn.Module, tokenizer: Any, save_merged: bool, parallel: Any
) -> Path | None:
    """One Hugging Face folder (safetensors) at `folder`, written by rank 0 through a
    temporary folder. Under FSDP2 every rank takes part in gathering the full weights (to
    rank 0's CPU memory). LoRA: the adapter, and with `save_merged` the merged model in
    `folder/merged`. Returns the folder on rank 0, None elsewhere."""
    is_main = parallel is None or parallel.is_main
    full_state = None
    if parallel is not None and parallel.strategy == "fsdp2":
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full_state = get_model_state_dict(model, options=options)  # a collective
    if not is_main:
        _barrier(parallel)
        return None
    tmp = folder.with_name(".tmp-" + folder.name)
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=full_state)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if save_merged:
        merged = model.merge_and_unload()
        merged.save_pretrained(tmp / "merged", safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "merged")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    logger.info("final model written to %s", folder)
    _barrier(parallel)
    return folder


def _model_config(model: torch.nn.Module):
    get_base_model = getattr(model, "get_base_model", None)
    base = get_base_model() if callable(get_base_model) else model
    return base.config


def _process_group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier(parallel: Any) -> None:
    if parallel is not None:
        parallel.barrier()


RUN_FILES = ("metrics.jsonl", "curves.png", "config.yaml", "final", "tensorboard")
"""What a run writes in output_dir besides checkpoints (the reference cache is kept)."""

RESUME_KEYS = (
    "data",
    "data_split",
    "eval_data",
    "eval_fraction",
    "seed",
    "pairs_per_step",
    "loss",
    "beta",
    "loss_params",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    *TOKENIZATION_FIELDS,
)
"""Keys that decide which pairs a step trains on and what it optimizes: fixed across a resume."""


def prepare_output_dir(output_dir: Path, *, overwrite: bool) -> None:
    """Refuse to start a fresh run over another run's outputs unless `overwrite` (then they are
    deleted, and the reference cache is kept for reuse by fingerprint)."""
    from fastdpo.train.config import ConfigError

    found = checkpoint_dirs(output_dir) + [
        output_dir / name for name in RUN_FILES[:2] + RUN_FILES[3:4] if (output_dir / name).exists()
    ]
    if not found:
        return
    if not overwrite:
        raise ConfigError(
            f"output_dir: {output_dir} holds another run ({', '.join(p.name for p in found[:3])}"
            "); continue it with resume_from_checkpoint: latest, choose another output_dir, or "
            "set overwrite_output_dir: true to start afresh there"
        )
    for path in checkpoint_dirs(output_dir) + [output_dir / name for name in RUN_FILES]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    logger.warning("overwrite_output_dir: removed the previous run's outputs in %s", output_dir)


def check_resumable(config: Any, checkpoint: Path) -> None:
    """ConfigError naming each key that differs from the checkpoint's config (the data order or
    the objective would change silently)."""
    import yaml

    from fastdpo.train.config import ConfigError

    saved = yaml.safe_load((checkpoint / "config.yaml").read_text()) or {}
    now = config.resolved().saved_dict()
    changed = [k for k in RESUME_KEYS if k in saved and saved[k] != now.get(k)]
    if changed:
        listed = ", ".join(f"{k} ({saved[k]!r} -> {now.get(k)!r})" for k in changed)
        raise ConfigError(
            f"resume_from_checkpoint: {checkpoint} was trained with other settings: {listed}; "
            "resume with the checkpoint's config.yaml, or start a new run"
        )


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
