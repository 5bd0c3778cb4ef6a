"""Unpacked calls on a model that `sequence_logps` switched to packed attention: padded forwards,
generation and training gradients must equal an untouched copy's, bit for bit (the same
attention function runs with the same mask), and packed calls must never build that mask.

Each case pairs two tiny models built from the same seed (the same weights): `switched` has
run `sequence_logps` once, `untouched` never has.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers.masking_utils import AttentionMaskInterface

from fastdpo import attention
from fastdpo.attention import ATTENTION_NAMES, packed_attention_kwargs, use_packed_attention
from fastdpo.data.collate import collate_pairs
from fastdpo.data.types import TokenizedPair
from fastdpo.model import sequence_logps
from fastdpo.testing.models import TINY_SIZES, tiny_model

VOCAB = TINY_SIZES["vocab_size"]

CASES = [
    pytest.param("llama", "eager", id="llama-eager"),
    # transformers' default: its mask function may return None (plain causal), leaving
    # causality to SDPA's is_causal.
    pytest.param("llama", "sdpa", id="llama-sdpa"),
    # score soft-capping (only its eager function has it), sliding window 4 on every other
    # layer, a final-logit soft-cap: the unpacked path must keep all three.
    pytest.param("gemma2", "eager", id="gemma2-eager"),
    # a sliding window (5) on layer 1 that SDPA gets only through the mask.
    pytest.param("qwen2", "sdpa", id="qwen2-sdpa"),
]

LENGTH = 14  # longer than every window above
PADDING = 4


def packed_batch():
    rng = random.Random(0)

    def ids(low, high):
        return [rng.randrange(3, VOCAB) for _ in range(rng.randint(low, high))]

    pairs = [
        TokenizedPair(
            example_id=f"ex{i}",
            prompt_ids=ids(2, 8),
            chosen_ids=ids(1, 10),
            rejected_ids=ids(1, 10),
        )
        for i in range(3)
    ]
    return collate_pairs(pairs)


def switched_and_untouched(family: str, implementation: str):
    switched = tiny_model(family, attn_implementation=implementation)
    untouched = tiny_model(family, attn_implementation=implementation)
    result = sequence_logps(switched, packed_batch())
    assert result.attention_backends == ("sdpa",)
    # Still switched: unpacked calls below go through fastdpo's attention function.
    assert switched.config._attn_implementation == ATTENTION_NAMES["auto"]
    return switched, untouched


def padded_inputs(*, left: bool, right: bool):
    """int64 [2, LENGTH] ids and their attention mask: row 0 left-padded, row 1 right-padded."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (2, LENGTH), generator=generator)
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    if left:
        mask[0, :PADDING] = 0
    if right:
        mask[1, -PADDING:] = 0
    input_ids[mask == 0] = TINY_SIZES["pad_token_id"]
    return input_ids, mask


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize(("family", "implementation"), CASES)
def test_padded_forward_equals_untouched(family, implementation):
    switched, untouched = switched_and_untouched(family, implementation)
    input_ids, mask = padded_inputs(left=True, right=True)
    with torch.no_grad():
        assert_same(
            switched(input_ids, attention_mask=mask).logits,
            untouched(input_ids, attention_mask=mask).logits,
        )
        # No mask at all (and a batch of one, the shape of a packed call).
        assert_same(switched(input_ids).logits, untouched(input_ids).logits)
        assert_same(switched(input_ids[:1]).logits, untouched(input_ids[:1]).logits)


def assert_same_generation(switched, untouched, input_ids, **options) -> None:
    options.update(
        max_new_tokens=6,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=TINY_SIZES["pad_token_id"],
    )
    got = switched.generate(input_ids, **options)
    expected = untouched.generate(input_ids, **options)
    assert_same(got.sequences, expected.sequences)
    # The logits of every step, not just the argmax: a mask off by one cache slot changes them
    # long before it changes a token.
    assert len(got.logits) == len(expected.logits) == options["max_new_tokens"]
    for step_got, step_expected in zip(got.logits, expected.logits, strict=True):
        assert_same(step_got, step_expected)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize(("family", "implementation"), CASES)
def test_greedy_generation_equals_untouched(family, implementation, cache):
    switched, untouched = switched_and_untouched(family, implementation)
    input_ids, mask = padded_inputs(left=True, right=False)  # generation pads on the left
    assert_same_generation(
        switched, untouched, input_ids, attention_mask=mask, cache_implementation=cache
    )
    # One row, no mask: nothing hides the cache's empty slots, so a mask built from a static
    # cache's query offset after the first layer advanced it in place shows (it did: the
    # offset is a tensor that DeferredMask must copy when the mask is asked for).
    assert_same_generation(switched, untouched, input_ids[1:], cache_implementation=cache)
    # Packed calls still run packed afterwards, with the same results.
    before = sequence_logps(switched, packed_batch()).logps
    switched.generate(input_ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)
    assert_same(sequence_logps(switched, packed_batch()).logps, before)


