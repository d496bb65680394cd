"""Dataset figures for the report, computed by Spark over the table snapshots.

Counts name their split (train = before the evaluation window's start, eval =
from it on); cold items are items with no interaction in the train window.
Only aggregates reach the driver.
"""

from __future__ import annotations

from typing import Any

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from qarm_dist.io.delta import Tables


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
