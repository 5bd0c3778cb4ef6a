"""Oracle tests of `fastdpo.sequence_logps`: the packed forward must give, for every sequence,
what the model's own forward gives on that sequence alone (full logits, float64 log-softmax),
and the same parameter gradients.

The negative controls break packing on purpose (positions not reset, boundaries removed, the
final soft-cap dropped) and check that the comparison catches it: the oracle can fail.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from torch import nn

from fastdpo.attention import huggingface, packed_attention_kwargs, runners
from fastdpo.data.collate import collate_pairs
from fastdpo.data.types import TokenizedPair
from fastdpo.liger import _swap_body_modules, apply_liger_body_kernels
from fastdpo.model import (
    SequenceLogps,
    check_packable,
    head_logit_transform,
    sequence_logps,
    unwrap_model,
)
from fastdpo.testing.models import MODEL_FAMILIES, TINY_SIZES, tiny_config, tiny_model

VOCAB = TINY_SIZES["vocab_size"]

# fp32, per-sequence sums of 3-14 token log-probs: packed and alone differ by rounding only,
# measured at most 3.6e-6 (logps) and 7.8e-7 of the largest gradient entry over the seven tiny
# families (CPU, 2026-11-23); broken packing moves log-probs by 1-5.
FP32_LOGP_ATOL = 5e-5
FP32_GRAD_RTOL = 1e-5


# ------------------------------------------------------------------------------------------------
# Examples (batches come from fastdpo.data.collate.collate_pairs; the oracle reads the examples
# directly, so it does not depend on the packing code)


def random_pairs(
    count: int,
    *,
    seed: int,
    prompt: tuple[int, int] = (2, 8),
    completion: tuple[int, int] = (1, 12),
    paired: bool = True,
) -> list[TokenizedPair]:
    rng = random.Random(seed)

    def ids(bounds):
        return [rng.randrange(3, VOCAB) for _ in range(rng.randint(*bounds))]

    return [
        TokenizedPair(
            example_id=f"ex{i}",
            prompt_ids=ids(prompt),
            chosen_ids=ids(completion),
            rejected_ids=ids(completion) if paired else None,
            label=None if paired else bool(i % 2),
        )
        for i in range(count)
    ]


def sequences_of(pairs: list[TokenizedPair]) -> list[tuple[list[int], list[int], list[bool]]]:
    """(prompt, completion, loss mask) of every sequence, in packed order."""
    out = []
    for pair in pairs:
        mask = pair.chosen_loss_mask or [True] * len(pair.chosen_ids)
        out.append((pair.prompt_ids, pair.chosen_ids, mask))
        if pair.is_paired:
            mask = pair.rejected_loss_mask or [True] * len(pair.rejected_ids)
            out.append((pair.prompt_ids, pair.rejected_ids, mask))
    return out


# ------------------------------------------------------------------------------------------------
# The oracle: each sequence alone through the model's standard forward


def reference_logps(model: nn.Module, pairs: list[TokenizedPair]) -> torch.Tensor:
    """float64 [S]: per-sequence completion log-probs from the standard (eager) forward."""
    model.set_attn_implementation("eager")
    device = model.lm_head.weight.device
    sums = []
    for prompt, completion, mask in sequences_of(pairs):
        tokens = torch.tensor([prompt + completion], device=device)
        logits = model(tokens).logits[0].double()  # [L, V], the model's own head transform
        logp = logits.log_softmax(-1)[len(prompt) - 1 : -1]  # rows predicting the completion
        token_logp = logp.gather(1, tokens[0, len(prompt) :, None]).squeeze(1)
        sums.append((token_logp * torch.tensor(mask, dtype=torch.float64, device=device)).sum())
    return torch.stack(sums)


def assert_logps_close(packed: torch.Tensor, reference: torch.Tensor, atol: float) -> None:
    error = (packed.double() - reference.double()).abs()
    worst = int(error.argmax())
    assert error.max() <= atol, (
        f"sequence {worst}: packed {packed[worst].item():.6f} vs alone "
        f"{reference[worst].item():.6f} (|diff| {error.max().item():.3g} > {atol})"
    )


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def gradients(loss: torch.Tensor, model: nn.Module) -> list[torch.Tensor | None]:
    """d loss / d each trainable parameter, through .backward() (reentrant checkpointing
    does not support torch.autograd.grad); leaves the parameters' .grad cleared."""
    params = trainable(model)
    for p in params:
        p.grad = None
    loss.backward()
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return grads


