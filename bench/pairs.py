"""`qarm pairs` as interactions grow: time, shuffle volume, and a single-process peer.

For each size the generated world is scaled (about 100 impressions per user,
as many items as users) and written with emitted content embeddings, then:
- the whole pairs job (Swing + ALS/U2I + judge + popularity control + commit)
  runs on Spark local[*], timed, with the shuffle bytes Spark reports;
- Swing alone runs on Spark and, up to --ref-max rows, in pandas
  (`swing_reference`) over the same capped positives: the ratio is
  pandas seconds / Spark seconds (above 1: Spark is faster).

    python bench/pairs.py --sizes 100000 300000 1000000 3000000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request

from pyspark.sql import functions as F

from qarm_dist.config import load_config
from qarm_dist.data.ingest import write_world
from qarm_dist.data.split import tables_eval_start
from qarm_dist.engines import set_process_env, spark_session
from qarm_dist.io.delta import Tables
from qarm_dist.pairs import run_pairs
from qarm_dist.pairs.swing import cap_positives, swing, swing_reference

UI = "http://127.0.0.1:4047/api/v1"


def shuffle_bytes() -> int:
    """Shuffle write bytes of every stage so far, from Spark's REST API (UI bound to 127.0.0.1)."""
    with urllib.request.urlopen(f"{UI}/applications", timeout=10) as r:
        app = json.load(r)[0]["id"]
    with urllib.request.urlopen(f"{UI}/applications/{app}/stages", timeout=30) as r:
        return sum(s.get("shuffleWriteBytes", 0) for s in json.load(r))


def main() -> None:
    set_process_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--ref-max", type=int, default=1_000_000, help="largest size the pandas peer runs at")
    args = ap.parse_args()

    results = []
    for size in args.sizes:
        users = max(100, size // 100)
        root = tempfile.mkdtemp(prefix=f"qarm-bench-pairs-{size}-")
        cfg = load_config(
            overrides=[
                "world.size=large",
                f"world.n_users={users}",
                f"world.n_items={users}",
                "world.impressions_per_user=100",
                "spark.conf={spark.ui.enabled: 'true', spark.ui.port: '4047'}",
            ],
            root=root,
        )
        write_world(cfg, "bench", emit_embeddings=True)
        tables = Tables(root)
        spark = spark_session(cfg)
        rows = tables.snapshot("interactions").rows

        shuffled0, t0 = shuffle_bytes(), time.perf_counter()
        result, section = run_pairs(cfg, f"bench-{size}")
        job_s = time.perf_counter() - t0
        job_shuffle = shuffle_bytes() - shuffled0

        pc = cfg.pairs
        cut = tables_eval_start(tables, cfg.split.eval_fraction)
        pos = (
            tables.spark(spark, "interactions")
            .filter((F.col(pc.positive) == 1) & (F.col("ts") < cut))
            .select("user_id", "item_id")
            .distinct()
        )
        capped = cap_positives(pos, pc.max_items_per_user, pc.max_users_per_item, pc.seed).cache()
        n_pos = capped.count()
        t0 = time.perf_counter()
        n_swing = swing(capped, pc.swing_alpha, pc.swing_user_weight, 10**9, 1).count()
        swing_s = time.perf_counter() - t0
        entry = {
            "interactions": rows,
            "positives_after_caps": n_pos,
            "pairs": result.rows,
            "i2i": section["i2i"],
            "u2i": section["u2i"],
            "heldout": section["heldout"],
            "job_seconds": round(job_s, 2),
            "job_shuffle_mb": round(job_shuffle / 2**20, 1),
            "swing_spark_seconds": round(swing_s, 2),
            "swing_pairs_both_directions": n_swing,
        }
        if rows <= args.ref_max:
            local = capped.toPandas()  # the peer needs the data in one process: small sizes only
            t0 = time.perf_counter()
            ref = swing_reference(local["user_id"].to_numpy(), local["item_id"].to_numpy(), pc.swing_alpha)
            entry["swing_pandas_seconds"] = round(time.perf_counter() - t0, 2)
            entry["swing_pandas_over_spark"] = round(entry["swing_pandas_seconds"] / swing_s, 3)
            assert 2 * len(ref) == n_swing, "Spark and pandas Swing disagree on the number of pairs"
        capped.unpersist()
        spark.stop()
        print(json.dumps(entry), flush=True)
        results.append(entry)
    print(json.dumps({"bench": "pairs", "results": results}))


if __name__ == "__main__":
    main()
