"""Faults during writes and training: no data lost, no half-written version, no duplicate rows.

- a job killed (``os._exit(137)`` at a named point, or a real SIGKILL of its process group at a
  random moment) leaves every table at its previous version or at the version it committed in
  full, and a re-run of its run id finishes the rest with no row written twice;
- a Spark task that dies is retried and the result equals a clean run's (or, with no retries left,
  the job fails and nothing is committed); a Ray Data actor that dies is restarted, and the same;
- two processes committing to one local table at the same moment both commit, or one fails
  cleanly; the same run id commits once (the object-store race is tests/test_object_store.py's);
- a Ray Train worker killed mid-epoch: the ranker resumes from its checkpoint and ends with the
  metrics of a run without the failure;
- codebook versions cannot be rewritten.

The fault points are documented in `qarm_dist.faults`; docs/reliability.md lists what each test proves.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import PIPELINE, read_all
from reliability import QARM, race_two_writers, run_qarm, state

from qarm_dist import faults
from qarm_dist.align.infer import run_embed as align_embed
from qarm_dist.codebook import stage as codebook
from qarm_dist.codebook import store
from qarm_dist.config import load_config
from qarm_dist.data.ingest import write_world
from qarm_dist.io.delta import TableError, Tables
from qarm_dist.io.schemas import spec
from qarm_dist.rank import train as rank
from qarm_dist.rank.samples import run_samples

pytestmark = pytest.mark.slow

WORLD_TABLES = ("items", "interactions", "item_content_emb")  # in the order the job commits them


def pipeline_cfg(root: Path, *extra: str):
    return load_config(overrides=[*PIPELINE, *extra], root=str(root))


def rows_by_key(t: Tables, name: str) -> pa.Table:
    """A table's rows sorted by its key, after checking that no key occurs twice."""
    rows = read_all(t, name)
    key = spec(name).key
    keys = rows.select(list(key)).group_by(list(key)).aggregate([([], "count_all")])
    assert pc.max(keys["count_all"]).as_py() == 1, f"table {name} has duplicate keys"
    return rows.sort_by([(k, "ascending") for k in key])


def assert_same_rows(a: pa.Table, b: pa.Table) -> None:
    """Equal rows; float columns (embeddings, scores) to 1e-6."""
    assert a.num_rows == b.num_rows and a.schema.names == b.schema.names
    for name in a.schema.names:
        x, y = a[name], b[name]
        if pa.types.is_fixed_size_list(x.type) or pa.types.is_floating(x.type):
            xs = pc.list_flatten(x) if pa.types.is_fixed_size_list(x.type) else x
            ys = pc.list_flatten(y) if pa.types.is_fixed_size_list(y.type) else y
            np.testing.assert_allclose(xs.to_numpy(), ys.to_numpy(), rtol=1e-6, atol=1e-6)
        else:
            assert x.equals(y), name


# ------------------------------------------------------------------ a killed job


@dataclass(frozen=True)
class WorldJob:
    """`qarm world --emit-embeddings` of world seed 1 over a root that holds seed 0 (the previous versions)."""

    settings: tuple[str, ...]
    before: Path  # the root the job starts from
    clean: Path  # what the job leaves when nothing goes wrong
    seconds: float  # how long that clean run took, start to exit

    def run(self, root: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        args = ["world", "--emit-embeddings", "--run-id", "w1", "--root", str(root), "-q"]
        return run_qarm(*args, *(a for s in (*self.settings, "world.seed=1") for a in ("--set", s)), env=env)

    def assert_old_or_complete(self, root: Path) -> list[str]:
        """Every table is at its previous version or at the job's full new one; the names of the new ones."""
        t, old, new = Tables(str(root)), state(self.before), state(self.clean)
        done = []
        for name in WORLD_TABLES:
            v = t.version(name)
            assert v in (old[name], new[name]), (name, v)
            done += [name] if v == new[name] else []
            want = Tables(str(self.clean if v == new[name] else self.before))
            assert_same_rows(rows_by_key(t, name), rows_by_key(want, name))
        assert done == list(WORLD_TABLES[: len(done)]), done  # committed in order: never a later one alone
        return done

    def assert_rerun_finishes(self, root: Path) -> None:
        """Re-running the killed run id commits what was left, once: the clean run's versions and rows."""
        p = self.run(root)
        assert p.returncode == 0, p.stderr[-3000:]
        assert state(root) == state(self.clean)  # one new version per table: nothing committed twice
        for name in WORLD_TABLES:
            assert_same_rows(rows_by_key(Tables(str(root)), name), rows_by_key(Tables(str(self.clean)), name))


def world_job(base: Path, *settings: str) -> WorldJob:
    before, clean = base / "before", base / "clean"
    write_world(load_config(overrides=list(settings), root=str(before)), "w0", emit_embeddings=True)
    shutil.copytree(before, clean)
    job = WorldJob(settings, before, clean, 0.0)
    t0 = time.time()
    assert job.run(clean).returncode == 0
    return WorldJob(settings, before, clean, time.time() - t0)


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory) -> WorldJob:
    return world_job(tmp_path_factory.mktemp("tiny-job"), "world.size=tiny")


