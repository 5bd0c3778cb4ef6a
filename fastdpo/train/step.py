"""One optimizer step's forward and backward over its micro-batches, and evaluation.

The loss of a step is the mean over the step's pairs, however they were split into
micro-batches: each micro-batch's mean loss is weighted by its share of the step's pairs
(`pairs in the micro-batch / pairs in the step`, the step's count being global under data
parallelism) before backward, so accumulating 4 micro-batches gives the gradient of one.
Metrics are combined the same way (pair-weighted means), on the device, without host syncs.

Token means (the NLL of sft, orpo and RPO) are over the step's chosen tokens: each micro-batch
gets `nll_denominator` = step chosen tokens x its pair share, so the weighted sum is exact.
Losses with batch statistics: BCO's running reward mean is updated micro-batch by micro-batch
(so a step split into several micro-batches sees the mean of the pairs before it, not of the
whole step); the trainer carries it across steps and checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdpo.data.types import PackedBatch
from fastdpo.losses import RunningMean, TailLogps, head_metrics, preference_loss
from fastdpo.ops.preference_loss import ld_tail_sums
from fastdpo.ops.segments import segment_sums
from fastdpo.reference import ReferenceCache
from fastdpo.train.distributed import packed_forward

_STATE_METRICS = ("bco/reward_mean", "bco/reward_count")
"""Metrics that carry state rather than a batch mean: the last micro-batch's value is kept."""


@dataclass(kw_only=True)
class LossSettings:
    """What `preference_loss` is called with, besides the log-probs."""

    loss: Any = "sigmoid"
    beta: float = 0.1
    params: dict[str, Any] = field(default_factory=dict)
    bco_state: RunningMean | None = None
    """BCO's running mean between calls (None for other losses)."""
    head_metrics: bool = False
    """Also log TRL's entropy, logits/chosen, logits/rejected and mean_token_accuracy (asks the
    fused head for per-token statistics; off, the head computes none of them)."""

    def head_stats(self) -> tuple[str, ...]:
        """The per-token head statistics the step needs: "log_sum_p2" for WPO
        (use_weighting), the metrics' own with `head_metrics`; () when none (no cost)."""
        stats = ("log_sum_p2",) if self.params.get("use_weighting") else ()
        if self.head_metrics:
            stats += ("entropy", "mean_logit", "is_top1")
        return stats


@dataclass(kw_only=True)
class StepOutput:
    """What one step computed. Tensors are detached device scalars (no sync yet)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    pairs: int
    tokens: int
    """Real (non-padding) tokens of the micro-batches."""
    micro_batches: list[list[str]]
    """Example ids of each micro-batch (to name the offenders of a non-finite loss)."""
    micro_losses: list[torch.Tensor]


def takes_nll_denominator(loss: Any) -> bool:
    """True if a component of `loss` averages an NLL over chosen tokens (sft, orpo)."""
    from fastdpo.losses import LOSSES

    names = [loss] if isinstance(loss, str) else list(loss)
    return any("nll_denominator" in LOSSES[name].params for name in names)


def chosen_tokens(batch: PackedBatch) -> int:
    """Completion tokens of the chosen sequences of a paired batch (host-side count)."""
    return int(batch.completion_lengths[0::2].sum())


def batch_loss(
    model: torch.nn.Module,
    batch: PackedBatch,
    reference: ReferenceCache | None,
    settings: LossSettings,
    *,
    nll_denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss over the pairs of one packed micro-batch (on the model's device) + metrics.

    `nll_denominator`: for token-mean NLL terms (sft, orpo), what they divide by (see the
    module docstring); None: the batch's own chosen tokens."""
    ld_alpha = settings.params.get("ld_alpha")
    stats = settings.head_stats()
    forward: dict[str, Any] = {"stats": stats} if stats else {}
    if ld_alpha is not None:  # LD-DPO's tails are sums of per-token log-probs
        forward["return_token_logps"] = True
    # Through a DDP / FSDP2 wrapper's forward when wrapped.
    out = packed_forward(model, batch, **forward)
    ref_chosen = ref_rejected = ref_tokens = None
    if reference is not None:
        if ld_alpha is None:
            ref = reference.for_batch(batch)
        else:  # LD-DPO reweights the reference's tokens too
            ref = reference.for_batch(batch, with_tokens=True)
            ref_tokens = ref.token_logps
        ref_chosen, ref_rejected = ref.chosen, ref.rejected
    params = dict(settings.params)
    params.update(_per_token_loss_inputs(out, ref_tokens, batch, ld_alpha, stats))
    if settings.bco_state is not None:
        params["bco_state"] = settings.bco_state
    if nll_denominator is not None and takes_nll_denominator(settings.loss):
        params["nll_denominator"] = nll_denominator
    loss, metrics = preference_loss(
        out.chosen,
        out.rejected,
        ref_chosen,
        ref_rejected,
        loss=settings.loss,
        beta=settings.beta,
        chosen_lengths=out.chosen_lengths,
        rejected_lengths=out.rejected_lengths,
        **params,
    )
    if "bco/reward_mean" in metrics:
        settings.bco_state = RunningMean.from_metrics(metrics)
    if settings.head_metrics:
        metrics.update(head_metrics(out.token_stats, batch.target_cu))
    return loss, metrics


