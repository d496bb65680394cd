"""`qarm align embed`: aligned embeddings for every item with Ray Data batch inference.

Every item of the content table gets an embedding, including items that never
appeared in a pair (cold start is the point: the tower maps content, not ids).
The actor model `AlignedEmbedder` loads a published checkpoint once; the
stage maps the content table through it and commits `item_aligned_emb` once
(`qarm_dist.io.raydata.write_mapped`). The table holds one model version per
Delta version (each run overwrites; older models stay readable by version),
so downstream stages that read "the table" read exactly one model. A refresh
(`embed_new`) appends rows for new items with that same model, which keeps it so.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from qarm_dist import models
from qarm_dist.align.model import load_tower
from qarm_dist.config import QarmConfig
from qarm_dist.engines import ray_init, torch_device
from qarm_dist.io.delta import CommitResult, Snapshot, TableError, Tables
from qarm_dist.io.handoff import missing_rows
from qarm_dist.io.raydata import check_cpu_budget, map_blocks, write_mapped

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

KIND = "align"
_CHUNK = 1024  # rows per forward pass inside a block (bounds the text tower's activations)


class AlignedEmbedder:
    """Ray Data actor model: content rows in, ``item_aligned_emb`` rows out."""

    def __init__(self, info: models.ModelInfo, storage_options: dict[str, str], device: str, threads: int):
        torch.set_num_threads(threads)
        with models.local_checkpoint(info, storage_options) as d:
            self.tower = load_tower(d).to(device)
        self.version, self.device = info.version, device

    @torch.no_grad()
    def __call__(self, block: pa.Table) -> pa.Table:
        col = block.column(self.tower.column)
        parts = []
        for lo in range(0, block.num_rows, _CHUNK):
            x = self.tower.inputs(col.slice(lo, _CHUNK))
            x = x.to(self.device) if isinstance(x, torch.Tensor) else x
            parts.append(self.tower(x).float().cpu().numpy())
        emb = np.concatenate(parts) if parts else np.zeros((0, self.tower.dim), np.float32)
        return pa.table(
            {
                "item_id": block.column("item_id"),
                "emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), self.tower.dim),
                "model_version": pa.array([self.version] * block.num_rows, pa.string()),
            }
        )


def _content_snapshot(tables: Tables, info: models.ModelInfo) -> Snapshot:
    """The model's content table (current version); refuses a dimension the model was not trained on."""
    meta = info.meta
    snap = tables.snapshot(meta["content"])
    if meta["column"] == "emb" and snap.dim != meta["dim"]:
        raise TableError(
            meta["content"],
            "emb",
            snap.rows,
            snap.rows,
            f"have dimension {snap.dim}, but model {info.version} was trained on dimension {meta['dim']}; "
            "re-run `qarm align train` on the current content embeddings",
        )
    if snap.rows == 0:
        raise TableError(
            meta["content"], None, 0, 0, "exist: the table is empty, so there is nothing to embed"
        )
    return snap


def _content(tables: Tables, info: models.ModelInfo) -> tuple[ray.data.Dataset, int, int]:
    """The model's content table (current version) as a Dataset, its version and rows."""
    snap = _content_snapshot(tables, info)
    return tables.ray(snap.name, snap.version, ["item_id", info.meta["column"]]), snap.version, snap.rows


def embed_model_kwargs(cfg: QarmConfig, tables: Tables, info: models.ModelInfo) -> dict:
    device = torch_device(cfg)
    return {
        "info": info,
        "storage_options": tables.storage_options,
        "device": device,
        "threads": max(1, int(cfg.align.cpus_per_worker)),
    }


def aligned_batches(cfg: QarmConfig, info: models.ModelInfo):
    """Stream a model's embeddings of every item as Arrow batches, committing nothing (evaluation)."""
    tables = Tables.from_config(cfg)
    ray_init(cfg)
    ds, _, _ = _content(tables, info)
    ac = cfg.align
    mapped = map_blocks(
        ds,
        AlignedEmbedder,
        embed_model_kwargs(cfg, tables, info),
        actors=ac.infer_actors,
        cpus_per_actor=ac.cpus_per_worker,
        gpus_per_actor=1.0 if torch_device(cfg) == "cuda" else 0,
        rows_per_block=ac.infer_rows_per_block,
    )
    yield from mapped.iter_batches(batch_size=None, batch_format="pyarrow")


