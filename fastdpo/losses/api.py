"""`preference_loss`: the public entry point (resolve the loss, check inputs, call, add metrics)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from fastdpo.losses.inputs import LossInputs
from fastdpo.losses.metrics import reward_metrics
from fastdpo.losses.options import LossOptions, TailLogps, ld_weighted, wpo_weights
from fastdpo.losses.registry import LOSSES, LossSpec, check_beta, check_reference_given

Tensor = torch.Tensor


def _resolve_components(loss: str | Mapping[str, float]) -> list[tuple[LossSpec, float]]:
    """[(spec, weight)] in the order given; validates names and weights."""
    if isinstance(loss, str):
        components = {loss: 1.0}
    elif isinstance(loss, Mapping):
        components = dict(loss)
        if not components:
            raise ValueError("loss: the mapping of losses to weights is empty")
    else:
        raise TypeError(
            f"loss must be a loss name or a mapping {{name: weight}}, got {type(loss).__name__}"
        )
    resolved = []
    for name, weight in components.items():
        spec = LOSSES.get(name)
        if spec is None:
            raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"loss {name!r}: weight must be a number, got {weight!r}")
        if not math.isfinite(weight):
            raise ValueError(f"loss {name!r}: weight must be finite, got {weight}")
        resolved.append((spec, float(weight)))
    paired = {spec.paired for spec, _ in resolved}
    if len(paired) > 1:
        raise ValueError(
            "loss: cannot combine paired losses with unpaired ones "
            f"({', '.join(s.name for s, _ in resolved if not s.paired)})"
        )
    return resolved


def _route_params(
    components: list[tuple[LossSpec, float]], loss_params: dict
) -> dict[str, dict[str, object]]:
    """Each keyword goes to every component whose function accepts it."""
    routed: dict[str, dict[str, object]] = {spec.name: {} for spec, _ in components}
    for key, value in loss_params.items():
        takers = [spec for spec, _ in components if key in spec.params]
        if not takers:
            accepted = {spec.name: list(spec.params) for spec, _ in components}
            raise TypeError(f"unknown loss parameter {key!r}; the parameters per loss: {accepted}")
        for spec in takers:
            routed[spec.name][key] = value
    return routed


def _check_tensor(name: str, tensor: Tensor, like: Tensor | None = None) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one value per sequence), got {tuple(tensor.shape)}")
    if like is not None:
        if tensor.shape != like.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected {tuple(like.shape)} "
                "(one value per completion, like the policy log-probs)"
            )
        if tensor.device != like.device:
            raise ValueError(f"{name} is on {tensor.device}, the policy log-probs on {like.device}")


def _build_inputs(
    components: list[tuple[LossSpec, float]],
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    chosen_lengths: Tensor | None,
    rejected_lengths: Tensor | None,
    beta: float,
) -> LossInputs:
    _check_tensor("policy_chosen", policy_chosen)
    _check_tensor("policy_rejected", policy_rejected)
    if not policy_chosen.is_floating_point() or policy_chosen.dtype != policy_rejected.dtype:
        raise TypeError(
            "policy_chosen and policy_rejected must share one floating dtype, got "
            f"{policy_chosen.dtype} and {policy_rejected.dtype}"
        )
    if policy_rejected.device != policy_chosen.device:
        raise ValueError(
            f"policy_chosen is on {policy_chosen.device}, policy_rejected on "
            f"{policy_rejected.device}: move them to one device"
        )
    paired = components[0][0].paired
    if paired and policy_chosen.shape != policy_rejected.shape:
        raise ValueError(
            f"policy_chosen {tuple(policy_chosen.shape)} and policy_rejected "
            f"{tuple(policy_rejected.shape)} must have one value per pair ([P] each)"
        )
    if paired and policy_chosen.numel() == 0:
        raise ValueError("the batch has no pairs (policy_chosen is empty)")
    if not paired and policy_chosen.numel() + policy_rejected.numel() == 0:
        raise ValueError("the batch has no completions (policy_chosen and policy_rejected empty)")
    beta = check_beta(beta)

    needs_reference = [spec.name for spec, _ in components if spec.needs_reference]
    if needs_reference:
        check_reference_given(needs_reference[0], ref_chosen, ref_rejected)
    ref_chosen, ref_rejected = _optional_pair(
        ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected), policy_chosen, policy_rejected
    )
    needs_lengths = [spec.name for spec, _ in components if spec.needs_lengths]
    if needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(
            f"loss {needs_lengths[0]!r} needs completion token counts: pass chosen_lengths and "
            "rejected_lengths ([P] each)"
        )
    chosen_lengths, rejected_lengths = _optional_pair(
        ("chosen_lengths", chosen_lengths),
        ("rejected_lengths", rejected_lengths),
        policy_chosen,
        policy_rejected,
    )

    return LossInputs(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        beta=beta,
    )


def _optional_pair(
    chosen: tuple[str, Tensor | None],
    rejected: tuple[str, Tensor | None],
    policy_chosen: Tensor,
    policy_rejected: Tensor,
) -> tuple[Tensor | None, Tensor | None]:
    """An optional (chosen, rejected) pair of per-sequence inputs, both or neither given, each
    shaped like its policy log-probs and cast to their dtype."""
    (chosen_name, chosen_value), (rejected_name, rejected_value) = chosen, rejected
    if (chosen_value is None) != (rejected_value is None):
        raise ValueError(f"pass both {chosen_name} and {rejected_name}, or neither")
    if chosen_value is None:
        return None, None
    _check_tensor(chosen_name, chosen_value, policy_chosen)
    _check_tensor(rejected_name, rejected_value, policy_rejected)
    dtype = policy_chosen.dtype
    return chosen_value.to(dtype), rejected_value.to(dtype)


def _apply_options(
    x: LossInputs,
    components: list[tuple[LossSpec, float]],
    options: LossOptions,
    tail_logps: TailLogps | None,
    chosen_log_sum_p2: Tensor | None,
    rejected_log_sum_p2: Tensor | None,
) -> LossInputs:
    """`x` with TRL's options applied: LD-weighted sums, WPO weights, the f-divergence."""
    changes: dict[str, object] = {
        "f_divergence_type": options.f_divergence_type,
        "f_alpha_divergence_coef": float(options.f_alpha_divergence_coef),
    }
    if options.use_weighting:
        if chosen_log_sum_p2 is None or rejected_log_sum_p2 is None:
            raise ValueError(
                "use_weighting (WPO) needs chosen_log_sum_p2 and rejected_log_sum_p2: [P] sums "
                "over each completion's tokens of log sum_v p_v^2 (the fused head's "
                "'log_sum_p2' statistic; packed_preference_loss takes it per token)"
            )
        if x.chosen_lengths is None:
            raise ValueError(
                "use_weighting (WPO) averages over tokens: pass chosen_lengths and "
                "rejected_lengths ([P] each)"
            )
        s2_c, s2_r = _optional_pair(
            ("chosen_log_sum_p2", chosen_log_sum_p2),
            ("rejected_log_sum_p2", rejected_log_sum_p2),
            x.policy_chosen,
            x.policy_rejected,
        )
        changes["pair_weights"] = wpo_weights(
            x.policy_chosen, x.policy_rejected, s2_c, s2_r, x.chosen_lengths, x.rejected_lengths
        )
    elif chosen_log_sum_p2 is not None or rejected_log_sum_p2 is not None:
        raise ValueError("chosen_log_sum_p2 / rejected_log_sum_p2 are read only with use_weighting")
    if options.ld_alpha is not None:
        changes.update(_ld_sums(x, components, options.ld_alpha, tail_logps))
    elif tail_logps is not None:
        raise ValueError("tail_logps is read only with ld_alpha (LD-DPO): pass ld_alpha too")
    return dataclasses.replace(x, **changes)


