"""U2I trigger pairs (QARM): for each positive (user, target), the trigger is the
item most similar to the target, in a behaviour ID-embedding space, among the
user's latest positives before it.

The ID embeddings are the item factors of Spark MLlib ALS (implicit
feedback), fitted on the training window only. Trigger choice is a vectorised
numpy kernel over a padded (events x history) block, run per Arrow batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.ml.recommendation import ALS
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F


def choose_triggers(
    target_f: np.ndarray, hist_f: np.ndarray, hist_ok: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Index into each history of the most similar item to its target.

    target_f (n, r), hist_f (n, h, r) unit-norm factors; hist_ok (n, h) marks
    real history entries that have factors. Returns (index (n,), cosine (n,));
    rows with no usable entry get index -1 and cosine NaN.
    """
    sim = np.einsum("nr,nhr->nh", target_f, hist_f)
    sim = np.where(hist_ok, sim, -np.inf)
    idx = sim.argmax(axis=1)
    best = sim[np.arange(len(idx)), idx]
    none = ~np.isfinite(best)
    return np.where(none, -1, idx), np.where(none, np.nan, best).astype(np.float32)


def item_factors(pos: DataFrame, rank: int, iters: int, reg: float, alpha: float, seed: int) -> DataFrame:
    """ALS (implicit) item factors, L2-normalised: ``item_id, factor``."""
    too_big = pos.agg(F.max("user_id").alias("u"), F.max("item_id").alias("i")).first()
    if max(too_big["u"] or 0, too_big["i"] or 0) >= 2**31:
        raise ValueError("ALS needs user and item ids below 2^31; remap ids before `qarm pairs`")
    als = ALS(
        rank=rank,
        maxIter=iters,
        regParam=reg,
        alpha=alpha,
        implicitPrefs=True,
        seed=seed,
        userCol="user_id",
        itemCol="item_id",
        ratingCol="r",
        coldStartStrategy="drop",
        nonnegative=False,
    )
    data = pos.select(F.col("user_id").cast("int"), F.col("item_id").cast("int"), F.lit(1.0).alias("r"))
    model = als.fit(data)
    norm = F.sqrt(F.aggregate("features", F.lit(0.0), lambda acc, x: acc + x * x))
    return model.itemFactors.select(
        F.col("id").cast("long").alias("item_id"),
        F.transform("features", lambda x: x / F.greatest(norm, F.lit(1e-12))).alias("factor"),
    )


def with_history(events: DataFrame, history: int) -> DataFrame:
    """Each positive event with the user's last ``history`` positive items before it (oldest first)."""
    w = Window.partitionBy("user_id").orderBy("ts", "item_id").rowsBetween(-history, -1)
    return events.withColumn("history", F.collect_list("item_id").over(w)).filter(F.size("history") > 0)


def u2i_pairs(events: DataFrame, factors: DataFrame, history: int) -> DataFrame:
    """``trigger_id, target_id, score, ts``: one pair per positive event that has a history.

    A target without a factor (an item unseen when ALS was fitted, e.g. a
    cold-start item) takes the most recent history item as its trigger, with
    score 0: the documented fallback.
    """
    ids, mat = factor_arrays(factors)
    spark = events.sparkSession
    b_ids, b_mat = spark.sparkContext.broadcast(ids), spark.sparkContext.broadcast(mat)

    def pick(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        fid, fmat = b_ids.value, b_mat.value
        for rb in batches:
            if rb.num_rows == 0:
                continue
            target = rb.column("item_id").to_numpy()
            hist = rb.column("history")
            lengths = np.diff(hist.offsets.to_numpy())
            flat = hist.values.to_numpy()
            h = int(lengths.max())
            # pad right-aligned so column h-1 is the latest item of every row
            pos = np.arange(h)[None, :] >= (h - lengths)[:, None]
            padded = np.zeros((len(target), h), dtype=np.int64)
            padded[pos] = flat
            t_row, t_ok = _lookup(fid, target)
            h_row, h_ok = _lookup(fid, padded)
            h_ok &= pos
            idx, cos = choose_triggers(fmat[t_row], fmat[h_row], h_ok & t_ok[:, None])
            fallback = idx < 0
            idx = np.where(fallback, h - 1, idx)
            trig = padded[np.arange(len(target)), idx]
            yield pa.RecordBatch.from_pydict(
                {
                    "trigger_id": trig,
                    "target_id": target,
                    "score": np.where(fallback, 0.0, cos).astype(np.float32),
                    "ts": rb.column("ts").to_numpy(),
                }
            )

    return (
        with_history(events, history)
        .select("item_id", "ts", "history")
        .mapInArrow(pick, "trigger_id long, target_id long, score float, ts long")
    )


def factor_arrays(factors: DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Sorted item ids and their factor rows, as one Arrow transfer (a model, not a table).

    Size: items x rank x 4 bytes (2M items at rank 32: 256 MB), broadcast once to the tasks.
    """
    t = factors.toArrow()
    if t.num_rows == 0:
        raise ValueError("ALS produced no item factors: no positives in the training window")
    id_arr = t.column("item_id").to_numpy()
    rank = len(t.column("factor")[0])
    mat = pc.list_flatten(t.column("factor")).to_numpy().astype(np.float32).reshape(-1, rank)
    order = np.argsort(id_arr)
    return id_arr[order], np.ascontiguousarray(mat[order])


def _lookup(sorted_ids: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row of each query id in ``sorted_ids`` (0 where absent) and whether it was found."""
    row = np.searchsorted(sorted_ids, query)
    row = np.minimum(row, len(sorted_ids) - 1)
    return row, sorted_ids[row] == query
