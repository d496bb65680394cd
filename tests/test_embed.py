"""`qarm embed`: Ray Data + the real MiniLM encoder over the tiny world."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import read_all

from qarm_dist.data.ingest import write_world
from qarm_dist.data.world import World
from qarm_dist.embed import run_embed
from qarm_dist.embed.encoders import make_encoder
from qarm_dist.io.delta import Tables
from qarm_dist.io.schemas import spec

pytestmark = pytest.mark.slow


def test_encoder_sees_meaning():
    enc = make_encoder("minilm")
    e = enc.encode(["a rocket launch to the moon", "astronauts orbit the planet", "a pasta sauce recipe"])
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_embed_tiny_world_end_to_end(ray_local, tiny_cfg):
    write_world(tiny_cfg, "w")
    r = run_embed(tiny_cfg, "emb-1")
    t = Tables(tiny_cfg.tables.root)
    world = World.from_config(tiny_cfg.world)
    assert (r.rows, r.skipped) == (world.n_items, False)
    snap = t.snapshot("item_content_emb")
    assert snap.dim == 384
    table = read_all(t, "item_content_emb")
    assert sorted(table["item_id"].to_pylist()) == list(range(world.n_items))
    assert set(table["encoder"].to_pylist()) == {"all-MiniLM-L6-v2"}
    table = table.sort_by("item_id")
    emb = np.stack(table["emb"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-4)
    # The encoder reads the planted text: nearest neighbours share the content topic far above chance (1/16).
    topic = world.item_truth(np.arange(world.n_items))["content_topic"]
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    assert (topic[sim.argmax(1)] == topic).mean() > 0.6

    again = run_embed(tiny_cfg, "emb-1")  # same run id: nothing new
    assert again.skipped and t.version("item_content_emb") == snap.version


def test_embed_refuses_an_empty_items_table(ray_local, tiny_cfg):
    t = Tables(tiny_cfg.tables.root)
    w = t.writer("items", "empty")
    w.write(spec("items").schema().empty_table())
    w.commit()
    with pytest.raises(ValueError, match="table 'items' .* has 0 rows"):
        run_embed(tiny_cfg, "emb-empty")
    assert not t.exists("item_content_emb")


def test_a_layout_that_would_starve_ray_data_is_refused(ray_local, tiny_cfg):
    write_world(tiny_cfg, "w")
    cfg = tiny_cfg.model_copy(update={"encoder": tiny_cfg.encoder.model_copy(update={"actors": 2})})
    with pytest.raises(
        ValueError, match="encoder.actors x encoder.cpus_per_actor = 2 x 1.0 holds 2 of the cluster's 2 CPUs"
    ):
        run_embed(cfg, "emb-starved")
    assert not Tables(tiny_cfg.tables.root).exists("item_content_emb")
