"""Hold a two-node Ray cluster on 127.0.0.1 until SIGTERM (started by `cluster/local/up`).

`ray start --address` refuses to add a second node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and without
that variable Ray binds the host's interface address (ENVIRONMENT.md §4). `ray.cluster_utils.Cluster`
in one long-running process gives both: two real raylets on 127.0.0.1 that other processes reach at the
GCS port, and the Jobs API on the dashboard port. Each node gets its own temp dir, so the nodes'
runtime-env agents never delete each other's job working dirs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from ray.cluster_utils import Cluster


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="state folder: node temp dirs and the ready file")
    ap.add_argument("--gcs-port", type=int, default=6379)
    ap.add_argument("--dashboard-port", type=int, default=8265)
    ap.add_argument("--cpus-per-node", type=int, default=1)
    ap.add_argument("--object-store-bytes", type=int, default=200_000_000)
    args = ap.parse_args()

    # Cluster() records its address in $RAY_TMPDIR/ray/ray_current_cluster (default /tmp/ray), and every
    # plain `ray.init()` on the machine would then join this cluster instead of starting its own.
    tmp = (args.dir / "tmp").resolve()
    (tmp / "ray").mkdir(parents=True, exist_ok=True)
    os.environ["RAY_TMPDIR"] = str(tmp)
    # Ray Train's placement-group cleaner finds the state API by auto-detection, which fails or picks
    # another Ray when several run on the machine; name ours to every process the nodes start.
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{args.dashboard_port}"
    node = {"num_cpus": args.cpus_per_node, "object_store_memory": args.object_store_bytes}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **node,
            "gcs_server_port": args.gcs_port,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": args.dashboard_port,
            # any free port, not the default 52365 that every other local Ray head on the machine wants: a
            # head agent that loses that race has no HTTP server, and the Jobs API then has no agent to use
            "dashboard_agent_listen_port": None,
            "temp_dir": str((args.dir / "head").resolve()),
        },
    )
    try:
        cluster.add_node(**node, temp_dir=str((args.dir / "node2").resolve()))
        cluster.wait_for_nodes()
        # Ray's node installs a SIGTERM handler that drains for 30 s; ours (installed after it) unwinds
        # through `finally` instead, so `cluster/local/down` stops the nodes in a few seconds.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        (args.dir / "ready").write_text(f"{cluster.address}\n")
        print(
            f"ray: 2 nodes up, GCS {cluster.address}, Jobs API http://127.0.0.1:{args.dashboard_port}",
            flush=True,
        )
        while True:
            time.sleep(3600)
    finally:
        (args.dir / "ready").unlink(missing_ok=True)
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
