"""`qarm refresh`: only new items are embedded and coded, one run id resumes a job that died, and
`--refit` adds exactly one codebook version; plus the submitted job's shape (`qarm submit refresh`)."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from conftest import read_all

from qarm_dist import models
from qarm_dist.align.infer import run_embed as align_embed
from qarm_dist.align.model import ResidualTower, load_tower, save_tower
from qarm_dist.cli import main
from qarm_dist.codebook import stage, store
from qarm_dist.config import QarmConfig, load_config
from qarm_dist.data.ingest import write_world
from qarm_dist.data.world import World
from qarm_dist.embed import embed_new, run_embed
from qarm_dist.io.delta import Tables
from qarm_dist.io.schemas import TABLES
from qarm_dist.refresh import run_refresh

OVERRIDES = [
    "world.size=tiny",
    "encoder.actors=1",
    "encoder.cpus_per_actor=1",
    "align.infer_actors=1",
    "align.cpus_per_worker=1",
    "codebook.levels=2",
    "codebook.k=8",
    "codebook.iters=3",
    "codebook.vq_k=5",
    "codebook.fit_window=all",
]
NEW = 40  # items that arrive after the first pipeline run
EMB_TABLES = ("item_content_emb", "item_aligned_emb")


def versions(t: Tables) -> dict[str, int | None]:
    return {name: t.version(name) for name in TABLES}


def sorted_rows(t: Tables, name: str) -> pa.Table:
    return read_all(t, name).sort_by(
        [(c, "ascending") for c in ("item_id", "version") if c in TABLES[name].columns]
    )


def arrive(cfg: QarmConfig, t: Tables) -> None:
    """Append the items a world with NEW more items has beyond this one, as a catalogue feed would."""
    n = World.from_config(cfg.world).n_items
    bigger = World.from_config(cfg.world.model_copy(update={"n_items": n + NEW}))
    rows = pa.concat_tables(bigger.items())
    w = t.writer("items", "arrivals")
    w.write(rows.filter(pc.greater_equal(rows["item_id"], n)))
    w.commit(mode="append")


def publish_tower(t: Tables, dim: int) -> Path:
    """Publish an untrained alignment model "m1" (the refresh needs one to exist, not a good one)."""
    torch.manual_seed(0)
    tower = ResidualTower(dim, 32)
    torch.nn.init.normal_(tower.down.weight, std=0.2)  # not the identity it starts as
    path = Path(models.run_uri(t, "align", "m1"), "checkpoint")
    path.mkdir(parents=True)
    save_tower(tower, str(path))
    meta = {"content": "item_content_emb", "column": "emb", "dim": dim, "tower": tower.spec}
    models.publish(t, "align", "m1", str(path), meta)
    return path


def crash(*args, **kwargs):
    raise RuntimeError("killed between two tables")


def statuses(summary: dict) -> dict[str, str]:
    return {s["step"]: s["status"] for s in summary["steps"]}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_refresh_codes_only_new_items_resumes_by_run_id_and_refits(
    spark, ray_local, tmp_path, monkeypatch, capsys
):
    cfg = load_config(overrides=OVERRIDES, root=str(tmp_path / "t"))
    t = Tables.from_config(cfg)
    write_world(cfg, "w")
    run_embed(cfg, "e")  # the real encoder
    tower = publish_tower(t, t.dim("item_content_emb"))
    align_embed(cfg, "a", "m1")
    _, cb = stage.run_fit(cfg, "f")
    assert cb.info["source"] == "item_aligned_emb"  # so the refresh must extend the aligned table too
    stage.run_assign(cfg, "c")
    before = {name: sorted_rows(t, name) for name in (*EMB_TABLES, "item_codes")}
    n_old = before["item_content_emb"].num_rows

    arrive(cfg, t)
    # a refresh killed after its embedding steps, before the codes...
    with monkeypatch.context() as m:
        m.setattr(stage, "run_assign", crash)
        with pytest.raises(RuntimeError, match="killed"):
            run_refresh(cfg, "r1")
    embedded = versions(t)
    assert all(t.snapshot(name).rows == n_old + NEW for name in EMB_TABLES)
    # ...is finished by its run id: the embedding steps are skipped, the codes written once
    s = run_refresh(cfg, "r1")
    assert statuses(s) == {
        "content": "already committed",
        "aligned": "already committed",
        "assign": "committed",
    }
    assert (s["codebook_version"], s["codes_assigned"], s["fitted_version"]) == (1, NEW, None)
    after = versions(t)
    assert {k: v for k, v in after.items() if k != "item_codes"} == {
        k: v for k, v in embedded.items() if k != "item_codes"
    }
    assert after["item_codes"] == embedded["item_codes"] + 1

    new_ids = list(range(n_old, n_old + NEW))
    for name in (*EMB_TABLES, "item_codes"):
        rows = sorted_rows(t, name)
        old = rows.filter(pc.less(rows["item_id"], n_old))
        assert old.equals(before[name]), name  # byte for byte: only new items were embedded and coded
        assert rows["item_id"].to_pylist()[n_old:] == new_ids, name
    content = sorted_rows(t, "item_content_emb").slice(n_old)
    x = np.stack(content["emb"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert set(content["encoder"].to_pylist()) == set(before["item_content_emb"]["encoder"].to_pylist())
    # the new aligned rows are the existing rows' model applied to the new content rows
    aligned = sorted_rows(t, "item_aligned_emb").slice(n_old)
    assert set(aligned["model_version"].to_pylist()) == {"m1"}
    with torch.no_grad():
        want = load_tower(str(tower))(torch.from_numpy(x.astype(np.float32))).numpy()
    np.testing.assert_allclose(np.stack(aligned["emb"].to_numpy(zero_copy_only=False)), want, atol=1e-5)

    # the same run id again adds nothing; a new run id with no new items is a no-op: no version anywhere
    again = run_refresh(cfg, "r1")
    assert set(statuses(again).values()) == {"already committed"} and versions(t) == after
    capsys.readouterr()
    assert main(["refresh", "--root", t.root, "--run-id", "r2", *(f"--set={o}" for o in OVERRIDES)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "refresh r2: 0 new items embedded, 0 aligned, 0 codes of version 1 assigned"
    assert [line.split(":")[1].split(";")[0] for line in out[:-1]] == [" nothing new"] * 3
    assert versions(t) == after

    # --refit killed after the fit, then resumed: exactly one new version, coded for every item
    with monkeypatch.context() as m:
        m.setattr(stage, "run_assign", crash)
        with pytest.raises(RuntimeError, match="killed"):
            run_refresh(cfg, "r3", refit=True)
    assert store.versions(t) == [1, 2]
    s = run_refresh(cfg, "r3", refit=True)
    assert store.versions(t) == [1, 2]
    assert statuses(s)["fit"] == "already committed" and statuses(s)["assign-refit"] == "committed"
    assert (s["fitted_version"], s["refit_codes_assigned"]) == (2, n_old + NEW)
    codes = sorted_rows(t, "item_codes")
    for version in (1, 2):
        ids = codes.filter(pc.equal(codes["version"], version))["item_id"].to_pylist()
        assert ids == list(range(n_old + NEW)), version
    assert not list(Path(t.root, "_scratch").rglob("*.parquet"))  # the Spark -> Ray hand-off files are gone


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_refresh_refuses_what_it_cannot_extend(spark, ray_local, tmp_path):
    cfg = load_config(overrides=OVERRIDES, root=str(tmp_path / "t"))
    t = Tables.from_config(cfg)
    write_world(cfg, "w", emit_embeddings=True)  # content embeddings from the world, not from an encoder
    with pytest.raises(ValueError, match="no codebook version"):
        run_refresh(cfg, "r")
    arrive(cfg, t)
    before = versions(t)
    # the new items would land in another space than the world's embeddings: refused, nothing written
    with pytest.raises(ValueError, match="encoder 'world'"):
        embed_new(cfg, "r.content")
    assert versions(t) == before


def test_submit_refresh_runs_on_spark_with_the_clusters_ray(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "refresh", "--cluster", "local", "--root", "t", "--run-id", "r", "--dry-run"]) == 0
    cmd = shlex.split(capsys.readouterr().out)
    assert Path(cmd[0]).name == "spark-submit" and cmd[cmd.index("--master") + 1] == "spark://127.0.0.1:7077"
    script = next(i for i, a in enumerate(cmd) if a.endswith("jobs/refresh.py"))
    assert cmd[script + 3 :] == ["--run-id", "r"]
    job = load_config(cmd[script + 2])
    # client mode: the driver runs here, and its Ray Data steps join the cluster's Ray
    assert (job.spark.master, job.ray.address) == ("spark://127.0.0.1:7077", "127.0.0.1:6379")


def test_submit_refresh_needs_a_ray_address_the_submitting_machine_reaches(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [
        "submit",
        "refresh",
        "--cluster",
        "local",
        "--set",
        "clusters.local.ray_address=auto",
        "--dry-run",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("qarm: error: ") and "clusters.local.ray_address" in err
    assert not (tmp_path / ".qarm").exists()
