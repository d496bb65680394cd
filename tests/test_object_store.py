"""Object-store roots (issue 8): every table path on ``s3://`` against a real S3 server on 127.0.0.1.

The server is moto's (``moto[server]``), started once for the module as its own process group.
Tables live under ``s3://qarm/<test>/``; each test uses its own prefix.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pytest
from conftest import read_all
from reliability import race_two_writers

from qarm_dist import models
from qarm_dist.io import objectstore
from qarm_dist.io.delta import TableError, Tables, stage
from qarm_dist.io.raydata import write_mapped
from qarm_dist.io.schemas import spec
from qarm_dist.io.spark import write_dataframe

pytestmark = pytest.mark.slow

BUCKET = "qarm"
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class S3:
    endpoint: str
    options: dict[str, str]

    def tables(self, prefix: str) -> Tables:
        return Tables(f"s3://{BUCKET}/{prefix}", self.options)

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        )

    def keys(self, prefix: str) -> list[str]:
        """Object keys under ``prefix``, without the empty folder markers pyarrow leaves after deletes."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/")
        return sorted(
            o["Key"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, stopped as one below
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto server did not start on port {port}") from None
                time.sleep(0.2)
        endpoint = f"http://127.0.0.1:{port}"
        server = S3(
            endpoint,
            {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ALLOW_HTTP": "true",
                "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_REGION": "us-east-1",
            },
        )
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        log.close()


def emb_rows(ids, dim: int = 8, seed: int = 0) -> pa.Table:
    e = np.random.default_rng(seed).standard_normal((len(ids), dim)).astype(np.float32)
    return pa.table({"item_id": np.asarray(ids, np.int64), "emb": list(e), "encoder": ["t"] * len(ids)})


def item_rows(ids) -> pa.Table:
    ids = np.asarray(ids, np.int64)
    return pa.table(
        {"item_id": ids, "text": [f"item {i}" for i in ids], "category": ["c"] * len(ids), "created_ts": ids}
    )


def sorted_rows(t: pa.Table) -> list[dict]:
    return t.sort_by("item_id").to_pylist()


# ------------------------------------------------------------------ options


def test_one_reading_of_the_storage_options_serves_every_client():
    opts = {
        "aws_endpoint_url": "http://127.0.0.1:9000",
        "allow_http": "true",
        "ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "region": "eu-west-1",
    }
    s = objectstore.s3_settings(opts)
    assert (s.endpoint, s.allow_http, s.access_key, s.secret_key, s.region) == (
        "http://127.0.0.1:9000",
        True,
        "k",
        "s",
        "eu-west-1",
    )
    assert objectstore.s3_filesystem(opts).region == "eu-west-1"
    conf = objectstore.spark_s3a_conf("s3a://b/p", opts)
    assert conf["spark.hadoop.fs.s3a.endpoint"] == "http://127.0.0.1:9000"
    assert conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] == "false"
    assert conf["spark.hadoop.fs.s3a.path.style.access"] == "true"
    assert conf["spark.hadoop.fs.s3a.access.key"] == "k"
    assert conf["spark.hadoop.fs.s3.impl"].endswith("S3AFileSystem")
    assert objectstore.spark_s3a_conf("/local/root", opts) == {}
    # a local root never looks at object-store options
    Tables("relative/root", {"AWS_S3_LOCKING_PROVIDER": "dynamodb"})


@pytest.mark.parametrize(
    "options, env, match",
    [
        (
            {"AWS_S3_LOCKING_PROVIDER": "dynamodb"},
            {},
            "AWS_S3_LOCKING_PROVIDER=dynamodb: deltalake 1.6 has no",
        ),
        ({}, {"AWS_S3_LOCKING_PROVIDER": "dynamodb"}, r"AWS_S3_LOCKING_PROVIDER=dynamodb \(environment\)"),
        ({"aws_conditional_put": "disabled"}, {}, "every commit would fail"),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, {}, "set AWS_ALLOW_HTTP"),
    ],
)
def test_unsafe_or_failing_s3_options_are_refused_up_front(monkeypatch, options, env, match):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(objectstore.StorageOptionsError, match=match):
        Tables("s3://bucket/root", options)


# ------------------------------------------------------------------ table layer