KILL_POINTS = [f"commit.{when}:table={name}" for name in WORLD_TABLES for when in ("before", "after")][:-1]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_job_killed_at_a_write_boundary_leaves_no_half_version(point, tiny_job, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(tiny_job.before, root)
    p = tiny_job.run(root, env={faults.FAULT_ENV: point})
    assert p.returncode == faults.EXIT_CODE, p.stderr[-3000:]
    done = tiny_job.assert_old_or_complete(root)
    assert (point.split("table=")[1] in done) == point.startswith("commit.after")  # it died where aimed
    tiny_job.assert_rerun_finishes(root)


def test_a_job_sigkilled_at_random_moments_leaves_no_half_version(tmp_path):
    """A real SIGKILL of the job's whole process group at seeded random moments of its run, then the re-run.

    The world is the `small` one (180k interactions), so that the job runs long enough for the kills
    to land at different moments of it.
    """
    job = world_job(tmp_path / "job", "world.size=small")
    rng = random.Random(9)
    outcomes = []
    for i in range(3):
        root = tmp_path / f"root{i}"
        shutil.copytree(job.before, root)
        args = ["world", "--emit-embeddings", "--run-id", "w1", "--root", str(root), "-q"]
        args += [a for s in (*job.settings, "world.seed=1") for a in ("--set", s)]
        proc = subprocess.Popen(
            [QARM, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        delay = rng.uniform(0.3, 1.0) * job.seconds
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        outcomes.append((round(delay, 2), proc.returncode, job.assert_old_or_complete(root)))
        job.assert_rerun_finishes(root)
    print(f"clean run {job.seconds:.1f} s; (delay, exit status, tables committed before the kill):", outcomes)
    assert any(rc == -signal.SIGKILL for _, rc, _ in outcomes)  # kills landed mid-job


# ------------------------------------------------------------------ engines: Spark tasks, Ray actors


def test_a_spark_task_failure_is_retried_and_equals_the_clean_run(pipeline_root, tmp_path, monkeypatch):
    """`qarm samples` with a Spark task killed: without retries nothing is committed; retried, the clean samples."""
    root = tmp_path / "root"
    shutil.copytree(pipeline_root, root)
    before = state(root)
    args = [
        "samples",
        "--run-id",
        "s-fault",
        "--root",
        str(root),
        "-q",
        *(a for s in PIPELINE for a in ("--set", s)),
    ]

    # a task dies and local[2] (the session here) allows no retry: the job fails, nothing is committed
    monkeypatch.setenv(faults.FAULT_ENV, "spark.stage:table=samples")
    with pytest.raises(Exception, match="Python worker exited unexpectedly"):
        run_samples(pipeline_cfg(root), "s-fault")
    monkeypatch.delenv(faults.FAULT_ENV)
    assert state(root) == before
    # a task dies once and local[2,2] retries it: the run equals the clean one
    marker = tmp_path / "fired"
    env = {faults.FAULT_ENV: "spark.stage:table=samples", faults.ONCE_ENV: str(marker)}
    p = run_qarm(*args, "--set", "spark.master=local[2,2]", env=env)
    assert p.returncode == 0 and marker.exists(), p.stderr[-3000:]
    assert state(root) == {**before, "samples": before["samples"] + 1}
    t, clean = Tables(str(root)), Tables(str(pipeline_root))
    assert_same_rows(rows_by_key(t, "samples"), rows_by_key(clean, "samples"))
    # the same run id again commits nothing
    p = run_qarm(*args)
    assert (
        p.returncode == 0
        and "already committed" in p.stdout
        and t.version("samples") == before["samples"] + 1
    )


def test_a_ray_data_actor_failure_is_retried_and_equals_the_clean_run(pipeline_root, tmp_path, monkeypatch):
    """`qarm align embed` with an actor killed after staging a block: Ray Data restarts it; same rows, once."""
    root = tmp_path / "root"
    shutil.copytree(pipeline_root, root)
    marker = tmp_path / "fired"
    monkeypatch.setenv(faults.FAULT_ENV, "ray.stage:table=item_aligned_emb")
    monkeypatch.setenv(faults.ONCE_ENV, str(marker))
    cfg = pipeline_cfg(root, "align.infer_rows_per_block=128")  # 5 blocks: the killed one is among others
    result, _ = align_embed(cfg, "ae-fault", "a")
    assert marker.exists() and not result.skipped
    t, clean = Tables(str(root)), Tables(str(pipeline_root))
    assert_same_rows(rows_by_key(t, "item_aligned_emb"), rows_by_key(clean, "item_aligned_emb"))


# ------------------------------------------------------------------ two writers


def test_two_writers_on_one_local_table_commit_or_fail_cleanly(tmp_path):
    """Both commit or one fails cleanly, no lost rows (the object-store twin is in tests/test_object_store.py)."""
    t = Tables(str(tmp_path / "race"))
    race_two_writers(t, lead_s=8)
    assert sorted(read_all(t, "items")["item_id"].to_pylist()) == [*range(250), *range(300, 350)]


# ------------------------------------------------------------------ training


def test_a_killed_ranker_worker_resumes_and_ends_with_the_clean_metrics(pipeline_root, tmp_path, monkeypatch):
    """Rank 1 dies in epoch 1 of 2; the run resumes from epoch 0's checkpoint and equals the clean run ``r``.

    Training input is read in order (`training.run`), so the restarted workers get exactly the
    batches of the uninterrupted run, and the checkpoint holds weights and both optimizers: the
    evaluation must come out the same to the last digit, not merely within a seed's spread.
    """
    root = tmp_path / "root"
    shutil.copytree(pipeline_root, root)
    marker = tmp_path / "fired"
    monkeypatch.setenv(faults.FAULT_ENV, "rank.step:job=0,epoch=1,step=2,rank=1,sleep=1")
    monkeypatch.setenv(faults.ONCE_ENV, str(marker))
    info = rank.train(pipeline_cfg(root), "r-fault")
    clean = rank.train(pipeline_cfg(pipeline_root), "r")  # published by the pipeline: read, not trained
    assert marker.exists()
    epochs = [(h["epoch"], h["resumed_from"]) for h in info.meta["history"]]
    assert epochs == [(0, None), (1, 0)]  # resumed after epoch 0, not restarted
    assert [h["loss"] for h in info.meta["history"]] == pytest.approx(
        [h["loss"] for h in clean.meta["history"]], rel=1e-9
    )
    got, want = info.meta["results"][-1]["eval"], clean.meta["results"][-1]["eval"]
    for task in ("click", "like"):
        for key in ("auc", "gauc", "logloss", "rows"):
            assert got[task][key] == pytest.approx(want[task][key], rel=1e-9), (task, key)


# ------------------------------------------------------------------ codebooks


def test_codebook_versions_cannot_be_rewritten(pipeline_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(pipeline_root, root)
    t = Tables(str(root))
    before = state(root)
    cb = store.load(t, 1)
    for mode, match in (("append", "share their key"), ("overwrite", "immutable")):
        w = t.writer("codebooks", f"rewrite-{mode}", dim=cb.dim)
        w.write(cb.to_table())
        with pytest.raises(TableError, match=match):
            w.commit(mode=mode)
    with pytest.raises(ValueError, match="already wrote a codebook version"):
        codebook.run_fit(pipeline_cfg(root), "cb")  # the same fit again
    assert state(root) == before
    assert_same_rows(store.load(t, 1).to_table(), cb.to_table())
