"""`qarm submit` against the local multi-node cluster of cluster/local/up (Spark standalone, two Ray nodes).

The cluster comes up once for this module and goes down at the end, whatever happens. Each test runs the
installed `qarm` as a user would, then checks the tables it wrote and asks the cluster (the Spark master's
/json/, the Ray Jobs API) that the job ran there and not in a local engine. A new stage's test needs a
world (`make_world`), one `submit` and its table checks.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from qarm_dist.codebook import store
from qarm_dist.config import QarmConfig
from qarm_dist.io.delta import Tables

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[1]
QARM = Path(sys.executable).parent / "qarm"  # the console script installed beside this interpreter
LOCAL = QarmConfig().clusters["local"]
SPARK_UI = "http://127.0.0.1:8080"  # the master's web UI (cluster/local/lib.sh)


@pytest.fixture(scope="module")
def local_cluster():
    try:
        up = subprocess.run([REPO / "cluster/local/up"], capture_output=True, text=True, timeout=240)
        assert up.returncode == 0, up.stdout + up.stderr
        yield LOCAL
    finally:
        subprocess.run([REPO / "cluster/local/down"], timeout=120, check=False)


def qarm(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([QARM, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def make_world(root: Path, *flags: str) -> None:
    r = qarm("world", "--root", str(root), "--set", "world.size=tiny", "-q", *flags, timeout=120)
    assert r.returncode == 0, r.stderr


def submit(stage: str, root: Path, *args: str) -> subprocess.CompletedProcess:
    """`qarm submit STAGE --cluster local --root ROOT ...` from ROOT's parent (where the package goes);
    its own timeout stops the job before ours would."""
    args = ("submit", stage, "--cluster", "local", "--root", str(root), "--timeout", "240", *args)
    return qarm(*args, cwd=root.parent)


def spark_master() -> dict:
    with urllib.request.urlopen(f"{SPARK_UI}/json/", timeout=10) as resp:
        return json.load(resp)


def spark_apps() -> dict[str, str]:
    return {a["id"]: a["state"] for a in spark_master()["completedapps"]}


def ray_job_status(run_id: str) -> list[str]:
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(LOCAL.ray_jobs).list_jobs()
    return [str(j.status) for j in jobs if f"--run-id {run_id}" in j.entrypoint]


def test_the_cluster_is_two_ray_nodes_and_a_spark_worker_on_loopback(local_cluster):
    from ray.util.state import list_nodes

    nodes = list_nodes(address=LOCAL.ray_jobs)
    assert [(n.state, n.node_ip) for n in nodes] == [("ALIVE", "127.0.0.1")] * 2
    assert spark_master()["aliveworkers"] == 1
    # every socket the cluster's processes listen on is on 127.0.0.1
    groups = [
        (REPO / f).read_text().strip() for f in (".ray/ray.pgid", ".spark/master.pgid", ".spark/worker.pgid")
    ]
    ps = subprocess.run(["ps", "-o", "pid=", "-g", ",".join(groups)], capture_output=True, text=True)
    ours = set(ps.stdout.split())
    ss = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout.splitlines()
    listening = [line.split()[3] for line in ss if ours & set(re.findall(r"pid=(\d+)", line))]
    assert len(listening) >= 10  # GCS, dashboard, raylets, agents, Spark RPC and UIs
    assert all(re.fullmatch(r"(\[::ffff:)?127\.0\.0\.1\]?:\d+", addr) for addr in listening), listening


def test_codebook_fit_runs_on_the_spark_cluster(local_cluster, tmp_path):
    root = tmp_path / "tables"
    make_world(root, "--emit-embeddings")
    before = spark_apps()
    r = submit(
        "codebook-fit",
        root,
        "--set",
        "codebook.levels=2",
        "--set",
        "codebook.k=8",
        "--set",
        "codebook.iters=5",
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    tables = Tables(str(root))
    assert store.versions(tables) == [1]
    cb = store.load(tables, 1)
    assert (cb.levels, tables.snapshot("codebooks").rows) == (2, 2 * 8)
    new = {app: state for app, state in spark_apps().items() if app not in before}
    assert list(new.values()) == ["FINISHED"]  # it ran on the standalone master, not in local[*]


def test_embed_runs_as_a_ray_job_on_the_cluster(local_cluster, tmp_path):
    root = tmp_path / "tables"
    make_world(root)
    # 1 actor x 1 CPU leaves 1 of the cluster's 2 CPUs to Ray Data's reads and writes
    r = submit(
        "embed", root, "--set", "encoder.actors=1", "--set", "encoder.cpus_per_actor=1", "--run-id", "emb-c"
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    snap = Tables(str(root)).snapshot("item_content_emb")
    assert (snap.rows, snap.dim) == (600, 384)
    assert ray_job_status("emb-c") == ["SUCCEEDED"]


@pytest.mark.parametrize(("stage", "table"), [("embed", "items"), ("codebook-fit", "item_content_emb")])
def test_a_failing_job_exits_non_zero_with_its_error(local_cluster, tmp_path, stage, table):
    run_id = f"fail-{stage}"
    r = submit(stage, tmp_path / "empty", "--run-id", run_id)
    assert r.returncode == 2  # the job's own exit status: qarm's one-line error in the driver
    assert f"qarm: error: table '{table}' does not exist" in r.stdout + r.stderr
    if stage == "embed":
        assert ray_job_status(run_id) == ["FAILED"]


def test_align_train_runs_as_a_ray_train_job_over_both_nodes(local_cluster, tmp_path):
    from qarm_dist import models

    root = tmp_path / "tables"
    make_world(root, "--emit-embeddings")
    r = qarm("pairs", "--root", str(root), "-q", "--run-id", "p", timeout=300)  # local Spark
    assert r.returncode == 0, r.stderr[-3000:]
    r = submit(
        "align-train",
        root,
        "--run-id",
        "al-c",
        *("--set", "align.epochs=2", "--set", "align.batch_size=128", "--set", "align.seeds=1"),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert ray_job_status("al-c") == ["SUCCEEDED"]
    tables = Tables(str(root))
    (info,) = models.published(tables, "align")  # published, its checkpoints beside the tables
    assert info.version.startswith("al-c") and info.meta["pairs_version"] == tables.version("item_pairs")
    assert [h["epoch"] for h in info.meta["history"]] == [0, 1] and info.meta["train_pairs"] > 0
