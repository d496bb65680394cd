"""Target-aware attention over the user's history (DIN, Zhou et al. 2018).

The target item attends over the history items: a small MLP scores each
(target, history item) from [t, h, t * h, t - h], and the history is pooled
with those weights. When item representations carry semantic codes, this is
QARM's cross feature: the target's codes meet the history's codes, so a
history item sharing a code prefix with a cold target still lights up.
Unlike the original DIN, weights are a softmax over the valid positions
(padding masked), which keeps the pooled vector on the scale of one item.
"""

from __future__ import annotations

import torch
from torch import nn


class DIN(nn.Module):
    def __init__(self, d: int, hidden: int = 64):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(4 * d, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, target: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """target (B, d), hist (B, N, d), mask (B, N) bool → (B, d)."""
        t = target[:, None, :].expand_as(hist)
        logits = self.score(torch.cat([t, hist, t * hist, t - hist], dim=-1)).squeeze(-1)
        logits = logits.masked_fill(~mask, float("-inf"))
        w = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with no history pools to 0
        return torch.einsum("bn,bnd->bd", w, hist)
