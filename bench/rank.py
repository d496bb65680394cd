"""Ranker throughput and large-table memory.

1. Samples/s of `qarm rank train` (Ray Train, 1 and 2 workers) vs a plain single-process torch
   loop with the same model, variant and global batch over the same samples held in memory, on
   the same cores. Ray Train's figure is the steady state (epochs after the first, from the
   workers' own timings); its wall time is reported apart.
2. One training step of a model whose item table has ``--rows`` (10M) hashed rows, with sparse
   gradients (nn.EmbeddingBag(sparse=True) + Adagrad) vs dense ones (sparse=False + Adagrad):
   step time and the process's peak RSS, each mode in a fresh subprocess.

Prints a JSON line last.

    python bench/rank.py --world small
    python bench/rank.py --root qarm-data --variant vq_rq_gsu
    python bench/rank.py --table-only --rows 10000000
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.compute as pc
import torch
from plain import RankSettings, rank_loop, table_step

from qarm_dist.codebook import stage as codebook
from qarm_dist.config import load_config
from qarm_dist.data.ingest import write_world
from qarm_dist.engines import set_process_env
from qarm_dist.io.delta import Tables
from qarm_dist.rank import train
from qarm_dist.rank.feature_store import load_item_features
from qarm_dist.rank.model import RankerSpec
from qarm_dist.rank.samples import run_samples


def plain_loop(cfg, tables: Tables, variant: str, epochs: int, threads: int) -> dict[str, float]:
    """Samples/s of the plain torch loop (the peer): same spec, featurizer, loss and optimizers."""
    torch.set_num_threads(threads)
    rc = cfg.rank
    jobs, _, load = train.plan(cfg, tables, [variant], [0])
    feats = load_item_features(tables, load["code_versions"], load["emb_dim"], load["projection_seed"])
    rows = pa.Table.from_batches(list(tables.read_batches("samples")))
    rows = rows.filter(pc.equal(rows["split"], "train"))
    settings = RankSettings(rc.lr, rc.sparse_lr, rc.sparse_optimizer, rc.batch_size)
    return rank_loop(rows, feats, RankerSpec.from_json(jobs[0]["spec"]), settings, epochs)


def ray_train(cfg, variant: str, workers: int, tag: str) -> dict:
    rc = cfg.rank.model_copy(update={"workers": workers, "variant": variant})
    t0 = time.perf_counter()
    info = train.train(cfg.model_copy(update={"rank": rc}), f"bench-{tag}-w{workers}")
    wall = time.perf_counter() - t0
    hist = info.meta["history"]
    steady = [h["samples"] / h["seconds"] for h in hist[1:]] or [hist[0]["samples"] / hist[0]["seconds"]]
    return {"workers": workers, "samples_per_s": statistics.median(steady), "fit_wall_s": wall}


def table_child(rows: int, sparse: bool) -> dict:
    """`plain.table_step` in this (fresh) process, with its peak RSS."""
    torch.set_num_threads(1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = table_step(rows, 16, sparse, 2048)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {**out, "rss_before_mb": base / 1024, "peak_rss_mb": peak / 1024}


def main() -> None:
    set_process_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", help="an existing root with samples and item_codes")
    ap.add_argument("--world", default="small", choices=["tiny", "small"], help="else build this world")
    ap.add_argument("--variant", default="vq_rq")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows of the large hashed table")
    ap.add_argument("--table-only", action="store_true", help="only the large-table comparison")
    ap.add_argument("--table-mode", choices=["sparse", "dense"], help=argparse.SUPPRESS)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    if args.table_mode:  # child process: one mode, clean peak RSS
        print(json.dumps(table_child(args.rows, args.table_mode == "sparse")))
        return
    out: dict = {"bench": "rank"}
    for mode in ("sparse", "dense"):
        p = subprocess.run(
            [sys.executable, __file__, "--table-mode", mode, "--rows", str(args.rows)],
            capture_output=True,
            text=True,
            check=True,
        )
        out[f"table_{mode}"] = json.loads(p.stdout.strip().splitlines()[-1])
    if not args.table_only:
        root = args.root or tempfile.mkdtemp(prefix="qarm-bench-rank-")
        cfg = load_config(
            overrides=[f"world.size={args.world}", f"rank.epochs={args.epochs}", *args.overrides], root=root
        )
        tables = Tables.from_config(cfg)
        if not tables.exists("samples"):
            write_world(cfg, "bench-world", emit_embeddings=True)
            _, cb = codebook.run_fit(cfg, "bench-cb")
            codebook.run_assign(cfg, "bench-cb", cb.version)
            run_samples(cfg, "bench-samples")
        out["variant"] = args.variant
        out["batch"] = cfg.rank.batch_size
        plain = plain_loop(cfg, tables, args.variant, args.epochs, args.threads)
        out["plain_samples_per_s"] = plain["samples_per_s"]
        out["plain_step_samples_per_s"] = plain["step_samples_per_s"]
        tag = str(int(time.time()))
        out["ray"] = [ray_train(cfg, args.variant, w, tag) for w in (1, 2)]
        out["ratio_ray_vs_plain"] = {
            r["workers"]: r["samples_per_s"] / out["plain_samples_per_s"] for r in out["ray"]
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
