"""`qarm pairs`: build `item_pairs` from `interactions` on Spark.

    positives ─┬─ train window ─ caps ─ Swing ───────────────► i2i candidates (train)
               │                └─ ALS item factors ─┐
               └─ all positive events + history ─────┴─► u2i candidates (train | heldout by event time)
    candidates ─► judge ─► popularity control ─► merge ─► item_pairs (one commit)

Leak-free by construction: Swing and ALS see only positives before the
evaluation window's start; U2I pairs whose target event lies in the window
form the held-out split used to evaluate alignment. Merging canonicalises each
pair to (min id, max id), so symmetric duplicates are one row, and a pair
found in train is never also held out.
"""

from __future__ import annotations

import logging
from typing import Any

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from qarm_dist.config import QarmConfig
from qarm_dist.data.split import tables_eval_start
from qarm_dist.engines import spark_session
from qarm_dist.io.delta import CommitResult, TableError, Tables
from qarm_dist.io.spark import write_dataframe
from qarm_dist.pairs import popularity
from qarm_dist.pairs.judge import PairJudge, make_judge
from qarm_dist.pairs.swing import cap_positives, swing, swing_stats
from qarm_dist.pairs.u2i import item_factors, u2i_pairs

log = logging.getLogger(__name__)

PAIR_COLUMNS = ["trigger_id", "target_id", "source", "score", "split"]


def check_inputs(spark: SparkSession, tables: Tables, judge: PairJudge) -> DataFrame:
    """Interactions must be non-empty and name only known items; returns the interactions DataFrame."""
    snap = tables.snapshot("interactions")
    if snap.rows == 0:
        raise TableError(
            "interactions", None, 0, 0, "exist: the table is empty, so there are no pairs to build"
        )
    inter = tables.spark(spark, "interactions")
    items = tables.spark(spark, "items", columns=["item_id"])
    unknown = inter.join(items, "item_id", "left_anti").count()
    if unknown:
        raise TableError(
            "interactions", "item_id", unknown, snap.rows, "name items that are not in table 'items'"
        )
    if "emb" in judge.needs and not tables.exists("item_content_emb"):
        raise FileNotFoundError(
            "the content judge needs table 'item_content_emb': run `qarm embed` or set pairs.judge=none"
        )
    return inter


def positive_events(inter: DataFrame, positive: str) -> DataFrame:
    """``user_id, item_id, ts`` of the interactions whose ``positive`` label is 1."""
    return inter.filter(F.col(positive) == 1).select("user_id", "item_id", "ts")


def train_positives(events: DataFrame, eval_start: int) -> DataFrame:
    """Distinct ``user_id, item_id`` positives before the evaluation window: all that Swing and ALS see."""
    return events.filter(F.col("ts") < eval_start).select("user_id", "item_id").distinct()


def _judge(spark: SparkSession, tables: Tables, cands: DataFrame, judge: PairJudge) -> DataFrame:
    """Add a boolean ``keep`` column from the judge, evaluated per Arrow batch in the tasks."""
    if not judge.needs:
        return cands.withColumn("keep", F.lit(True))
    side = cands
    for need in judge.needs:
        table, col = ("item_content_emb", "emb") if need == "emb" else ("items", "text")
        src = tables.spark(spark, table, columns=["item_id", col])
        for end in ("trigger", "target"):
            side = side.join(
                src.withColumnRenamed("item_id", f"{end}_id").withColumnRenamed(col, f"{end}_{need}"),
                f"{end}_id",
                "left",
            )
    base = cands.schema.simpleString()[len("struct<") : -1]
    cols = cands.columns  # names only: the closure must not capture the DataFrame

    def run(batches):
        import pyarrow as pa

        for rb in batches:
            t = pa.Table.from_batches([rb])
            keep = judge.keep(t)
            yield pa.RecordBatch.from_arrays(
                [t.column(c).combine_chunks() for c in cols] + [pa.array(keep)],
                names=[*cols, "keep"],
            )

    return side.mapInArrow(run, f"{base}, keep boolean")


def _merge(cands: DataFrame) -> DataFrame:
    """One row per unordered pair: train before heldout, i2i before u2i, then the best score."""
    a, b = F.least("trigger_id", "target_id"), F.greatest("trigger_id", "target_id")
    c = cands.filter(F.col("trigger_id") != F.col("target_id")).select(
        a.alias("trigger_id"), b.alias("target_id"), "source", "score", "split"
    )
    pref = Window.partitionBy("trigger_id", "target_id").orderBy(
        F.desc(F.col("split") == "train"), F.desc(F.col("source") == "i2i"), F.desc("score")
    )
    return c.withColumn("_r", F.row_number().over(pref)).filter(F.col("_r") == 1).drop("_r")


