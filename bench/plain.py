"""The plain torch peers the benches compare against, on any device.

One process, no Ray, no Spark, the project's own model, loss and optimizers: the
alignment loop over in-memory pairs, the ranker loop over in-memory samples, and
one step of a large hashed table. `bench/align.py` and `bench/rank.py` run them on
the CPU beside Ray Train; `bench/gpu.py` runs them on CUDA and on the host's cores.
This module imports torch, numpy and pyarrow only (no storage stack), so it runs
on a bare GPU box.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from qarm_dist.align.loss import Batch, info_nce
from qarm_dist.align.model import ResidualTower
from qarm_dist.rank.embeddings import EmbeddingBagConfig, EmbeddingTables, sparse_optimizer
from qarm_dist.rank.features import ItemFeatures, featurize
from qarm_dist.rank.model import Ranker, RankerSpec, loss_fn


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _steady(times: list[float]) -> float:
    """The median epoch time after the first (warm-up, allocator growth, CUDA kernels' first load)."""
    return statistics.median(times[1:] if len(times) > 1 else times)


@dataclass
class PlainPairs:
    """The train pairs as rows of an in-memory content matrix, with their logQ terms."""

    x: torch.Tensor  # (items, dim) content embeddings, rows sorted by item id
    a: np.ndarray  # trigger rows of x
    b: np.ndarray  # target rows of x
    logq: torch.Tensor  # per row of x


@dataclass(frozen=True)
class AlignSettings:
    hidden: int
    lr: float
    weight_decay: float
    temperature: float
    logq: bool
    batch: int


def align_loop(data: PlainPairs, s: AlignSettings, epochs: int, device: str = "cpu") -> float:
    """Pairs/s of the alignment step (tower, global-batch InfoNCE, AdamW) over in-memory pairs."""
    x, logq = data.x.to(device), data.logq.to(device)
    a, b = torch.from_numpy(data.a).to(device), torch.from_numpy(data.b).to(device)
    torch.manual_seed(0)
    tower = ResidualTower(x.shape[1], s.hidden).to(device)
    opt = torch.optim.AdamW(tower.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    bs, times = s.batch, []
    gen = torch.Generator(device=device).manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(a), generator=gen, device=device)
        _sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(a) - bs + 1, bs):
            ia, ib = a[perm[i : i + bs]], b[perm[i : i + bs]]
            out = tower(torch.cat([x[ia], x[ib]]))
            batch = Batch(
                out[:bs], out[bs:], ia, ib, logq[ia] if s.logq else None, logq[ib] if s.logq else None
            )
            loss, _, _ = info_nce(batch, s.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return (len(a) // bs) * bs / _steady(times)


@dataclass(frozen=True)
class RankSettings:
    lr: float
    sparse_lr: float
    sparse_optimizer: str
    batch: int


def to_device(f: dict, device: str) -> dict:
    """A featurized batch with its tensors on ``device`` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in f.items()}


def rank_loop(
    rows: pa.Table, feats: ItemFeatures, spec: RankerSpec, s: RankSettings, epochs: int, device: str = "cpu"
) -> dict[str, float]:
    """Samples/s of the ranker step (featurize on the CPU, forward, BCE, AdamW + sparse optimizer).

    ``samples_per_s`` counts the whole loop; ``step_samples_per_s`` only the device work, timed
    over batches featurized beforehand (what a loader that keeps up would leave).
    """
    torch.manual_seed(0)
    model = Ranker(spec).to(device)
    opt_d = torch.optim.AdamW(model.dense.parameters(), lr=s.lr)
    opt_s = sparse_optimizer(s.sparse_optimizer, list(model.sparse.parameters()), s.sparse_lr)
    fspec, bs = spec.feature_spec(), s.batch
    rng = np.random.default_rng(0)

    def step(f: dict) -> None:
        loss, _ = loss_fn(model(f), f["labels"], f["label_mask"])
        opt_d.zero_grad()
        opt_s.zero_grad()
        loss.backward()
        opt_d.step()
        opt_s.step()

    times, step_times = [], []
    for _ in range(epochs):
        perm = rng.permutation(rows.num_rows)
        starts = range(0, rows.num_rows - bs + 1, bs)
        t0 = time.perf_counter()
        for i in starts:
            step(to_device(featurize(rows.take(perm[i : i + bs]), feats, fspec), device))
        _sync(device)
        times.append(time.perf_counter() - t0)
        ready = [to_device(featurize(rows.take(perm[i : i + bs]), feats, fspec), device) for i in starts]
        _sync(device)
        t0 = time.perf_counter()
        for f in ready:
            step(f)
        _sync(device)
        step_times.append(time.perf_counter() - t0)
    n = (rows.num_rows // bs) * bs
    return {"samples_per_s": n / _steady(times), "step_samples_per_s": n / _steady(step_times)}


def table_step(rows: int, dim: int, sparse: bool, batch: int, device: str = "cpu") -> dict[str, float]:
    """Step time of one ``rows`` x ``dim`` table trained on ``batch`` bags of 50 ids (Adagrad).

    Sparse: ``nn.EmbeddingBag(sparse=True)`` and a gradient of the rows the batch names; dense:
    ``sparse=False``, a gradient (and an Adagrad update) of the whole table every step.
    """
    tables = EmbeddingTables([EmbeddingBagConfig("item", rows, dim, ("item",))]).to(device)
    if not sparse:
        tables.tables["item"].sparse = False
    opt = (
        sparse_optimizer("adagrad", list(tables.parameters()), 0.05)
        if sparse
        else torch.optim.Adagrad(tables.parameters(), lr=0.05)
    )
    rng = np.random.default_rng(0)
    times = []
    for _ in range(6):
        ids = torch.from_numpy(rng.integers(1, rows, (batch, 50))).to(device)
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        tables("item", ids).pow(2).sum().backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {
        "mode": "sparse" if sparse else "dense",
        "rows": rows,
        "table_mb": rows * dim * 4 / 2**20,
        "step_s": statistics.median(times[1:]),
        "first_step_s": times[0],
    }
