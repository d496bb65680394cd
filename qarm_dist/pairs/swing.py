"""Swing item-to-item similarity on Spark (QARM's I2I pairs).

    swing(i, j) = sum over user pairs (u, v) who both have i and j of
                  w_u * w_v / (alpha + |I_u & I_v|),    w_u = 1/sqrt(|I_u|) (or 1)

The quadratic blow-up is bounded as production Swing bounds it: each user
keeps at most ``max_items_per_user`` items and each item at most
``max_users_per_item`` users, both sampled deterministically by a seeded hash,
so the user-pair join is at most (users per item)^2 per item. Each item keeps
its ``top_n`` best partners, and pairs backed by fewer than ``min_support``
user pairs are dropped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F


def cap_positives(pos: DataFrame, max_items_per_user: int, max_users_per_item: int, seed: int) -> DataFrame:
    """Keep at most N items per user, then M users per item, chosen by a seeded hash (deterministic)."""
    h = F.xxhash64(F.lit(seed), "user_id", "item_id")
    by_user = Window.partitionBy("user_id").orderBy(h, "item_id")
    by_item = Window.partitionBy("item_id").orderBy(h, "user_id")
    capped = pos.withColumn("_r", F.row_number().over(by_user)).filter(F.col("_r") <= max_items_per_user)
    capped = capped.withColumn("_r", F.row_number().over(by_item)).filter(F.col("_r") <= max_users_per_item)
    return capped.drop("_r")


def swing(
    pos: DataFrame,
    alpha: float = 1.0,
    user_weight: bool = True,
    top_n: int = 20,
    min_support: int = 1,
) -> DataFrame:
    """Swing scores over distinct (user_id, item_id) positives.

    Returns ``trigger_id, target_id, score, support`` for both directions of
    every kept pair (each item's top-N partners), so callers can merge
    symmetric duplicates as they need.
    """
    pos = pos.select("user_id", "item_id").distinct()
    n_u = pos.groupBy("user_id").agg(F.count("*").alias("n_u"))
    w = F.pow(F.col("n_u"), -0.5) if user_weight else F.lit(1.0)
    users = n_u.select("user_id", w.alias("w"))
    a, b = pos.alias("a"), pos.alias("b")
    # every user pair (u < v) that shares an item, with the shared items
    user_pairs = (
        a.join(b, (F.col("a.item_id") == F.col("b.item_id")) & (F.col("a.user_id") < F.col("b.user_id")))
        .select(
            F.col("a.user_id").alias("u"), F.col("b.user_id").alias("v"), F.col("a.item_id").alias("item")
        )
        .groupBy("u", "v")
        .agg(F.collect_list("item").alias("items"), F.count("*").alias("c"))
        .filter(F.col("c") >= 2)
    )
    weighted = (
        user_pairs.join(users.withColumnRenamed("user_id", "u").withColumnRenamed("w", "wu"), "u")
        .join(users.withColumnRenamed("user_id", "v").withColumnRenamed("w", "wv"), "v")
        .select((F.col("wu") * F.col("wv") / (F.lit(alpha) + F.col("c"))).alias("s"), "items")
    )
    item_pairs = (
        weighted.select("s", "items", F.explode("items").alias("i"))
        .select("s", "i", F.explode("items").alias("j"))
        .filter(F.col("i") < F.col("j"))
        .groupBy("i", "j")
        .agg(F.sum("s").alias("score"), F.count("*").alias("support"))
        .filter(F.col("support") >= min_support)
    )
    both = item_pairs.select(
        F.col("i").alias("trigger_id"), F.col("j").alias("target_id"), "score", "support"
    ).unionByName(
        item_pairs.select(F.col("j").alias("trigger_id"), F.col("i").alias("target_id"), "score", "support")
    )
    rank = Window.partitionBy("trigger_id").orderBy(F.desc("score"), "target_id")
    return both.withColumn("_r", F.row_number().over(rank)).filter(F.col("_r") <= top_n).drop("_r")


def swing_reference(
    user_ids: np.ndarray, item_ids: np.ndarray, alpha: float = 1.0, user_weight: bool = True
) -> pd.DataFrame:
    """Single-process Swing with pandas (the benchmark's peer and the tests' cross-check).

    Returns ``i, j, score, support`` for i < j, before any top-N or support filter.
    """
    pos = pd.DataFrame({"u": user_ids, "i": item_ids}).drop_duplicates()
    n_u = pos.groupby("u")["i"].transform("size").to_numpy()
    pos["w"] = n_u**-0.5 if user_weight else 1.0
    up = pos.merge(pos, on="i", suffixes=("", "_v"))
    up = up[up["u"] < up["u_v"]]
    c = up.groupby(["u", "u_v"])["i"].transform("size")
    up = up.assign(c=c)[c >= 2]
    up["s"] = up["w"] * up["w_v"] / (alpha + up["c"])
    # pair every two shared items of the same user pair
    pairs = up[["u", "u_v", "i", "s"]].merge(up[["u", "u_v", "i"]], on=["u", "u_v"], suffixes=("", "_j"))
    pairs = pairs[pairs["i"] < pairs["i_j"]]
    out = pairs.groupby(["i", "i_j"]).agg(score=("s", "sum"), support=("s", "size")).reset_index()
    return out.rename(columns={"i_j": "j"})


def swing_stats(pos: DataFrame, capped: DataFrame) -> dict[str, Any]:
    """How many positives the caps dropped (written into the job's stats)."""
    before, after = pos.count(), capped.count()
    return {"positives": before, "after_caps": after, "dropped_by_caps": before - after}
