"""Write a data source into the `items` and `interactions` tables.

Sources stream chunks; `TableWriter` validates and stages them. Every table is
staged and checked before the first commit, so bad rows anywhere commit
nothing; then each table is committed once under the job's run id. Items are
committed before interactions, so a job killed between the two commits leaves
items only, and a re-run of the same run id skips items and commits
interactions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import pyarrow as pa
from tqdm import tqdm

from qarm_dist.config import QarmConfig
from qarm_dist.data import movielens
from qarm_dist.data.world import World
from qarm_dist.io.delta import CommitResult, TableError, Tables, TableWriter

log = logging.getLogger(__name__)


def _stage(
    tables: Tables,
    name: str,
    chunks: Iterable[pa.Table],
    run_id: str,
    cfg: QarmConfig,
    total: int | None,
    dim: int | None = None,
) -> TableWriter | CommitResult:
    """Validate and stage every row of ``name``, committing nothing; the earlier commit if ``run_id`` made one."""
    if done := tables.already_committed(name, run_id):
        log.info("run %s already committed %s; skipping", run_id, name)
        return done
    w = tables.writer(name, run_id, dim=dim, target_rows=cfg.tables.target_file_rows)
    try:
        with tqdm(total=total, desc=f"{name}", unit="rows", leave=False) as bar:
            for chunk in chunks:
                w.write(chunk)
                bar.update(chunk.num_rows)
    except BaseException:
        w.abort()
        raise
    return w


def _write_all(
    staging: dict[str, Callable[[], TableWriter | CommitResult]], info: dict
) -> dict[str, CommitResult]:
    """Stage and check every table, then commit them in order.

    Bad rows anywhere (a later table's included) therefore commit nothing. What is left between
    two commits is a kill of the process, which a re-run of the run id finishes.
    """
    staged: dict[str, TableWriter | CommitResult] = {}
    try:
        for name, stage_rows in staging.items():
            staged[name] = stage_rows()
        for w in staged.values():
            if isinstance(w, TableWriter):
                w.check(mode="overwrite")
    except BaseException:
        for w in staged.values():
            if isinstance(w, TableWriter):
                w.abort()
        raise
    return {
        name: w if isinstance(w, CommitResult) else w.commit(mode="overwrite", info=info)
        for name, w in staged.items()
    }


def write_world(cfg: QarmConfig, run_id: str, emit_embeddings: bool = False) -> dict[str, CommitResult]:
    """Generate the configured world into `items`, `interactions` (and `item_content_emb`)."""
    world = World.from_config(cfg.world)
    tables = Tables.from_config(cfg)
    if emit_embeddings and tables.exists("item_content_emb"):
        # checked before anything is written: the commit would refuse it after items and interactions
        snap = tables.snapshot("item_content_emb")
        if snap.dim != world.content_dim:
            raise TableError(
                "item_content_emb",
                "emb",
                snap.rows,
                snap.rows,
                f"have dimension {snap.dim}, the world's is {world.content_dim}: set world.content_dim="
                f"{snap.dim}, or write this world under a new --root",
            )
    info = {"source": f"world:{cfg.world.size}", "seed": world.seed}
    staging = {
        "items": lambda: _stage(tables, "items", world.items(), run_id, cfg, world.n_items),
        "interactions": lambda: _stage(
            tables,
            "interactions",
            world.interactions(),
            run_id,
            cfg,
            world.n_users * world.impressions_per_user,
        ),
    }
    if emit_embeddings:
        staging["item_content_emb"] = lambda: _stage(
            tables,
            "item_content_emb",
            world.content_embeddings(),
            run_id,
            cfg,
            world.n_items,
            world.content_dim,
        )
    return _write_all(staging, info)


def write_movielens(cfg: QarmConfig, path: str, run_id: str) -> dict[str, CommitResult]:
    """Ingest a MovieLens folder; tags are cut at the evaluation window's start."""
    movielens.check_folder(path)
    tables = Tables.from_config(cfg)
    cutoff = movielens.ratings_eval_start(path, cfg.split.eval_fraction)
    info = {"source": f"movielens:{path}", "tags_before_ts": cutoff}
    staging = {
        "items": lambda: _stage(tables, "items", movielens.items(path, cutoff), run_id, cfg, None),
        "interactions": lambda: _stage(
            tables, "interactions", movielens.interactions(path), run_id, cfg, None
        ),
    }
    return _write_all(staging, info)
