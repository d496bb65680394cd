"""Popularity control for pair corpora: popular items dominate behaviour pairs.

Two rules, both deterministic by seed:
- down-sampling: a pair whose more popular item lies above the
  ``popular_quantile`` of item popularity (train positives per item) is kept with
  probability (threshold / popularity)^power;
- a cap: within each source, an item appears in at most ``max_pairs_per_item``
  pairs (its best-scored ones), as trigger and as target.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F


def item_popularity(pos: DataFrame) -> DataFrame:
    """``item_id, pop``: positives per item."""
    return pos.groupBy("item_id").agg(F.count("*").alias("pop"))


def _with_pop(pairs: DataFrame, pop: DataFrame) -> DataFrame:
    p = pop.select(F.col("item_id"), F.col("pop"))
    return (
        pairs.join(
            p.withColumnRenamed("item_id", "trigger_id").withColumnRenamed("pop", "_pt"), "trigger_id", "left"
        )
        .join(
            p.withColumnRenamed("item_id", "target_id").withColumnRenamed("pop", "_pg"), "target_id", "left"
        )
        .withColumn("_maxpop", F.greatest(F.coalesce("_pt", F.lit(0)), F.coalesce("_pg", F.lit(0))))
    )


def control(
    pairs: DataFrame, pop: DataFrame, threshold: float, power: float, max_pairs_per_item: int, seed: int
) -> DataFrame:
    """Down-sample pairs of very popular items, then cap pairs per item within each source."""
    cols = pairs.columns
    p = _with_pop(pairs, pop)
    keep_prob = F.least(F.lit(1.0), F.pow(F.lit(float(threshold)) / F.col("_maxpop"), F.lit(power)))
    u = (F.abs(F.xxhash64(F.lit(seed), "trigger_id", "target_id", "source")) % 1_000_000) / 1_000_000.0
    p = p.filter((F.col("_maxpop") <= threshold) | (u < keep_prob))
    for side in ("trigger_id", "target_id"):
        w = Window.partitionBy("source", side).orderBy(F.desc("score"), "trigger_id", "target_id")
        p = p.withColumn("_r", F.row_number().over(w)).filter(F.col("_r") <= max_pairs_per_item)
    return p.select(*cols)


def profile(pairs: DataFrame, pop: DataFrame) -> list[list[float]]:
    """Share of pair endpoints per log2 bucket of item popularity: [[bucket, share], ...]."""
    p = pop.select("item_id", "pop")
    ends = pairs.select(F.col("trigger_id").alias("item_id")).unionAll(
        pairs.select(F.col("target_id").alias("item_id"))
    )
    b = ends.join(p, "item_id", "left").select(
        F.floor(F.log2(F.coalesce("pop", F.lit(1)))).cast("int").alias("b")
    )
    rows = b.groupBy("b").count().orderBy("b").collect()
    total = sum(r["count"] for r in rows) or 1
    return [[r["b"], round(r["count"] / total, 4)] for r in rows]
