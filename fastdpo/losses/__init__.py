"""Preference losses over per-sequence log-probs, a registry of them by name, and their metrics.

Every loss is a small pure function of per-sequence tensors: summed completion log-probs of the
policy (and of the reference model, for losses that need one), completion token counts, and
`beta`. The same functions serve the pure-PyTorch path of `fastdpo.ops.preference_loss` (which
first sums packed per-token log-probs per sequence); the Triton kernel re-implements the common
few, and the tests tie both to one float64 formula each.

Notation in the docstrings, per pair p (all [P]):

    pi_c, pi_r    policy log-probs of the chosen / rejected completion, summed over its tokens
    ref_c, ref_r  the same under the reference model
    L_c, L_r      completion token counts; avg(.) divides a sum by its count
    rho_c = pi_c - ref_c, rho_r = pi_r - ref_r        log-ratios ("implicit rewards" / beta)
    m = rho_c - rho_r                                  the DPO margin (logits in TRL's code)
    sigma = logistic sigmoid, softplus(x) = log(1 + e^x) = -log sigma(-x)

Unless a docstring says otherwise the batch loss is the mean of the per-pair losses.

Public entry point: `preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
*, loss="sigmoid", beta=0.1, ...) -> (loss, metrics)`. `loss` is a registered name, or a mapping
{name: weight} whose weighted sum is the loss (RPO = {"sigmoid": 1.0, "sft": alpha}). Add a loss
with the `register_loss` decorator.

Modules: `inputs` (LossInputs), `registry` (LOSSES, register_loss, parameter checks),
`options` (TRL's f-divergences, LD-DPO, WPO), `pairwise` (the reference-based paired losses),
`reference_free` (simpo, orpo, sft), `kto`, `metrics` (reward_metrics, head_metrics) and `api`
(preference_loss). Importing the package registers every
loss.
"""

from fastdpo.losses.api import preference_loss
from fastdpo.losses.inputs import LossInputs
from fastdpo.losses.kto import kto
from fastdpo.losses.metrics import HEAD_METRIC_STATS, head_metrics, reward_metrics
from fastdpo.losses.options import (
    F_DIVERGENCE_TYPES,
    LOSS_OPTIONS,
    LossOptions,
    TailLogps,
    f_divergence_scores,
    ld_weighted,
    wpo_weights,
)
from fastdpo.losses.pairwise import (
    RunningMean,
    aot,
    aot_unpaired,
    apo_down,
    apo_zero,
    bco_pair,
    discopop,
    exo_pair,
    hinge,
    ipo,
    nca_pair,
    robust,
    sigmoid,
    sigmoid_norm,
    sppo_hard,
)
from fastdpo.losses.reference_free import _log1mexp as _log1mexp  # tests read it
from fastdpo.losses.reference_free import orpo, sft, simpo
from fastdpo.losses.registry import (
    LOSSES,
    LossFn,
    LossSpec,
    check_beta,
    check_finite,
    check_label_smoothing,
    check_reference_given,
    register_loss,
)

__all__ = [
    "F_DIVERGENCE_TYPES",
    "HEAD_METRIC_STATS",
    "LOSSES",
    "LOSS_OPTIONS",
    "LossFn",
    "LossInputs",
    "LossOptions",
    "LossSpec",
    "RunningMean",
    "TailLogps",
    "aot",
    "aot_unpaired",
    "apo_down",
    "apo_zero",
    "bco_pair",
    "check_beta",
    "check_finite",
    "check_label_smoothing",
    "check_reference_given",
    "discopop",
    "exo_pair",
    "f_divergence_scores",
    "head_metrics",
    "hinge",
    "ipo",
    "kto",
    "ld_weighted",
    "nca_pair",
    "orpo",
    "preference_loss",
    "register_loss",
    "reward_metrics",
    "robust",
    "sft",
    "sigmoid",
    "sigmoid_norm",
    "simpo",
    "sppo_hard",
    "wpo_weights",
]
