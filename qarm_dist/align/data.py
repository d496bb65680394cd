"""The alignment training set: train-split pairs, each bringing both items' content.

    item_pairs (split = train) ──┐
    content (emb | text) ⋈ counts ┴─► ⋈ trigger ─► ⋈ target ─► materialised, sharded to workers

Everything is Ray Data: the pairs are read as a Dataset, joined (hash shuffles)
with the content table twice, once per side, and, for the logQ correction, with
each item's number of occurrences among the pairs' endpoints. The result is
materialised once (in the object store, spilling to disk) and streamed to the
Ray Train workers every epoch, so the joins run once per job, not per epoch.

Inputs are checked before anything trains: no train pairs, or pairs naming items
that the content table does not have, are errors that name the table, the
column and the number of rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from qarm_dist.io.delta import TableError, Tables

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

SIDES = ("trigger", "target")


@dataclass(frozen=True)
class PairData:
    dataset: ray.data.Dataset  # trigger_id, target_id, trigger_<col>, target_<col>[, trigger_n, target_n]
    rows: int
    endpoints: int  # 2 x rows: the denominator of the logQ frequencies
    pairs_version: int
    content: str  # the content table
    content_version: int
    column: str  # "emb" or "text"
    dim: int | None


def content_source(column: str) -> str:
    return "item_content_emb" if column == "emb" else "items"


def _null_counts(batch: pa.Table, column: str) -> pa.Table:
    return pa.table({f"{s}_missing": [batch.column(f"{s}_{column}").null_count] for s in SIDES})


def load_pairs(tables: Tables, column: str, logq: bool, partitions: int) -> PairData:
    """Train pairs joined with both items' content (and endpoint counts), materialised and checked."""
    import ray

    pairs_snap = tables.snapshot("item_pairs")
    source = content_source(column)
    content_snap = tables.snapshot(source)
    pairs = tables.ray("item_pairs", pairs_snap.version, ["trigger_id", "target_id", "split"])
    pairs = pairs.filter(expr="split == 'train'").drop_columns(["split"]).materialize()
    rows = pairs.count()
    if rows == 0:
        raise TableError(
            "item_pairs",
            "split",
            pairs_snap.rows,
            pairs_snap.rows,
            "are in split 'train' (none): there is nothing to align on; run `qarm pairs` on more data",
        )
    # hash-shuffle partitions: one per million pairs up to one per CPU (each costs an aggregator actor)
    parts = partitions or max(1, min(int(ray.cluster_resources().get("CPU", 1)), -(-rows // 1_000_000)))
    content = tables.ray(source, content_snap.version, ["item_id", column])
    if logq:
        ends = (
            pairs.select_columns(["trigger_id"])
            .rename_columns({"trigger_id": "item_id"})
            .union(pairs.select_columns(["target_id"]).rename_columns({"target_id": "item_id"}))
        )
        counts = ends.groupby("item_id", num_partitions=parts).count().rename_columns({"count()": "n"})
        content = content.join(counts, "left_outer", parts, on=("item_id",))
    joined = pairs
    for side in SIDES:
        renamed = {c: f"{side}_{c}" for c in content.columns() if c != "item_id"}
        renamed["item_id"] = f"{side}_id"
        joined = joined.join(content.rename_columns(renamed), "left_outer", parts, on=(f"{side}_id",))
    joined = joined.materialize()
    missing = joined.map_batches(_null_counts, fn_kwargs={"column": column}, batch_format="pyarrow")
    bad = missing.sum([f"{side}_missing" for side in SIDES])  # one pass for both sides
    for side in SIDES:
        if bad[f"sum({side}_missing)"]:
            raise TableError(
                "item_pairs",
                f"{side}_id",
                int(bad[f"sum({side}_missing)"]),
                rows,
                f"(split train) name items that are not in table '{source}' (version {content_snap.version}); "
                "re-run the stage that writes it, or `qarm pairs` on the current items",
            )
    log.info("alignment data: %d train pairs with %s from %s v%d", rows, column, source, content_snap.version)
    return PairData(
        joined, rows, 2 * rows, pairs_snap.version, source, content_snap.version, column, content_snap.dim
    )


def log_frequency(counts: np.ndarray, endpoints: int) -> np.ndarray:
    """log q of an item: its share of all pair endpoints (the in-batch sampling probability)."""
    return (np.log(np.maximum(counts, 1)) - np.log(endpoints)).astype(np.float32)
