"""From sample rows to the ranker's input tensors: item side features, hashing, dedup.

`ItemFeatures` holds, per item id, what the ranker looks up about an item: the
semantic codes of the chosen codebook versions (RQ levels, FSQ, VQ neighbour
ids) and the aligned embedding reduced by a seeded random projection (a
Johnson-Lindenstrauss map: it keeps inner products in expectation, needs no
fit, so it cannot leak the evaluation window). Each training worker streams it
from `item_codes` and `item_aligned_emb` itself (never through the driver):
memory is items x (levels + VQ length + projection) numbers per worker, the
analogue of the item-feature cache a serving system keeps. An item without
codes (not yet assigned) gets the padding id 0 in every code table: the
documented fallback, counted in the training metrics.

`featurize` turns a batch of samples into tensors. Item features are computed
once per distinct item of the batch (targets and history together) and
indexed by position, so a history of 50 items with 25 VQ neighbours each costs
a lookup per distinct item, not per position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from qarm_dist.codebook import store
from qarm_dist.codebook.fsq import fsq_pack
from qarm_dist.hashing import mix64
from qarm_dist.io.delta import Tables

PAD = 0  # row 0 of every table is padding (and the fallback for unknown codes)


def hashed_rows(ids: np.ndarray, rows: int, salt: int) -> np.ndarray:
    """Table rows 1..rows-1 for arbitrary int64 ids (row 0 stays padding); negative ids → padding."""
    ids = np.asarray(ids, dtype=np.int64)
    out = (1 + mix64(ids, salt) % np.uint64(rows - 1)).astype(np.int64)
    return np.where(ids < 0, PAD, out)


@dataclass
class Codes:
    """One codebook version's codes, aligned with `ItemFeatures.ids`; 0 = no code."""

    version: int
    k: list[int]  # centroids per RQ level
    rq: np.ndarray  # (n, L) int64, code + 1
    vq: np.ndarray  # (n, K) int64 neighbour item ids, -1 = none
    fsq: np.ndarray | None  # (n,) int64 packed FSQ code + 1
    fsq_size: int  # distinct FSQ codes


