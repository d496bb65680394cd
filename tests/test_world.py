"""The generated world plants what QARM needs, deterministically and streamably."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from qarm_dist.data.split import eval_start
from qarm_dist.data.world import World


@pytest.fixture(scope="module")
def tiny() -> World:
    return World.named("tiny")


@pytest.fixture(scope="module")
def inter(tiny: World) -> pa.Table:
    return pa.concat_tables(list(tiny.interactions(users_per_chunk=150)))


def test_deterministic_by_seed_and_chunking(tiny):
    a = pa.concat_tables(list(tiny.items(chunk_rows=1000)))
    b = pa.concat_tables(list(tiny.items(chunk_rows=37)))  # streaming in other chunks gives the same rows
    assert a.equals(b)
    assert a.num_rows == tiny.n_items and a["item_id"].to_pylist() == list(range(tiny.n_items))
    c = pa.concat_tables(list(tiny.with_seed(1).items()))
    assert not a["text"].equals(c["text"])
    x = pa.concat_tables(list(tiny.interactions()))
    y = pa.concat_tables(list(tiny.interactions()))
    assert x.equals(y)
    e1 = pa.concat_tables(list(tiny.content_embeddings(chunk_rows=50)))
    e2 = pa.concat_tables(list(tiny.content_embeddings()))
    assert e1.equals(e2)


def test_popularity_is_heavy_tailed(tiny, inter):
    counts = np.sort(np.bincount(inter["item_id"].to_numpy(), minlength=tiny.n_items))[::-1]
    top1 = counts[: tiny.n_items // 100].sum() / counts.sum()
    assert top1 > 0.10  # uniform popularity would give 0.01
    median_item = np.median(counts)
    assert counts[0] > 20 * median_item


def test_items_appear_only_after_they_exist_and_labels_are_consistent(tiny, inter):
    created = tiny.created_ts(inter["item_id"].to_numpy())
    assert (inter["ts"].to_numpy() >= created).all()
    click, like = inter["click"].to_numpy(), inter["like"].to_numpy()
    assert ((like == 1) <= (click == 1)).all()  # like implies click
    assert 0.2 < click.mean() < 0.8 and 0.05 < like.mean() < click.mean()


def test_cold_start_items_are_in_the_eval_window(tiny, inter):
    ts, items = inter["ts"].to_numpy(), inter["item_id"].to_numpy()
    cut = eval_start(lambda: [ts], 0.1)
    cold = ~np.isin(items[ts >= cut], items[ts < cut])
    assert cold.sum() >= 100  # enough cold rows to measure a cold-start effect on the tiny world
    assert len(np.unique(items[ts >= cut][cold])) >= 10


def test_planted_mismatch_is_measurable(tiny, inter):
    truth = tiny.item_truth(np.arange(tiny.n_items))
    assert abs(truth["mismatched"].mean() - tiny.mismatch) < 0.06
    # The content view groups items by content topic: nearest neighbours share it far above chance ...
    emb = np.stack(pa.concat_tables(list(tiny.content_embeddings()))["emb"].to_numpy(zero_copy_only=False))
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    nn = sim.argmax(1)
    content_agree = (truth["content_topic"][nn] == truth["content_topic"]).mean()
    behaviour_agree = (truth["behaviour_topic"][nn] == truth["behaviour_topic"]).mean()
    assert content_agree > 0.9
    # ... but behaviour topics only where content and behaviour agree: the gap alignment must close.
    assert behaviour_agree < content_agree - 0.25
    # Behaviour follows behaviour topics: items a user liked share behaviour topics more than content topics.
    liked = inter.filter(pa.compute.equal(inter["like"], 1))
    u, i = liked["user_id"].to_numpy(), liked["item_id"].to_numpy()
    same_b, same_c = [], []
    for user in np.unique(u)[:200]:
        items = i[u == user]
        if len(items) > 1:
            b, c = truth["behaviour_topic"][items], truth["content_topic"][items]
            same_b.append((b[:, None] == b[None]).mean())
            same_c.append((c[:, None] == c[None]).mean())
    assert np.mean(same_b) > np.mean(same_c) + 0.1


def test_named_sizes_and_bad_size():
    assert World.named("small").n_items > World.named("tiny").n_items
    assert World.named("tiny", n_items=50).n_items == 50
    with pytest.raises(ValueError, match="unknown world size"):
        World.named("huge")


def test_popularity_cdf_is_built_chunk_by_chunk(tiny):
    full = np.cumsum(tiny.popularity(np.arange(tiny.n_items)))
    np.testing.assert_allclose(tiny._popularity_cdf(chunk_rows=7), full, rtol=1e-12)
