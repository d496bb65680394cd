"""Distributed residual K-means on Spark: Lloyd's algorithm by sufficient statistics.

The table's files are grouped into *pieces* of about equal rows, one Spark task
per piece. A task reads its piece's vectors with pyarrow (never through the
JVM) and keeps them in its Python worker between passes (`_WorkerCache`,
keyed by snapshot, level and piece; Spark reuses Python workers). A pass
assigns the piece with the `kmeans.assign` kernel and returns only the
K x (d+1) statistics and the inertia; the driver adds them and moves the
centroids. On a cache miss (another worker, an evicted entry, a retried task)
the task re-reads the piece and re-encodes it through the levels fitted so
far, so the result does not depend on where a task runs.

Per level: one pass per iteration, then a final pass that assigns with the
final centroids, stores the residuals for the next level in the cache and
returns a sample of them (the next level's initialisation, or FSQ's fit).
Driver memory: O(K * d + init sample); task memory: O(piece + K * d).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import SparkSession

from qarm_dist.codebook.fsq import FSQParams, fit_fsq, fsq_decode, fsq_encode
from qarm_dist.codebook.kmeans import ResidualCodebook, assign, init_centroids, rq_encode, update
from qarm_dist.io.delta import Snapshot, TableError, filesystem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Piece:
    """What one task reads: whole files of the snapshot."""

    index: int
    files: tuple[str, ...]
    rows: int


def plan_pieces(snapshot: Snapshot, n_pieces: int) -> list[Piece]:
    """Group files into at most ``n_pieces`` pieces of about equal rows (largest file first)."""
    n = max(1, min(n_pieces, len(snapshot.files)))
    bins: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for f, rows in sorted(zip(snapshot.files, snapshot.file_rows), key=lambda fr: -fr[1]):
        i = int(np.argmin(load))
        bins[i].append(f)
        load[i] += rows
    return [Piece(i, tuple(b), load[i]) for i, b in enumerate(bins) if b]


class _WorkerCache:
    """Per-Python-worker LRU of numpy arrays, bounded in bytes."""

    def __init__(self) -> None:
        self.items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.bytes = 0
        self.misses = 0  # reads of a piece from storage; a fit reports the sum over its passes

    def get(self, key: tuple) -> np.ndarray | None:
        arr = self.items.get(key)
        if arr is not None:
            self.items.move_to_end(key)
        return arr

    def put(self, key: tuple, arr: np.ndarray, limit: int) -> None:
        self.drop(key)
        if arr.nbytes > limit:
            return
        self.items[key] = arr
        self.bytes += arr.nbytes
        while self.bytes > limit and self.items:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.nbytes

    def drop(self, key: tuple) -> None:
        old = self.items.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes


_CACHE = _WorkerCache()  # lives as long as the Python worker process


def read_vectors(
    files: tuple[str, ...],
    column: str,
    dim: int,
    storage_options: dict[str, str] | None,
    allowed_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(item ids, (n, dim) float32 vectors) of some table files; only ``allowed_ids`` if given (sorted)."""
    ids, vecs = [], []
    for uri in files:
        fs, path = filesystem(uri, storage_options)
        with fs.open_input_file(path) as fh:
            t = pq.read_table(fh, columns=["item_id", column])
        item = t.column("item_id").to_numpy()
        flat = pc.list_flatten(t.column(column)).to_numpy().astype(np.float32, copy=False)
        if len(flat) != len(item) * dim:
            raise ValueError(f"{uri}: column '{column}' does not hold {dim}-d vectors")
        x = flat.reshape(-1, dim)
        if allowed_ids is not None:
            pos = np.minimum(np.searchsorted(allowed_ids, item), max(len(allowed_ids) - 1, 0))
            keep = allowed_ids[pos] == item if len(allowed_ids) else np.zeros(len(item), bool)
            item, x = item[keep], x[keep]
        ids.append(item)
        vecs.append(x)
    return np.concatenate(ids), np.ascontiguousarray(np.concatenate(vecs))


