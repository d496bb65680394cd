"""`qarm align` on the tiny world: Ray Train with a killed worker, Ray Data inference, hit rate, bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pytest
from conftest import read_all

from qarm_dist import faults, models
from qarm_dist.align.data import load_pairs
from qarm_dist.align.evaluate import evaluate
from qarm_dist.align.infer import run_embed
from qarm_dist.align.train import train
from qarm_dist.config import load_config
from qarm_dist.data.ingest import write_world
from qarm_dist.embed import run_embed as run_content_embed
from qarm_dist.io.delta import TableError, Tables
from qarm_dist.io.schemas import spec
from qarm_dist.pairs import run_pairs

pytestmark = pytest.mark.slow

ALIGN = ["align.epochs=4", "align.batch_size=128", "align.workers=2", "align.seeds=1"]


def cfg_for(root: str, *extra: str):
    return load_config(
        overrides=["world.size=tiny", "encoder.actors=1", "encoder.cpus_per_actor=1", *ALIGN, *extra],
        root=root,
    )


@pytest.fixture(scope="module")
def world_root(tmp_path_factory, spark, ray_local):
    """The tiny world with real MiniLM content embeddings and its item pairs."""
    root = str(tmp_path_factory.mktemp("align") / "tables")
    cfg = cfg_for(root)
    write_world(cfg, "w")
    run_content_embed(cfg, "emb")
    run_pairs(cfg, "pairs")
    return root


@pytest.fixture(scope="module")
def trained(world_root, tmp_path_factory, monkeypatch_module):
    """One model trained while rank 1 is killed at the start of epoch 1 (after epoch 0's checkpoint)."""
    marker = tmp_path_factory.mktemp("fault") / "fired"
    monkeypatch_module.setenv(faults.FAULT_ENV, "align.step:epoch=1,step=0,rank=1,sleep=3")
    monkeypatch_module.setenv(faults.ONCE_ENV, str(marker))
    info = train(cfg_for(world_root), "t1")
    monkeypatch_module.delenv(faults.FAULT_ENV)
    return info, marker


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_training_resumes_from_the_checkpoint_after_a_killed_worker(world_root, trained):
    info, marker = trained
    assert marker.exists()  # the fault fired: rank 1 died in epoch 1
    hist = info.meta["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]  # every epoch once: resumed, not restarted
    assert hist[0]["resumed_from"] is None and all(h["resumed_from"] == 0 for h in hist[1:])
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert all(h["shard_in_memory"] for h in hist)  # they fit align.worker_cache_mb; resumed workers reload
    assert info.meta["train_pairs"] > 500 and info.meta["tower"]["dim"] == 384
    # the version is the run id: asking again returns the published model, training nothing
    assert train(cfg_for(world_root), "t1").meta == info.meta


def test_aligned_embeddings_cover_every_item_and_beat_raw_on_heldout_pairs(world_root, trained):
    info, _ = trained
    cfg = cfg_for(world_root)
    result, used = run_embed(cfg, "ae1", info.version)
    t = Tables(world_root)
    n_items = t.snapshot("items").rows
    assert (result.rows, used.version) == (n_items, "t1")
    emb = read_all(t, "item_aligned_emb")
    assert set(emb["model_version"].to_pylist()) == {"t1"}
    pairs = read_all(t, "item_pairs")
    in_pairs = set(pairs["trigger_id"].to_pylist()) | set(pairs["target_id"].to_pylist())
    ids = set(emb["item_id"].to_pylist())
    assert ids == set(range(n_items)) and ids - in_pairs  # items never seen in a pair get an embedding too
    x = np.stack(emb["emb"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-4)
    assert run_embed(cfg, "ae1", info.version)[0].skipped  # same run id: nothing new

    section = evaluate(cfg, [info], behaviour=False)
    raw, aligned = section["hit_rate"]["raw"], section["hit_rate"]["aligned"]
    assert section["queries"] == 2 * section["heldout_pairs"] > 50
    assert aligned["50"] > raw["50"] and aligned["200"] > raw["200"], section["hit_rate"]


def test_hit_rate_kernel_excludes_the_query_and_counts_unknown_ids_as_misses():
    from qarm_dist.align.evaluate import hit_rate

    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    ids = np.array([10, 11, 12, 13])
    got = hit_rate(ids, x, np.array([10, 12, 10, 99]), np.array([11, 13, 12, 10]), [1, 2])
    # 10 -> 11 at rank 1 (10 itself excluded); 12 -> 13 at rank 1; 10 -> 12 at rank 3; 99 unknown
    assert got == {1: 0.5, 2: 0.5}
    assert hit_rate(ids, x, np.array([10]), np.array([12]), [3]) == {3: 1.0}


def test_bad_input_is_refused_before_training_and_commits_nothing(world_root, trained, tmp_path):
    info, _ = trained
    root = str(tmp_path / "copy")
    shutil.copytree(world_root, root)
    cfg = cfg_for(root)
    t = Tables(root)
    pairs = read_all(t, "item_pairs")
    before = t.version("item_aligned_emb")

    # pairs naming an item that the content table lacks
    w = t.writer("item_pairs", "bad-ids")
    bad = pa.table(
        {"trigger_id": [10**9], "target_id": [1], "source": ["i2i"], "score": [1.0], "split": ["train"]}
    )
    w.write(pa.concat_tables([pairs, bad.cast(pairs.schema)]))
    w.commit(mode="overwrite")
    with pytest.raises(TableError, match=r"table 'item_pairs', column 'trigger_id': 1 of \d+ rows"):
        load_pairs(t, "emb", True, 2)

    # no train pairs at all
    w = t.writer("item_pairs", "empty")
    w.write(spec("item_pairs").schema().empty_table())
    w.commit(mode="overwrite")
    with pytest.raises(TableError, match="table 'item_pairs', column 'split'"):
        train(cfg, "never")
    assert "never" not in [m.version for m in models.published(t, "align")]

    # content embeddings whose dimension is not the model's
    shutil.rmtree(f"{root}/item_content_emb")
    w = t.writer("item_content_emb", "dim8", dim=8)
    n = t.snapshot("items").rows
    v = np.full((n, 8), 1 / np.sqrt(8), np.float32)
    w.write(
        pa.table(
            {
                "item_id": np.arange(n),
                "emb": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), 8),
                "encoder": ["x"] * n,
            }
        )
    )
    w.commit()
    with pytest.raises(TableError, match=r"table 'item_content_emb', column 'emb'.*trained on dimension 384"):
        run_embed(cfg, "ae-dim", info.version)
    assert t.version("item_aligned_emb") == before


def test_finetuning_the_text_encoder_end_to_end(world_root, tmp_path):
    """align.mode=finetune trains MiniLM itself on item text; its embeddings move but keep their meaning."""
    root = str(tmp_path / "ft")
    shutil.copytree(world_root, root, ignore=shutil.ignore_patterns("_models", "item_aligned_emb"))
    cfg = cfg_for(root, "align.mode=finetune", "align.epochs=2", "align.batch_size=64")
    info = train(cfg, "ft")
    assert info.meta["tower"]["kind"] == "text" and info.meta["column"] == "text"
    hist = info.meta["history"]
    assert len(hist) == 2 and hist[1]["loss"] < hist[0]["loss"]
    assert not any(h["shard_in_memory"] for h in hist)  # text is tokenized per batch: streamed every epoch
    result, _ = run_embed(cfg, "ft-embed", "ft")
    t = Tables(root)
    assert result.rows == t.snapshot("items").rows and t.snapshot("item_aligned_emb").dim == 384
    aligned = read_all(t, "item_aligned_emb").sort_by("item_id")
    content = read_all(t, "item_content_emb").sort_by("item_id")
    a = np.stack(aligned["emb"].to_numpy(zero_copy_only=False))
    c = np.stack(content["emb"].to_numpy(zero_copy_only=False))
    cos = (a * c).sum(axis=1)
    assert cos.max() < 0.9999  # the encoder's weights changed ...
    assert np.median(cos) > 0.5  # ... from the pretrained model, not into noise
