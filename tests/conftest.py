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
