"""`qarm samples` and `qarm rank` on the tiny world: samples invariants, a killed worker, learning, bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import read_all
from deltalake import write_deltalake

from qarm_dist import faults
from qarm_dist.codebook import stage as codebook
from qarm_dist.config import load_config
from qarm_dist.data.ingest import write_world
from qarm_dist.data.split import tables_eval_start
from qarm_dist.io.delta import TableError, Tables
from qarm_dist.rank import evaluate, train
from qarm_dist.rank.samples import run_samples

pytestmark = pytest.mark.slow

FAST = [
    "world.size=tiny",
    "codebook.levels=2",
    "codebook.k=16",
    "rank.epochs=3",
    "rank.batch_size=256",
    "rank.user_rows=4096",
    "rank.item_rows=4096",
    "rank.ngram_rows=4096",
]


def cfg_for(root, *extra):
    return load_config(overrides=[*FAST, *extra], root=str(root))


@pytest.fixture(scope="module")
def world_root(tmp_path_factory, spark):
    """Tiny world (emitted content embeddings), an RQ codebook with codes, and its samples."""
    root = tmp_path_factory.mktemp("rank") / "tables"
    cfg = cfg_for(root)
    write_world(cfg, "w", emit_embeddings=True)
    _, cb = codebook.run_fit(cfg, "cb")
    codebook.run_assign(cfg, "cb", cb.version)
    run_samples(cfg, "s")
    return root


@pytest.fixture(scope="module")
def ablation(world_root, ray_local, tmp_path_factory):
    """id_only and vq_rq x 2 seeds in one Ray Train run, with rank 1 killed in the first job's epoch 1."""
    marker = tmp_path_factory.mktemp("fault") / "fired"
    mp = pytest.MonkeyPatch()
    mp.setenv(faults.FAULT_ENV, "rank.step:job=0,epoch=1,step=2,rank=1,sleep=2")
    mp.setenv(faults.ONCE_ENV, str(marker))
    try:
        info = train.fit(cfg_for(world_root), "ab", ["id_only", "vq_rq", "emb"], [0, 1])
    finally:
        mp.undo()
    return info, marker