def assert_grads_close(packed: list, reference: list, rtol: float) -> None:
    scale = max(g.abs().max().item() for g in reference if g is not None)
    for i, (a, b) in enumerate(zip(packed, reference, strict=True)):
        assert (a is None) == (b is None), f"parameter {i}: gradient present in only one run"
        if a is not None:
            error = (a.double() - b.double()).abs().max().item()
            assert error <= rtol * scale, (
                f"parameter {i}: grad |diff| {error:.3g} > {rtol * scale:.3g}"
            )


def check_against_reference(model, pairs, *, pad_to_multiple=None, attention=None):
    """Packed vs alone: log-probs and the gradients of a random weighting of them."""
    batch = collate_pairs(pairs, pad_to_multiple=pad_to_multiple)
    weights = torch.randn(batch.num_sequences)
    result = sequence_logps(model, batch, attention=attention)
    packed_grads = gradients((result.logps * weights).sum(), model)
    reference = reference_logps(model, pairs)
    reference_grads = gradients((reference * weights.double()).sum(), model)
    assert_logps_close(result.logps, reference, FP32_LOGP_ATOL)
    assert_grads_close(packed_grads, reference_grads, FP32_GRAD_RTOL)
    return result


# ------------------------------------------------------------------------------------------------
# Oracle


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_matches_each_sequence_alone(family):
    model = tiny_model(family)
    result = check_against_reference(model, random_pairs(3, seed=1, completion=(3, 14)))
    assert result.attention_backends == ("sdpa",)
    assert result.logps.dtype == torch.float32