def test_round_trip_versions_and_idempotent_runs_on_s3(s3):
    t = s3.tables("roundtrip")
    assert not t.exists("item_content_emb") and t.version("item_content_emb") is None
    w = t.writer("item_content_emb", "r1", dim=8, target_rows=4)
    w.write(emb_rows(range(0, 6)))
    w.write(emb_rows(range(6, 10), seed=1))
    r1 = w.commit()
    assert (r1.version, r1.rows, r1.skipped) == (1, 10, False) and r1.files >= 2
    r2 = t.commit("item_content_emb", [], "r2", dim=8)  # an empty append is still a version
    w = t.writer("item_content_emb", "r3", dim=8)
    w.write(emb_rows(range(10, 15), seed=2))
    r3 = w.commit()
    assert (r2.version, r3.version, r3.rows) == (2, 3, 15)
    assert t.exists("item_content_emb") and t.version("item_content_emb") == 3

    snap = t.snapshot("item_content_emb", version=1)
    assert (snap.rows, snap.dim, len(snap.files)) == (10, 8, r1.files)
    assert all(f.startswith("s3://qarm/roundtrip/item_content_emb/") for f in snap.files)
    v1 = read_all(t, "item_content_emb", version=1)
    assert v1.schema.field("emb").type == pa.list_(pa.float32(), 8)
    assert sorted(v1["item_id"].to_pylist()) == list(range(10))
    latest = read_all(t, "item_content_emb")
    expected = pa.concat_tables(
        [emb_rows(range(0, 6)), emb_rows(range(6, 10), seed=1), emb_rows(range(10, 15), seed=2)]
    )
    np.testing.assert_array_equal(
        np.stack(latest.sort_by("item_id")["emb"].to_numpy(zero_copy_only=False)),
        np.stack(expected["emb"].to_numpy(zero_copy_only=False)),
    )
    # re-running a committed run id adds nothing and leaves no staged file behind
    before = s3.keys("roundtrip")
    w = t.writer("item_content_emb", "r3", dim=8)
    w.write(emb_rows(range(10, 15), seed=2))
    again = w.commit()
    assert again.skipped and again.version == 3 and s3.keys("roundtrip") == before


def test_bad_input_on_s3_commits_nothing_and_leaves_no_files(s3):
    t = s3.tables("bad")
    w = t.writer("items", "ok", target_rows=4)
    w.write(item_rows(range(10)))
    w.commit()
    before = s3.keys("bad")
    # a key that is already in the table (the duplicate check streams the S3 files)
    w = t.writer("items", "dup", target_rows=4)
    w.write(item_rows(range(8, 14)))
    with pytest.raises(TableError, match="'item_id': 4 of 16 rows share their key"):
        w.commit()
    # rows that fail validation where they are written
    w = t.writer("items", "nulls")
    bad = item_rows(range(20, 23)).set_column(1, "text", pa.array(["a", None, "c"]))
    with pytest.raises(TableError, match="'text': 1 of 3 rows are null"):
        w.write(bad)
        w.commit()
    # a staged file that vanished before the commit (`_check_files` asks the store)
    gone = stage(t.uri("items"), spec("items"), item_rows(range(30, 33)), "gone", None, t.storage_options)
    s3.client().delete_object(Bucket=BUCKET, Key=f"bad/items/{gone.path}")
    with pytest.raises(FileNotFoundError, match="is missing; nothing was committed"):
        t.commit("items", [gone], "gone")
    assert t.version("items") == 1 and s3.keys("bad") == before


# ------------------------------------------------------------------ engines


def test_spark_reads_an_s3_table_like_pyarrow(s3, spark):
    t = s3.tables("spark-read")
    for i in range(3):
        w = t.writer("item_content_emb", f"r{i}", dim=8, target_rows=3)
        w.write(emb_rows(range(10 * i, 10 * i + 7), seed=i))
        w.commit()
    df = t.spark(spark, "item_content_emb")
    assert dict(df.dtypes)["emb"] == "array<float>"
    got = sorted((r.item_id, r.encoder, [round(x, 6) for x in r.emb]) for r in df.collect())
    want = sorted(
        (r["item_id"], r["encoder"], [round(x, 6) for x in r["emb"]])
        for r in read_all(t, "item_content_emb").to_pylist()
    )
    assert got == want and len(got) == 21
    pinned = t.spark(spark, "item_content_emb", version=1, columns=["item_id"])
    assert pinned.columns == ["item_id"]
    assert sorted(r.item_id for r in pinned.collect()) == list(range(7))


def test_spark_stage_stages_in_tasks_and_commits_to_s3(s3, spark):
    t = s3.tables("spark-write")
    df = spark.createDataFrame(item_rows(range(50)).to_pandas()).repartition(3)
    r = write_dataframe(df, t, "items", "spark-run")
    assert (r.version, r.rows, r.files, r.skipped) == (1, 50, 3, False)
    assert sorted_rows(read_all(t, "items")) == sorted_rows(item_rows(range(50)))
    assert write_dataframe(df, t, "items", "spark-run").skipped
    assert len([k for k in s3.keys("spark-write") if k.endswith(".parquet")]) == 3


