"""What a reference cache was computed from: model, tokenizer, data, settings (its fingerprint).

A cache is only valid for the run whose inputs match the ones it was built from. The fingerprint
records each input as one comparable field, so a mismatch can be reported by name
("tokenization.max_length: 512 vs 1024") instead of as one opaque hash.

Fields (flat names, as they appear in `manifest.json` and in error messages):

- `tokenization.<key>`: each tokenization setting passed explicitly to the build (max_length,
  truncation side, template, ...), compared value by value.
- `tokenizer.vocab_size`, `tokenizer.digest`: `len(tokenizer)` and a hash of the serialized
  tokenizer, special tokens and chat template.
- `model.config`: a hash of the model config (minus keys that do not change the function
  computed, like `_name_or_path` or `transformers_version`).
- `model.weights`: `weights_digest`, a checksum of every weight (see there for its cost).
- `dtype`: the dtype the reference model ran in.
- `dataset`: a hash of every tokenized example (ids and token ids), independent of row order.
- `fastdpo_version`: the version that computed the values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fastdpo.data.cache import tokenizer_fingerprint
from fastdpo.data.types import TokenizedPair

# Config keys that name or describe a checkpoint without changing what it computes; they differ
# between the same weights loaded from a hub id, a local folder, or another library version.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "architectures",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_attn_implementation_internal",
        "attn_implementation",
        "_commit_hash",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)

# Order in which differing fields are reported: the most telling first.
_FIELD_ORDER = (
    "tokenization",
    "tokenizer.vocab_size",
    "tokenizer.digest",
    "model.config",
    "model.weights",
    "dtype",
    "dataset",
    "fastdpo_version",
)

# `weights_digest` reads each tensor in chunks of _DIGEST_ROWS x _POSITION_PERIOD elements:
# temporaries stay small (16 MiB of fp32 per chunk) and every integer sum stays exact (see there).
_POSITION_PERIOD = 256
_DIGEST_ROWS = 1 << 14
# A Mersenne prime: per-chunk sums are reduced modulo it so the running totals never overflow.
_DIGEST_MODULUS = (1 << 61) - 1


@dataclass(frozen=True, kw_only=True)
class Fingerprint:
    """The inputs a reference cache was computed from, one comparable field each."""

    model_config: str
    """sha256 of the model config (volatile keys removed), hex."""
    model_weights: str
    """`weights_digest` of the model's state dict, hex."""
    tokenizer_vocab_size: int | None
    """`len(tokenizer)`, or None when no tokenizer was recorded."""
    tokenizer_digest: str | None
    """`tokenizer_digest`, or None when no tokenizer was recorded."""
    tokenization: dict[str, Any] = field(default_factory=dict)
    """Tokenization settings (JSON values), e.g. {"max_length": 1024, "loss_on": "final_turn"}."""
    dtype: str
    """Dtype the reference model ran in, e.g. "bfloat16"."""
    dataset: str
    """`dataset_digest` of the tokenized examples, hex."""
    fastdpo_version: str

    def to_flat(self) -> dict[str, Any]:
        """Field name -> value, with one `tokenization.<key>` entry per setting."""
        settings = sorted(self.tokenization.items())
        flat: dict[str, Any] = {f"tokenization.{k}": v for k, v in settings}
        flat.update(
            {
                "tokenizer.vocab_size": self.tokenizer_vocab_size,
                "tokenizer.digest": self.tokenizer_digest,
                "model.config": self.model_config,
                "model.weights": self.model_weights,
                "dtype": self.dtype,
                "dataset": self.dataset,
                "fastdpo_version": self.fastdpo_version,
            }
        )
        return flat

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fingerprint:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"fingerprint has unknown fields {sorted(unknown)}")
        return cls(**data)

    def differences(self, expect: Fingerprint | Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
        """(field, value here, expected value) for every field of `expect` that differs.

        `expect` is a whole `Fingerprint` or a mapping of flat field names (see `to_flat`) to
        expected values, to compare only some fields (e.g. a training run that does not hold the
        reference model checks everything but `model.*`). Fields are ordered most telling first.
        """
        mine = self.to_flat()
        if isinstance(expect, Fingerprint):
            wanted = expect.to_flat()
            names = list(dict.fromkeys([*mine, *wanted]))
        else:
            wanted = dict(expect)
            unknown = [n for n in wanted if n not in mine and not n.startswith("tokenization.")]
            if unknown:
                raise KeyError(
                    f"unknown fingerprint field(s) {unknown}: known fields are {sorted(mine)}"
                )
            names = list(wanted)
        # A setting present on only one side differs whatever its value (None too).
        diffs = [
            (name, mine.get(name, ABSENT), wanted.get(name, ABSENT))
            for name in names
            if name not in mine
            or name not in wanted
            or _normalize(mine[name]) != _normalize(wanted[name])
        ]
        return sorted(diffs, key=lambda d: (_field_rank(d[0]), d[0]))


class _Absent:
    """The value of a field one side of a comparison does not have."""

    def __repr__(self) -> str:
        return "absent"


ABSENT = _Absent()


def describe_differences(diffs: Iterable[tuple[str, Any, Any]]) -> str:
    """ "field (a vs b), ..." for error messages; 64-character hex digests cut to 12."""

    def short(value: Any) -> str:
        text = repr(value)
        return text[:13] + "…'" if isinstance(value, str) and len(value) == 64 else text

    return ", ".join(f"{name} ({short(a)} vs {short(b)})" for name, a, b in diffs)


def _normalize(value: Any) -> Any:
    # JSON round trip: tuples vs lists and int keys vs str keys compare equal after loading.
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _field_rank(name: str) -> int:
    for rank, prefix in enumerate(_FIELD_ORDER):
        if name == prefix or name.startswith(prefix + "."):
            return rank
    return len(_FIELD_ORDER)


TOKENIZATION_KEYS = (
    "max_length",
    "max_prompt_length",
    "prompt_truncation",
    "loss_on",
    "add_eos",
    "text_as_chat",
)
"""The `tokenize_pairs` arguments that change the token ids, recorded in the fingerprint."""


def tokenization_settings(**tokenize_kwargs: Any) -> dict[str, Any]:
    """The fingerprint's tokenization settings from `tokenize_pairs` keyword arguments.

    Arguments that do not change the token ids (num_proc, cache_dir, on_bad_row) are left out;
    those not given take `tokenize_pairs`'s defaults, so the dict is the same whether a default
    was spelled out or not.
    """
    from fastdpo.data.tokenize import tokenize_pairs

    parameters = inspect.signature(tokenize_pairs).parameters
    unknown = set(tokenize_kwargs) - set(parameters)
    if unknown:
        raise TypeError(f"tokenize_pairs has no argument(s) {sorted(unknown)}")
    settings = {}
    for key in TOKENIZATION_KEYS:
        default = parameters[key].default
        if default is inspect.Parameter.empty:
            default = None
        settings[key] = tokenize_kwargs.get(key, default)
    if settings["max_length"] is None:
        raise TypeError("max_length is required")
    return settings


def compute_fingerprint(
    *,
    model: torch.nn.Module,
    tokenizer: Any | None,
    tokenization: Mapping[str, Any] | Any,
    example_digests: Iterable[tuple[str, int]],
) -> Fingerprint:
    """The fingerprint of a reference pass of `model` over examples with these digests.

    `tokenization` is a mapping (or a dataclass) of the settings the examples were tokenized
    with (values JSON can hold; others are stored as str). `tokenizer=None` records no tokenizer
    (pre-tokenized data); then the `tokenizer.*` fields are None. `example_digests` are
    `example_digest(pair)` of every example.
    """
    import fastdpo

    return Fingerprint(
        model_config=model_config_digest(model),
        model_weights=weights_digest(model),
        tokenizer_vocab_size=None if tokenizer is None else len(tokenizer),
        tokenizer_digest=None if tokenizer is None else tokenizer_digest(tokenizer),
        tokenization=_settings_dict(tokenization),
        dtype=model_dtype(model),
        dataset=dataset_digest(example_digests),
        fastdpo_version=fastdpo.__version__,
    )


def expected_fields(
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any | None = None,
    tokenization: Mapping[str, Any] | Any | None = None,
    examples: Iterable[TokenizedPair] | None = None,
) -> dict[str, Any]:
    """Flat fingerprint fields a run expects, for `ReferenceCache.open(expect=...)`.

    Only the inputs given are included (plus `fastdpo_version`), so a training run checks what
    it holds: e.g. the tokenizer and settings, and the model when the policy starts from the
    reference checkpoint (pass it before the first step). Leave `examples` out when training
    on a subset of the cached data; `ReferenceCache.check_coverage` then checks each example.
    `model` gives `model.config` and `model.weights` but not `dtype` (training may run in
    another dtype than the reference pass did).
    """
    import fastdpo

    fields: dict[str, Any] = {"fastdpo_version": fastdpo.__version__}
    if model is not None:
        fields["model.config"] = model_config_digest(model)
        fields["model.weights"] = weights_digest(model)
    if tokenizer is not None:
        fields["tokenizer.vocab_size"] = len(tokenizer)
        fields["tokenizer.digest"] = tokenizer_digest(tokenizer)
    if tokenization is not None:
        for key, value in _settings_dict(tokenization).items():
            fields[f"tokenization.{key}"] = value
    if examples is not None:
        fields["dataset"] = dataset_digest(example_digest(p) for p in examples)
    return fields


def _settings_dict(tokenization: Mapping[str, Any] | Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(tokenization) and not isinstance(tokenization, type):
        tokenization = dataclasses.asdict(tokenization)
    if not isinstance(tokenization, Mapping):
        raise TypeError(
            f"tokenization must be a mapping or a dataclass of settings, got {type(tokenization)}"
        )
    return _normalize(dict(tokenization))  # values that JSON lacks (paths, ...) become str


def model_dtype(model: torch.nn.Module) -> str:
    """The dtype of the model's floating-point parameters, e.g. "bfloat16"."""
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "none"


def model_config_digest(model: torch.nn.Module) -> str:
    """sha256 (hex) of `model.config` without the keys that do not change what it computes.

    Models without a Hugging Face config hash their class name instead (their weights digest
    still identifies them). Adding new config keys across transformers versions changes this
    digest: build and train with the same transformers version.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        payload: Any = {"class": type(model).__qualname__}
    else:
        payload = _drop_volatile(config.to_dict())
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _drop_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_volatile(v) for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(value, list):
        return [_drop_volatile(v) for v in value]
    return value


@torch.no_grad()
def weights_digest(model: torch.nn.Module) -> str:
    """A checksum of every tensor in `model.state_dict()`, computed where the weights live.

    For each tensor: its name, shape, and two exact integer sums over all its elements, taken
    of the float32 bit patterns (floating tensors are upcast first, so a bf16 checkpoint loaded
    in bf16 or in fp32 gives the same digest; the `dtype` field records the compute dtype):
    the plain sum and a position-weighted sum (element i weighs i % 256 + 1), both modulo
    2**61 - 1. The sha256 of all of these is the digest.

    Trade-off: unlike a hash of a sample of each tensor, every element is read, so changing any
    single weight changes the digest, and so does moving values to other positions, except
    moves that keep both sums (e.g. swapping two elements whose positions differ by a multiple
    of 256: not what fine-tuning or another checkpoint produces). The price is one read of the
    weights, memory-bound, on the weights' device (measured in benchmarks/bench_precompute.py;
    on a GPU a small fraction of one forward pass). Not a cryptographic hash: two models made on
    purpose to collide can collide. One host sync at the end.
    """
    entries = []
    sums = []
    for name, tensor in model.state_dict().items():
        entries.append((name, list(tensor.shape)))
        sums.append(_tensor_sums(tensor))
    totals = torch.stack(sums).cpu().tolist() if sums else []
    h = hashlib.sha256()
    for (name, shape), (plain, weighted) in zip(entries, totals, strict=True):
        h.update(json.dumps([name, shape, plain, weighted]).encode())
    return h.hexdigest()


def _tensor_sums(tensor: torch.Tensor) -> torch.Tensor:
    """int64 [2] on the tensor's device: (sum, position-weighted sum) mod 2**61 - 1.

    Each chunk is viewed as [rows, 256] and summed over rows (one pass, accumulating in int64);
    the weighted sum is then the dot product of the 256 column sums with 1..256. Exact: a word
    is below 2**31, a column sum below 2**45, the weighted sum below 2**61.
    """
    flat = tensor.detach().reshape(-1)
    device = flat.device
    weights = torch.arange(1, _POSITION_PERIOD + 1, dtype=torch.int64, device=device)
    total = torch.zeros(2, dtype=torch.int64, device=device)
    chunk_size = _DIGEST_ROWS * _POSITION_PERIOD
    for start in range(0, flat.numel(), chunk_size):
        chunk = flat[start : start + chunk_size]
        scale = 1
        if chunk.dtype == torch.bfloat16:
            # A bf16 value's float32 bits are its own 16 bits followed by 16 zero bits: the
            # int32 word is the int16 word times 2**16 (saves the upcast, the costly part).
            words, scale = chunk.view(torch.int16), 1 << 16
        elif chunk.is_floating_point():
            words = chunk.to(torch.float32).view(torch.int32)
        else:  # integer and bool buffers: their values (64-bit ones reduced modulo 2**31)
            words = (chunk.to(torch.int64) % (1 << 31)).to(torch.int32)
        padding = -words.numel() % _POSITION_PERIOD  # zeros add nothing to either sum
        if padding:
            words = torch.cat([words, words.new_zeros(padding)])
        column_sums = _column_sums(words.view(-1, _POSITION_PERIOD)) * scale
        chunk_sums = torch.stack([column_sums.sum(), (column_sums * weights).sum()])
        total = (total + chunk_sums % _DIGEST_MODULUS) % _DIGEST_MODULUS
    return total


def _column_sums(words: torch.Tensor) -> torch.Tensor:
    """int64 [256]: exact column sums of int16 or int32 [rows, 256] words."""
    if words.device.type == "cpu":
        # numpy's integer reduction is ~10x faster than torch's on the CPU (16 MiB: 6 vs 60 ms,
        # measured on this project's 2-core EPYC CPU, 2026-11); same exact integers.
        return torch.from_numpy(words.numpy().sum(0, dtype=np.int64))
    return words.sum(0, dtype=torch.int64)


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 (hex) of the tokenizer: `fastdpo.data.cache.tokenizer_fingerprint`, the same
    identity the tokenization cache uses (serialized model, special tokens, chat template)."""
    return tokenizer_fingerprint(tokenizer)


def example_digest(pair: TokenizedPair) -> tuple[str, int]:
    """(example id, a 63-bit hash of everything tokenized about it).

    Stored per example in the cache, so a training run can check that each of its examples is
    the one the cache holds values for, even when it trains on a subset of the cached data.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(pair.example_id.encode())
    for part in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
        # The length prefix keeps ([1, 2], [3]) and ([1], [2, 3]) apart; -1 marks "absent".
        if part is None:
            h.update(np.int64(-1).tobytes())
        else:
            h.update(np.int64(len(part)).tobytes())
            h.update(np.asarray(part, dtype=np.int64).tobytes())
    for mask in (pair.chosen_loss_mask, pair.rejected_loss_mask):
        h.update(b"-" if mask is None else np.asarray(mask, dtype=np.bool_).tobytes() + b"|")
    h.update(repr(pair.label).encode())
    # Masked to 63 bits so it fits a signed int64 tensor.
    return pair.example_id, int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def dataset_digest(example_digests: Iterable[tuple[str, int]]) -> str:
    """sha256 (hex) over (example id, example digest) sorted by id: row order does not matter."""
    h = hashlib.sha256()
    for example_id, digest in sorted(example_digests):
        h.update(json.dumps([example_id, digest]).encode())
    return h.hexdigest()
