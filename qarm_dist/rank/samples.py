"""`qarm samples`: time-ordered ranker samples with user history, on Spark.

    interactions ─► per user: last N prior events (numpy kernel, grouped by user) ─┐
    items (created_ts) ─► sampled negatives (implicit data only) ───────────────────┴─► + split, item_pop ─► samples

- one sample per interaction: user, target item, every task label, and the
  user's last ``samples.history`` items with ``history_event = 1`` *strictly*
  before the sample's time (oldest first), so no sample sees its own or a
  later event, with ``history_like``, the like label of each of those
  earlier events (what the user thought of them, known by then);
- split by the shared time cut (`qarm_dist.data.split`): ``train`` before the
  evaluation window, ``eval`` from it on; items with no train-window
  interaction are the cold-start set;
- ``item_pop`` = the item's interactions in the train window (never the
  evaluation window), for popularity buckets and the cold-start flag;
- implicit data (no row with click = 0, like MovieLens ratings) has no
  negatives to learn from, so ``samples.negatives`` (auto: 1 there) sampled
  negatives per row are added: items drawn uniformly, by a seeded hash of
  (user, ts, j), among the items created by the row's time; all labels 0,
  ``sampled = 1``, the row's history. A draw that hits a real row's key is
  dropped. The ranker learns click on them and masks them out of the other
  tasks (a user's like of an item never shown is unknown, not 0).

Written by partition with `write_dataframe`: nothing is collected.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from qarm_dist.config import QarmConfig
from qarm_dist.data.split import tables_eval_start
from qarm_dist.engines import spark_session
from qarm_dist.hashing import mix64
from qarm_dist.io.delta import CommitResult, TableError, Tables
from qarm_dist.io.schemas import SAMPLES, TASKS
from qarm_dist.io.spark import write_dataframe

log = logging.getLogger(__name__)

# An interaction's columns, and those the history kernel emits: SAMPLES' own declarations up to
# history_like (split, sampled and the popularity counts are added on Spark afterwards).
_EVENT_COLUMNS = ["user_id", "item_id", "ts", *TASKS]
_HIST_COLUMNS = [*_EVENT_COLUMNS, "history", "history_like"]


def _hist_schema():
    """The Spark schema of the history kernel's output, taken from the `samples` table spec."""
    from pyspark.sql.pandas.types import from_arrow_schema

    declared = SAMPLES.schema()
    return from_arrow_schema(pa.schema([declared.field(c) for c in _HIST_COLUMNS]))


