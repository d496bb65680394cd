"""`qarm codebook`: distributed residual K-means on Spark, versions, assign/refresh, quality."""

from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_all
from deltalake import CommitProperties, DeltaTable
from deltalake.transaction import AddAction

from qarm_dist.codebook import stage, store
from qarm_dist.codebook.distributed import fit
from qarm_dist.codebook.kmeans import assign, init_centroids, kmeans
from qarm_dist.codebook.quality import level_metrics, sid_metrics
from qarm_dist.config import load_config
from qarm_dist.data.ingest import write_world
from qarm_dist.io.delta import TableError, Tables

OVERRIDES = [
    "world.size=tiny",
    "codebook.levels=2",
    "codebook.k=16",
    "codebook.iters=8",
    "codebook.fit_window=all",
]


@pytest.fixture(scope="module")
def world_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cb") / "t")
    cfg = load_config(overrides=OVERRIDES, root=root)
    write_world(cfg, "w", emit_embeddings=True)
    return root


def vectors(tables: Tables, name: str = "item_content_emb") -> tuple[np.ndarray, np.ndarray]:
    t = pa.concat_tables([pa.Table.from_batches([b]) for b in tables.read_batches(name)]).sort_by("item_id")
    return t["item_id"].to_numpy(), np.stack(t["emb"].to_numpy(zero_copy_only=False)).astype(np.float32)


