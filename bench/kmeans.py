"""K-means at scale: faiss (one process) vs qarm (Spark job) vs Spark MLlib, same data, same cores.

    python bench/kmeans.py --n 500000 --d 64 --k 1024 --iters 10 --json

- data: a seeded mixture of 4,096 Gaussian clusters (float32), written as an
  `item_content_emb` Delta table in ~262k-row files;
- faiss.Kmeans: the same init centroids (k rows drawn from the data by seed),
  the same iterations, no subsampling (max_points_per_centroid large);
- qarm: `qarm_dist.codebook.distributed.fit` on Spark local[*] with the same
  init centroids; the session start and the first (caching) pass are reported
  apart from the iterations (`qarm.seconds` = iterations + final pass);
- MLlib: `pyspark.ml.clustering.KMeans(solver="block")`, random init, same k and
  iterations; which BLAS it used is printed (the native one if
  libopenblas0-pthread is installed: run as root with --install-blas).

qarm and MLlib run in a child process (the parent holds the data for faiss);
`driver_peak_mb` is that Spark driver's peak RSS sampled during the fit. Every inertia is
recomputed the same way: the sum of squared distances of all points to the
final centroids. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time

import numpy as np
import psutil
import pyarrow as pa


def make_data(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4096, d)).astype(np.float32) * 3.0
    x = centres[rng.integers(0, len(centres), n)]
    x += rng.standard_normal((n, d)).astype(np.float32)
    return x


def inertia(x: np.ndarray, books: list[np.ndarray]) -> float:
    """Sum of squared residuals after greedy encoding through every level's centroids."""
    from qarm_dist.codebook.kmeans import ResidualCodebook, rq_encode

    _, residual = rq_encode(x, ResidualCodebook([np.ascontiguousarray(c, np.float32) for c in books]))
    return float((residual.astype(np.float64) ** 2).sum())


def faiss_residual(
    x: np.ndarray, k: int, iters: int, levels: int, c0: np.ndarray, seed: int
) -> list[np.ndarray]:
    """faiss.Kmeans per level on the residuals; level 0 from c0, later levels from random residual rows."""
    import faiss

    books, r = [], x
    for level in range(levels):
        init = c0 if level == 0 else r[np.random.default_rng(seed + level).choice(len(r), k, replace=False)]
        km = faiss.Kmeans(
            x.shape[1], k, niter=iters, seed=seed, max_points_per_centroid=10**9, min_points_per_centroid=1
        )
        km.train(r, init_centroids=np.ascontiguousarray(init))
        books.append(km.centroids.copy())
        if level + 1 < levels:
            r = r - km.centroids[km.index.search(r, 1)[1][:, 0]]
    return books