def build_pairs(cfg: QarmConfig, spark: SparkSession, tables: Tables) -> tuple[DataFrame, dict[str, Any]]:
    """The `item_pairs` rows as a DataFrame (lazy), and the job's stats."""
    pc = cfg.pairs
    judge = make_judge(pc.judge, pc.judge_min_cosine)
    inter = check_inputs(spark, tables, judge)
    eval_start = tables_eval_start(tables, cfg.split.eval_fraction)
    events = positive_events(inter, pc.positive)
    train_pos = train_positives(events, eval_start).cache()
    stats: dict[str, Any] = {"eval_start_ts": eval_start, "positive": pc.positive}

    log.info("[pairs 1/4] Swing I2I over train-window positives")
    capped = cap_positives(train_pos, pc.max_items_per_user, pc.max_users_per_item, pc.seed).cache()
    stats["swing"] = {
        **swing_stats(train_pos, capped),
        "max_items_per_user": pc.max_items_per_user,
        "max_users_per_item": pc.max_users_per_item,
    }
    i2i = swing(capped, pc.swing_alpha, pc.swing_user_weight, pc.swing_top_n, pc.swing_min_support).select(
        "trigger_id",
        "target_id",
        F.lit("i2i").alias("source"),
        F.col("score").cast("float"),
        F.lit("train").alias("split"),
    )

    log.info("[pairs 2/4] ALS item factors and U2I triggers (last %d positives)", pc.history)
    factors = item_factors(train_pos, pc.als_rank, pc.als_iters, pc.als_reg, pc.als_alpha, pc.seed)
    u2i = u2i_pairs(events, factors, pc.history).select(
        "trigger_id",
        "target_id",
        F.lit("u2i").alias("source"),
        "score",
        F.when(F.col("ts") >= eval_start, "heldout").otherwise("train").alias("split"),
    )

    log.info("[pairs 3/4] judge '%s'", judge.name)
    judged = _judge(spark, tables, i2i.unionByName(u2i), judge).cache()
    rejected = judged.groupBy("source").agg((1.0 - F.avg(F.col("keep").cast("double"))).alias("r")).collect()
    stats["judge"] = judge.name
    stats["judge_rejected"] = {r["source"]: round(r["r"], 4) for r in rejected}
    cands = judged.filter("keep").drop("keep")

    log.info("[pairs 4/4] popularity control and merge")
    pop = popularity.item_popularity(train_pos).cache()
    threshold = pop.approxQuantile("pop", [pc.popular_quantile], 0.001)[0]
    controlled = popularity.control(cands, pop, threshold, pc.popular_power, pc.max_pairs_per_item, pc.seed)
    stats["popularity"] = {
        "threshold": threshold,
        "before": popularity.profile(cands, pop),
        "after": popularity.profile(controlled, pop),
    }
    return _merge(controlled).select(*PAIR_COLUMNS), stats


def run_pairs(cfg: QarmConfig, run_id: str) -> tuple[CommitResult, dict[str, Any]]:
    """Build and commit `item_pairs`; returns the commit and the report section."""
    tables = Tables.from_config(cfg)
    if done := tables.already_committed("item_pairs", run_id):
        log.info("run %s already committed item_pairs; nothing to do", run_id)
        return done, pairs_section(cfg, tables)
    spark = spark_session(cfg)
    pairs, stats = build_pairs(cfg, spark, tables)
    pairs = pairs.cache()
    counts = {
        (r["source"], r["split"]): r["count"] for r in pairs.groupBy("source", "split").count().collect()
    }
    stats["counts"] = {f"{s}/{sp}": n for (s, sp), n in sorted(counts.items())}
    result = write_dataframe(pairs, tables, "item_pairs", run_id, mode="overwrite", info=stats)
    pairs.unpersist()
    return result, pairs_section(cfg, tables)


def pairs_section(cfg: QarmConfig, tables: Tables) -> dict[str, Any]:
    """report.json["pairs"] from the committed table and the stats stored with its commit."""
    import json

    from deltalake import DeltaTable

    dt = DeltaTable(tables.uri("item_pairs"), storage_options=tables.storage_options or None)
    info = json.loads(dt.history(1)[0].get("qarm.info", "{}"))
    counts = info.get("counts", {})
    return {
        "i2i": sum(n for k, n in counts.items() if k.startswith("i2i/")),
        "u2i": sum(n for k, n in counts.items() if k.startswith("u2i/")),
        "heldout": sum(n for k, n in counts.items() if k.endswith("/heldout")),
        "judge_rejected": info.get("judge_rejected", {}),
        "judge": info.get("judge"),
        "swing": info.get("swing", {}),
        "popularity": info.get("popularity", {}),
        "eval_start_ts": info.get("eval_start_ts"),
    }
