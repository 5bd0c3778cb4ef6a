"""Training: `TrainConfig` (every setting), `Trainer` (the loop), checkpoints and logs.

    from fastdpo import TrainConfig, Trainer
    Trainer(TrainConfig.from_yaml("dpo.yaml")).train()

Files: config.py (the settings), data.py (rows -> pairs -> the step plan), reference_cache.py
(the reference log-probs of the run), model_setup.py (policy loading, precision, LoRA),
optim.py (AdamW, schedule), step.py (one step's micro-batches, evaluation), trainer.py (the
loop), checkpoint.py, metrics_log.py, command.py (`fastdpo train`). Names resolve lazily, so
the command-line parser does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "fastdpo.train.config",
    "TrainConfig": "fastdpo.train.config",
    "Trainer": "fastdpo.train.trainer",
    "TrainResult": "fastdpo.train.trainer",
    "NonFiniteLossError": "fastdpo.train.trainer",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastdpo.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
