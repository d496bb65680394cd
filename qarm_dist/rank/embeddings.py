"""Embedding tables declared as data, with sparse gradients on CPU.

A table is an `EmbeddingBagConfig` (the shape of TorchRec's
``torchrec.EmbeddingBagConfig``: name, rows, dim, the features it serves,
pooling), so the model code never says where or how a table lives. The backend
here is torch's own ``nn.EmbeddingBag(sparse=True)``: a step's gradient holds
only the rows the batch touched, and a sparse-capable optimizer updates only
those, so a 10M-row table trains on CPU without a dense gradient of the whole
table per step. (TorchRec's sharded backend is the GPU-cluster path; its CPU
wheels do not load next to this torch, see docs/architecture.md.)

Row 0 of every table is padding: it is excluded from bag means and never
trained, and ids with no value (no code, no history) map to it.

Distributed: the tables are not inside DDP. After backward each worker
all-reduces its sparse gradients (`sync_sparse_grads`, gloo supports sparse
all-reduce) and divides by the world size, which is exactly DDP's averaging
for the dense parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# The sparse gradients here are built by torch's own EmbeddingBag backward, so they are valid by
# construction; opting out explicitly also silences the per-step "invariant checks disabled" warning.
torch.sparse.check_sparse_tensor_invariants.disable()


@dataclass(frozen=True)
class EmbeddingBagConfig:
    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: tuple[str, ...]
    pooling: str = "mean"  # "mean" or "sum" over a bag (a single id is a bag of one)


class EmbeddingTables(nn.Module):
    """One ``nn.EmbeddingBag(sparse=True)`` per config; look features up by name."""

    def __init__(self, configs: Iterable[EmbeddingBagConfig], init_std: float = 0.05):
        super().__init__()
        self.configs = {c.name: c for c in configs}
        self.by_feature = {f: c.name for c in self.configs.values() for f in c.feature_names}
        self.tables = nn.ModuleDict()
        for c in self.configs.values():
            t = nn.EmbeddingBag(c.num_embeddings, c.embedding_dim, mode=c.pooling, sparse=True, padding_idx=0)
            nn.init.normal_(t.weight, std=init_std)
            with torch.no_grad():
                t.weight[0].zero_()
            self.tables[c.name] = t

    def forward(self, feature: str, ids: torch.Tensor) -> torch.Tensor:
        """(n,) ids → (n, dim); (n, k) ids → (n, dim) pooled over each row's k ids (padding excluded).

        The table is read once per *distinct* id and the bags are pooled from those rows, so the
        sparse gradient has one row per distinct id, not one per position. Bags repeat ids heavily
        (a batch's VQ codes on the large world: 347k positions, 19k distinct rows), and that
        gradient's size is what the coalesce, the optimizer and the workers' all-reduce pay for.
        """
        table = self.tables[self.by_feature[feature]]
        bags = ids.reshape(len(ids), -1)
        if bags.numel() == 0:
            return table(bags)
        distinct, position = torch.unique(bags, return_inverse=True)
        rows = table(distinct[:, None])  # padding (id 0, first when present) reads as a zero row
        pad = 0 if int(distinct[0]) == 0 else None
        return F.embedding_bag(position, rows, mode=table.mode, padding_idx=pad)


def sync_sparse_grads(tables: EmbeddingTables) -> None:
    """Average every table's sparse gradient over the workers (a no-op on one worker)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    size = dist.get_world_size()
    for t in tables.tables.values():
        if t.weight.grad is None:
            continue
        g = t.weight.grad.coalesce()
        dist.all_reduce(g)
        t.weight.grad = g.coalesce() / size


def sparse_optimizer(name: str, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """An optimizer that updates only the rows a sparse gradient names."""
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    if name == "sparse_adam":
        return torch.optim.SparseAdam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"unknown sparse optimizer {name!r}: adagrad, sparse_adam or sgd")
