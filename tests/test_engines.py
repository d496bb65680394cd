"""Spark and Ray read the same pinned snapshots that pyarrow reads (no delta-spark jars)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from qarm_dist.config import load_config
from qarm_dist.data.ingest import write_world
from qarm_dist.io.delta import Tables
from qarm_dist.io.schemas import spec


@pytest.fixture
def two_versions(root):
    """item_content_emb at v1 (world embeddings, 600 rows) and v2 (120 rows overwrite)."""
    cfg = load_config(overrides=["world.size=tiny"], root=root)
    write_world(cfg, "w1", emit_embeddings=True)
    t = Tables(root)
    w = t.writer("item_content_emb", "w2", dim=cfg.world.content_dim)
    first = next(t.read_batches("item_content_emb", batch_rows=120))
    w.write(first)
    w.commit(mode="overwrite")
    return t, first


def test_spark_reads_a_pinned_version(spark, two_versions):
    t, first = two_versions
    v1 = t.spark(spark, "item_content_emb", version=1)
    v2 = t.spark(spark, "item_content_emb")
    assert (v1.count(), v2.count()) == (600, 120)
    assert dict(v1.dtypes)["emb"] == "array<float>"
    rows = v2.orderBy("item_id").limit(3).collect()
    want = np.stack(first["emb"].to_numpy(zero_copy_only=False)[:3])
    np.testing.assert_array_equal(np.array([r["emb"] for r in rows], np.float32), want)
    # an aggregate Spark computes over the snapshot equals the one pyarrow streams
    s = v1.selectExpr("sum(item_id) as s").first()["s"]
    assert s == sum(
        pa.compute.sum(b.column("item_id")).as_py() for b in t.read_batches("item_content_emb", 1)
    )


def test_spark_reads_an_empty_snapshot_with_the_schema(spark, root):
    t = Tables(root)
    w = t.writer("items", "e1")
    w.write(pa.table({"item_id": [1], "text": ["x"], "category": ["c"], "created_ts": [0]}))
    w.commit()
    w = t.writer("items", "e2")
    w.write(spec("items").schema().empty_table())
    w.commit(mode="overwrite")
    df = t.spark(spark, "items")
    assert df.count() == 0 and df.columns == ["item_id", "text", "category", "created_ts"]


def test_ray_reads_a_pinned_version(ray_local, two_versions):
    t, _ = two_versions
    assert t.ray("item_content_emb", version=1).count() == 600
    ds = t.ray("item_content_emb", columns=["item_id"])
    assert ds.count() == 120
    assert ds.sum("item_id") == sum(range(120))
