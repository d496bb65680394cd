"""`qarm codebook fit | assign | diff | quality`: versioned semantic-ID codebooks on Spark.

- fit: distributed residual K-means (+ FSQ) over an embedding table
  (`distributed.fit`), written as a new immutable version of `codebooks`;
- assign: RQ (+ FSQ) codes and VQ codes (the ids of the ``vq_k`` nearest items of
  a pool, searched with faiss in the Spark tasks) for every item that has no
  codes for that version yet: the first run codes every item, later runs only
  new ones (refresh), and existing items keep their codes;
- diff: how many items changed code between two versions;
- quality: collision rate, bucket sizes, per-level utilisation and perplexity.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from qarm_dist.codebook import store
from qarm_dist.codebook.distributed import fit
from qarm_dist.codebook.fsq import fsq_encode
from qarm_dist.codebook.kmeans import rq_encode
from qarm_dist.codebook.quality import level_metrics, sid_metrics
from qarm_dist.config import CodebookConfig, QarmConfig
from qarm_dist.data.split import tables_eval_start
from qarm_dist.engines import spark_session
from qarm_dist.io.delta import CommitResult, Tables
from qarm_dist.io.spark import write_dataframe

log = logging.getLogger(__name__)


def source_table(cc: CodebookConfig, tables: Tables) -> str:
    if cc.source != "auto":
        return cc.source
    return "item_aligned_emb" if tables.exists("item_aligned_emb") else "item_content_emb"


def _fit_window_ids(spark: SparkSession, tables: Tables, cfg: QarmConfig) -> tuple[np.ndarray | None, Any]:
    """Items created before the evaluation window (leak-free fit), or None for all items."""
    if cfg.codebook.fit_window == "all" or not tables.exists("interactions") or not tables.exists("items"):
        return None, None
    cut = tables_eval_start(tables, cfg.split.eval_fraction)
    ids = tables.spark(spark, "items", columns=["item_id", "created_ts"]).filter(F.col("created_ts") < cut)
    return ids.select("item_id").toArrow().column(0).to_numpy(), cut


def run_fit(
    cfg: QarmConfig, run_id: str, cc: CodebookConfig | None = None
) -> tuple[CommitResult, store.Codebook]:
    """Fit a new codebook version from ``cc`` (default ``cfg.codebook``) and commit it."""
    cc = cc or cfg.codebook
    tables = Tables.from_config(cfg)
    if tables.committed("codebooks", run_id):
        raise ValueError(f"run id {run_id} already wrote a codebook version; use another run id to refit")
    src = source_table(cc, tables)
    snap = tables.snapshot(src)
    spark = spark_session(cfg)
    allowed, cut = _fit_window_ids(spark, tables, cfg)
    log.info(
        "fitting %d levels x k=%d%s on %s v%d (%d rows)",
        cc.levels,
        cc.k,
        f" + FSQ {cc.fsq_levels}" if cc.fsq_levels else "",
        src,
        snap.version,
        snap.rows,
    )
    res = fit(
        spark,
        snap,
        "emb",
        cc.levels,
        cc.k,
        cc.iters,
        fsq_levels=cc.fsq_levels,
        tol=cc.tol,
        init=cc.init,
        init_sample=cc.init_sample,
        sample_fraction=cc.sample_fraction,
        sample_iters=cc.sample_iters,
        seed=cc.seed,
        partitions=cc.partitions,
        threads_per_task=cc.threads_per_task,
        backend=cc.backend,
        cache_mb=cc.worker_cache_mb,
        allowed_ids=allowed,
        storage_options=tables.storage_options,
    )
    known = store.versions(tables)
    version = (known[-1] + 1) if known else 1
    info = {
        "version": version,
        "run_id": run_id,
        "source": src,
        "source_version": snap.version,
        "fit_window": cc.fit_window,
        "fit_before_ts": cut,
        "rows": res.rows,
        "config": cc.model_dump(),
        "recon_mse": res.recon_mse,
        "fsq_recon_mse": res.fsq_recon_mse,
        "inertia": res.inertia,
        "cost": res.cost,
        "seconds": res.seconds,
    }
    cb = store.Codebook(version, res.book, res.fsq, info)
    w = tables.writer("codebooks", run_id, dim=cb.dim)
    w.write(cb.to_table())
    result = w.commit(mode="append", info={"version": version, "run_id": run_id})
    return result, cb


def _pool(spark: SparkSession, tables: Tables, cb: store.Codebook, pool_max: int, seed: int):
    """VQ pool: the fit's source snapshot, all items up to ``pool_max``, else a seeded sample of that many."""
    df = tables.spark(spark, cb.info["source"], cb.info["source_version"], columns=["item_id", "emb"])
    if tables.snapshot(cb.info["source"], cb.info["source_version"]).rows > pool_max:
        df = df.orderBy(F.xxhash64(F.lit(seed), "item_id")).limit(pool_max)
    t = df.toArrow()  # bounded by pool_max rows by construction
    ids = t.column("item_id").to_numpy()
    x = pc.list_flatten(t.column("emb")).to_numpy().astype(np.float32).reshape(len(ids), cb.dim)
    return ids, np.ascontiguousarray(x)


