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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from qarm_dist.codebook import stage as codebook
from qarm_dist.config import load_config
from qarm_dist.data.ingest import write_world
from qarm_dist.engines import set_process_env
from qarm_dist.io.delta import Tables
from qarm_dist.rank import train
from qarm_dist.rank.embeddings import EmbeddingBagConfig, EmbeddingTables, sparse_optimizer
from qarm_dist.rank.features import featurize, load_item_features
from qarm_dist.rank.model import Ranker, RankerSpec, loss_fn
from qarm_dist.rank.samples import run_samples


def plain_loop(cfg, tables: Tables, variant: str, epochs: int, threads: int) -> float:
    """Samples/s of a plain torch loop (the peer): same spec, featurizer, loss and optimizers."""
    torch.set_num_threads(threads)
    rc = cfg.rank
    jobs, _, load = train.plan(cfg, tables, [variant], [0])
    spec = RankerSpec.from_json(jobs[0]["spec"])
    feats = load_item_features(tables, load["code_versions"], load["emb_dim"], load["projection_seed"])
    rows = pa.Table.from_batches(list(tables.read_batches("samples")))
    rows = rows.filter(pc.equal(rows["split"], "train"))
    torch.manual_seed(0)
    model = Ranker(spec)
    opt_d = torch.optim.AdamW(model.dense.parameters(), lr=rc.lr)
    opt_s = sparse_optimizer(rc.sparse_optimizer, list(model.sparse.parameters()), rc.sparse_lr)
    fspec, bs, times = spec.feature_spec(), rc.batch_size, []
    rng = np.random.default_rng(0)
    for _ in range(epochs):
        perm = rng.permutation(rows.num_rows)
        t0 = time.perf_counter()
        for s in range(0, rows.num_rows - bs + 1, bs):
            f = featurize(rows.take(perm[s : s + bs]), feats, fspec)
            loss, _ = loss_fn(model(f), f["labels"], f["label_mask"])
            opt_d.zero_grad()
            opt_s.zero_grad()
            loss.backward()
            opt_d.step()
            opt_s.step()
        times.append(time.perf_counter() - t0)
    return (rows.num_rows // bs) * bs / statistics.median(times[1:] if len(times) > 1 else times)


def ray_train(cfg, variant: str, workers: int, tag: str) -> dict:
    rc = cfg.rank.model_copy(update={"workers": workers, "variant": variant})
    t0 = time.perf_counter()
    info = train.train(cfg.model_copy(update={"rank": rc}), f"bench-{tag}-w{workers}")
    wall = time.perf_counter() - t0
    hist = info.meta["history"]
    steady = [h["samples"] / h["seconds"] for h in hist[1:]] or [hist[0]["samples"] / hist[0]["seconds"]]
    return {"workers": workers, "samples_per_s": statistics.median(steady), "fit_wall_s": wall}


def table_step(rows: int, dim: int, sparse: bool, batch: int) -> dict:
    """Peak RSS and step time of one table of ``rows`` x ``dim`` trained on a batch of bags."""
    torch.set_num_threads(1)
    tables = EmbeddingTables([EmbeddingBagConfig("item", rows, dim, ("item",))])
    if not sparse:
        tables.tables["item"].sparse = False
    opt = (
        sparse_optimizer("adagrad", list(tables.parameters()), 0.05)
        if sparse
        else torch.optim.Adagrad(tables.parameters(), lr=0.05)
    )
    rng = np.random.default_rng(0)
    times = []
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(5):
        ids = torch.from_numpy(rng.integers(1, rows, (batch, 50)))
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        tables("item", ids).pow(2).sum().backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "mode": "sparse" if sparse else "dense",
        "rows": rows,
        "table_mb": rows * dim * 4 / 2**20,
        "step_s": statistics.median(times[1:]),
        "first_step_s": times[0],
        "rss_after_init_mb": base / 1024,
        "peak_rss_mb": peak / 1024,
    }


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
        print(json.dumps(table_step(args.rows, 16, args.table_mode == "sparse", 2048)))
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
        out["plain_samples_per_s"] = plain_loop(cfg, tables, args.variant, args.epochs, args.threads)
        tag = str(int(time.time()))
        out["ray"] = [ray_train(cfg, args.variant, w, tag) for w in (1, 2)]
        out["ratio_ray_vs_plain"] = {
            r["workers"]: r["samples_per_s"] / out["plain_samples_per_s"] for r in out["ray"]
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
