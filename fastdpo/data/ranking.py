"""Pairing policies: turning one prompt with several scored responses into preference pairs.

- "best_vs_worst": one pair, the highest score against the lowest.
- "best_vs_each": the highest score against every response scored lower.
- "all_pairs": every ordered pair (i, j) with score[i] - score[j] >= min_score_gap.

Every policy keeps only pairs whose score gap is positive and at least `min_score_gap`. Ties
are broken by position (the earlier response wins), so the pairs of a row never change.
"""

from __future__ import annotations

from typing import Literal

PairingPolicy = Literal["best_vs_worst", "best_vs_each", "all_pairs"]
PAIRING_POLICIES = ("best_vs_worst", "best_vs_each", "all_pairs")


def check_pairing(pairing: str, min_score_gap: float) -> None:
    if pairing not in PAIRING_POLICIES:
        raise ValueError(f"pairing must be one of {PAIRING_POLICIES}, got {pairing!r}")
    if min_score_gap < 0:
        raise ValueError(f"min_score_gap must be >= 0, got {min_score_gap}")


def rank_pairs(
    scores: list[float], pairing: PairingPolicy, min_score_gap: float = 0.0
) -> list[tuple[int, int]]:
    """(chosen index, rejected index) pairs for `scores` under `pairing`, possibly none."""
    check_pairing(pairing, min_score_gap)

    def keeps(i: int, j: int) -> bool:
        gap = scores[i] - scores[j]
        return gap > 0 and gap >= min_score_gap

    n = len(scores)
    if n < 2:
        return []
    # Highest score first; the earlier position first among equal scores.
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    best = order[0]
    if pairing == "best_vs_worst":
        worst = max(range(n), key=lambda i: (-scores[i], i))
        return [(best, worst)] if keeps(best, worst) else []
    if pairing == "best_vs_each":
        return [(best, j) for j in range(n) if keeps(best, j)]
    return [(i, j) for i in order for j in order if keeps(i, j)]
