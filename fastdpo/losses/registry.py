"""The loss registry (`LOSSES`, `register_loss`) and the parameter checks losses share."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor
LossFn = Callable[..., "Tensor | tuple[Tensor, dict[str, Tensor]]"]


@dataclass(frozen=True, kw_only=True)
class LossSpec:
    """A registered loss: its function and what it needs."""

    name: str
    fn: LossFn
    """fn(inputs: LossInputs, **params) -> scalar loss, or (scalar loss, extra metrics)."""
    needs_reference: bool
    """True if the loss reads reference log-probs (error when they are missing)."""
    needs_lengths: bool
    """True if the loss reads completion token counts (error when they are missing)."""
    length_normalized: bool
    """True if the loss compares per-token averages: the reward metrics then do too."""
    paired: bool
    """False for losses over unpaired desirable/undesirable completions (chosen and rejected
    may then differ in size)."""
    params: tuple[str, ...] = field(default=())
    """Keyword parameters the function accepts (read from its signature)."""
    f_divergence: bool = False
    """True if the loss reads the chosen and rejected scores through `LossInputs.scores` /
    `score_margin` (or reads no log-ratios at all), so `f_divergence_type` applies to it."""
    pair_weighting: bool = False
    """True if the loss reduces its per-pair values with `LossInputs.reduce`, so WPO's
    per-pair weights (`use_weighting`) apply to it."""
    ld_alpha: bool = False
    """True if LD-DPO's reweighted sums (`ld_alpha`) may replace the policy and reference sums
    the loss reads (its NLL terms read `LossInputs.chosen_plain`, the plain sums)."""


LOSSES: dict[str, LossSpec] = {}
"""Every registered loss by name."""


def register_loss(
    name: str,
    *,
    needs_reference: bool = True,
    needs_lengths: bool = False,
    length_normalized: bool = False,
    paired: bool = True,
    f_divergence: bool = False,
    pair_weighting: bool = False,
    ld_alpha: bool = False,
    replace: bool = False,
) -> Callable[[LossFn], LossFn]:
    """Decorator that registers `fn(inputs: LossInputs, *, param=default, ...)` under `name`.

    The function returns the scalar batch loss, or (loss, metrics) to add metrics of its own
    (device tensors, detached). Its keyword-only parameters become `preference_loss` keyword
    arguments. Example::

        @register_loss("my_dpo")
        def my_dpo(x: LossInputs, *, margin: float = 0.0) -> torch.Tensor:
            return -F.logsigmoid(x.beta * x.margin() - margin).mean()

        loss, metrics = preference_loss(pc, pr, rc, rr, loss="my_dpo", margin=0.5)

    `f_divergence`, `pair_weighting` and `ld_alpha` say which of TRL's loss options the
    function honours (see `LossSpec`); `preference_loss` refuses the others for it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a loss name must be a non-empty string, got {name!r}")

    def decorator(fn: LossFn) -> LossFn:
        if name in LOSSES and not replace:
            raise ValueError(
                f"a loss named {name!r} is already registered; pick another name or pass "
                "replace=True"
            )
        signature = inspect.signature(fn)
        params = tuple(
            p.name
            for p in signature.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        )
        LOSSES[name] = LossSpec(
            name=name,
            fn=fn,
            needs_reference=needs_reference,
            needs_lengths=needs_lengths or length_normalized,
            length_normalized=length_normalized,
            paired=paired,
            params=params,
            f_divergence=f_divergence,
            pair_weighting=pair_weighting,
            ld_alpha=ld_alpha,
        )
        return fn

    return decorator


def check_label_smoothing(loss: str, label_smoothing: float, *, allow_zero: bool = True) -> float:
    """`label_smoothing` as a float if it lies in [0, 0.5) (or (0, 0.5)); ValueError otherwise."""
    eps = float(label_smoothing)
    low_ok = eps >= 0.0 if allow_zero else eps > 0.0
    if not (low_ok and eps < 0.5):
        interval = "[0, 0.5)" if allow_zero else "(0, 0.5)"
        raise ValueError(f"loss {loss!r}: label_smoothing must be in {interval}, got {eps}")
    return eps


def check_beta(beta: float) -> float:
    """`beta` as a float if it is a positive finite number; TypeError / ValueError otherwise."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a number, got {beta!r}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive finite number, got {beta}")
    return float(beta)


def check_finite(loss: str, name: str, value: float) -> float:
    """`value` (parameter `name` of `loss`) as a float if it is finite; ValueError otherwise."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"loss {loss!r}: {name} must be a finite number, got {value}")
    return value


def check_reference_given(loss: str, ref_chosen: Tensor | None, ref_rejected: Tensor | None):
    """ValueError saying what to pass if `loss` (which reads reference log-probs) lacks them."""
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(
            f"loss {loss!r} needs reference log-probs: pass ref_chosen and ref_rejected (e.g. "
            "from fastdpo.ReferenceCache), or pick a reference-free loss (simpo, orpo, sft)"
        )