def test_ray_data_reads_and_stages_on_s3(s3, ray_local):
    t = s3.tables("ray")
    w = t.writer("items", "src", target_rows=40)
    w.write(item_rows(range(100)))
    w.commit()
    ds = t.ray("items", columns=["item_id", "text"])
    assert sorted(r["item_id"] for r in ds.take_all()) == list(range(100))

    class Embed:  # a trivial "model": defined here, so Ray ships it by value
        def __call__(self, block: pa.Table) -> pa.Table:
            ids = block.column("item_id").to_numpy()
            emb = np.repeat(ids[:, None], 4, axis=1).astype(np.float32)
            return pa.table({"item_id": ids, "emb": list(emb), "encoder": ["ids"] * len(ids)})

    r = write_mapped(
        t.ray("items", columns=["item_id"]),
        Embed,
        {},
        t,
        "item_content_emb",
        "ray-run",
        4,
        actors=1,
        cpus_per_actor=0.5,
        gpus_per_actor=0,
        rows_per_block=25,
    )
    assert (r.rows, r.skipped) == (100, False) and r.files >= 4
    out = read_all(t, "item_content_emb").sort_by("item_id")
    assert out["item_id"].to_pylist() == list(range(100))
    assert out["emb"][42].as_py() == [42.0] * 4


def test_ray_train_checkpoints_and_the_model_registry_on_s3(s3, ray_local, tmp_path):
    from ray.train import Checkpoint, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    t = s3.tables("models")

    def loop(config: dict) -> None:
        import ray.train

        d = config["dir"]
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "weights.txt"), "w") as fh:
            fh.write("42")
        ray.train.report({"loss": 0.5}, checkpoint=Checkpoint.from_directory(d))

    storage, storage_fs = models.train_storage(t, "toy")
    assert storage == "qarm/models/_models/toy" and storage_fs is not None
    result = DataParallelTrainer(
        loop,
        train_loop_config={"dir": str(tmp_path / "ck")},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="v1", storage_path=storage, storage_filesystem=storage_fs),
    ).fit()
    assert result.error is None
    uri = models.checkpoint_uri(t, result.checkpoint.path)
    assert uri.startswith("s3://qarm/models/_models/toy/v1/checkpoint")
    models.publish(t, "toy", "v1", uri, {"loss": 0.5})
    info = models.find(t, "toy")
    assert (info.version, info.checkpoint, info.meta["loss"]) == ("v1", uri, 0.5)
    with models.local_checkpoint(info, t.storage_options) as d, open(os.path.join(d, "weights.txt")) as fh:
        assert fh.read() == "42"


# ------------------------------------------------------------------ concurrency


def test_concurrent_writers_on_s3_commit_once_each_or_fail_cleanly(s3):
    t = s3.tables("race")
    race_two_writers(t, lead_s=6)
    ids = read_all(t, "items")["item_id"].to_pylist()
    assert sorted(ids) == [*range(250), *range(300, 350)] and t.version("items") == 4
    # every parquet file in the table folder is referenced: losers deleted what they staged
    on_store = {k.rsplit("/", 1)[1] for k in s3.keys("race/items") if k.endswith(".parquet")}
    assert on_store == {f.rsplit("/", 1)[1] for f in t.snapshot("items").files}


# ------------------------------------------------------------------ end to end


def test_cli_stages_on_an_s3_root(s3):
    root = f"s3://{BUCKET}/e2e-{uuid.uuid4().hex[:6]}"
    opts = [f"--set=tables.storage_options.{k}={v}" for k, v in s3.options.items()]
    common = ["--root", root, *opts, "--set", "spark.master=local[2]", "--set", "spark.shuffle_partitions=4"]

    def qarm(*args: str) -> str:
        p = subprocess.run([str(BIN / "qarm"), *args, *common], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    assert "item_content_emb: version 1, 600 rows" in qarm(
        "world", "--emit-embeddings", "--set", "world.size=tiny"
    )
    assert "codebooks: version 1" in qarm("codebook", "fit", "--levels", "2", "--k", "8", "--iters", "3")
    assert "item_codes: version 1, 600 rows" in qarm("codebook", "assign")
    tables = Tables(root, s3.options)
    codes = read_all(tables, "item_codes")
    assert codes.num_rows == 600 and all(len(rq) == 2 for rq in codes["rq"].to_pylist())
    assert "codebooks          version   1" in qarm("tables")