def spark_child(
    root: str, k: int, iters: int, levels: int, c0: np.ndarray, skip_mllib: bool, out: mp.Queue
) -> None:
    """qarm's Spark fit, then MLlib, in one Spark driver process."""
    from qarm_dist.codebook.distributed import fit
    from qarm_dist.config import load_config
    from qarm_dist.engines import set_process_env, spark_session
    from qarm_dist.io.delta import Tables

    set_process_env()
    t0 = time.perf_counter()
    spark = spark_session(load_config(overrides=["spark.driver_memory=6g"]))
    spark.range(1).count()
    session_s = time.perf_counter() - t0
    snap = Tables(root).snapshot("item_content_emb")
    # Peak RSS sampled during the fit. Not ru_maxrss: a spawned child inherits its parent's
    # high-water mark across exec, and the parent holds the whole data set for faiss.
    proc, peak, done = psutil.Process(), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    t0 = time.perf_counter()
    res = fit(
        spark,
        snap,
        "emb",
        levels,
        k,
        iters,
        init="random",
        init_centroids_l0=c0,
        tol=0.0,
        partitions=os.cpu_count(),
    )
    total_s = time.perf_counter() - t0
    done.set()
    peak_mb = peak[0] / 2**20
    qarm = {
        "seconds": round(res.seconds["fit"], 2),
        "load_seconds": round(res.seconds["load"], 2),
        "total_seconds": round(total_s, 2),
        "session_seconds": round(session_s, 2),
        "driver_peak_mb": round(peak_mb, 1),
        "centroids": res.book.centroids,
        "cost": res.cost,
        "recon_mse": res.recon_mse,
    }
    if skip_mllib:
        spark.stop()
        out.put((qarm, None))
        return

    from pyspark.ml.clustering import KMeans
    from pyspark.ml.functions import array_to_vector

    jvm = spark.sparkContext._jvm
    blas = jvm.dev.ludovic.netlib.blas.BLAS.getInstance().getClass().getName()
    df = spark.read.parquet(*snap.files).select(array_to_vector("emb").alias("features")).cache()
    df.count()
    t0 = time.perf_counter()
    model = KMeans(k=k, maxIter=iters, initMode="random", seed=0, tol=0.0, solver="block").fit(df)
    mllib_s = time.perf_counter() - t0
    mllib = {
        "seconds": round(mllib_s, 2),
        "blas": blas,
        "centroids": np.asarray(model.clusterCenters(), np.float32),
    }
    spark.stop()
    out.put((qarm, mllib))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500_000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--levels", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-mllib", action="store_true")
    ap.add_argument("--install-blas", action="store_true", help="apt-get install libopenblas0-pthread (root)")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args()

    from qarm_dist.engines import set_process_env

    set_process_env()
    if args.install_blas and not os.path.exists("/usr/lib/x86_64-linux-gnu/libblas.so.3"):
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "libopenblas0-pthread"], check=True, stdout=subprocess.DEVNULL
        )

    import faiss

    x = make_data(args.n, args.d, args.seed)
    rng = np.random.default_rng(args.seed)
    c0 = x[rng.choice(args.n, args.k, replace=False)].copy()
    root = tempfile.mkdtemp(prefix="qarm-bench-kmeans-")
    from qarm_dist.io.delta import Tables

    w = Tables(root).writer("item_content_emb", "bench", dim=args.d, target_rows=262_144)
    for lo in range(0, args.n, 262_144):
        hi = min(lo + 262_144, args.n)
        w.write(
            pa.table(
                {
                    "item_id": np.arange(lo, hi, dtype=np.int64),
                    "emb": pa.FixedSizeListArray.from_arrays(pa.array(x[lo:hi].ravel()), args.d),
                    "encoder": pa.array(["bench"] * (hi - lo)),
                }
            )
        )
    w.commit()

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    child = ctx.Process(
        target=spark_child, args=(root, args.k, args.iters, args.levels, c0, args.skip_mllib, q)
    )
    child.start()
    while True:  # fail, rather than wait forever, if the Spark child dies
        try:
            qarm, mllib = q.get(timeout=10)
            break
        except queue.Empty:
            if not child.is_alive():
                raise SystemExit(f"the Spark child exited with code {child.exitcode}") from None
    child.join()

    t0 = time.perf_counter()
    faiss_books = faiss_residual(x, args.k, args.iters, args.levels, c0, args.seed)
    faiss_s = time.perf_counter() - t0

    out = {
        "n": args.n,
        "d": args.d,
        "k": args.k,
        "iters": args.iters,
        "levels": args.levels,
        "cores": os.cpu_count(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "faiss": {"seconds": round(faiss_s, 2), "inertia": inertia(x, faiss_books)},
        "qarm": {
            "seconds": qarm["seconds"],
            "inertia": inertia(x, qarm["centroids"]),
            "driver_peak_mb": qarm["driver_peak_mb"],
            "load_seconds": qarm["load_seconds"],
            "session_seconds": qarm["session_seconds"],
            "cost": qarm["cost"],
        },
    }
    out["ratios"] = {
        "qarm_over_faiss_seconds": round(out["qarm"]["seconds"] / out["faiss"]["seconds"], 3),
        "qarm_over_faiss_inertia": round(out["qarm"]["inertia"] / out["faiss"]["inertia"], 5),
    }
    if mllib is not None:
        out["mllib"] = {
            "seconds": mllib["seconds"],
            "inertia": inertia(x, [mllib["centroids"]]),
            "blas": mllib["blas"],
        }
        out["ratios"]["mllib_over_qarm_seconds"] = round(out["mllib"]["seconds"] / out["qarm"]["seconds"], 3)
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