def prior_events(ts: np.ndarray, event_ts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For each time in ``ts``, the last ``n`` events strictly before it (oldest first), as list offsets
    and the events' indices into ``event_ts``.

    ``event_ts`` must be sorted (ties in any fixed order); vectorised, no loop over rows.
    """
    end = np.searchsorted(event_ts, ts, side="left")  # events strictly before each row
    start = np.maximum(end - n, 0)
    lengths = end - start
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return offsets, np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])


def _history_fn(n: int, event: str):
    def per_user(t: pa.Table) -> pa.Table:
        ts = t.column("ts").to_numpy()
        items = t.column("item_id").to_numpy()
        likes = t.column("like").to_numpy()
        is_event = t.column(event).to_numpy() == 1
        order = np.lexsort((items, ts))
        ev = order[is_event[order]]
        offsets, idx = prior_events(ts, ts[ev], n)
        off = pa.array(offsets)
        return (
            t.select(_EVENT_COLUMNS)
            .append_column("history", pa.ListArray.from_arrays(off, pa.array(items[ev][idx], pa.int64())))
            .append_column("history_like", pa.ListArray.from_arrays(off, pa.array(likes[ev][idx], pa.int8())))
        )

    return per_user


def negatives(
    rows: pa.RecordBatch, k: int, seed: int, created_sorted: np.ndarray, ids_by_created: np.ndarray
) -> pa.RecordBatch:
    """``k`` sampled negatives per row: items created by the row's time, uniform by a seeded hash.

    The hash keys on (user, ts, the row's item, j), so rows that share a user and a time (a user
    rating a batch of movies at once) still draw different items.
    """
    n = rows.num_rows
    user = np.repeat(rows.column("user_id").to_numpy(), k)
    ts = np.repeat(rows.column("ts").to_numpy(), k)
    real_item = np.repeat(rows.column("item_id").to_numpy(), k)
    j = np.tile(np.arange(k, dtype=np.int64), n)
    available = np.maximum(np.searchsorted(created_sorted, ts, side="right"), 1)
    key = mix64(user, seed) ^ mix64(ts, seed + 1) ^ mix64(real_item, seed + 2) ^ mix64(j, seed + 3)
    pick = (key % available.astype(np.uint64)).astype(np.int64)
    hist, hist_like = rows.column("history"), rows.column("history_like")
    take = pa.array(np.repeat(np.arange(n), k))
    zeros = pa.array(np.zeros(n * k, np.int8))
    return pa.RecordBatch.from_arrays(
        [
            pa.array(user),
            pa.array(ids_by_created[pick]),
            pa.array(ts),
            *[zeros] * len(TASKS),
            hist.take(take),
            hist_like.take(take),
        ],
        names=_HIST_COLUMNS,
    )


def check_inputs(spark: SparkSession, tables: Tables) -> DataFrame:
    snap = tables.snapshot("interactions")
    if snap.rows == 0:
        raise TableError("interactions", None, 0, 0, "exist: the table is empty, so there are no samples")
    inter = tables.spark(spark, "interactions")
    unknown = inter.join(tables.spark(spark, "items", columns=["item_id"]), "item_id", "left_anti").count()
    if unknown:
        raise TableError(
            "interactions", "item_id", unknown, snap.rows, "name items that are not in table 'items'"
        )
    return inter


def build_samples(cfg: QarmConfig, spark: SparkSession, tables: Tables) -> tuple[DataFrame, dict[str, Any]]:
    """The `samples` rows as a DataFrame (lazy) and the job's stats."""
    sc = cfg.samples
    inter = check_inputs(spark, tables).select(*_EVENT_COLUMNS)
    eval_start = tables_eval_start(tables, cfg.split.eval_fraction)
    real = inter.groupBy("user_id").applyInArrow(_history_fn(sc.history, sc.history_event), _hist_schema())
    k = sc.negatives
    if k is None:
        k = 1 if inter.filter(F.col("click") == 0).limit(1).count() == 0 else 0
    rows = real.withColumn("sampled", F.lit(0).cast("byte"))
    if k:
        items = tables.spark(spark, "items", columns=["item_id", "created_ts"]).orderBy(
            "created_ts", "item_id"
        )
        cat = items.toArrow()  # 16 bytes per item: a model of the catalogue, not a table collect
        created, ids = cat.column("created_ts").to_numpy(), cat.column("item_id").to_numpy()
        b = spark.sparkContext.broadcast((created, ids))
        seed = sc.seed

        def sample(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            c, i = b.value
            for rb in batches:
                if rb.num_rows:
                    yield negatives(rb, k, seed, c, i)

        drawn = real.mapInArrow(sample, _hist_schema())
        drawn = drawn.join(real.select("user_id", "item_id", "ts"), ["user_id", "item_id", "ts"], "left_anti")
        drawn = drawn.dropDuplicates(["user_id", "item_id", "ts"])
        rows = rows.unionByName(drawn.withColumn("sampled", F.lit(1).cast("byte")))
    before = inter.filter(F.col("ts") < eval_start)
    item_pop = before.groupBy("item_id").agg(F.count("*").alias("item_pop"))
    user_pop = before.groupBy("user_id").agg(F.count("*").alias("user_pop"))
    out = (
        rows.join(item_pop, "item_id", "left")
        .join(user_pop, "user_id", "left")
        .withColumn("item_pop", F.coalesce("item_pop", F.lit(0)).cast("long"))
        .withColumn("user_pop", F.coalesce("user_pop", F.lit(0)).cast("long"))
        .withColumn("split", F.when(F.col("ts") >= eval_start, "eval").otherwise("train"))
        .select(*SAMPLES.columns)
    )
    # Rows leave the history step grouped by user, and trainers read a table in order (a run must
    # repeat). Written in a seeded hash order instead, every stretch of the table is a random sample
    # of all users and times, so a batch (or a local shuffle buffer) never holds a handful of users.
    key = F.xxhash64("user_id", "item_id", "ts", "sampled", F.lit(sc.seed))
    out = out.repartition(key).sortWithinPartitions(key)
    return out, {"eval_start_ts": eval_start, "negatives_per_row": k, "history": sc.history}


def run_samples(cfg: QarmConfig, run_id: str) -> tuple[CommitResult, dict[str, Any]]:
    """Build and commit `samples`; returns the commit and the counts by split."""
    tables = Tables.from_config(cfg)
    if done := tables.already_committed("samples", run_id):
        log.info("run %s already committed samples; nothing to do", run_id)
        return done, {}
    spark = spark_session(cfg)
    samples, stats = build_samples(cfg, spark, tables)
    samples = samples.cache()
    counts = samples.groupBy("split", "sampled").agg(
        F.count("*").alias("rows"),
        F.countDistinct("user_id").alias("users"),
        F.sum((F.col("item_pop") == 0).cast("long")).alias("cold_rows"),
    )
    stats["counts"] = {
        f"{r['split']}/{'sampled' if r['sampled'] else 'real'}": {
            "rows": r["rows"],
            "users": r["users"],
            "cold_rows": r["cold_rows"],
        }
        for r in counts.collect()
    }
    log.info("samples: %s", stats["counts"])
    result = write_dataframe(samples, tables, "samples", run_id, mode="overwrite", info=stats)
    samples.unpersist()
    return result, stats