def _per_token_loss_inputs(
    out, ref_tokens: torch.Tensor | None, batch: PackedBatch, ld_alpha, stats: tuple[str, ...]
) -> dict[str, Any]:
    """What TRL's options read from per-token values, as sums per sequence: LD-DPO's tails
    (policy, and reference when the cache gives per-token values) and WPO's log sum p^2 sums.
    Everything comes from the head's one pass; nothing here touches the hidden states."""
    inputs: dict[str, Any] = {}
    if ld_alpha is not None:
        tails = ld_tail_sums(out.token_logps, batch.target_cu)
        ref_tails = None if ref_tokens is None else ld_tail_sums(ref_tokens, batch.target_cu)
        inputs["tail_logps"] = TailLogps(
            policy_chosen=tails[0::2],
            policy_rejected=tails[1::2],
            ref_chosen=None if ref_tails is None else ref_tails[0::2],
            ref_rejected=None if ref_tails is None else ref_tails[1::2],
        )
    if "log_sum_p2" in stats:
        sums, _ = segment_sums(out.token_stats["log_sum_p2"].detach(), batch.target_cu)
        inputs["chosen_log_sum_p2"], inputs["rejected_log_sum_p2"] = sums[0::2], sums[1::2]
    return inputs


def train_step(
    model: torch.nn.Module,
    batches: Iterable[PackedBatch],
    *,
    step_pairs: int,
    step_chosen_tokens: int | None = None,
    reference: ReferenceCache | None,
    settings: LossSettings,
    device: torch.device,
    autocast,
    filler_batches: Iterable[PackedBatch] = (),
    gradient_sync=None,
) -> StepOutput:
    """Forward + backward of every micro-batch; gradients accumulate in `.grad`.

    `step_pairs` is the number of pairs of the whole (global) step: each micro-batch's loss is
    scaled by its pairs / step_pairs. `step_chosen_tokens` (global too) is what token-mean NLL
    terms average over; None: the sum over these micro-batches. `autocast` is a
    context-manager factory (precision).

    Data parallelism: `filler_batches` run after the real ones with weight 0 (their gradient
    is exactly zero and they add nothing to loss or metrics; BCO's running mean is left as
    it was): they give a rank with fewer micro-batches the same number of forwards and
    backwards as the others. `gradient_sync(is_last)` returns the context each micro-batch's
    forward + backward runs in (DDP's `no_sync` on all but the last); None: no context.
    """
    batches = list(batches)
    fillers = list(filler_batches)
    if step_chosen_tokens is None:
        step_chosen_tokens = sum(chosen_tokens(b) for b in batches)
    total = torch.zeros((), device=device)
    sums: dict[str, torch.Tensor] = {}
    pairs = tokens = 0
    ids: list[list[str]] = []
    micro_losses = []
    weighted = _weighted_losses(
        model,
        batches + fillers,
        step_pairs,
        step_chosen_tokens,
        reference,
        settings,
        device,
        autocast,
    )
    count = len(batches) + len(fillers)
    for index in range(count):
        is_filler = index >= len(batches)
        bco_before = settings.bco_state
        sync = gradient_sync(index == count - 1) if gradient_sync else contextlib.nullcontext()
        with sync:  # the forward too: DDP decides in its forward whether backward all-reduces
            batch, share, loss, metrics = next(weighted)
            (loss * (0.0 if is_filler else share)).backward()  # one graph at a time
        if is_filler:  # its metric names with zeros: every rank then reduces the same keys
            settings.bco_state = bco_before
            zeros = {k: torch.zeros_like(v) for k, v in metrics.items() if k not in _STATE_METRICS}
            _accumulate(sums, zeros, 0.0)
            continue
        total += loss.detach() * share
        _accumulate(sums, metrics, share)
        pairs += batch.num_examples
        tokens += batch.num_tokens
        ids.append(batch.example_ids)
        micro_losses.append(loss.detach())
    return StepOutput(
        loss=total,
        metrics=sums,
        pairs=pairs,
        tokens=tokens,
        micro_batches=ids,
        micro_losses=micro_losses,
    )


@torch.no_grad()
def evaluate_batches(
    model: torch.nn.Module,
    batches: Iterable[PackedBatch],
    *,
    reference: ReferenceCache | None,
    settings: LossSettings,
    device: torch.device,
    autocast,
) -> dict[str, float]:
    """Pair-weighted means of the loss and metrics over held-out batches, as `eval/` names."""
    batches = list(batches)
    total_pairs = sum(b.num_examples for b in batches)
    if total_pairs == 0:
        return {}
    total_chosen_tokens = sum(chosen_tokens(b) for b in batches)
    eval_settings = LossSettings(
        loss=settings.loss,
        beta=settings.beta,
        params=settings.params,
        bco_state=settings.bco_state,
        head_metrics=settings.head_metrics,
    )
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros((), device=device)
        sums: dict[str, torch.Tensor] = {}
        weighted = _weighted_losses(
            model,
            batches,
            total_pairs,
            total_chosen_tokens,
            reference,
            eval_settings,
            device,
            autocast,
        )
        for _, share, loss, metrics in weighted:
            total += loss.detach() * share
            _accumulate(sums, metrics, share)
    finally:
        model.train(was_training)
    values = {"loss": total, **sums}
    return {f"eval/{k}": float(v) for k, v in values.items() if k not in _STATE_METRICS}


def _weighted_losses(
    model, batches, total_pairs, total_chosen_tokens, reference, settings, device, autocast
):
    """(batch on the device, its share of the pairs, mean loss, metrics) per micro-batch, lazily
    (the caller's backward runs before the next forward). The token-mean NLL terms get
    `total_chosen_tokens x share` as denominator, so the weighted sum is the total's mean."""
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        share = batch.num_examples / total_pairs
        with autocast():
            loss, metrics = batch_loss(
                model,
                batch,
                reference,
                settings,
                nll_denominator=max(total_chosen_tokens, 1) * share,
            )
        yield batch, share, loss, metrics


def _accumulate(sums: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor], share: float):
    for key, value in metrics.items():
        value = value.detach().double()  # fp64: shares of a rate add up to it exactly
        if key in _STATE_METRICS:
            sums[key] = value
        else:
            sums[key] = sums[key] + value * share if key in sums else value * share
