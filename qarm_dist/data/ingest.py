"""Write a data source into the `items` and `interactions` tables.

Sources stream chunks; `TableWriter` validates and stages them, and each
table is committed once under the job's run id. Items are committed before
interactions, so a job that dies between the two leaves items only, and a
re-run of the same run id skips items and commits interactions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import pyarrow as pa
from tqdm import tqdm

from qarm_dist.config import QarmConfig
from qarm_dist.data import movielens
from qarm_dist.data.world import World
from qarm_dist.io.delta import CommitResult, TableError, Tables

log = logging.getLogger(__name__)


def _write(
    tables: Tables,
    name: str,
    chunks: Iterable[pa.Table],
    run_id: str,
    cfg: QarmConfig,
    total: int | None,
    dim: int | None = None,
    info: dict | None = None,
) -> CommitResult:
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
    return w.commit(mode="overwrite", info=info)


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
    out = {
        "items": _write(tables, "items", world.items(), run_id, cfg, world.n_items, info=info),
        "interactions": _write(
            tables,
            "interactions",
            world.interactions(),
            run_id,
            cfg,
            world.n_users * world.impressions_per_user,
            info=info,
        ),
    }
    if emit_embeddings:
        out["item_content_emb"] = _write(
            tables,
            "item_content_emb",
            world.content_embeddings(),
            run_id,
            cfg,
            world.n_items,
            dim=world.content_dim,
            info=info,
        )
    return out


def write_movielens(cfg: QarmConfig, path: str, run_id: str) -> dict[str, CommitResult]:
    """Ingest a MovieLens folder; tags are cut at the evaluation window's start."""
    movielens.check_folder(path)
    tables = Tables.from_config(cfg)
    cutoff = movielens.ratings_eval_start(path, cfg.split.eval_fraction)
    info = {"source": f"movielens:{path}", "tags_before_ts": cutoff}
    return {
        "items": _write(tables, "items", movielens.items(path, cutoff), run_id, cfg, None, info=info),
        "interactions": _write(
            tables, "interactions", movielens.interactions(path), run_id, cfg, None, info=info
        ),
    }