def _ld_sums(
    x: LossInputs,
    components: list[tuple[LossSpec, float]],
    ld_alpha: float,
    tails: TailLogps | None,
) -> dict[str, Tensor]:
    """LD-DPO's sums full - (1 - ld_alpha) * tail for the policy (and the reference)."""
    if not isinstance(tails, TailLogps):
        raise ValueError(
            "ld_alpha (LD-DPO) needs tail_logps=TailLogps(...): the log-probs summed over each "
            "completion's tokens past its pair's shared length, policy and reference ("
            "fastdpo.ops.preference_loss.ld_tail_sums makes them from per-token log-probs; "
            f"packed_preference_loss does it itself), got {type(tails).__name__}"
        )
    policy_c, policy_r = _optional_pair(
        ("tail_logps.policy_chosen", tails.policy_chosen),
        ("tail_logps.policy_rejected", tails.policy_rejected),
        x.policy_chosen,
        x.policy_rejected,
    )
    sums = {
        "policy_chosen": ld_weighted(x.policy_chosen, policy_c, ld_alpha),
        "policy_rejected": ld_weighted(x.policy_rejected, policy_r, ld_alpha),
        "policy_chosen_plain": x.policy_chosen,
    }
    if x.ref_chosen is not None:
        reading = [spec.name for spec, _ in components if spec.needs_reference]
        if reading and (tails.ref_chosen is None or tails.ref_rejected is None):
            raise ValueError(
                f"ld_alpha (LD-DPO) reweights the reference sums too, and loss {reading[0]!r} "
                "reads them: pass tail_logps.ref_chosen and tail_logps.ref_rejected (to "
                "packed_preference_loss: ref_token_logps), from the reference's per-token "
                "log-probs: a cache built with `fastdpo precompute-ref --per-token`"
            )
        if tails.ref_chosen is not None:
            ref_c, ref_r = _optional_pair(
                ("tail_logps.ref_chosen", tails.ref_chosen),
                ("tail_logps.ref_rejected", tails.ref_rejected),
                x.policy_chosen,
                x.policy_rejected,
            )
            sums["ref_chosen"] = ld_weighted(x.ref_chosen, ref_c, ld_alpha)
            sums["ref_rejected"] = ld_weighted(x.ref_rejected, ref_r, ld_alpha)
    return sums


