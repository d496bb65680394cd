"""Content-embedding throughput: `qarm embed` (Ray Data) vs a plain single-process loop.

Both encode the same `items` table with the same encoder and batch size on the
same cores; the plain loop reads the table, encodes with one process and all
its torch threads, and stages+commits one file. Prints a JSON line last.

    python bench/embed.py --world small            # 3,000 generated items
    python bench/embed.py --movielens ../shared/data/ml-latest-small
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import pyarrow as pa

from qarm_dist.config import load_config
from qarm_dist.data.ingest import write_movielens, write_world
from qarm_dist.embed import run_embed
from qarm_dist.embed.encoders import make_encoder
from qarm_dist.engines import ray_init, set_process_env
from qarm_dist.io.delta import Tables


def plain_loop(tables: Tables, name: str, batch_size: int, threads: int) -> float:
    t0 = time.perf_counter()
    enc = make_encoder(name, batch_size=batch_size, threads=threads)
    w = tables.writer("item_content_emb", "bench-plain", dim=enc.dim)
    for rb in tables.read_batches("items", columns=["item_id", "text"]):
        e = enc.encode(rb.column("text").to_pylist())
        w.write(
            pa.table(
                {
                    "item_id": rb.column("item_id"),
                    "emb": pa.FixedSizeListArray.from_arrays(pa.array(e.ravel()), enc.dim),
                    "encoder": pa.array([enc.name] * rb.num_rows),
                }
            )
        )
    w.commit(mode="overwrite")
    return time.perf_counter() - t0


def main() -> None:
    set_process_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--world", default="small", choices=["tiny", "small"])
    src.add_argument("--movielens", metavar="PATH")
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per actor")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args()

    root = tempfile.mkdtemp(prefix="qarm-bench-embed-")
    cfg = load_config(
        overrides=[
            f"world.size={args.world}",
            f"encoder.actors={args.actors}",
            f"encoder.threads_per_actor={args.threads}",
            f"encoder.cpus_per_actor={min(1.0, (os.cpu_count() - 1) / args.actors)}",
        ],
        root=root,
    )
    if args.movielens:
        write_movielens(cfg, args.movielens, "bench")
    else:
        write_world(cfg, "bench")
    tables = Tables(root)
    n = tables.snapshot("items").rows
    cores = os.cpu_count() or 1

    t0 = time.perf_counter()
    ray_init(cfg)
    ray_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_embed(cfg, "bench-ray")
    ray_s = time.perf_counter() - t0
    plain_s = plain_loop(tables, cfg.encoder.name, cfg.encoder.batch_size, threads=cores)

    out = {
        "items": n,
        "cores": cores,
        "actors": args.actors,
        "threads_per_actor": args.threads,
        "ray_init_seconds": round(ray_start, 2),
        "qarm_ray_data": {"seconds": round(ray_s, 2), "items_per_s": round(n / ray_s, 1)},
        "plain_loop": {"seconds": round(plain_s, 2), "items_per_s": round(n / plain_s, 1), "threads": cores},
        "ratio_qarm_over_plain": round((n / ray_s) / (n / plain_s), 3),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