_INDEX: dict[tuple, Any] = {}  # per Python worker: the faiss index of a pool, built once


def pool_index(key: tuple, pool_x: np.ndarray):
    """The faiss index of a pool, built once per Python worker.

    Module-level on purpose: a task closure is pickled by value and would carry its own empty
    copy of `_INDEX`; this function is pickled by reference and reaches the worker's real one.
    """
    import faiss

    if key not in _INDEX:
        _INDEX.clear()
        index = faiss.IndexFlatL2(pool_x.shape[1])
        index.add(pool_x)
        _INDEX[key] = index
    return _INDEX[key]


def vq_codes(x: np.ndarray, item_ids: np.ndarray, index, pool_ids: np.ndarray, k: int) -> np.ndarray:
    """Ids of the ``k`` nearest pool items of each row, the item itself excluded."""
    _, nn = index.search(x, k + 1)
    ids = pool_ids[nn]
    is_self = ids == item_ids[:, None]
    # drop the item itself where found, else the farthest of the k + 1
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones_like(ids, dtype=bool)
    keep[np.arange(len(ids)), drop] = False
    return ids[keep].reshape(len(ids), k)


def uncoded(spark: SparkSession, tables: Tables, cb: store.Codebook) -> DataFrame:
    """``item_id, emb`` of the source items that have no codes for version ``cb`` (an anti-join).

    What assign codes: every item the first time, only the new ones after that (the refresh).
    """
    todo = tables.spark(spark, cb.info["source"], columns=["item_id", "emb"])
    if tables.exists("item_codes"):
        have = tables.spark(spark, "item_codes", columns=["item_id", "version"]).filter(
            F.col("version") == cb.version
        )
        todo = todo.join(have.select("item_id"), "item_id", "left_anti")
    return todo