def test_samples_have_strictly_earlier_histories_and_leak_free_popularity(world_root):
    t = Tables(str(world_root))
    s = read_all(t, "samples")
    inter = read_all(t, "interactions").to_pandas()
    assert s.num_rows == len(inter) and pc.sum(s["sampled"]).as_py() == 0  # the world has real negatives
    cut = tables_eval_start(t, 0.1)
    assert set(np.where(s["ts"].to_numpy() >= cut, "eval", "train")) == set(s["split"].to_pylist())
    assert (np.where(s["ts"].to_numpy() >= cut, "eval", "train") == np.array(s["split"].to_pylist())).all()
    clicks = inter[inter["click"] == 1].sort_values(["ts", "item_id"])
    by_user = {u: g for u, g in clicks.groupby("user_id")}
    for row in s.slice(0, 400).to_pylist():
        g = by_user.get(row["user_id"])
        prior = g.iloc[:0] if g is None else g[g["ts"] < row["ts"]].iloc[-50:]
        assert row["history"] == prior["item_id"].tolist()
        assert row["history_like"] == prior["like"].tolist()  # each earlier event's own label
    train_counts = inter[inter["ts"] < cut].groupby("item_id").size()
    pop = dict(zip(s["item_id"].to_pylist(), s["item_pop"].to_pylist()))
    assert all(pop[i] == int(train_counts.get(i, 0)) for i in list(pop)[:500])
    user_counts = inter[inter["ts"] < cut].groupby("user_id").size()
    upop = dict(zip(s["user_id"].to_pylist(), s["user_pop"].to_pylist()))
    assert all(upop[u] == int(user_counts.get(u, 0)) for u in upop)
    assert run_samples(cfg_for(world_root), "s")[0].skipped  # same run id: nothing new
    # written in a hashed order (trainers read in table order): the first tenth mixes users like a
    # random tenth does, where rows grouped by user would name about a tenth of them
    users = s["user_id"].to_numpy()
    head = len(np.unique(users[: len(users) // 10]))
    drawn = len(np.unique(np.random.default_rng(0).choice(users, len(users) // 10, replace=False)))
    assert head > 0.9 * drawn, (head, drawn, len(np.unique(users)))


def test_implicit_data_gets_sampled_negatives(world_root, tmp_path, spark):
    root = tmp_path / "implicit"
    shutil.copytree(world_root, root)
    t = Tables(str(root))
    clicks = read_all(t, "interactions")
    clicks = clicks.filter(pc.equal(clicks["click"], 1))  # ratings-like data: every row is a click
    w = t.writer("interactions", "implicit")
    w.write(clicks)
    w.commit(mode="overwrite")
    run_samples(cfg_for(root), "s-implicit")
    s = read_all(t, "samples")
    sampled = s.filter(pc.equal(s["sampled"], 1))
    assert sampled.num_rows > 0.9 * clicks.num_rows  # one per row, minus the rare draw of a real key
    assert pc.max(sampled["click"]).as_py() == 0 and pc.max(sampled["like"]).as_py() == 0
    keys = list(zip(s["user_id"].to_pylist(), s["item_id"].to_pylist(), s["ts"].to_pylist()))
    assert len(keys) == len(set(keys))


def test_training_resumes_after_a_killed_worker_and_learns(ablation):
    info, marker = ablation
    assert marker.exists()
    hist = info.meta["history"]
    first = [h for h in hist if h["job"] == 0]
    assert [h["epoch"] for h in first] == [0, 1, 2] and first[1][
        "resumed_from"
    ] == 0  # resumed, not restarted
    assert [(r["variant"], r["seed"]) for r in info.meta["results"]] == [
        ("id_only", 0),
        ("id_only", 1),
        ("vq_rq", 0),
        ("vq_rq", 1),
    ]
    assert info.meta["skipped"] == {
        "emb": "no item_aligned_emb (run `qarm align train` and `qarm align embed`)"
    }
    for r in info.meta["results"]:
        like = r["eval"]["like"]
        assert like["auc"] > 0.6 and like["gauc"] > 0.55, like  # the planted signal, far above chance 0.5
        assert r["items_without_codes"] == 0


def test_code_features_improve_cold_start_auc(ablation):
    summary = train.summarize(ablation[0], "like")
    v = summary["variants"]
    assert v["vq_rq"]["like"]["counts"]["cold_rows"] > 100
    assert v["vq_rq"]["like"]["auc_cold"] > v["id_only"]["like"]["auc_cold"] + 0.02, summary


def test_ray_data_evaluation_matches_the_in_worker_evaluation(world_root, ablation):
    info, _ = ablation
    got = evaluate.evaluate(cfg_for(world_root), info.version)
    want = info.meta["results"][-1]["eval"]
    for task in ("click", "like"):
        for key in ("auc", "gauc", "logloss", "auc_cold"):
            assert got["metrics"][task][key] == pytest.approx(want[task][key], abs=1e-5)


def test_bad_samples_are_refused_before_training(world_root, tmp_path, ray_local):
    root = tmp_path / "bad"
    shutil.copytree(world_root, root)
    t = Tables(str(root))
    s = read_all(t, "samples")
    before = t.version("samples")

    # written by something else, bypassing validation: a like label of 2
    bad = s.set_column(s.schema.get_field_index("like"), "like", pa.array(np.full(s.num_rows, 2, np.int8)))
    write_deltalake(t.uri("samples"), bad.slice(0, 10), mode="append")
    with pytest.raises(
        TableError, match=r"table 'samples', column 'like': 10 of \d+ rows have a label outside"
    ):
        train.fit(cfg_for(root), "never", ["id_only"], [0])

    # no evaluation window
    w = t.writer("samples", "train-only")
    w.write(s.filter(pc.equal(s["split"], "train")))
    w.commit(mode="overwrite")
    with pytest.raises(TableError, match="table 'samples', column 'split': 0 of .* in split 'eval'"):
        train.fit(cfg_for(root), "never", ["id_only"], [0])
    assert not (root / "_models" / "rank" / "never" / "model.json").exists()
    assert t.version("samples") == before + 2  # only the two writes above
