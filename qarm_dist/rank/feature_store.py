"""The ranker's item-feature cache, loaded from `item_codes` and `item_aligned_emb`.

Each training worker and scorer streams it from the tables itself (never through
the driver): memory is items x (levels + VQ length + projection) numbers per
process, the analogue of the item-feature cache a serving system keeps. The
aligned embedding is reduced by a seeded random projection (a Johnson-Lindenstrauss
map: it keeps inner products in expectation and needs no fit, so it cannot leak the
evaluation window). `qarm_dist.rank.features` turns batches into tensors with it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qarm_dist.codebook import store
from qarm_dist.codebook.fsq import fsq_pack
from qarm_dist.io.delta import Tables
from qarm_dist.rank.features import PAD, Codes, ItemFeatures


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
