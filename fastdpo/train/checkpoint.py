"""Checkpoints: `output_dir/checkpoint-STEP/`, written to a temporary folder and renamed.

A checkpoint holds the model in Hugging Face format (safetensors; with LoRA the adapter), the
optimizer and scheduler state, RNG states, the data position and the resolved config. A crash
mid-write leaves only a `.tmp-checkpoint-STEP` folder behind, never a partial checkpoint, so
the previous one stays usable. Loading uses `torch.load(weights_only=True)`: nothing but
tensors and plain containers is unpickled.
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

from fastdpo.train.config import TOKENIZATION_FIELDS

logger = logging.getLogger("fastdpo.train")

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


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
    config_yaml: str,
    save_total_limit: int | None = None,
) -> Path:
    """Write `checkpoint-<global_step>` atomically; prune old ones beyond `save_total_limit`."""
    root = Path(output_dir)
    final = root / f"checkpoint-{state.global_step}"
    tmp = root / f".tmp-checkpoint-{state.global_step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng_state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
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
    return final


def load_training_state(
    path: Path, *, optimizer: torch.optim.Optimizer, scheduler: Any
) -> TrainerState:
    """Restore optimizer, scheduler and RNG states from a checkpoint; return its state."""

    # map_location: a checkpoint written on a GPU resumes on the CPU too (the optimizer moves
    # its state to the parameters' device when loading it).
    def load(name: str):
        return torch.load(path / name, weights_only=True, map_location="cpu")

    optimizer.load_state_dict(load("optimizer.pt"))
    scheduler.load_state_dict(load("scheduler.pt"))
    _set_rng_state(load("rng_state.pt"))
    return TrainerState(**json.loads((path / STATE_FILE).read_text()))


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