@pytest.mark.parametrize(("family", "tied"), [("llama", True), ("gemma2", False)])
def test_tied_and_untied_heads(family, tied):
    model = tiny_model(family, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    check_against_reference(model, random_pairs(2, seed=2))


def test_head_with_bias():
    model = tiny_model("llama")
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model.lm_head = nn.Linear(32, VOCAB, bias=True)
    check_against_reference(model, random_pairs(2, seed=3))


def test_padding_multiple():
    pairs = random_pairs(3, seed=4)
    batch = collate_pairs(pairs, pad_to_multiple=16)
    assert batch.num_padding > 0 and batch.cu_seqlens.shape[0] == batch.num_sequences + 2
    check_against_reference(tiny_model("qwen2"), pairs, pad_to_multiple=16)


def test_one_sequence_batch():
    pairs = random_pairs(1, seed=5, paired=False)
    result = check_against_reference(tiny_model("mistral"), pairs)
    assert result.logps.shape == (1,)
    assert result.chosen is None and result.rejected is None


def test_one_completion_token():
    pairs = random_pairs(2, seed=6, prompt=(1, 1), completion=(1, 1))
    result = check_against_reference(tiny_model("gemma2"), pairs)
    assert result.lengths.tolist() == [1, 1, 1, 1]


def test_loss_mask_selects_targets():
    pair = random_pairs(1, seed=7, completion=(6, 6))[0]
    pair = dataclasses.replace(
        pair,
        chosen_loss_mask=[True, False, False, True, True, False],
        rejected_loss_mask=[False, True, True, True, True, True],
    )
    result = check_against_reference(tiny_model("llama"), [pair])
    assert result.chosen_lengths.tolist() == [3] and result.rejected_lengths.tolist() == [5]


def test_no_counted_tokens_gives_zero():
    pair = dataclasses.replace(
        random_pairs(1, seed=24, completion=(2, 2))[0],
        chosen_loss_mask=[False, False],
        rejected_loss_mask=[False, True],
    )
    result = check_against_reference(tiny_model("llama"), [pair])
    assert result.lengths.tolist() == [0, 1] and result.chosen.item() == 0.0


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing(reentrant, monkeypatch):
    model = tiny_model("llama")
    options = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    model.train()  # checkpointing is active in training mode only (dropout is 0 in tiny models)
    calls = []
    original = huggingface.varlen_attention
    monkeypatch.setattr(
        huggingface, "varlen_attention", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    check_against_reference(model, random_pairs(2, seed=8))
    # Each of the 2 layers ran in the forward and again when backward recomputed it (the
    # reference runs in eager attention, which does not come through here).
    assert len(calls) == 2 * 2


def test_paired_views_and_token_logps():
    pairs = random_pairs(3, seed=9)
    batch = collate_pairs(pairs)
    result = sequence_logps(tiny_model("llama"), batch, return_token_logps=True)
    assert isinstance(result, SequenceLogps)
    assert torch.equal(result.chosen, result.logps[0::2])
    assert torch.equal(result.rejected, result.logps[1::2])
    assert torch.equal(result.chosen_lengths, batch.completion_lengths[0::2])
    assert result.token_logps.shape == batch.target_ids.shape
    sums = torch.stack([seg.sum() for seg in result.token_logps.split(result.lengths.tolist())])
    torch.testing.assert_close(sums, result.logps)


def test_bf16_error_within_bf16_noise():
    """bf16 packed vs fp32 truth is no worse than the standard bf16 forward vs fp32 truth."""
    pairs = random_pairs(3, seed=10, completion=(4, 12))
    model_bf16 = tiny_model("llama", dtype=torch.bfloat16)
    model_fp32 = tiny_model("llama", dtype=torch.bfloat16).float()  # the same bf16 weights
    with torch.no_grad():
        packed = sequence_logps(model_bf16, collate_pairs(pairs)).logps
        truth = reference_logps(model_fp32, pairs)
        standard = reference_logps(model_bf16, pairs)
    packed_error = (packed.double() - truth).abs().max().item()
    standard_error = (standard - truth).abs().max().item()
    assert packed_error <= 2 * standard_error + 1e-3, (packed_error, standard_error)


def test_bf16_gradients_within_bf16_noise():
    """bf16 packed parameter gradients vs the fp32 truth are no worse than the standard bf16
    forward's (measured: 0.22 vs 0.16, gradients up to 21; broken packing errs by ~10)."""
    pairs = random_pairs(2, seed=11)
    weights = torch.randn(4, generator=torch.Generator().manual_seed(11))
    model = tiny_model("gemma2", dtype=torch.bfloat16)
    packed = gradients((sequence_logps(model, collate_pairs(pairs)).logps * weights).sum(), model)
    standard = gradients((reference_logps(model, pairs) * weights.double()).sum(), model)
    model_fp32 = tiny_model("gemma2", dtype=torch.bfloat16).float()  # the same bf16 weights
    truth = gradients((reference_logps(model_fp32, pairs) * weights.double()).sum(), model_fp32)
    assert all(g is not None and g.dtype == torch.bfloat16 for g in packed)

    def error(grads):
        return max(
            (g.double() - t.double()).abs().max().item() for g, t in zip(grads, truth, strict=True)
        )

    assert error(packed) <= 2 * error(standard), (error(packed), error(standard))


def test_frozen_head_gets_no_gradient():
    model = tiny_model("llama")
    model.lm_head.weight.requires_grad_(False)
    check_against_reference(model, random_pairs(2, seed=12))
    batch = collate_pairs(random_pairs(2, seed=12))
    sequence_logps(model, batch).logps.sum().backward()
    assert model.lm_head.weight.grad is None
    # The body's gradients are those of the same model with a trainable head.
    trainable = tiny_model("llama")
    sequence_logps(trainable, batch).logps.sum().backward()
    for name, param in trainable.named_parameters():
        frozen_grad = model.get_parameter(name).grad
        if name == "lm_head.weight":
            assert param.grad is not None and param.grad.abs().sum() > 0
        else:
            torch.testing.assert_close(frozen_grad, param.grad, msg=name)


def test_flex_forward_on_cpu():
    pairs = random_pairs(2, seed=13)
    model = tiny_model("gemma2")
    with torch.no_grad():
        result = sequence_logps(model, collate_pairs(pairs), attention="flex")
        reference = reference_logps(model, pairs)
    assert result.attention_backends == ("flex",)
    assert_logps_close(result.logps, reference, FP32_LOGP_ATOL)
    with pytest.raises(RuntimeError, match="no backward on the CPU"):
        sequence_logps(model, collate_pairs(pairs), attention="flex")


class _PeftLike(nn.Module):
    """What peft.PeftModel exposes to us: its adapter configs and the base model."""

    def __init__(self, model, *, prompt_learning: bool = False):
        super().__init__()
        self.model = model
        self.peft_config = {"default": _AdapterConfig(is_prompt_learning=prompt_learning)}

    def get_base_model(self):
        return self.model


@dataclasses.dataclass
class _AdapterConfig:
    is_prompt_learning: bool


def test_peft_style_wrapper_is_unwrapped():
    model = tiny_model("llama")
    assert unwrap_model(_PeftLike(model)) is model
    pairs = random_pairs(2, seed=14)
    with torch.no_grad():
        wrapped = sequence_logps(_PeftLike(model), collate_pairs(pairs)).logps
        direct = sequence_logps(model, collate_pairs(pairs)).logps
    torch.testing.assert_close(wrapped, direct, rtol=0, atol=0)


def test_refuses_prompt_learning_adapters():
    # Prefix/prompt tuning adds virtual tokens in the PEFT wrapper's forward: never seen here.
    with pytest.raises(TypeError, match="prompt-learning"):
        unwrap_model(_PeftLike(tiny_model("llama"), prompt_learning=True))


def test_compile_wrapper_is_looked_through_with_a_warning(caplog):
    model = tiny_model("llama")
    with caplog.at_level("WARNING", logger="fastdpo.model"):
        assert unwrap_model(torch.compile(model)) is model  # nothing compiles until called
    assert "compile the decoder layers" in caplog.text


def test_refuses_ddp_wrapper():
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        unwrap_model(ddp)


# ------------------------------------------------------------------------------------------------
# Negative controls: the oracle must notice broken packing


def _packed_with(model, pairs, **changes):
    with torch.no_grad():
        batch = dataclasses.replace(collate_pairs(pairs), **changes)
        return sequence_logps(model, batch).logps


def test_control_positions_not_reset_is_detected():
    # Absolute position embeddings: with RoPE (relative) and correct boundaries, positions that
    # do not restart change nothing but rounding, so only an absolute model can show this.
    model, pairs = tiny_model("gpt2"), random_pairs(3, seed=15)
    batch = collate_pairs(pairs)
    total = batch.input_ids.shape[0]
    broken = _packed_with(model, pairs, position_ids=torch.arange(total))
    with torch.no_grad():
        reference = reference_logps(model, pairs)
    with pytest.raises(AssertionError, match="packed"):
        assert_logps_close(broken, reference, FP32_LOGP_ATOL)


def test_control_boundaries_removed_is_detected(monkeypatch):
    model, pairs = tiny_model("llama"), random_pairs(3, seed=16)
    total = collate_pairs(pairs).input_ids.shape[0]

    # A batch with one segment for several sequences is refused by the batch checks, so the
    # boundaries are removed where attention reads them: in the kwargs handed to the layers.
    def one_segment(cu_seqlens, max_seqlen, total_tokens=None, **layout):
        return packed_attention_kwargs(torch.tensor([0, total], dtype=torch.int32), total, total)

    monkeypatch.setattr("fastdpo.model.packed_attention_kwargs", one_segment)
    broken = _packed_with(model, pairs)
    monkeypatch.undo()
    with torch.no_grad():
        reference = reference_logps(model, pairs)
    assert_logps_close(broken[:1], reference[:1], FP32_LOGP_ATOL)  # the first sequence is intact
    with pytest.raises(AssertionError, match="packed"):
        assert_logps_close(broken, reference, FP32_LOGP_ATOL)


@pytest.mark.parametrize("shift", [-1, 1])
def test_control_window_off_by_one_is_detected(monkeypatch, shift):
    """A sliding window one key too short or too long (W = 6 here) is caught by the oracle."""
    model, pairs = tiny_model("mistral"), random_pairs(3, seed=25, completion=(6, 12))
    with torch.no_grad():
        reference = reference_logps(model, pairs)
    original_mask = runners._causal_window_mask
    monkeypatch.setattr(
        runners,
        "_causal_window_mask",
        lambda length_q, length_k, window, device: original_mask(
            length_q, length_k, window + shift, device
        ),
    )
    broken = _packed_with(model, pairs)
    with pytest.raises(AssertionError, match="packed"):
        assert_logps_close(broken, reference, FP32_LOGP_ATOL)


def test_control_dropped_final_softcap_is_detected(monkeypatch):
    model, pairs = tiny_model("gemma2"), random_pairs(2, seed=17)
    assert head_logit_transform(model) == (3.0, 1.0)
    with torch.no_grad():
        reference = reference_logps(model, pairs)
    monkeypatch.setattr("fastdpo.model.head_logit_transform", lambda model: (None, 1.0))
    broken = _packed_with(model, pairs)
    with pytest.raises(AssertionError, match="packed"):
        assert_logps_close(broken, reference, FP32_LOGP_ATOL)


# ------------------------------------------------------------------------------------------------
# Refusals


class _ConfigOnly(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config


def test_head_logit_transforms():
    assert head_logit_transform(tiny_model("llama")) == (None, 1.0)
    assert head_logit_transform(tiny_model("granite")) == (None, 4.0)  # logits / 4
    assert head_logit_transform(tiny_model("cohere")) == (None, 0.4)  # logits * 2.5
    assert head_logit_transform(tiny_model("gemma2")) == (3.0, 1.0)
    # The same field name, the inverse use (HyperCLOVA X multiplies by logits_scaling).
    config = tiny_config("llama")
    config.logits_scaling = 4.0
    with pytest.raises(ValueError, match="does not know how this model applies it"):
        head_logit_transform(_ConfigOnly(config))
    config.model_type = "hyperclovax"
    assert head_logit_transform(_ConfigOnly(config)) == (None, 0.25)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"layer_types": ["full_attention", "linear_attention"]}, "linear_attention"),
        ({"layer_types": ["conv", "full_attention"]}, "conv"),
        ({"attention_chunk_size": 8}, "chunked attention"),
        ({"use_bidirectional_attention": True}, "bidirectional"),
    ],
)
def test_refuses_unpackable_configs(changes, message):
    config = tiny_config("llama")
    for key, value in changes.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=message):
        check_packable(_ConfigOnly(config))


