"""QARM V2's two-stage history search: GSU picks, ESU attends.

- GSU (general search unit): score every history item by the inner product of
  its *frozen* reduced aligned embedding with the target's, and keep the top
  ``k``. It finds history items related to the target by business-aligned
  content, which an id or category match misses, and it is cheap (no
  gradient, one dot product per item), so it can scan long histories.
- ESU (exact search unit): multi-head attention of the target over the
  selected items' learned representations (item id + semantic-code
  embeddings), trained end to end.
"""

from __future__ import annotations

import torch
from torch import nn


def gsu_topk(
    target_emb: torch.Tensor, hist_emb: torch.Tensor, mask: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, k') of the k best-scoring valid history items and whether each pick is valid."""
    with torch.no_grad():
        scores = torch.einsum("be,bne->bn", target_emb, hist_emb).masked_fill(~mask, float("-inf"))
        k = min(k, scores.shape[1])
        top, idx = scores.topk(k, dim=1)
    return idx, torch.isfinite(top)


class ESU(nn.Module):
    def __init__(self, d: int, heads: int = 2):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, target: torch.Tensor, picked: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """target (B, d), picked (B, k, d), valid (B, k) → (B, d); rows with nothing valid give 0."""
        none = ~valid.any(dim=1)
        key_padding = ~valid
        key_padding[none] = False  # attention needs one key; its output is zeroed below
        out, _ = self.attn(
            target[:, None, :], picked, picked, key_padding_mask=key_padding, need_weights=False
        )
        return out[:, 0].masked_fill(none[:, None], 0.0)