def _write(
    cfg: QarmConfig,
    tables: Tables,
    info: models.ModelInfo,
    ds: ray.data.Dataset,
    rows: int,
    run_id: str,
    mode: str,
    commit_info: dict,
) -> CommitResult:
    """Map the content rows of ``ds`` through model ``info`` in the actor pool; commit in ``mode``."""
    ac = cfg.align
    check_cpu_budget(ac.infer_actors, ac.cpus_per_worker, ("align.infer_actors", "align.cpus_per_worker"))
    log.info("align embed: %d items of %s with model %s", rows, info.meta["content"], info.version)
    dim = info.meta["dim"] if info.meta["column"] == "emb" else None
    if dim is None:  # text tower: its output dimension is the encoder's
        from qarm_dist.embed.encoders import encoder_dim

        dim = encoder_dim(info.meta["tower"]["encoder"])
    return write_mapped(
        ds,
        AlignedEmbedder,
        embed_model_kwargs(cfg, tables, info),
        tables,
        "item_aligned_emb",
        run_id,
        dim,
        actors=ac.infer_actors,
        cpus_per_actor=ac.cpus_per_worker,
        gpus_per_actor=1.0 if torch_device(cfg) == "cuda" else 0,
        rows_per_block=ac.infer_rows_per_block,
        mode=mode,
        info={"model_version": info.version, "content": info.meta["content"], **commit_info},
    )


def run_embed(
    cfg: QarmConfig, run_id: str, version: str | None = None
) -> tuple[CommitResult, models.ModelInfo]:
    """Embed every item with model ``version`` (default: the latest) into `item_aligned_emb`."""
    tables = Tables.from_config(cfg)
    info = models.find(tables, KIND, version)
    if done := tables.already_committed("item_aligned_emb", run_id):
        log.info("run %s already committed item_aligned_emb; nothing to do", run_id)
        return done, info
    ray_init(cfg)
    ds, content_version, rows = _content(tables, info)
    result = _write(cfg, tables, info, ds, rows, run_id, "overwrite", {"content_version": content_version})
    return result, info


def embed_new(cfg: QarmConfig, run_id: str) -> tuple[CommitResult | None, int]:
    """Aligned embeddings for the content items that have none yet, appended, with the table's own model.

    The refresh path: the model is the one that produced the existing rows (their ``model_version``),
    not the latest published one, so the table keeps one model per Delta version and codes assigned
    from it stay comparable. Spark finds the content rows without an aligned row and hands them to
    Ray Data as files (`qarm_dist.io.handoff`). Returns the commit (None when nothing was missing: no
    empty version) and how many items were embedded.
    """
    tables = Tables.from_config(cfg)
    if not tables.exists("item_aligned_emb"):
        raise FileNotFoundError(
            f"table 'item_aligned_emb' does not exist under {tables.root}; run `qarm align embed` first"
        )
    first = next(tables.read_batches("item_aligned_emb", columns=["model_version"], batch_rows=1), None)
    if first is None:
        raise ValueError("table 'item_aligned_emb' is empty, so no model to extend; run `qarm align embed`")
    info = models.find(tables, KIND, first.column(0)[0].as_py())
    if done := tables.already_committed("item_aligned_emb", run_id):
        log.info("run %s already committed item_aligned_emb; nothing to do", run_id)
        return done, 0
    snap = _content_snapshot(tables, info)
    columns = ["item_id", info.meta["column"]]
    with missing_rows(cfg, tables, snap.name, snap.version, "item_aligned_emb", columns, run_id) as (new, n):
        if new is None:
            return None, 0
        commit_info = {"content_version": snap.version, "new_items": n}
        return _write(cfg, tables, info, new, n, run_id, "append", commit_info), n