@dataclass
class _Job:
    """Everything a task needs, shipped with the closure (small: paths, sizes, the codebook so far)."""

    key: str
    column: str
    dim: int
    storage_options: dict[str, str]
    allowed_ids: Any  # a Spark broadcast of sorted ids, or None
    cache_bytes: int
    threads: int
    backend: str
    seed: int
    books: list[np.ndarray] = field(default_factory=list)

    # Cache access goes through these methods only: `_Job` is a module-level class, so in a worker
    # they reach the module's real `_CACHE`. Task closures are pickled by value, and a global they
    # name directly would be a throw-away copy.
    def store(self, piece: Piece, level: int, x: np.ndarray) -> None:
        _CACHE.put((self.key, level, piece.index), x, self.cache_bytes)

    def forget(self, piece: Piece, level: int) -> None:
        _CACHE.drop((self.key, level, piece.index))

    @staticmethod
    def misses() -> int:
        return _CACHE.misses

    def residual(self, piece: Piece, level: int) -> np.ndarray:
        """This piece's level-``level`` residuals, from the cache or recomputed (counted as a miss)."""
        import faiss

        faiss.omp_set_num_threads(self.threads)
        key = (self.key, level, piece.index)
        x = _CACHE.get(key)
        if x is None:
            _CACHE.misses += 1
            allowed = self.allowed_ids.value if self.allowed_ids is not None else None
            _, x = read_vectors(piece.files, self.column, self.dim, self.storage_options, allowed)
            if level > 0:
                _, x = rq_encode(x, ResidualCodebook(self.books[:level]), backend=self.backend)
            self.store(piece, level, x)
        return x


def _load_pass(job: _Job, pieces_rdd, table: str, rate: float) -> tuple[int, np.ndarray]:
    """First pass: load (and cache) level-0 vectors; count rows, refuse non-finite ones, sample for init."""

    def task(it: Iterator[Piece]):
        for piece in it:
            x = job.residual(piece, 0)
            rng = np.random.default_rng([job.seed, 1_000_003, piece.index])  # a tag no level uses
            yield len(x), int((~np.isfinite(x).all(axis=1)).sum()), x[rng.random(len(x)) < rate]

    parts = pieces_rdd.mapPartitions(task).collect()
    n, bad = sum(p[0] for p in parts), sum(p[1] for p in parts)
    if bad:
        raise TableError(table, job.column, bad, n, "have NaN or infinite values")
    return n, np.concatenate([p[2] for p in parts])


def _stats_pass(job: _Job, pieces_rdd, level: int, centroids: np.ndarray, frac: float):
    sc = pieces_rdd.context
    bc = sc.broadcast(centroids)

    def task(it: Iterator[Piece]):
        c = bc.value
        for piece in it:
            before = job.misses()
            x = job.residual(piece, level)
            if frac < 1.0:
                x = x[:: max(1, round(1 / frac))]
            a = assign(x, c, backend=job.backend)
            yield a.sums, a.counts, a.inertia, len(x), job.misses() - before

    def add(p, q):
        return tuple(a + b for a, b in zip(p, q))

    out = pieces_rdd.mapPartitions(task).treeReduce(add, depth=2)
    bc.unpersist()
    return out


def _final_pass(job: _Job, pieces_rdd, level: int, centroids: np.ndarray, rate: float, keep: bool):
    """Assign with the final centroids, cache next-level residuals (if ``keep``), return (inertia, n, sample)."""
    sc = pieces_rdd.context
    bc = sc.broadcast(centroids)

    def task(it: Iterator[Piece]):
        c = bc.value
        for piece in it:
            x = job.residual(piece, level)
            a = assign(x, c, backend=job.backend)
            r = x - c[a.codes]
            job.forget(piece, level)
            if keep:
                job.store(piece, level + 1, r)
            rng = np.random.default_rng([job.seed, level, piece.index])
            yield a.inertia, len(x), r[rng.random(len(r)) < rate]

    parts = pieces_rdd.mapPartitions(task).collect()
    bc.unpersist()
    inertia = sum(p[0] for p in parts)
    n = sum(p[1] for p in parts)
    sample = np.concatenate([p[2] for p in parts]) if parts else np.empty((0, job.dim), np.float32)
    return inertia, n, sample


@dataclass
class FitResult:
    book: ResidualCodebook
    fsq: FSQParams | None
    rows: int
    inertia: list[list[float]]  # per level, per iteration (the assignment of that iteration)
    recon_mse: list[float]  # mean squared residual after each level (final assignment)
    fsq_recon_mse: float | None
    cost: dict[str, Any]
    seconds: dict[str, float]