@dataclass
class ItemFeatures:
    ids: np.ndarray  # (n,) sorted item ids
    codes: dict[str, Codes] = field(default_factory=dict)  # by role: "rq", "rkfsq"
    emb: np.ndarray | None = None  # (n, e) projected aligned embeddings

    def rows(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index of each id in `ids` and whether it is there."""
        if len(self.ids) == 0:
            return np.zeros(len(item_ids), np.int64), np.zeros(len(item_ids), bool)
        r = np.minimum(np.searchsorted(self.ids, item_ids), len(self.ids) - 1)
        return r, self.ids[r] == item_ids


def code_versions(tables: Tables) -> dict[str, int]:
    """The latest codebook version of each role: ``rq`` (no FSQ) and ``rkfsq`` (with FSQ)."""
    out: dict[str, int] = {}
    for v in store.versions(tables):
        out["rkfsq" if store.load(tables, v).fsq is not None else "rq"] = v
    return out


def _codes_of(tables: Tables, version: int) -> tuple[np.ndarray, Codes]:
    cb = store.load(tables, version)
    ids, rq, vq, fsq = [], [], [], []
    for rb in tables.read_batches("item_codes"):
        keep = pc.equal(rb.column("version"), version)
        if not pc.any(keep).as_py():
            continue
        t = pa.Table.from_batches([rb]).filter(keep)
        n = t.num_rows
        ids.append(t.column("item_id").to_numpy())
        rq.append(pc.list_flatten(t.column("rq")).to_numpy().reshape(n, cb.levels).astype(np.int64) + 1)
        flat_vq = pc.list_flatten(t.column("vq")).to_numpy()
        vq.append(flat_vq.reshape(n, len(flat_vq) // max(n, 1)))
        if cb.fsq is not None:
            m = len(cb.fsq.levels)
            f = pc.list_flatten(t.column("fsq")).to_numpy().reshape(n, m)
            fsq.append(fsq_pack(f, cb.fsq.levels).astype(np.int64) + 1)
    if not ids:
        raise FileNotFoundError(
            f"table 'item_codes' has no rows of codebook version {version}: run `qarm codebook assign`"
        )
    order = np.argsort(np.concatenate(ids))
    size = int(np.prod(cb.fsq.levels)) if cb.fsq is not None else 0
    return np.concatenate(ids)[order], Codes(
        version,
        [len(c) for c in cb.book.centroids],
        np.concatenate(rq)[order],
        np.concatenate(vq)[order],
        np.concatenate(fsq)[order] if fsq else None,
        size,
    )


def _projected_embeddings(tables: Tables, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ids and their aligned embeddings x a seeded Gaussian projection (d -> dim)."""
    snap = tables.snapshot("item_aligned_emb")
    proj = np.random.default_rng(seed).standard_normal((snap.dim, dim)).astype(np.float32) / np.sqrt(dim)
    ids, parts = [], []
    for rb in tables.read_batches("item_aligned_emb", columns=["item_id", "emb"], snapshot=snap):
        item = rb.column("item_id").to_numpy()
        ids.append(item)
        parts.append(pc.list_flatten(rb.column("emb")).to_numpy().reshape(len(item), snap.dim) @ proj)
    all_ids = np.concatenate(ids)
    order = np.argsort(all_ids)
    return all_ids[order], np.concatenate(parts)[order]


def _align(src_ids: np.ndarray, values: np.ndarray, ids: np.ndarray, fill: float | int) -> np.ndarray:
    """Rows of ``values`` (keyed by sorted ``src_ids``) for each of ``ids``, ``fill`` where absent."""
    r = np.minimum(np.searchsorted(src_ids, ids), len(src_ids) - 1)
    ok = (src_ids[r] == ids).reshape(-1, *([1] * (values.ndim - 1)))
    return np.where(ok, values[r], fill)


def check_feature_tables(tables: Tables, versions: dict[str, int], emb_dim: int | None) -> None:
    """Snapshot, and so validate on read, the tables `load_item_features` will read.

    The trainer and the scorer call this in the driver: bad rows then fail the job with one clear
    error before any worker starts, instead of failing every worker (and every restart) one by one.
    """
    if versions:
        tables.snapshot("item_codes")
    if emb_dim:
        tables.snapshot("item_aligned_emb")


def load_item_features(
    tables: Tables, versions: dict[str, int], emb_dim: int | None, seed: int
) -> ItemFeatures:
    """Codes of ``versions`` (role → codebook version) and, with ``emb_dim``, projected aligned embeddings.

    Items are the union of every source; an item missing from one source gets its padding there.
    """
    per_role = {role: _codes_of(tables, v) for role, v in versions.items()}
    emb = _projected_embeddings(tables, emb_dim, seed) if emb_dim else None
    sources = [i for i, _ in per_role.values()] + ([emb[0]] if emb is not None else [])
    ids = np.unique(np.concatenate(sources)) if sources else np.zeros(0, np.int64)
    feats = ItemFeatures(ids)
    for role, (role_ids, c) in per_role.items():
        c.rq = _align(role_ids, c.rq, ids, PAD)
        c.vq = _align(role_ids, c.vq, ids, -1)
        c.fsq = _align(role_ids, c.fsq, ids, PAD) if c.fsq is not None else None
        feats.codes[role] = c
    if emb is not None:
        feats.emb = _align(emb[0], emb[1], ids, 0.0).astype(np.float32)
    return feats


@dataclass(frozen=True)
class FeatureSpec:
    """What `featurize` builds: table sizes and which item features the variant uses."""

    user_rows: int
    item_rows: int
    ngram_rows: int
    roles: tuple[str, ...]  # RQ-style code features used, by role ("rq", "rkfsq")
    vq: bool  # VQ code (neighbour ids) of the "rq" role's version
    emb: bool
    tasks: tuple[str, ...]
    exposure_task: str = "click"  # the only task sampled negatives carry a label for


def featurize(batch: pa.Table, feats: ItemFeatures, spec: FeatureSpec) -> dict[str, Any]:
    """Tensors for one batch of samples (see `qarm_dist.rank.model.Ranker.forward`)."""
    b = batch.num_rows
    user = batch.column("user_id").to_numpy()
    target = batch.column("item_id").to_numpy()
    hist = (
        batch.column("history").combine_chunks()
        if isinstance(batch.column("history"), pa.ChunkedArray)
        else batch.column("history")
    )
    lengths = pc.list_value_length(hist).to_numpy(zero_copy_only=False)
    n = max(int(lengths.max()) if b else 0, 1)
    flat = pc.list_flatten(hist).to_numpy()
    # right-align histories so the latest item is always in the last column
    pos = np.arange(n)[None, :] >= (n - lengths)[:, None]
    hist_ids = np.full((b, n), -1, np.int64)
    hist_ids[pos] = flat
    uniq, inverse = np.unique(np.concatenate([target, flat]), return_inverse=True)
    u = len(uniq)
    hist_pos = np.full((b, n), u, np.int64)  # u = the padding position (a zero row)
    hist_pos[pos] = inverse[b:]
    out: dict[str, Any] = {
        "user": torch.from_numpy(hashed_rows(user, spec.user_rows, 11)),
        "target_pos": torch.from_numpy(inverse[:b].astype(np.int64)),
        "hist_pos": torch.from_numpy(hist_pos),
        "hist_mask": torch.from_numpy(pos),
        "item": torch.from_numpy(hashed_rows(uniq, spec.item_rows, 13)),
    }
    r, found = feats.rows(uniq)
    out["missing_codes"] = int((~found).sum()) if (spec.roles or spec.vq) else 0
    for role in spec.roles:
        c = feats.codes[role]
        rq = np.where(found[:, None], c.rq[r], PAD)
        for lv in range(rq.shape[1]):
            out[f"{role}_l{lv}"] = torch.from_numpy(rq[:, lv])
        for width in range(2, rq.shape[1] + 1):  # prefix n-grams (c1, c2), (c1, c2, c3), ...
            key = np.zeros(u, np.uint64)
            for lv in range(width):
                key = mix64(key ^ rq[:, lv].astype(np.uint64), 17 + lv)
            rows = (1 + key % np.uint64(spec.ngram_rows - 1)).astype(np.int64)
            out[f"{role}_p{width}"] = torch.from_numpy(np.where(rq[:, width - 1] == PAD, PAD, rows))
        if c.fsq is not None:
            out[f"{role}_fsq"] = torch.from_numpy(np.where(found, c.fsq[r], PAD))
    if spec.vq:
        vq = np.where(found[:, None], feats.codes["rq"].vq[r], -1)
        out["vq"] = torch.from_numpy(hashed_rows(vq, spec.item_rows, 19))
    if spec.emb:
        out["emb"] = torch.from_numpy(np.where(found[:, None], feats.emb[r], 0.0).astype(np.float32))
    labels = np.stack([batch.column(t).to_numpy().astype(np.float32) for t in spec.tasks], axis=1)
    sampled = batch.column("sampled").to_numpy() == 1
    mask = np.ones_like(labels, dtype=bool)
    mask[sampled] = np.array([t == spec.exposure_task for t in spec.tasks])
    out["labels"] = torch.from_numpy(labels)
    out["label_mask"] = torch.from_numpy(mask)
    return out