def preference_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    *,
    loss: str | Mapping[str, float] = "sigmoid",
    beta: float = 0.1,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    ld_alpha: float | None = None,
    tail_logps: TailLogps | None = None,
    use_weighting: bool = False,
    chosen_log_sum_p2: Tensor | None = None,
    rejected_log_sum_p2: Tensor | None = None,
    **loss_params,
) -> tuple[Tensor, dict[str, Tensor]]:
    """A preference loss over per-sequence log-probs, and TRL-compatible metrics.

    Args:
        policy_chosen, policy_rejected: [P] float policy log-probs summed over each completion's
            tokens (for KTO: desirable [P_d] and undesirable [P_u] completions).
        ref_chosen, ref_rejected: the same under the reference model; required unless every
            loss is reference-free (simpo, orpo, sft). Treated like any input by autograd (pass
            them detached, as the reference cache does).
        loss: a registered name (see `LOSSES`), or a mapping {name: weight}: the loss is then
            sum(weight * loss_name), e.g. RPO = {"sigmoid": 1.0, "sft": 1.0}. The first entry is
            the main loss: the reward metrics follow its definition.
        beta: the losses' temperature / regularization strength (> 0).
        chosen_lengths, rejected_lengths: [P] completion token counts (int or float); required
            by ipo, simpo, orpo, sft. A per-token average divides by max(count, 1), so an
            empty completion (log-prob 0) averages 0.
        **loss_params: parameters of the losses (e.g. label_smoothing, gamma, tau, bco_state,
            kl); each goes to every component that accepts it, and one no component accepts is
            an error.

    TRL's loss options, with TRL 1.16's names and meanings (`fastdpo.losses.options`); each is
    refused for a loss it does not apply to:
        f_divergence_type, f_alpha_divergence_coef: f-DPO; "reverse_kl" (DPO), "forward_kl",
            "js_divergence", "alpha_divergence" (with alpha = f_alpha_divergence_coef). The
            losses on the score difference compare f'(pi / ref) instead of the log-ratios.
        ld_alpha, tail_logps: LD-DPO; with ld_alpha in [0, 1], the tokens of the longer
            completion past the pair's shared length count ld_alpha times, for policy and
            reference alike. `tail_logps` gives those tails' sums ([P] each; the reference's
            when a loss reads it); the log-probs above stay the full sums.
        use_weighting, chosen_log_sum_p2, rejected_log_sum_p2: WPO; each pair's loss is
            multiplied by exp(mean over its tokens of log p - log sum_v p_v^2), chosen times
            rejected, without gradient. The two tensors are [P] sums over each completion's
            tokens of log sum_v p_v^2 (the fused head's "log_sum_p2"); lengths are required.
    The reward and log-prob metrics read the LD-weighted sums, as TRL's do.

    Returns:
        (loss, metrics): the scalar loss in the log-probs' dtype; metrics are detached device
        tensors (no host sync) named as in TRL (see `reward_metrics`), plus "loss/<name>" for
        each component (unweighted) and the components' own (nll_loss, kl, ...).
    """
    components = _resolve_components(loss)
    options = LossOptions(
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        ld_alpha=ld_alpha,
        use_weighting=use_weighting,
    )
    options.check(spec for spec, _ in components)
    routed = _route_params(components, loss_params)
    x = _build_inputs(
        components,
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        chosen_lengths,
        rejected_lengths,
        beta,
    )
    x = _apply_options(x, components, options, tail_logps, chosen_log_sum_p2, rejected_log_sum_p2)
    total = None
    extra: dict[str, Tensor] = {}
    for spec, weight in components:
        out = spec.fn(x, **routed[spec.name])
        value, metrics = out if isinstance(out, tuple) else (out, {})
        extra[f"loss/{spec.name}"] = value.detach()
        extra.update(metrics)
        total = weight * value if total is None else total + weight * value
    metrics = reward_metrics(x, components[0][0])
    metrics.update(extra)
    return total, metrics
