"""fastdpo: Direct Preference Optimization that never materializes [tokens, vocab] logits.

The public names resolve lazily, so `import fastdpo` stays cheap (no transformers import) and
each piece loads only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "linear_logprobs": "fastdpo.ops.linear_logprobs",
    "check_targets": "fastdpo.ops.linear_logprobs",
    "packed_preference_loss": "fastdpo.ops.preference_loss",
    "preference_loss": "fastdpo.losses",
    "register_loss": "fastdpo.losses",
    "LOSSES": "fastdpo.losses",
    "LossInputs": "fastdpo.losses",
    "RunningMean": "fastdpo.losses",
    "fused_linear_preference_loss": "fastdpo.ops.fused_linear_preference_loss",
    "load_preference_data": "fastdpo.data.sources",
    "tokenize_pairs": "fastdpo.data.tokenize",
    "pack_pairs": "fastdpo.data.packing",
    "collate_pairs": "fastdpo.data.packing",
    "PreferenceExample": "fastdpo.data.types",
    "TokenizedPair": "fastdpo.data.types",
    "PackedBatch": "fastdpo.data.types",
    "sequence_logps": "fastdpo.model",
    "SequenceLogps": "fastdpo.model",
    "ReferenceCache": "fastdpo.reference",
    "TrainConfig": "fastdpo.train",
    "Trainer": "fastdpo.train",
    "TrainResult": "fastdpo.train",
    "evaluate": "fastdpo.evaluation.ranking",
    "implicit_reward": "fastdpo.evaluation.implicit_reward",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastdpo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