def test_refuses_known_recurrent_model_type():
    config = tiny_config("llama")
    config.model_type = "mamba"
    with pytest.raises(ValueError, match="cannot pack"):
        check_packable(_ConfigOnly(config))


def test_refuses_layers_that_bypass_packed_attention(monkeypatch):
    """A hybrid model (LFM2: convolution + attention layers) fails the every-layer check too."""
    from transformers import Lfm2Config, Lfm2ForCausalLM

    config = Lfm2Config(
        **TINY_SIZES,
        full_attn_idxs=[1],  # layer 0 a convolution (the oldest spelling of the layout)
        block_multiple_of=16,
    )
    model = Lfm2ForCausalLM(config).eval()
    monkeypatch.setattr("fastdpo.model.check_packable", lambda model: None)
    with pytest.raises(ValueError, match="only 1 of the 2 decoder layers"):
        _packed_with(model, random_pairs(2, seed=18))


@pytest.mark.parametrize("window", [4, 64], ids=["in-effect", "longer-than-sequences"])
def test_refuses_window_applied_only_by_the_mask(window):
    """Qwen2-MoE declares a sliding window but applies it only through its attention mask (its
    attention call does not pass it): packed, it would silently run full attention. A window
    longer than every sequence changes nothing, so then the model runs."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        **TINY_SIZES,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        use_sliding_window=True,
        sliding_window=window,
        max_window_layers=1,
    )
    config._attn_implementation = "eager"
    model = Qwen2MoeForCausalLM(config).eval()
    pairs = random_pairs(2, seed=26, completion=(4, 8))
    if window == 4:
        with pytest.raises(ValueError, match="declares sliding window 4 but its attention call"):
            _packed_with(model, pairs)
    else:
        with torch.no_grad():
            reference = reference_logps(model, pairs)
        assert_logps_close(_packed_with(model, pairs), reference, FP32_LOGP_ATOL)


def test_refuses_wrapped_head():
    class LoraLikeHead(nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1.0

    model = tiny_model("llama")
    model.lm_head = LoraLikeHead(32, VOCAB, bias=False)
    with pytest.raises(TypeError, match=r"not a plain torch\.nn\.Linear"):
        sequence_logps(model, collate_pairs(random_pairs(1, seed=19)))


def test_refuses_batch_on_another_layout():
    model, batch = tiny_model("llama"), collate_pairs(random_pairs(2, seed=20))
    with pytest.raises(ValueError, match="segments"):
        sequence_logps(model, dataclasses.replace(batch, cu_seqlens=batch.cu_seqlens[:-1]))
    with pytest.raises(ValueError, match=r"\[T\]"):
        sequence_logps(model, dataclasses.replace(batch, position_ids=batch.position_ids[None]))


# ------------------------------------------------------------------------------------------------
# Liger body kernels (the swap itself on the CPU with PyTorch stand-ins; the kernels on CUDA)


class _TorchRMSNorm(nn.Module):
    """Stand-in for LigerRMSNorm: the same math as the module it replaces, same weight."""

    def __init__(self, module: nn.Module, offset: float) -> None:
        super().__init__()
        self.weight = module.weight
        self.eps = getattr(module, "variance_epsilon", None) or module.eps
        self.offset = offset

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (self.offset + self.weight.float())).to(x.dtype)


@pytest.mark.parametrize(("family", "offset"), [("llama", 0.0), ("gemma2", 1.0)])
def test_body_module_swap_is_per_instance(family, offset):
    model, untouched = tiny_model(family), tiny_model(family)
    keys = list(model.state_dict())
    activation = torch.nn.functional.silu if family == "llama" else model.model.layers[0].mlp.act_fn
    replaced = _swap_body_modules(
        model,
        lambda module: _TorchRMSNorm(module, offset),
        lambda gate, up: activation(gate) * up,
        rms_norm=True,
        swiglu=True,
    )
    layers = model.config.num_hidden_layers
    norms_per_layer = 2 if family == "llama" else 4  # Gemma 2 has pre/post norms around both
    assert len(replaced) == layers * (norms_per_layer + 1) + 1  # + the final norm
    assert list(model.state_dict()) == keys
    assert type(untouched.model.norm) is not _TorchRMSNorm
    pairs = random_pairs(2, seed=22)
    with torch.no_grad():
        swapped = sequence_logps(model, collate_pairs(pairs)).logps
        original = sequence_logps(untouched, collate_pairs(pairs)).logps
    torch.testing.assert_close(swapped, original, rtol=1e-5, atol=1e-5)


def test_liger_needs_cuda():
    pytest.importorskip("liger_kernel")
    with pytest.raises(RuntimeError, match="CUDA"):
        apply_liger_body_kernels(tiny_model("llama"))


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_liger_body_kernels_on_cuda(family):
    pytest.importorskip("liger_kernel")
    pairs = random_pairs(3, seed=23)
    batch = collate_pairs(pairs).to("cuda")
    liger, plain = tiny_model(family).cuda(), tiny_model(family).cuda()
    assert apply_liger_body_kernels(liger)
    weights = torch.randn(batch.num_sequences, device="cuda")
    liger_logps = sequence_logps(liger, batch, attention="sdpa").logps
    plain_logps = sequence_logps(plain, batch, attention="sdpa").logps
    torch.testing.assert_close(liger_logps, plain_logps, rtol=1e-4, atol=1e-3)
    assert_grads_close(
        gradients((liger_logps * weights).sum(), liger),
        gradients((plain_logps * weights).sum(), plain),
        rtol=1e-3,
    )


# ------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)

# Head dim 16 on GPU: the tiny models' default of 8 is below what FlexAttention's Triton kernels
# take (tl.dot needs 16).
GPU_SIZES = {"hidden_size": 64, "head_dim": 16}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "torch", "flex", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_cuda_backend_in_bf16(family, backend):
    """Each CUDA backend in bf16: log-probs within bf16 noise of the fp32 truth, and gradients
    close to those of the "sdpa" backend."""
    pairs = random_pairs(4, seed=21, completion=(4, 16))
    batch = collate_pairs(pairs, pad_to_multiple=8).to("cuda")
    model = tiny_model(family, dtype=torch.bfloat16, **GPU_SIZES).cuda()
    try:
        result = sequence_logps(model, batch, attention=backend)
    except RuntimeError as error:
        if "cannot run" in str(error):
            pytest.skip(str(error))
        raise
    assert result.attention_backends == (backend,)
    with torch.no_grad():
        bf16 = {"dtype": torch.bfloat16, **GPU_SIZES}
        truth = reference_logps(tiny_model(family, **bf16).float().cuda(), pairs)
        standard = reference_logps(tiny_model(family, **bf16).cuda(), pairs)
    packed_error = (result.logps.double() - truth).abs().max().item()
    standard_error = (standard - truth).abs().max().item()
    assert packed_error <= 2 * standard_error + 2e-2, (packed_error, standard_error)
    weights = torch.randn(batch.num_sequences, device="cuda")
    grads = gradients((result.logps * weights).sum(), model)
    sdpa_model = tiny_model(family, dtype=torch.bfloat16, **GPU_SIZES).cuda()
    sdpa_logps = sequence_logps(sdpa_model, batch, attention="sdpa").logps
    sdpa_grads = gradients((sdpa_logps * weights).sum(), sdpa_model)
    assert_grads_close(grads, sdpa_grads, rtol=5e-2)
