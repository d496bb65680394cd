"""Hit rate of held-out behaviour pairs: raw content vs aligned embeddings (QARM's alignment metric).

For each held-out pair (a, b), in both directions, the query item's embedding
searches all items (faiss, exact inner product on L2-normalised vectors, the
query item itself excluded) and it is a hit at K when the other item is among
the K nearest. Held-out pairs come from the evaluation window and the models
are trained on train-window pairs only, so nothing leaks (DESIGN.md,
"Evaluation protocol"). Aligned figures are means over seeds with their spread.

A behaviour-only baseline sits beside them: ALS item factors fitted on the
train window's positives (the U2I model of `qarm pairs`). It knows behaviour
but not content, so items without train interactions (cold start) are never
found by it; the aligned tower reaches them through their content.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qarm_dist import models
from qarm_dist.align.infer import aligned_batches
from qarm_dist.config import QarmConfig
from qarm_dist.io.delta import TableError, Tables

log = logging.getLogger(__name__)


def hit_rate(
    item_ids: np.ndarray, vectors: np.ndarray, query_ids: np.ndarray, target_ids: np.ndarray, ks: list[int]
) -> dict[int, float]:
    """Share of queries whose target is among the query item's ``k`` nearest items, for each ``k``.

    ``vectors`` (n, d) are the items ``item_ids`` (n,); similarity is the inner product of
    L2-normalised rows. A query or target id missing from ``item_ids`` is a miss.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    faiss.normalize_L2(x)
    order = np.argsort(item_ids)
    sorted_ids = item_ids[order]
    row = np.minimum(np.searchsorted(sorted_ids, query_ids), len(sorted_ids) - 1)
    known = sorted_ids[row] == query_ids
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    k_max = max(ks)
    _, nn = index.search(x[order[row[known]]], min(k_max + 1, len(item_ids)))
    nn_ids = item_ids[nn]
    # drop the query item itself, keeping the others' order (stable sort pushes it last)
    is_self = nn_ids == query_ids[known][:, None]
    nn_ids = np.take_along_axis(nn_ids, np.argsort(is_self, axis=1, kind="stable"), axis=1)[:, :k_max]
    found = nn_ids == target_ids[known][:, None]
    m = max(len(query_ids), 1)
    return {k: float(found[:, :k].any(axis=1).sum()) / m for k in ks}


def nearest_neighbours(
    tables: Tables, table: str, query_ids: Iterable[int], k: int = 10, version: int | None = None
) -> dict[int, list[tuple[int, float]]]:
    """The ``k`` items most similar (cosine) to each of a few query items in an embedding table.

    For looking at a handful of items (notebooks, debugging), at any table size: the table is
    streamed twice (the queries' vectors, then a running top-k over each batch), so memory is
    O(queries x (k + dim) + one batch). The query item itself is left out; a query id missing from
    the table gets no entry. Returns ``{query id: [(item id, cosine), ...]}``, most similar first.
    """
    want = np.unique(np.asarray(list(query_ids), dtype=np.int64))
    snap = tables.snapshot(table, version)
    cols = ["item_id", "emb"]
    found = [
        b.filter(pc.is_in(b.column("item_id"), value_set=pa.array(want)))
        for b in tables.read_batches(table, columns=cols, snapshot=snap)
    ]
    q_ids, q = _collect(found) if any(b.num_rows for b in found) else (np.zeros(0, np.int64), None)
    if q is None:
        return {}
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    best_s = np.full((len(q_ids), k), -np.inf, np.float32)
    best_i = np.full((len(q_ids), k), -1, np.int64)
    for rb in tables.read_batches(table, columns=cols, snapshot=snap):
        if rb.num_rows == 0:
            continue
        ids, x = _collect([rb])
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        s = q @ x.T
        s[q_ids[:, None] == ids[None, :]] = -np.inf
        all_s = np.concatenate([best_s, s], axis=1)
        all_i = np.concatenate([best_i, np.broadcast_to(ids, s.shape)], axis=1)
        top = np.argpartition(-all_s, min(k, all_s.shape[1] - 1), axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
    return {
        int(qid): [(int(i), float(s)) for i, s in zip(best_i[r], best_s[r]) if i >= 0 and np.isfinite(s)]
        for r, qid in enumerate(q_ids)
    }


def _collect(
    batches: Iterable[pa.RecordBatch | pa.Table], column: str = "emb"
) -> tuple[np.ndarray, np.ndarray]:
    """Ids and vectors of streamed batches: the exact search index needs them all (n x d float32)."""
    ids, vecs = [], []
    for b in batches:
        if b.num_rows == 0:
            continue
        col = b.column(column)
        dim = col.type.list_size if pa.types.is_fixed_size_list(col.type) else len(col[0])
        ids.append(b.column("item_id").to_numpy())
        vecs.append(pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim))
    return np.concatenate(ids), np.concatenate(vecs)


