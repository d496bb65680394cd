"""`qarm pairs`: Swing and U2I on Spark, judge, popularity control, held-out split."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from conftest import read_all

from qarm_dist.config import load_config
from qarm_dist.data.ingest import write_world
from qarm_dist.data.split import tables_eval_start
from qarm_dist.data.world import World
from qarm_dist.io.delta import TableError, Tables
from qarm_dist.pairs import run_pairs
from qarm_dist.pairs.swing import cap_positives, swing, swing_reference
from qarm_dist.pairs.u2i import choose_triggers


def pos_df(spark, rows):
    return spark.createDataFrame(rows, "user_id long, item_id long")


def test_swing_by_hand(spark):
    # A: {1,2,3}, B: {1,2}, C: {2,3}. User pairs sharing >= 2 items: (A,B) on {1,2}, (A,C) on {2,3}.
    rows = [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (2, 2), (2, 3)]
    got = {
        (r["trigger_id"], r["target_id"]): r["score"] for r in swing(pos_df(spark, rows), alpha=1.0).collect()
    }
    w = {0: 1 / math.sqrt(3), 1: 1 / math.sqrt(2), 2: 1 / math.sqrt(2)}
    assert set(got) == {(1, 2), (2, 1), (2, 3), (3, 2)}  # (1,3) shares no user pair with two common items
    assert got[(1, 2)] == pytest.approx(w[0] * w[1] / (1 + 2))
    assert got[(2, 3)] == pytest.approx(w[0] * w[2] / (1 + 2))
    unweighted = swing(pos_df(spark, rows), alpha=0.5, user_weight=False).collect()
    assert len(unweighted) == 4 and all(r["score"] == pytest.approx(1 / 2.5) for r in unweighted)


def test_swing_matches_the_single_process_reference(spark):
    rng = np.random.default_rng(0)
    u, i = rng.integers(0, 60, 900), rng.integers(0, 40, 900)
    ref = swing_reference(u, i, alpha=1.0)
    rows = swing(pos_df(spark, list(zip(u.tolist(), i.tolist()))), alpha=1.0, top_n=10_000).collect()
    got = {(r["trigger_id"], r["target_id"]): r["score"] for r in rows if r["trigger_id"] < r["target_id"]}
    want = dict(zip(zip(ref["i"], ref["j"]), ref["score"]))
    assert len(got) == len(want) > 100
    assert all(got[k] == pytest.approx(v, rel=1e-9) for k, v in want.items())


def test_caps_are_deterministic_and_bounded(spark):
    rows = [(u, i) for u in range(30) for i in range(20)]
    a = cap_positives(pos_df(spark, rows), max_items_per_user=5, max_users_per_item=8, seed=1)
    b = cap_positives(pos_df(spark, rows), max_items_per_user=5, max_users_per_item=8, seed=1)
    ra, rb = sorted(map(tuple, a.collect())), sorted(map(tuple, b.collect()))
    assert ra == rb
    per_user = np.bincount([r[0] for r in ra])
    per_item = np.bincount([r[1] for r in ra])
    assert per_user.max() <= 5 and per_item.max() <= 8


def test_trigger_choice_known_answer():
    t = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32)
    h = np.array(
        [
            [[0.0, 1.0], [0.8, 0.6], [0.6, 0.8]],
            [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]],
            [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]],
        ],
        np.float32,
    )
    ok = np.array([[True, True, True], [True, True, False], [False, False, False]])
    idx, cos = choose_triggers(t, h, ok)
    assert idx.tolist() == [1, 0, -1]
    np.testing.assert_allclose(cos[:2], [0.8, 1.0])
    assert np.isnan(cos[2])


@pytest.fixture(scope="module")
def tiny_pairs(spark, tmp_path_factory):
    """The tiny world with emitted content embeddings, and its committed pairs."""
    root = str(tmp_path_factory.mktemp("pairs") / "t")
    cfg = load_config(overrides=["world.size=tiny", "spark.master=local[2]"], root=root)
    write_world(cfg, "w", emit_embeddings=True)
    result, section = run_pairs(cfg, "p1")
    t = Tables(root)
    table = read_all(t, "item_pairs")
    return cfg, t, result, section, table


def test_pairs_invariants_and_report(tiny_pairs):
    cfg, t, result, section, table = tiny_pairs
    trig, targ = table["trigger_id"].to_numpy(), table["target_id"].to_numpy()
    assert (trig < targ).all()  # canonical order: no self pairs, symmetric duplicates merged
    assert len(set(zip(trig, targ))) == table.num_rows
    assert set(table["source"].to_pylist()) == {"i2i", "u2i"}
    assert set(table["split"].to_pylist()) == {"train", "heldout"}
    assert not set(table.filter(pa.compute.equal(table["source"], "i2i"))["split"].to_pylist()) - {"train"}
    assert section["i2i"] + section["u2i"] == table.num_rows == result.rows
    assert section["heldout"] == table.filter(pa.compute.equal(table["split"], "heldout")).num_rows > 0
    assert set(section["judge_rejected"]) == {"i2i", "u2i"}
    for src in ("i2i", "u2i"):  # the cap holds per item and source
        s = table.filter(pa.compute.equal(table["source"], src))
        ends = np.concatenate([s["trigger_id"].to_numpy(), s["target_id"].to_numpy()])
        assert np.bincount(ends).max() <= 2 * cfg.pairs.max_pairs_per_item
    assert section["swing"]["dropped_by_caps"] >= 0 and section["popularity"]["after"]


def test_pairs_agree_with_planted_behaviour(tiny_pairs):
    cfg, _, _, _, table = tiny_pairs
    world = World.from_config(cfg.world)
    truth = world.item_truth(np.arange(world.n_items))
    rng = np.random.default_rng(0)
    rand = truth["behaviour_topic"][rng.integers(0, world.n_items, (5000, 2))]
    chance = (rand[:, 0] == rand[:, 1]).mean()
    for src in ("i2i", "u2i"):
        s = table.filter(pa.compute.equal(table["source"], src))
        same = (
            truth["behaviour_topic"][s["trigger_id"].to_numpy()]
            == truth["behaviour_topic"][s["target_id"].to_numpy()]
        ).mean()
        assert same > chance + 0.15, (src, same, chance)


def test_heldout_pairs_come_from_the_eval_window_only(spark, root):
    # Two users; the eval window (last 10 % by time) holds user 1's late likes only.
    cfg = load_config(
        overrides=[
            "pairs.judge=none",
            "pairs.swing_min_support=1",
            "spark.master=local[2]",
            "split.eval_fraction=0.12",
        ],
        root=root,
    )
    t = Tables(root)
    items = t.writer("items", "i")
    items.write(
        pa.table(
            {"item_id": list(range(10)), "text": ["x"] * 10, "category": ["c"] * 10, "created_ts": [0] * 10}
        )
    )
    items.commit()
    day = 86_400
    rows = [(u, i, 1_700_000_000 + (u * 10 + i) * day) for u in (0, 1) for i in range(8)]
    rows += [(1, 8, 1_700_000_000 + 400 * day), (1, 9, 1_700_000_000 + 401 * day)]
    u, i, ts = map(np.array, zip(*rows))
    w = t.writer("interactions", "x")
    w.write(
        pa.table(
            {
                "user_id": u,
                "item_id": i,
                "ts": ts,
                "day": pa.array((ts // day).astype(np.int32)).cast(pa.date32()),
                "click": np.ones(len(u), np.int8),
                "like": np.ones(len(u), np.int8),
            }
        )
    )
    w.commit()
    cut = tables_eval_start(t, cfg.split.eval_fraction)
    assert (ts >= cut).sum() == 2  # exactly the two late events
    run_pairs(cfg, "p")
    table = read_all(t, "item_pairs")
    held = table.filter(pa.compute.equal(table["split"], "heldout"))
    late = {8, 9}
    assert held.num_rows >= 1
    assert all(
        a in late or b in late for a, b in zip(held["trigger_id"].to_pylist(), held["target_id"].to_pylist())
    )
    train = table.filter(pa.compute.equal(table["split"], "train"))
    assert not (set(train["trigger_id"].to_pylist()) | set(train["target_id"].to_pylist())) & late


@pytest.mark.parametrize("case", ["empty", "unknown items", "missing column"])
def test_bad_input_leaves_item_pairs_unchanged(spark, root, case):
    cfg = load_config(overrides=["world.size=tiny", "pairs.judge=none", "spark.master=local[2]"], root=root)
    write_world(cfg, "w")
    run_pairs(cfg, "good")
    t = Tables(root)
    before = t.version("item_pairs")
    w = t.writer("interactions", f"bad-{case}")
    if case == "empty":
        w.write(next(t.read_batches("interactions")).slice(0, 0))
        w.commit(mode="overwrite")
        match = "table 'interactions'.*empty"
    elif case == "unknown items":
        b = next(t.read_batches("interactions")).slice(0, 50)
        ids = b.column("item_id").to_numpy().copy()
        ids[:7] = 10**9 + np.arange(7)
        w.write(b.set_column(1, "item_id", pa.array(ids)))
        w.commit(mode="overwrite")
        match = (
            "table 'interactions', column 'item_id': 7 of 50 rows name items that are not in table 'items'"
        )
    else:
        from deltalake import write_deltalake

        write_deltalake(
            t.uri("interactions"),
            pa.table({"user_id": [1], "item_id": [1]}),
            mode="overwrite",
            schema_mode="overwrite",
        )
        match = "column 'ts'"
    with pytest.raises(TableError, match=match):
        run_pairs(cfg, f"after-{case}")
    assert t.version("item_pairs") == before
