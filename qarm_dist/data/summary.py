"""Dataset figures for the report, computed by Spark over the table snapshots.

Counts name their split (train = before the evaluation window's start, eval =
from it on); cold items are items with no interaction in the train window.
Only aggregates reach the driver. `lookup` fetches a few rows by key (for notebooks).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from qarm_dist.io.delta import Tables
from qarm_dist.io.schemas import spec


def dataset_summary(spark: SparkSession, tables: Tables, eval_start_ts: int, name: str) -> dict[str, Any]:
    inter = tables.spark(spark, "interactions").cache()
    n_catalogue = tables.snapshot("items").rows

    def counts(df) -> dict[str, Any]:
        r = df.agg(
            F.count("*").alias("rows"),
            F.countDistinct("user_id").alias("users"),
            F.countDistinct("item_id").alias("items"),
            F.avg("click").alias("click_rate"),
            F.avg("like").alias("like_rate"),
        ).first()
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.asDict().items()}

    train = inter.filter(F.col("ts") < eval_start_ts)
    ev = inter.filter(F.col("ts") >= eval_start_ts)
    cold = ev.join(train.select("item_id").distinct(), "item_id", "left_anti")
    eval_counts = counts(ev)
    eval_counts["cold_rows"] = cold.count()
    eval_counts["cold_items"] = cold.select("item_id").distinct().count()

    per_item = train.groupBy("item_id").count()
    p99 = per_item.agg(F.percentile_approx("count", 0.99).alias("p")).first()["p"] or 0
    top_share = per_item.agg(
        F.sum(F.when(F.col("count") >= p99, F.col("count")).otherwise(0)).alias("top"),
        F.sum("count").alias("all"),
    ).first()
    hist = (
        per_item.groupBy(F.floor(F.log2("count")).cast("int").alias("log2_count"))
        .agg(F.count("*").alias("items"))
        .orderBy("log2_count")
        .collect()
    )
    span = inter.agg(F.min("ts").alias("first_ts"), F.max("ts").alias("last_ts")).first()
    inter.unpersist()
    return {
        "name": name,
        "catalogue_items": n_catalogue,
        **counts(inter),
        "first_ts": span["first_ts"],
        "last_ts": span["last_ts"],
        "eval_start_ts": eval_start_ts,
        "train": counts(train),
        "eval": eval_counts,
        "popularity": {
            "train_top1pct_share": round(top_share["top"] / max(top_share["all"], 1), 4),
            "items_by_log2_count": [[r["log2_count"], r["items"]] for r in hist],
        },
    }


def lookup(
    tables: Tables,
    name: str,
    values: Iterable[Any],
    column: str = "item_id",
    columns: list[str] | None = None,
    version: int | None = None,
) -> pa.Table:
    """The rows of table ``name`` whose ``column`` is one of a few ``values`` (e.g. items' text by id).

    Streams the table's snapshot and keeps only the matching rows, so a notebook or a debugging
    session can look at a handful of rows of a table of any size without collecting it.
    """
    snap = tables.snapshot(name, version)
    table_spec = spec(name)
    schema = table_spec.schema(snap.dim) if table_spec.emb_columns else table_spec.schema()
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    wanted = pa.array(list(values)).cast(schema.field(column).type)
    parts = [
        pa.Table.from_batches([rb]).filter(pc.is_in(rb.column(column), value_set=wanted))
        for rb in tables.read_batches(name, columns=columns, snapshot=snap)
    ]
    return pa.concat_tables(parts) if parts else schema.empty_table()
