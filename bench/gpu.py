"""The plain peers (`bench/plain.py`) on CUDA against the same host's CPU cores.

A GPU box here has torch but neither Ray, Spark, deltalake nor faiss, and no
package index, so this bench needs none of them: `export` (run where the tables
are) writes a sample of real ranker inputs to a folder small enough to carry
along, and `run` (on the GPU box) times, on ``cuda`` and on ``cpu`` with every
core:

1. alignment steps (tower + global-batch InfoNCE + AdamW) at the configured batch and larger
   ones, on random content rows of the real shape (throughput does not depend on the values);
2. ranker steps of ``--variant`` on the exported samples: the whole loop (featurize on the CPU
   included) and the device step alone;
3. one step of a 10M-row hashed table with sparse vs dense gradients, with CUDA's peak memory.

    python bench/gpu.py export --root qarm-data --out bench/out/gpu-data          # here
    python bench/gpu.py run --data bench/out/gpu-data --out bench/out/gpu.json    # on the GPU box
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from plain import AlignSettings, PlainPairs, RankSettings, align_loop, rank_loop, table_step, to_device

from qarm_dist.rank.features import Codes, ItemFeatures, featurize
from qarm_dist.rank.model import Ranker, RankerSpec, loss_fn

SAMPLES, FEATURES, SETTINGS = "samples.parquet", "item_features.npz", "settings.json"


def export(root: str, out: str, variant: str, rows: int, overrides: list[str]) -> None:
    """A hash-ordered slice of the train samples, the item features they need, the spec and settings."""
    from qarm_dist.config import load_config
    from qarm_dist.io.delta import Tables
    from qarm_dist.rank import train
    from qarm_dist.rank.feature_store import load_item_features

    cfg = load_config(overrides=overrides, root=root)
    tables = Tables.from_config(cfg)
    jobs, skipped, load = train.plan(cfg, tables, [variant], [0])
    if not jobs:
        raise SystemExit(f"variant {variant} cannot run on {root}: {skipped[variant]}")
    os.makedirs(out, exist_ok=True)
    kept, n = [], 0
    for rb in tables.read_batches("samples"):  # the table is in a seeded hash order: a prefix is a sample
        rb = rb.filter(pc.equal(rb.column("split"), "train"))
        kept.append(rb.slice(0, rows - n))
        n += kept[-1].num_rows
        if n >= rows:
            break
    samples = pa.Table.from_batches(kept)
    pq.write_table(samples, os.path.join(out, SAMPLES), compression="zstd")
    feats = load_item_features(tables, load["code_versions"], load["emb_dim"], load["projection_seed"])
    arrays: dict[str, np.ndarray] = {"ids": feats.ids}
    codes = {}
    for role, c in feats.codes.items():
        arrays |= {f"{role}.rq": c.rq, f"{role}.vq": c.vq}
        if c.fsq is not None:
            arrays[f"{role}.fsq"] = c.fsq
        codes[role] = {"version": c.version, "k": c.k, "fsq_size": c.fsq_size}
    if feats.emb is not None:
        arrays["emb"] = feats.emb
    np.savez_compressed(os.path.join(out, FEATURES), **arrays)
    ac, rc = cfg.align, cfg.rank
    settings = {
        "variant": variant,
        "spec": jobs[0]["spec"],
        "rank": {"lr": rc.lr, "sparse_lr": rc.sparse_lr, "sparse_optimizer": rc.sparse_optimizer},
        "rank_batch": rc.batch_size,
        "align": {
            "hidden": ac.hidden,
            "lr": ac.lr,
            "weight_decay": ac.weight_decay,
            "temperature": ac.temperature,
            "logq": ac.logq,
        },
        "align_batch": ac.batch_size,
        "content_dim": tables.snapshot("item_content_emb").dim,
        "codes": codes,
        "samples": samples.num_rows,
    }
    with open(os.path.join(out, SETTINGS), "w") as fh:
        json.dump(settings, fh, indent=1)
    print(f"exported {samples.num_rows} train samples and {len(feats.ids)} items' features to {out}")


def _features(data: str, codes: dict) -> ItemFeatures:
    z = np.load(os.path.join(data, FEATURES))
    feats = ItemFeatures(z["ids"], emb=z.get("emb", None))
    for role, m in codes.items():
        fsq = z.get(f"{role}.fsq", None)
        rq, vq = z[f"{role}.rq"], z[f"{role}.vq"]
        feats.codes[role] = Codes(m["version"], m["k"], rq, vq, fsq, m["fsq_size"])
    return feats


def _agreement(samples: pa.Table, feats: ItemFeatures, spec: RankerSpec) -> dict[str, float]:
    """Relative error of the ranker's logits and loss gradient on CUDA against the CPU, same weights."""
    torch.manual_seed(0)
    cpu = Ranker(spec)
    gpu = copy.deepcopy(cpu).to("cuda")
    f = featurize(samples.slice(0, 1024), feats, spec.feature_spec())
    out = {}
    for name, model, dev in (("cpu", cpu, "cpu"), ("cuda", gpu, "cuda")):
        g = to_device(f, dev)
        logits = model(g)
        loss, _ = loss_fn(logits, g["labels"], g["label_mask"])
        loss.backward()
        out[name] = (logits.detach().double().cpu(), next(model.dense.parameters()).grad.double().cpu())
    rel = [float((b - a).norm() / a.norm()) for a, b in zip(out["cpu"], out["cuda"], strict=True)]
    return {"logits_rel_err": rel[0], "first_dense_grad_rel_err": rel[1]}


