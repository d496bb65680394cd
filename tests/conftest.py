"""Shared fixtures: real engines (local Spark, local Ray), a fresh table root per test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from qarm_dist.config import QarmConfig, load_config
from qarm_dist.engines import set_process_env

set_process_env()

REPO = Path(__file__).resolve().parents[1]
MOVIELENS = REPO.parent / "shared" / "data" / "ml-latest-small"

# deltalake can abort the interpreter at exit (rc 134) after a green run (ENVIRONMENT.md §1):
# keep pytest's own exit status and leave without running native destructors.
_exit = {"status": 0}


def pytest_sessionfinish(session, exitstatus):
    _exit["status"] = int(exitstatus)


def pytest_unconfigure(config):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit["status"])


def read_all(tables, name: str, version: int | None = None):
    """A whole (small, test-sized) table as one Arrow table, through the streamed reader."""
    import pyarrow as pa

    return pa.Table.from_batches(list(tables.read_batches(name, version=version)))


@pytest.fixture
def root(tmp_path: Path) -> str:
    return str(tmp_path / "tables")


@pytest.fixture
def tiny_cfg(root: str) -> QarmConfig:
    return load_config(
        overrides=["world.size=tiny", "encoder.actors=1", "encoder.cpus_per_actor=1"], root=root
    )


@pytest.fixture(scope="session")
def spark():
    from qarm_dist.engines import spark_session

    session = spark_session(load_config(overrides=["spark.master=local[2]", "spark.shuffle_partitions=4"]))
    yield session
    session.stop()


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from qarm_dist.engines import ray_init

    ray_init(load_config(overrides=["ray.num_cpus=2", "ray.object_store_memory=300000000"]))
    yield ray
    ray.shutdown()


# `qarm demo --world tiny` with fast settings: one seed, three ranker variants, short training.
DEMO_FAST = [
    *("--set", "align.seeds=1", "--set", "rank.seeds=1", "--set", "rank.epochs=2"),
    *("--set", "rank.batch_size=256", "--set", "rank.variants=[id_only,vq_rq,vq_rq_gsu]"),
    *("--set", "encoder.actors=1", "--set", "encoder.cpus_per_actor=1"),
]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A finished tiny-world demo root (every table, model and report section), made once per session.

    Runs the installed console script as a user does (`qarm demo --world tiny --run-id demo-t` plus
    ``DEMO_FAST``); its output is kept in ``demo.stdout`` and ``demo.stderr`` under the root.
    """
    import signal
    import subprocess

    root = tmp_path_factory.mktemp("demo") / "root"
    cmd = [str(Path(sys.executable).parent / "qarm"), "demo", "--world", "tiny", "--root", str(root)]
    cmd += ["--run-id", "demo-t", *DEMO_FAST]
    # its own session, so a timeout stops the Ray and Spark processes it started too
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=1200)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += "\n[killed after 1200 s]"
    root.mkdir(parents=True, exist_ok=True)
    (root / "demo.stdout").write_text(out)
    (root / "demo.stderr").write_text(err)
    assert proc.returncode == 0, f"qarm demo exited with {proc.returncode}:\n{err[-3000:]}"
    return root


# The reliability suites' pipeline: the tiny world (emitted embeddings) with short training everywhere.
PIPELINE = [
    "world.size=tiny",
    "spark.master=local[2]",
    "spark.shuffle_partitions=4",
    "codebook.levels=2",
    "codebook.k=8",
    "codebook.iters=3",
    "codebook.vq_k=5",
    "align.epochs=1",
    "align.batch_size=128",
    "align.seeds=1",
    "rank.epochs=2",
    "rank.batch_size=256",
    "rank.user_rows=4096",
    "rank.item_rows=4096",
    "rank.ngram_rows=4096",
    "rank.variant=id_only",
    "rank.variants=[id_only]",
    "rank.seeds=1",
]


@pytest.fixture(scope="session")
def pipeline_root(tmp_path_factory, spark, ray_local) -> Path:
    """Every stage once on the tiny world with ``PIPELINE`` settings; the suites copy it, never change it.

    Its tables and models are also the clean runs that fault-injected re-runs must reproduce: the
    world (run id w), item_pairs (p), alignment model a and its item_aligned_emb (ae), codebook
    version 1 and its codes (cb), samples (s) and the ranker r (id_only, 2 epochs).
    """
    from qarm_dist.align.infer import run_embed
    from qarm_dist.align.train import train as train_alignment
    from qarm_dist.codebook import stage as codebook
    from qarm_dist.data.ingest import write_world
    from qarm_dist.pairs import run_pairs
    from qarm_dist.rank import train as rank
    from qarm_dist.rank.samples import run_samples

    root = tmp_path_factory.mktemp("pipeline") / "root"
    cfg = load_config(overrides=PIPELINE, root=str(root))
    write_world(cfg, "w", emit_embeddings=True)
    run_pairs(cfg, "p")
    run_embed(cfg, "ae", train_alignment(cfg, "a").version)
    _, cb = codebook.run_fit(cfg, "cb")
    codebook.run_assign(cfg, "cb", cb.version)
    run_samples(cfg, "s")
    rank.train(cfg, "r")
    return root