@pytest.mark.parametrize(("family", "implementation"), CASES)
def test_training_gradients_equal_untouched(family, implementation):
    switched, untouched = switched_and_untouched(family, implementation)
    input_ids, mask = padded_inputs(left=True, right=True)
    weights = torch.randn(2, LENGTH, VOCAB, generator=torch.Generator().manual_seed(2))
    grads = []
    for model in (switched, untouched):
        model.train()
        logits = model(input_ids, attention_mask=mask).logits
        loss = (logits.log_softmax(-1) * weights * mask[..., None]).sum()
        loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert_same(grad, grads[1][name])


@pytest.mark.parametrize(("family", "implementation"), CASES)
def test_packed_calls_never_build_the_original_mask(monkeypatch, family, implementation):
    built = []
    original = AttentionMaskInterface._global_mapping[implementation]

    def counting(**arguments):
        built.append(arguments["q_length"])
        return original(**arguments)

    monkeypatch.setitem(AttentionMaskInterface._global_mapping, implementation, counting)
    switched, _ = switched_and_untouched(family, implementation)
    assert built == []  # the packed call: no [T, T] mask
    input_ids, mask = padded_inputs(left=True, right=True)
    with torch.no_grad():
        switched(input_ids, attention_mask=mask)
    # One mask per kind (full; sliding for models with sliding layers), shared by the layers.
    kinds = len(set(getattr(switched.config, "layer_types", None) or ["full_attention"]))
    assert built == [LENGTH] * kinds


def test_the_remembered_implementation_runs_and_travels_with_copies():
    switched, untouched = switched_and_untouched("gemma2", "eager")
    duplicate = copy.deepcopy(switched)
    input_ids, mask = padded_inputs(left=True, right=True)
    with torch.no_grad():
        expected = untouched(input_ids, attention_mask=mask).logits
        assert_same(duplicate(input_ids, attention_mask=mask).logits, expected)
        # What ran is what the modules remember (so the copy above did run eager, not the
        # default): told "sdpa", they run transformers' SDPA function, which refuses Gemma 2's
        # soft-capped scores (transformers 5.24) or drops the soft-cap (5.17: the tiny model's
        # cap of 2 moves the logits by ~2).
        for module in switched.modules():
            if hasattr(module, attention.UNPACKED_ATTRIBUTE):
                setattr(module, attention.UNPACKED_ATTRIBUTE, "sdpa")
        try:
            uncapped = switched(input_ids, attention_mask=mask).logits
        except ValueError as error:
            assert "softcap" in str(error)
        else:
            assert (uncapped - expected).abs().max() > 0.5


def test_comparison_catches_a_lost_mask(monkeypatch):
    """Negative control: the unpacked path without the original's mask (eager: no causal mask,
    padding attended) is far from the untouched copy."""
    switched, untouched = switched_and_untouched("llama", "eager")
    monkeypatch.setattr(attention.DeferredMask, "build", lambda self, implementation: None)
    input_ids, mask = padded_inputs(left=True, right=True)
    with torch.no_grad():
        wrong = switched(input_ids, attention_mask=mask).logits
        expected = untouched(input_ids, attention_mask=mask).logits
    assert (wrong - expected).abs().max() > 1e-1


def test_model_created_packed_falls_back_to_the_default():
    name = use_packed_attention(tiny_model("llama"))  # registers the name
    created = tiny_model("llama", attn_implementation=name)
    untouched = tiny_model("llama", attn_implementation=attention.DEFAULT_UNPACKED)
    input_ids, mask = padded_inputs(left=True, right=True)
    with torch.no_grad():
        assert_same(
            created(input_ids, attention_mask=mask).logits,
            untouched(input_ids, attention_mask=mask).logits,
        )


def test_packed_call_with_a_padding_mask_is_refused():
    switched, _ = switched_and_untouched("llama", "eager")
    lengths = [5, 9]
    cu_seqlens = torch.tensor([0, 5, 14], dtype=torch.int32)
    input_ids = torch.randint(3, VOCAB, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with pytest.raises(ValueError, match="attention mask"):
        switched(
            input_ids,
            position_ids=position_ids,
            attention_mask=torch.ones_like(input_ids),
            use_cache=False,
            **packed_attention_kwargs(cu_seqlens, max(lengths)),
        )