def _timed(name: str, fn, results: dict, out: str) -> None:
    """Run one measurement, keep going on failure, and write what is known so far."""
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # a failed measurement is reported as such; the others still run
        results[name] = {"error": f"{type(e).__name__}: {e}"}
    print(f"{name} ({time.perf_counter() - t0:.0f} s): {json.dumps(results[name])}", flush=True)
    with open(out, "w") as fh:
        json.dump(results, fh, indent=1)


def run(data: str, out: str, epochs: int, align_pairs: int, table_rows: int) -> None:
    with open(os.path.join(data, SETTINGS)) as fh:
        st = json.load(fh)
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    results: dict = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "variant": st["variant"],
    }
    rng = np.random.default_rng(0)
    items = 50_000
    pairs = PlainPairs(
        torch.from_numpy(rng.standard_normal((items, st["content_dim"]), dtype=np.float32)),
        rng.integers(0, items, align_pairs),
        rng.integers(0, items, align_pairs),
        torch.from_numpy(np.full(items, -np.log(items), np.float32)),
    )
    for batch in sorted({st["align_batch"], 4096, 16384}):
        s = AlignSettings(**st["align"], batch=batch)
        # InfoNCE is O(batch^2): the large batches run on the GPU only
        for dev in devices if batch == st["align_batch"] else devices[:1]:
            _timed(
                f"align_b{batch}_{dev}", lambda s=s, dev=dev: align_loop(pairs, s, epochs, dev), results, out
            )
    samples = pq.read_table(os.path.join(data, SAMPLES))
    feats, spec = _features(data, st["codes"]), RankerSpec.from_json(st["spec"])
    if "cuda" in devices:
        _timed("cuda_matches_cpu", lambda: _agreement(samples, feats, spec), results, out)
    for batch in sorted({st["rank_batch"], 4096}):
        s = RankSettings(**st["rank"], batch=batch)
        for dev in devices:
            _timed(
                f"rank_b{batch}_{dev}",
                lambda s=s, dev=dev: rank_loop(samples, feats, spec, s, epochs, dev),
                results,
                out,
            )
    for dev in devices:
        for sparse in (True, False):
            mode = "sparse" if sparse else "dense"

            def one(sparse=sparse, dev=dev) -> dict:
                if dev == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                r = table_step(table_rows, 16, sparse, 2048, dev)
                if dev == "cuda":
                    r["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
                return r

            _timed(f"table_{mode}_{dev}", one, results, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write the ranker inputs the GPU run needs (where the tables are)")
    e.add_argument("--root", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--variant", default="vq_rq_gsu")
    e.add_argument("--rows", type=int, default=60_000, help="train samples to export")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    r = sub.add_parser("run", help="time the peers on cuda and cpu (on the GPU box)")
    r.add_argument("--data", required=True)
    r.add_argument("--out", required=True, help="results JSON, rewritten after every measurement")
    r.add_argument("--epochs", type=int, default=3)
    r.add_argument("--align-pairs", type=int, default=200_000)
    r.add_argument("--table-rows", type=int, default=10_000_000)
    args = ap.parse_args()
    if args.cmd == "export":
        export(args.root, args.out, args.variant, args.rows, args.overrides)
    else:
        run(args.data, args.out, args.epochs, args.align_pairs, args.table_rows)


if __name__ == "__main__":
    main()