def heldout_queries(tables: Tables, version: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(query ids, target ids, held-out pairs): each held-out pair in both directions."""
    a, b = [], []
    for rb in tables.read_batches("item_pairs", version, ["trigger_id", "target_id", "split"]):
        keep = pc.equal(rb.column("split"), "heldout")
        a.append(pc.filter(rb.column("trigger_id"), keep).to_numpy())
        b.append(pc.filter(rb.column("target_id"), keep).to_numpy())
    a_ids = np.concatenate(a) if a else np.zeros(0, np.int64)
    b_ids = np.concatenate(b) if b else np.zeros(0, np.int64)
    if len(a_ids) == 0:
        raise TableError(
            "item_pairs",
            "split",
            0,
            tables.snapshot("item_pairs", version).rows,
            "are held out: the evaluation window produced no pairs, so there is nothing to evaluate",
        )
    return np.concatenate([a_ids, b_ids]), np.concatenate([b_ids, a_ids]), len(a_ids)


def behaviour_factors(cfg: QarmConfig, tables: Tables) -> tuple[np.ndarray, np.ndarray]:
    """ALS item factors on train-window positives (Spark): the behaviour-only baseline's embedding."""
    from qarm_dist.data.split import tables_eval_start
    from qarm_dist.engines import spark_session
    from qarm_dist.pairs.stage import positive_events, train_positives
    from qarm_dist.pairs.u2i import factor_arrays, item_factors

    pc_ = cfg.pairs
    spark = spark_session(cfg)
    events = positive_events(tables.spark(spark, "interactions"), pc_.positive)
    train_pos = train_positives(events, tables_eval_start(tables, cfg.split.eval_fraction))
    return factor_arrays(
        item_factors(train_pos, pc_.als_rank, pc_.als_iters, pc_.als_reg, pc_.als_alpha, pc_.seed)
    )


def _summary(per_seed: list[dict[int, float]], ks: list[int]) -> tuple[dict[str, float], dict[str, float]]:
    mean = {str(k): float(np.mean([r[k] for r in per_seed])) for k in ks}
    std = {str(k): float(np.std([r[k] for r in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0 for k in ks}
    return mean, std


def evaluate(cfg: QarmConfig, infos: list[models.ModelInfo], behaviour: bool = True) -> dict[str, Any]:
    """report.json["alignment"]: hit rates raw vs aligned (mean and spread over ``infos``), with counts."""
    tables = Tables.from_config(cfg)
    ks = sorted(cfg.align.eval_k)
    queries, targets, n_pairs = heldout_queries(tables)
    raw_ids, raw_x = _collect(tables.read_batches("item_content_emb", columns=["item_id", "emb"]))
    raw = hit_rate(raw_ids, raw_x, queries, targets, ks)
    del raw_x
    per_seed = []
    for info in infos:
        ids, x = _collect(aligned_batches(cfg, info))
        per_seed.append(hit_rate(ids, x, queries, targets, ks))
        log.info("align eval: model %s hit rate %s (raw %s)", info.version, per_seed[-1], raw)
    mean, std = _summary(per_seed, ks)
    out: dict[str, Any] = {
        "hit_rate": {"raw": {str(k): v for k, v in raw.items()}, "aligned": mean},
        "spread": {"aligned_std": std, "seeds": [i.meta["seed"] for i in infos]},
        "per_seed": {i.version: {str(k): v for k, v in r.items()} for i, r in zip(infos, per_seed)},
        "heldout_pairs": n_pairs,
        "queries": len(queries),
        "items": len(raw_ids),
        "models": [i.version for i in infos],
        "epochs": infos[0].meta["epochs"] if infos else 0,
        "train_pairs": infos[0].meta["train_pairs"] if infos else 0,
        "history": infos[0].meta.get("history", []) if infos else [],
    }
    if behaviour:
        f_ids, f_x = behaviour_factors(cfg, tables)
        known = np.isin(queries, f_ids) & np.isin(targets, f_ids)
        out["hit_rate"]["behaviour"] = {
            str(k): v for k, v in hit_rate(f_ids, f_x, queries, targets, ks).items()
        }
        out["behaviour_queries_with_factors"] = int(known.sum())
    return out
