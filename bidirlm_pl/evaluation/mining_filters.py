"""Positive-aware hard-negative selection: a rank window and margins relative to each row's positive score.

For every row, the candidates are its query's corpus entries ranked by cosine (highest first, the entries
equal to the query or to any positive of that query already removed). Walking the ranking:

* the first ``range_min`` candidates are skipped (reason ``rank``: the very top of a ranking is where
  unlabelled positives hide), and none past rank ``range_max`` is considered;
* ``relative_margin`` (TopK-PercPos, NV-Retriever): a candidate is kept only if its score is below
  ``relative_margin`` x the positive's score (0.95 in the paper); sentence-transformers'
  ``relative_margin=0.05`` is the same rule written as ``1 - 0.95`` (for a positive scoring above 0: it scales
  the positive's magnitude, so a negative positive score still bounds the candidates below it);
* ``absolute_margin``: kept only if its score is below the positive's score minus the margin (TopK-MarginPos;
  a negative margin allows negatives above the positive: ``-0.1`` is the Qwen3-Embedding mask of candidates
  scoring more than 0.1 above the positive);
* the first ``num_negatives`` candidates that pass are the row's negatives, in rank order.

Candidates after the last kept one are not examined, so they count as neither kept nor dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bidirlm_pl.core.errors import BidirLMError

REASONS = ("rank", "relative_margin", "absolute_margin")


@dataclass
class NegativeRule:
    """Which ranked candidates become a row's hard negatives (see the module docstring)."""

    num_negatives: int = 1
    range_min: int = 0
    range_max: int = 50
    relative_margin: float | None = 0.95
    absolute_margin: float | None = None

    def check(self) -> None:
        """A one-line error naming the first bad value."""
        if self.num_negatives < 1:
            raise BidirLMError(f"num_negatives {self.num_negatives} must be >= 1")
        if self.range_min < 0:
            raise BidirLMError(f"range_min {self.range_min} must be >= 0")
        if self.range_max - self.range_min < self.num_negatives:
            raise BidirLMError(f"range_max {self.range_max} must be >= range_min {self.range_min} + num_negatives "
                               f"{self.num_negatives}: the window must hold the negatives")
        if self.relative_margin is not None and not 0 < self.relative_margin <= 1:
            raise BidirLMError(f"relative_margin {self.relative_margin} must be in (0, 1]: negatives score below "
                               "relative_margin x the positive (NV-Retriever: 0.95), or none")
        if self.absolute_margin is not None and not -1 <= self.absolute_margin <= 1:
            raise BidirLMError(f"absolute_margin {self.absolute_margin} must be in [-1, 1]: negatives score below "
                               "the positive minus it, or none")


@dataclass
class Selection:
    """Per row: the kept corpus ids and scores (rank order); the scores of the dropped candidates per reason."""

    ids: list[list[int]]
    scores: list[list[float]]
    dropped: dict[str, torch.Tensor]


def select_negatives(scores_RK: torch.Tensor, ids_RK: torch.Tensor, positive_R: torch.Tensor,
                     rule: NegativeRule) -> Selection:
    """Apply ``rule`` to ranked candidates (scores descending, ``-inf`` where there is none) of every row."""
    valid = torch.isfinite(scores_RK)
    skipped = scores_RK[:, : rule.range_min][valid[:, : rule.range_min]]
    window = scores_RK[:, rule.range_min: rule.range_max]
    window_ids = ids_RK[:, rule.range_min: rule.range_max]
    valid = valid[:, rule.range_min: rule.range_max]
    positive = positive_R[:, None].to(window.dtype)
    relative_ok = window < rule.relative_margin * positive if rule.relative_margin is not None else valid
    absolute_ok = window < positive - rule.absolute_margin if rule.absolute_margin is not None else valid
    ok = valid & relative_ok & absolute_ok
    before = ok.long().cumsum(1) - ok.long()  # kept candidates ranked above each position
    examined = valid & (before < rule.num_negatives)
    take = ok & examined
    dropped_relative = examined & ~relative_ok
    dropped_absolute = examined & relative_ok & ~absolute_ok
    order = torch.argsort((~take).to(torch.int8), dim=1, stable=True)[:, : rule.num_negatives]
    kept_ids = window_ids.gather(1, order).tolist()
    kept_scores = window.gather(1, order).tolist()
    counts = take.sum(1).tolist()
    return Selection(
        ids=[row[:n] for row, n in zip(kept_ids, counts)],
        scores=[row[:n] for row, n in zip(kept_scores, counts)],
        dropped={"rank": skipped, "relative_margin": window[dropped_relative],
                 "absolute_margin": window[dropped_absolute]},
    )
