"""In-batch contrastive loss over the global batch of every worker.

QARM aligns items with a batch-contrastive (InfoNCE) loss: in a batch of
behaviour pairs (a_i, b_i), b_i is a_i's positive and every other item of the
batch is a negative. More negatives help, so the batch is the *global* one:
each worker gathers the embeddings of all workers.

How the gradient stays exact (the test: 2 workers with batch B give the loss
and gradients of 1 worker with batch 2B). Each worker

1. gathers every worker's embeddings with a differentiable all-gather, so the
   backward pass sends each worker the gradient its rows receive from every
   other worker's loss (`_AllGather`);
2. computes the loss of its own rows against all columns (open_clip's
   ``local_loss``: B x WB logits per worker, not WB x WB), normalised by the
   global batch, so the workers' losses add up to the global loss;
3. scales that by the world size before backward, because DDP *averages*
   gradients over workers while the global loss is their *sum*.

The loss is symmetric (a→b and b→a). Two corrections are optional:
- false negatives: when an item occurs twice in the global batch (a popular
  target, or the query item among the candidates), those logits are masked
  instead of being pushed apart;
- popularity (logQ): in-batch negatives are drawn in proportion to how often
  items occur in pairs, which over-penalises popular items; subtracting each
  candidate's log frequency from its logit (Yi et al., RecSys 2019) corrects
  the sampled softmax toward the full one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

_MASKED = -1e9  # a logit that never wins and whose softmax weight is 0 in float32


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """All-gather whose backward hands each worker the summed gradient of its own block.

    Backward is an all-reduce of the gathered gradient, then the worker's slice: gloo has no
    reduce-scatter, and an all-reduce works on every backend (it moves W x more bytes than a
    reduce-scatter would, which is noise next to the forward at these sizes).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, size = world()
        ctx.rows = (rank * x.shape[0], (rank + 1) * x.shape[0])
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        lo, hi = ctx.rows
        return grad[lo:hi]


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every worker's rows of ``x`` in rank order, differentiable (identity on one worker).

    Workers must pass the same number of rows (the trainer drops the last partial batch).
    """
    _, size = world()
    if size == 1:
        return x
    if x.requires_grad:
        return _AllGather.apply(x)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@dataclass
class Batch:
    """One side-by-side batch of pairs: embeddings, item ids, and log item frequencies (or None)."""

    a: torch.Tensor  # (n, d) L2-normalised trigger embeddings
    b: torch.Tensor  # (n, d) L2-normalised target embeddings
    a_ids: torch.Tensor  # (n,) int64
    b_ids: torch.Tensor  # (n,) int64
    a_logq: torch.Tensor | None = None  # (n,) log frequency of the trigger item in the pairs
    b_logq: torch.Tensor | None = None


def _direction(
    q: torch.Tensor,
    c: torch.Tensor,
    q_ids: torch.Tensor,
    pos_ids: torch.Tensor,
    c_ids: torch.Tensor,
    c_logq: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    mask_duplicates: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and correct count of queries ``q`` against candidates ``c``."""
    logits = q @ c.T / temperature
    if c_logq is not None:
        logits = logits - c_logq[None, :]
    if mask_duplicates:
        # a candidate that is the query's own positive item (again) or the query item itself
        dup = (c_ids[None, :] == pos_ids[:, None]) | (c_ids[None, :] == q_ids[:, None])
        dup[torch.arange(len(labels)), labels] = False
        logits = logits.masked_fill(dup, _MASKED)
    loss = F.cross_entropy(logits, labels, reduction="sum")
    correct = (logits.argmax(dim=1) == labels).sum()
    return loss, correct


def info_nce(
    batch: Batch, temperature: float, mask_duplicates: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of this worker's rows against the global batch.

    Returns ``(to_backward, loss, accuracy)``: ``to_backward`` is this worker's
    share of the global loss times the world size (call ``.backward()`` on it
    under DDP); ``loss`` and ``accuracy`` are the global batch's values, the same
    on every worker (detached).
    """
    rank, size = world()
    n = batch.a.shape[0]
    a, b = gather(batch.a), gather(batch.b)
    a_ids, b_ids = gather(batch.a_ids), gather(batch.b_ids)
    a_logq = gather(batch.a_logq) if batch.a_logq is not None else None
    b_logq = gather(batch.b_logq) if batch.b_logq is not None else None
    rows = slice(rank * n, (rank + 1) * n)
    labels = torch.arange(rank * n, (rank + 1) * n, device=a.device)
    loss_ab, ok_ab = _direction(
        a[rows], b, a_ids[rows], b_ids[rows], b_ids, b_logq, labels, temperature, mask_duplicates
    )
    loss_ba, ok_ba = _direction(
        b[rows], a, b_ids[rows], a_ids[rows], a_ids, a_logq, labels, temperature, mask_duplicates
    )
    total = a.shape[0]
    local = (loss_ab + loss_ba) / (2 * total)
    stats = torch.stack([local.detach(), (ok_ab + ok_ba).to(local.dtype)])
    if size > 1:
        dist.all_reduce(stats)
    return local * size, stats[0], stats[1] / (2 * total)