def run_assign(
    cfg: QarmConfig, run_id: str, version: int | None = None
) -> tuple[CommitResult, store.Codebook]:
    """Write `item_codes` for every item of the codebook's source table that has none for ``version``."""
    tables = Tables.from_config(cfg)
    cb = store.load(tables, version)
    spark = spark_session(cfg)
    src = cb.info["source"]
    snap = tables.snapshot(src)
    if snap.dim != cb.dim:
        raise ValueError(
            f"table '{src}' has dimension {snap.dim}, codebook version {cb.version} has {cb.dim}"
        )
    if done := tables.already_committed("item_codes", run_id):
        return done, cb
    todo = uncoded(spark, tables, cb)
    pool_ids, pool_x = _pool(spark, tables, cb, cfg.codebook.pool_max, cfg.codebook.seed)
    vq_k = min(cfg.codebook.vq_k, len(pool_ids) - 1)
    sc = spark.sparkContext
    b_pool = sc.broadcast((pool_ids, pool_x))
    book, fsq, ver, dim, threads = cb.book, cb.fsq, cb.version, cb.dim, cfg.codebook.threads_per_task
    pool_key = (ver, run_id)

    def encode(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import faiss

        faiss.omp_set_num_threads(threads)
        ids_pool, x_pool = b_pool.value
        index = pool_index(pool_key, x_pool)
        for rb in batches:
            if rb.num_rows == 0:
                continue
            item = rb.column("item_id").to_numpy()
            x = pc.list_flatten(rb.column("emb")).to_numpy().astype(np.float32).reshape(len(item), dim)
            rq, residual = rq_encode(x, book)
            vq = vq_codes(x, item, index, ids_pool, vq_k)
            n = len(item)
            fsq_col = (
                pa.FixedSizeListArray.from_arrays(
                    pa.array(fsq_encode(residual, fsq).ravel()), len(fsq.levels)
                ).cast(pa.list_(pa.int32()))
                if fsq is not None
                else pa.nulls(n, pa.list_(pa.int32()))
            )
            yield pa.RecordBatch.from_arrays(
                [
                    pa.array(item),
                    pa.array(np.full(n, ver, np.int64)),
                    pa.FixedSizeListArray.from_arrays(pa.array(rq.ravel()), rq.shape[1]).cast(
                        pa.list_(pa.int32())
                    ),
                    pa.FixedSizeListArray.from_arrays(pa.array(vq.ravel()), vq_k).cast(pa.list_(pa.int64())),
                    fsq_col,
                ],
                names=["item_id", "version", "rq", "vq", "fsq"],
            )

    codes = todo.mapInArrow(
        encode, "item_id long, version long, rq array<int>, vq array<long>, fsq array<int>"
    )
    result = write_dataframe(
        codes,
        tables,
        "item_codes",
        run_id,
        mode="append",
        info={"version": cb.version, "pool": len(pool_ids)},
    )
    b_pool.unpersist()
    return result, cb


def _codes(spark: SparkSession, tables: Tables, version: int):
    return tables.spark(spark, "item_codes").filter(F.col("version") == version)


def diff(cfg: QarmConfig, v1: int, v2: int) -> dict[str, Any]:
    """Items coded in both versions, and how many changed their RQ code (full and per level).

    Versions with different level counts are compared on the levels they share, so ``rq_changed``
    counts items whose shared prefix changed (``levels_compared`` says how many levels that is).
    """
    tables = Tables.from_config(cfg)
    spark = spark_session(cfg)
    a = _codes(spark, tables, v1).select("item_id", F.col("rq").alias("a"), F.col("vq").alias("va"))
    b = _codes(spark, tables, v2).select("item_id", F.col("rq").alias("b"), F.col("vq").alias("vb"))
    j = a.join(b, "item_id")
    levels = min(store.load(tables, v1).levels, store.load(tables, v2).levels)
    aggs = [
        F.count("*").alias("items"),
        F.sum((F.slice("a", 1, levels) != F.slice("b", 1, levels)).cast("int")).alias("rq_changed"),
        F.sum((F.col("va") != F.col("vb")).cast("int")).alias("vq_changed"),
    ]
    aggs += [
        F.sum((F.col("a")[lv] != F.col("b")[lv]).cast("int")).alias(f"level_{lv}") for lv in range(levels)
    ]
    r = j.agg(*aggs).first().asDict()
    return {
        "versions": [v1, v2],
        "items": r["items"],
        "levels_compared": levels,
        "rq_changed": r["rq_changed"] or 0,
        "vq_changed": r["vq_changed"] or 0,
        "per_level_changed": [r[f"level_{lv}"] or 0 for lv in range(levels)],
    }


def code_histograms(cfg: QarmConfig, version: int | None = None) -> dict[str, Any]:
    """The small aggregates of one version's `item_codes` that SID quality is computed from (Spark).

    ``bucket_sizes``/``buckets``: ``buckets[j]`` full SIDs hold ``bucket_sizes[j]`` items each
    (ascending sizes); ``levels``: per RQ level (then FSQ, when fitted) the items per code, most used
    first, zeros for unused codes (length = codes of the level); ``codebook``: the loaded version.
    """
    tables = Tables.from_config(cfg)
    cb = store.load(tables, version)
    spark = spark_session(cfg)
    codes = _codes(spark, tables, cb.version).cache()
    sid = F.concat("rq", F.coalesce("fsq", F.array().cast("array<int>"))) if cb.fsq else F.col("rq")
    hist = codes.groupBy(sid.alias("sid")).count().groupBy("count").agg(F.count("*").alias("n")).collect()
    hist = sorted((r["count"], r["n"]) for r in hist)

    def per_code(col: Any, k: int) -> np.ndarray:
        counts = sorted((r["count"] for r in codes.groupBy(col.alias("c")).count().collect()), reverse=True)
        return np.array(counts + [0] * max(0, k - len(counts)), dtype=np.int64)

    levels = [per_code(F.col("rq")[lv], len(cb.book.centroids[lv])) for lv in range(cb.levels)]
    if cb.fsq is not None:
        levels.append(per_code(F.col("fsq"), int(np.prod(cb.fsq.levels))))
    codes.unpersist()
    return {
        "bucket_sizes": np.array([s for s, _ in hist], dtype=np.int64),
        "buckets": np.array([n for _, n in hist], dtype=np.int64),
        "levels": levels,
        "codebook": cb,
    }


def quality(cfg: QarmConfig, version: int | None = None) -> dict[str, Any]:
    """The SID quality report of one version's `item_codes`."""
    h = code_histograms(cfg, version)
    cb = h["codebook"]
    out: dict[str, Any] = sid_metrics(h["bucket_sizes"], h["buckets"])
    levels = [
        level_metrics(h["levels"][lv], len(h["levels"][lv]), cb.info["recon_mse"][lv])
        for lv in range(cb.levels)
    ]
    if cb.fsq is not None:
        fsq = h["levels"][cb.levels]
        levels.append(
            {**level_metrics(fsq, len(fsq), cb.info["fsq_recon_mse"]), "fsq_levels": list(cb.fsq.levels)}
        )
    out["levels"] = levels
    out["version"] = cb.version
    return out