def fit(
    spark: SparkSession,
    snapshot: Snapshot,
    column: str,
    levels: int,
    k: int,
    iters: int,
    *,
    fsq_levels: list[int] | None = None,
    tol: float = 0.0,
    init: str = "kmeans++",
    init_sample: int = 50_000,
    sample_fraction: float = 1.0,
    sample_iters: int = 0,
    seed: int = 0,
    partitions: int = 0,
    threads_per_task: int = 1,
    backend: str = "faiss",
    cache_mb: int = 8192,
    allowed_ids: np.ndarray | None = None,
    init_centroids_l0: np.ndarray | None = None,
    storage_options: dict[str, str] | None = None,
) -> FitResult:
    """Fit ``levels`` residual K-means levels (and FSQ) over an embedding table snapshot."""
    sc = spark.sparkContext
    dim = snapshot.dim
    if dim is None:
        raise ValueError(f"table '{snapshot.name}' has no embedding column")
    pieces = plan_pieces(snapshot, partitions or sc.defaultParallelism)
    if not pieces or snapshot.rows == 0:
        raise TableError(snapshot.name, column, 0, 0, "exist to fit on (the table is empty)")
    pieces_rdd = sc.parallelize(pieces, len(pieces))
    job = _Job(
        key=f"{snapshot.uri}@{snapshot.version}#{seed}#{time.time_ns()}",
        column=column,
        dim=dim,
        storage_options=dict(storage_options or {}),
        allowed_ids=sc.broadcast(np.sort(allowed_ids)) if allowed_ids is not None else None,
        cache_bytes=cache_mb << 20,
        threads=threads_per_task,
        backend=backend,
        seed=seed,
    )
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    rate = min(1.0, init_sample / snapshot.rows)
    n, sample = _load_pass(job, pieces_rdd, snapshot.name, rate)
    seconds["load"] = time.perf_counter() - t0
    if n == 0:
        raise TableError(snapshot.name, column, 0, 0, "exist to fit on (the fit window holds no item)")
    if k > n:
        raise ValueError(
            f"codebook k={k} is larger than the {n} vectors of table '{snapshot.name}' to fit on"
        )
    if len(sample) < k:  # the fit window kept few rows: sample them all
        _, sample = _load_pass(job, pieces_rdd, snapshot.name, 1.0)
    rate = min(1.0, init_sample / n)
    t0 = time.perf_counter()
    inertia_hist: list[list[float]] = []
    recon: list[float] = []
    passes, misses = 0, 0
    for level in range(levels):
        if level == 0 and init_centroids_l0 is not None:
            c = np.ascontiguousarray(init_centroids_l0, dtype=np.float32)
        else:
            c = init_centroids(sample, k, method=init, seed=seed + level)
        hist: list[float] = []
        for it in range(iters):
            frac = sample_fraction if it < sample_iters else 1.0
            sums, counts, inertia, _, missed = _stats_pass(job, pieces_rdd, level, c, frac)
            passes += 1
            misses += missed
            hist.append(float(inertia))
            c, repaired = update(sums, counts, c, seed=seed + 1000 * level + it)
            if repaired:
                log.info("level %d iteration %d: repaired %d empty clusters", level, it, repaired)
            if tol > 0 and frac == 1.0 and len(hist) > 1 and abs(hist[-2] - hist[-1]) <= tol * hist[-2]:
                break
        log.info("level %d: %d iterations, inertia %.6g -> %.6g", level, len(hist), hist[0], hist[-1])
        inertia_hist.append(hist)
        job.books.append(c)
        final_inertia, _, sample = _final_pass(job, pieces_rdd, level, c, rate, keep=level + 1 < levels)
        passes += 1
        recon.append(final_inertia / n)
    fsq = None
    fsq_mse = None
    if fsq_levels:
        fsq = fit_fsq(sample, fsq_levels)
        fsq_mse = float(((sample - fsq_decode(fsq_encode(sample, fsq), fsq)) ** 2).sum(axis=1).mean())
    seconds["fit"] = time.perf_counter() - t0
    stat_bytes = len(pieces) * (k * (dim + 1) * 8 + 16)
    cost = {
        "rows": n,
        "dim": dim,
        "pieces": len(pieces),
        "passes": passes,
        "rows_scanned": n * (passes + 1),  # + the load pass
        "flops": float(2.0 * n * k * dim * passes),
        "bytes_to_driver_per_iteration": stat_bytes,
        # pieces re-read from storage during the iterations (0 = every iteration hit the worker cache)
        "iteration_cache_misses": misses,
        "iteration_piece_reads": len(pieces) * sum(len(h) for h in inertia_hist),
    }
    return FitResult(ResidualCodebook(job.books), fsq, n, inertia_hist, recon, fsq_mse, cost, seconds)
