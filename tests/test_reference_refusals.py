"""`ReferenceCache.open(expect=...)` refuses a cache built from other inputs, one field at a time,
naming the field.

The fields come from the code, not from a list written here: the flat fields of the cache's
own fingerprint (`Fingerprint.to_flat`), built with every tokenization setting of
`TOKENIZATION_KEYS`. A field added later has no entry in `OTHER_INPUTS` and fails
`test_every_fingerprint_field_has_a_case` until it gets one. The other values are those real
other inputs give (another model, tokenizer, data, setting), so each case is a mismatch a user
can actually run into.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch

import fastdpo
from fastdpo.data.types import TokenizedPair
from fastdpo.reference import FingerprintMismatchError, ReferenceCache, tokenization_settings
from fastdpo.reference_fingerprint import (
    TOKENIZATION_KEYS,
    Fingerprint,
    dataset_digest,
    example_digest,
    model_config_digest,
    model_dtype,
    tokenizer_digest,
    weights_digest,
)
from fastdpo.testing.models import tiny_model
from fastdpo.testing.tokenizer import build_tiny_tokenizer

# Every setting tokenization_settings records (the defaults of tokenize_pairs besides these).
SETTINGS = tokenization_settings(max_length=64)


def make_pairs(seed: int) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 90, (n,), generator=g).tolist()

    return [
        TokenizedPair(
            example_id=f"ex-{i}", prompt_ids=ids(4), chosen_ids=ids(3), rejected_ids=ids(5)
        )
        for i in range(6)
    ]


# flat field -> the value that other real inputs give it
OTHER_INPUTS: dict[str, Callable[[], Any]] = {
    "model.config": lambda: model_config_digest(tiny_model("llama", rms_norm_eps=1e-5)),
    "model.weights": lambda: weights_digest(tiny_model("llama", seed=1)),
    "dtype": lambda: model_dtype(tiny_model("llama", dtype=torch.bfloat16)),
    "fastdpo_version": lambda: fastdpo.__version__ + ".post1",
    "tokenizer.vocab_size": lambda: len(build_tiny_tokenizer(vocab_size=300)),
    "tokenizer.digest": lambda: tokenizer_digest(build_tiny_tokenizer(chat_template="{{ x }}")),
    "dataset": lambda: dataset_digest(example_digest(p) for p in make_pairs(seed=1)),
    "tokenization.max_length": lambda: 128,
    "tokenization.max_prompt_length": lambda: 32,
    "tokenization.prompt_truncation": lambda: "right",
    "tokenization.loss_on": lambda: "all_assistant_turns",
    "tokenization.add_eos": lambda: False,
    "tokenization.text_as_chat": lambda: True,
}

# Fingerprint dataclass field -> its flat name (a prefix for the tokenization settings)
FLAT_NAME = {
    "model_config": "model.config",
    "model_weights": "model.weights",
    "tokenizer_vocab_size": "tokenizer.vocab_size",
    "tokenizer_digest": "tokenizer.digest",
    "tokenization": "tokenization.",
    "dtype": "dtype",
    "dataset": "dataset",
    "fastdpo_version": "fastdpo_version",
}


def _flat_fields_from_code() -> list[str]:
    """The flat fields of a fingerprint holding every tokenization setting the code records."""
    values: dict[str, Any] = {f.name: "x" for f in dataclasses.fields(Fingerprint)}
    values["tokenization"] = {key: None for key in TOKENIZATION_KEYS}
    return sorted(Fingerprint(**values).to_flat())


FLAT_FIELDS = _flat_fields_from_code()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> ReferenceCache:
    return ReferenceCache.build(
        tiny_model("llama"),
        make_pairs(seed=0),
        tmp_path_factory.mktemp("refusals") / "cache",
        tokenizer=build_tiny_tokenizer(),
        tokenization=SETTINGS,
        examples_per_shard=4,
        progress=False,
    )


def with_field(fingerprint: Fingerprint, name: str, value: Any) -> Fingerprint:
    """`fingerprint` with flat field `name` set to `value` (every other field as it was)."""
    if name.startswith("tokenization."):
        settings = {**fingerprint.tokenization, name.removeprefix("tokenization."): value}
        return dataclasses.replace(fingerprint, tokenization=settings)
    (attribute,) = [a for a, flat in FLAT_NAME.items() if flat == name]
    return dataclasses.replace(fingerprint, **{attribute: value})


def refusal(cache: ReferenceCache, expect) -> FingerprintMismatchError:
    with pytest.raises(FingerprintMismatchError) as info:
        ReferenceCache.open(cache.path, expect=expect)
    assert "fastdpo precompute-ref" in str(info.value)  # says how to rebuild
    return info.value


def test_every_fingerprint_field_has_a_case(cache):
    assert set(cache.fingerprint.to_flat()) == set(FLAT_FIELDS), "cache built without a setting"
    missing = sorted(set(FLAT_FIELDS) - set(OTHER_INPUTS))
    assert not missing, f"fingerprint field(s) {missing} have no refusal case in OTHER_INPUTS"
    assert not set(OTHER_INPUTS) - set(FLAT_FIELDS), "OTHER_INPUTS names fields the code lacks"
    settings = {f"tokenization.{key}" for key in TOKENIZATION_KEYS}
    assert settings == {f for f in FLAT_FIELDS if f.startswith("tokenization.")}


@pytest.mark.parametrize("attribute", [f.name for f in dataclasses.fields(Fingerprint)])
def test_every_dataclass_field_is_compared(cache, attribute):
    """A Fingerprint field that `to_flat` forgot would never be compared: change each one
    (whatever its type) and the difference must be reported under its flat name."""
    assert attribute in FLAT_NAME, f"new Fingerprint field {attribute!r}: add it to FLAT_NAME"
    value = getattr(cache.fingerprint, attribute)
    if isinstance(value, dict):
        changed: Any = {**value, "a_new_setting": 1}
    elif isinstance(value, bool) or value is None:
        changed = "other"
    elif isinstance(value, int):
        changed = value + 1
    else:
        changed = f"{value}-other"
    other = dataclasses.replace(cache.fingerprint, **{attribute: changed})
    names = [name for name, _, _ in cache.fingerprint.differences(other)]
    assert names and all(n.startswith(FLAT_NAME[attribute]) for n in names), names


def test_the_same_inputs_open(cache):
    for expect in (cache.fingerprint, cache.fingerprint.to_flat(), {}):
        opened = ReferenceCache.open(cache.path, expect=expect)
        assert opened.fingerprint == cache.fingerprint and len(opened) == len(cache)


@pytest.mark.parametrize("form", ["fingerprint", "fields"])
@pytest.mark.parametrize("field", FLAT_FIELDS)
def test_each_differing_field_is_refused_by_name(cache, field, form):
    if field not in OTHER_INPUTS:
        pytest.fail(f"no refusal case for fingerprint field {field!r}: add it to OTHER_INPUTS")
    cached = cache.fingerprint.to_flat()[field]
    other = OTHER_INPUTS[field]()
    assert other != cached, f"the case for {field} does not change it"
    if form == "fingerprint":
        expect: Any = with_field(cache.fingerprint, field, other)
    else:
        expect = {**cache.fingerprint.to_flat(), field: other}
    error = refusal(cache, expect)
    assert error.fields == [field]
    assert f"{field} (" in str(error)


@pytest.mark.parametrize(
    "key",
    [key for key in TOKENIZATION_KEYS],
)
def test_a_setting_only_the_cache_has_is_refused(cache, key):
    """A whole expected Fingerprint lacking a setting the cache recorded: they differ."""
    settings = {k: v for k, v in cache.fingerprint.tokenization.items() if k != key}
    error = refusal(cache, dataclasses.replace(cache.fingerprint, tokenization=settings))
    assert error.fields == [f"tokenization.{key}"]
    assert f"tokenization.{key} ({SETTINGS[key]!r} vs " in str(error)


@pytest.mark.parametrize(
    ("form", "value"),
    [
        ("fingerprint", "chatml"),
        ("fields", "chatml"),
        ("fingerprint", None),
        ("fields", None),
    ],
)
def test_a_setting_only_the_run_has_is_refused(cache, form, value):
    """The run tokenized with a setting the cache never recorded (e.g. a chat template name)."""
    if form == "fingerprint":
        settings = {**cache.fingerprint.tokenization, "template": value}
        expect: Any = dataclasses.replace(cache.fingerprint, tokenization=settings)
    else:
        expect = {"tokenization.template": value}
    error = refusal(cache, expect)
    assert error.fields == ["tokenization.template"]
    assert f" vs {value!r})" in str(error).split("tokenization.template (")[1]


def test_fields_left_out_of_a_mapping_are_not_checked(cache):
    """A mapping checks only the fields it names (a run that does not hold the reference model
    leaves out model.*): the documented way to check a subset."""
    flat = cache.fingerprint.to_flat()
    subset = {name: value for name, value in flat.items() if not name.startswith("model.")}
    assert ReferenceCache.open(cache.path, expect=subset).fingerprint == cache.fingerprint


def test_several_differing_fields_are_all_named_most_telling_first(cache):
    expect = with_field(cache.fingerprint, "model.weights", OTHER_INPUTS["model.weights"]())
    expect = with_field(expect, "tokenization.max_length", 128)
    expect = with_field(expect, "dataset", OTHER_INPUTS["dataset"]())
    error = refusal(cache, expect)
    assert error.fields == ["tokenization.max_length", "model.weights", "dataset"]