def test_distributed_fit_equals_the_single_process_kernels(spark, world_root):
    t = Tables(world_root)
    _, x = vectors(t)
    c0 = init_centroids(x, 16, "random", seed=3)
    dist = fit(spark, t.snapshot("item_content_emb"), "emb", 1, 16, 6, init_centroids_l0=c0, partitions=2)
    local = kmeans(x, 16, iters=6, centroids=c0, seed=0)
    np.testing.assert_allclose(dist.inertia[0], local.inertia, rtol=1e-4)
    np.testing.assert_allclose(dist.book.centroids[0], local.centroids, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(assign(x, dist.book.centroids[0]).codes, local.codes)
    assert dist.cost["rows"] == len(x) and dist.cost["pieces"] >= 1


def test_cache_misses_recompute_the_same_residuals(spark, world_root):
    snap = Tables(world_root).snapshot("item_content_emb")
    cached = fit(spark, snap, "emb", 3, 8, 4, seed=1, partitions=2)
    uncached = fit(spark, snap, "emb", 3, 8, 4, seed=1, partitions=2, cache_mb=0)  # every pass re-reads
    for a, b in zip(cached.book.centroids, uncached.book.centroids):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert cached.recon_mse[0] > cached.recon_mse[1] > cached.recon_mse[2]  # each level explains more
    reads = uncached.cost["iteration_piece_reads"]
    assert uncached.cost["iteration_cache_misses"] == reads > 0  # no cache: every iteration re-reads
    assert cached.cost["iteration_cache_misses"] < reads  # the worker cache spares the re-reads


def test_inertia_within_one_percent_of_faiss(spark, world_root):
    t = Tables(world_root)
    _, x = vectors(t)
    ours = fit(spark, t.snapshot("item_content_emb"), "emb", 1, 12, 20, init="kmeans++", seed=0)
    best_faiss = np.inf
    for seed in range(3):
        km = faiss.Kmeans(x.shape[1], 12, niter=20, seed=seed, max_points_per_centroid=10**6)
        km.train(x)
        best_faiss = min(best_faiss, float(km.index.search(x, 1)[0].sum()))
    assert ours.recon_mse[0] * len(x) <= 1.01 * best_faiss


def test_fit_assign_refresh_diff_and_immutable_versions(spark, world_root, tmp_path):
    root = str(tmp_path / "r")
    cfg = load_config(overrides=[*OVERRIDES, "codebook.vq_k=5", "codebook.fsq_levels=[4,4]"], root=root)
    write_world(cfg, "w", emit_embeddings=True)
    t = Tables(root)
    r1, cb1 = stage.run_fit(cfg, "fit-1")
    assert cb1.version == 1 and cb1.fsq is not None and cb1.info["source"] == "item_content_emb"
    loaded = store.load(t, 1)
    for a, b in zip(loaded.book.centroids, cb1.book.centroids):
        np.testing.assert_array_equal(a, b)
    assert loaded.fsq.levels == (4, 4)

    # a second version never rewrites the first; writing version 1 again is refused
    _, cb2 = stage.run_fit(
        cfg.model_copy(update={"codebook": cfg.codebook.model_copy(update={"seed": 5})}), "fit-2"
    )
    assert cb2.version == 2 and store.versions(t) == [1, 2]
    w = t.writer("codebooks", "rewrite-1", dim=cb1.dim)
    w.write(cb1.to_table())
    with pytest.raises(TableError, match="share their key"):
        w.commit(mode="append")
    np.testing.assert_array_equal(store.load(t, 1).book.centroids[0], cb1.book.centroids[0])

    # assign: every item gets codes; VQ equals brute-force nearest neighbours without the item itself
    a1, _ = stage.run_assign(cfg, "assign-1", version=1)
    ids, x = vectors(t)
    codes = read_all(t, "item_codes").sort_by("item_id")
    assert a1.rows == len(ids) and codes["item_id"].to_pylist() == ids.tolist()
    rq = np.stack(codes["rq"].to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(rq[:, 0], assign(x, cb1.book.centroids[0]).codes)
    fsq = np.stack(codes["fsq"].to_numpy(zero_copy_only=False))
    assert fsq.shape == (len(ids), 2) and fsq.min() >= 0 and fsq.max() <= 3
    vq = np.stack(codes["vq"].to_numpy(zero_copy_only=False))
    d = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    pos = np.searchsorted(ids, vq)
    assert not (vq == ids[:, None]).any()  # the item itself is never its own neighbour
    # the world repeats some vectors exactly, so compare distances (ties make the ids arbitrary)
    got = np.sort(np.take_along_axis(d, pos, axis=1), axis=1)
    want = np.sort(d, axis=1)[:, :5]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    # refresh: new items get codes from version 1 without refitting; old items keep theirs
    new = pa.table(
        {"item_id": np.arange(10_000, 10_020), "emb": list(x[:20] + 0.01), "encoder": ["world"] * 20}
    )
    w = t.writer("item_content_emb", "new-items", dim=cb1.dim)
    w.write(new)
    w.commit(mode="append")
    a2, _ = stage.run_assign(cfg, "assign-2", version=1)
    after = read_all(t, "item_codes").sort_by("item_id")
    assert a2.rows == len(ids) + 20
    old = after.filter(pa.compute.less(after["item_id"], 10_000))
    assert old["rq"].equals(codes["rq"]) and old["vq"].equals(codes["vq"])
    again, _ = stage.run_assign(cfg, "assign-3", version=1)  # nothing left to code: an empty commit
    assert again.rows == a2.rows

    stage.run_assign(cfg, "assign-v2", version=2)
    d12 = stage.diff(cfg, 1, 2)
    assert d12["items"] == len(ids) + 20 and 0 < d12["rq_changed"] <= d12["items"]
    # an item changed iff one of the compared levels changed
    assert max(d12["per_level_changed"]) <= d12["rq_changed"] <= sum(d12["per_level_changed"])
    q = stage.quality(cfg, 1)
    assert q["items"] == len(ids) + 20 and 0 <= q["collision_rate"] <= 1 and len(q["levels"]) == 3
    assert q["levels"][0]["k"] == 16 and q["levels"][2]["k"] == 16  # FSQ (4 x 4) as the last level


def _foreign_commit(t: Tables, name: str, table: pa.Table) -> None:
    """Commit a Parquet file without the table layer's validation: input from another writer."""
    path = os.path.join(t.uri(name), "foreign.parquet")
    pq.write_table(table, path)
    st = os.stat(path)
    add = AddAction(
        "foreign.parquet",
        st.st_size,
        {},
        int(st.st_mtime * 1000),
        True,
        json.dumps({"numRecords": table.num_rows}),
    )
    dt = DeltaTable(t.uri(name))
    dt.create_write_transaction(
        [add], mode="overwrite", schema=dt.schema(), commit_properties=CommitProperties()
    )


@pytest.mark.parametrize("case", ["nan", "k too large", "empty", "wrong dimension"])
def test_bad_input_makes_no_new_version(spark, tmp_path, case):
    root = str(tmp_path / "r")
    cfg = load_config(overrides=OVERRIDES, root=root)
    write_world(cfg, "w", emit_embeddings=True)
    t = Tables(root)
    stage.run_fit(cfg, "good")
    before = store.versions(t)
    ids, x = vectors(t)
    if case == "nan":
        x[:3, 0] = np.nan
        x[7, 5] = np.inf
        _foreign_commit(
            t,
            "item_content_emb",
            pa.table(
                {
                    "item_id": ids,
                    "emb": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1]),
                    "encoder": ["x"] * len(ids),
                }
            ),
        )
        err, match = TableError, "table 'item_content_emb', column 'emb': 4 of 600 rows have NaN"
    elif case == "k too large":
        cfg = load_config(overrides=[*OVERRIDES, "codebook.k=601"], root=root)
        err, match = ValueError, "k=601 is larger than the 600 vectors"
    elif case == "empty":
        w = t.writer("item_content_emb", "empty", dim=x.shape[1])
        w.write(next(t.read_batches("item_content_emb")).slice(0, 0))
        w.commit(mode="overwrite")
        err, match = TableError, "table 'item_content_emb', column 'emb': 0 of 0 rows exist"
    else:
        # the source re-created by another encoder (8-d) under a codebook fitted on 64-d vectors
        import shutil

        shutil.rmtree(t.uri("item_content_emb"))
        w = t.writer("item_content_emb", "other-encoder", dim=8)
        w.write(pa.table({"item_id": ids, "emb": list(x[:, :8]), "encoder": ["other"] * len(ids)}))
        w.commit()
        with pytest.raises(ValueError, match="'item_content_emb' has dimension 8, codebook version 1 has 64"):
            stage.run_assign(cfg, "assign-bad", version=1)
        assert not t.exists("item_codes") and store.versions(t) == before
        return
    with pytest.raises(err, match=match):
        stage.run_fit(cfg, f"bad-{case}")
    assert store.versions(t) == before


def test_quality_kernels_against_brute_force():
    rng = np.random.default_rng(0)
    sids = rng.zipf(1.6, 3000) % 500  # skewed: collisions and a large bucket
    _, sizes = np.unique(sids, return_counts=True)
    hist_sizes, hist_n = np.unique(sizes, return_counts=True)
    m = sid_metrics(hist_sizes, hist_n)
    n = len(sids)
    assert m["items"] == n and m["sids"] == len(sizes) and m["largest_bucket"] == sizes.max()
    assert m["collision_rate"] == pytest.approx(sizes[sizes > 1].sum() / n)
    s = np.sort(sizes).astype(float)
    gini = (2 * np.arange(1, len(s) + 1) - len(s) - 1) @ s / (len(s) * s.sum())
    assert m["gini"] == pytest.approx(gini, rel=1e-9)
    p = sizes / n
    assert m["normalized_entropy"] == pytest.approx(-(p * np.log(p)).sum() / np.log(n))
    lv = level_metrics(np.array([10, 0, 5, 5]), k=6)
    assert lv["utilization"] == 0.5 and lv["dead_codes"] == 3
    assert lv["perplexity"] == pytest.approx(np.exp(-(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25))))
