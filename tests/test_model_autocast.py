"""`fastdpo.sequence_logps` under `torch.autocast` (CPU, bf16): the head runs in the autocast
dtype, as the model's own forward runs its lm_head, and fp32 master weights get gradients.

Two oracles. The head alone: the hidden states this very forward fed to the head (captured at
the final norm), through the model's own `lm_head` under autocast, then a float64 log-softmax:
only the head differs, so the comparison is tight, and an fp32 head would miss it by ~1e-2.
The whole model: each sequence alone through the model's own autocast forward (eager
attention); its bf16 body rounds differently from the packed one, so that bound is loose.
"""

from __future__ import annotations

import random

import pytest
import torch

from fastdpo.data.collate import collate_pairs
from fastdpo.data.types import TokenizedPair
from fastdpo.model import sequence_logps
from fastdpo.testing.models import TINY_SIZES, tiny_model

AUTOCAST = torch.bfloat16
HEAD_ATOL = 1e-5
"""Per-token log-probs, same hidden states and bf16 logits: only fp32 vs float64 log-softmax
differs (measured 4e-7, CPU, torch 2.13, 2026-12); an fp32 head is ~1e-2 away."""
MODEL_ATOL = 0.25
"""Per-sequence sums (6-11 tokens), packed vs alone, both with a bf16 body: measured up to
0.05 (same machine); a wrong sequence boundary moves sums by 1-5 (tests/test_model.py)."""


def pairs(count: int = 3, seed: int = 0) -> list[TokenizedPair]:
    rng = random.Random(seed)

    def ids(n):
        return [rng.randrange(3, TINY_SIZES["vocab_size"]) for _ in range(n)]

    return [
        TokenizedPair(
            example_id=f"ex{i}",
            prompt_ids=ids(rng.randint(3, 7)),
            chosen_ids=ids(rng.randint(6, 11)),
            rejected_ids=ids(rng.randint(6, 11)),
        )
        for i in range(count)
    ]


def head_reference(model, hidden: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """float64 [M]: the model's own lm_head on `hidden` [M, H] under autocast, log-softmax in
    float64, gathered at the targets."""
    with torch.autocast("cpu", dtype=AUTOCAST):
        logits = model.lm_head(hidden)
    assert logits.dtype == AUTOCAST  # what the model's own forward computes in
    logp = logits.double().log_softmax(-1)
    return logp.gather(1, target_ids[:, None]).squeeze(1)


def packed_forward(model, batch):
    """sequence_logps under autocast, and the final norm's output (the head's input) [M, H]."""
    captured = {}
    hook = model.model.norm.register_forward_hook(
        lambda module, args, output: captured.__setitem__("hidden", output)
    )
    try:
        with torch.autocast("cpu", dtype=AUTOCAST):
            result = sequence_logps(model, batch, return_token_logps=True)
    finally:
        hook.remove()
    hidden = captured["hidden"][0].index_select(0, batch.target_positions)
    return result, hidden


def test_head_runs_in_the_autocast_dtype():
    model = tiny_model("llama")
    batch = collate_pairs(pairs())
    result, hidden = packed_forward(model, batch)
    assert result.token_logps.dtype == torch.float32 and result.logps.dtype == torch.float32
    expected = head_reference(model, hidden.detach(), batch.target_ids)
    error = (result.token_logps.double() - expected).abs().max().item()
    assert error <= HEAD_ATOL, f"token log-probs {error:.2e} from the model's autocast head"
    # The check can tell the head dtypes apart: the fp32 head's log-probs are far outside it.
    fp32_logits = hidden.detach().float() @ model.lm_head.weight.T
    fp32 = fp32_logits.double().log_softmax(-1).gather(1, batch.target_ids[:, None]).squeeze(1)
    assert (fp32 - expected).abs().max().item() > 100 * HEAD_ATOL


def test_matches_the_models_own_autocast_forward():
    """Each sequence alone through the model's own autocast forward (eager attention, full
    logits) plus a float64 log-softmax: the packed sums agree to bf16 body rounding."""
    model = tiny_model("llama", attn_implementation="eager")
    examples = pairs()
    result, _ = packed_forward(model, collate_pairs(examples))
    model.set_attn_implementation("eager")
    alone = []
    for pair in examples:
        for completion in (pair.chosen_ids, pair.rejected_ids):
            tokens = torch.tensor([pair.prompt_ids + completion])
            with torch.no_grad(), torch.autocast("cpu", dtype=AUTOCAST):
                logits = model(tokens).logits[0]
            assert logits.dtype == AUTOCAST
            logp = logits.double().log_softmax(-1)[len(pair.prompt_ids) - 1 : -1]
            alone.append(logp.gather(1, tokens[0, len(pair.prompt_ids) :, None]).sum())
    alone = torch.stack(alone)
    error = (result.logps.detach().double() - alone).abs().max().item()
    assert error <= MODEL_ATOL, f"sequence sums {error:.3f} from the model's own forward"


@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward-after", "inside"])
def test_fp32_master_weights_get_gradients(backward_inside):
    """Every fp32 parameter gets an fp32 gradient; the head's equals (to bf16 rounding) the
    gradient through the model's own autocast head on the same hidden states, whether
    backward runs after the autocast region or inside it."""
    model = tiny_model("llama")
    batch = collate_pairs(pairs(seed=1))
    weights = torch.randn(batch.num_sequences, generator=torch.Generator().manual_seed(2))
    captured = {}
    hook = model.model.norm.register_forward_hook(
        lambda module, args, output: captured.__setitem__("hidden", output.detach())
    )
    try:
        with torch.autocast("cpu", dtype=AUTOCAST):
            result = sequence_logps(model, batch)
            loss = (result.logps * weights).sum()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
    finally:
        hook.remove()
    for name, parameter in model.named_parameters():
        assert parameter.dtype == torch.float32
        assert parameter.grad is not None, f"{name}: no gradient"
        assert parameter.grad.dtype == torch.float32, f"{name}: {parameter.grad.dtype} gradient"
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().max() > 0, name

    hidden = captured["hidden"][0].index_select(0, batch.target_positions)
    head = model.lm_head.weight
    token_weights = torch.repeat_interleave(weights.double(), batch.completion_lengths)
    expected_loss = (head_reference(model, hidden, batch.target_ids) * token_weights).sum()
    (expected,) = torch.autograd.grad(expected_loss, head)
    scale = expected.abs().max()
    error = ((head.grad - expected).abs().max() / scale).item()
    # Both round the gradient to bf16 (the dtype the head ran in): measured 3.4e-3 of the
    # largest entry, under half a bf16 epsilon (same machine).
    assert error <= 2 * torch.finfo(AUTOCAST).eps, f"head gradient: scaled error {error:.2e}"
