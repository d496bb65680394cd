"""`qarm embed`: encode every item's text into `item_content_emb` with Ray Data.

Each actor loads the encoder once, encodes a block of items and stages the
block as a Parquet file of the output table (`qarm_dist.io.raydata`); the
driver gathers only the staged-file records and commits them in one Delta
transaction. A failed run commits nothing, a re-run of its run id adds no rows.
"""

from __future__ import annotations

import logging

import pyarrow as pa

from qarm_dist.config import QarmConfig
from qarm_dist.embed.encoders import encoder_dim, make_encoder
from qarm_dist.engines import ray_init, torch_device
from qarm_dist.io.delta import CommitResult, Tables
from qarm_dist.io.raydata import check_cpu_budget, write_mapped
from qarm_dist.io.schemas import ITEM_CONTENT_EMB

log = logging.getLogger(__name__)


class ContentEmbedder:
    """Ray Data actor model: a block of ``item_id, text`` in, ``item_content_emb`` rows out."""

    def __init__(self, encoder: str, device: str, batch_size: int, threads: int):
        self.encoder = make_encoder(encoder, device=device, batch_size=batch_size, threads=threads)

    def __call__(self, block: pa.Table) -> pa.Table:
        emb = self.encoder.encode(block.column("text").to_pylist())
        return pa.table(
            {
                "item_id": block.column("item_id"),
                "emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), self.encoder.dim),
                "encoder": pa.array([self.encoder.name] * block.num_rows, pa.string()),
            }
        )


def run_embed(cfg: QarmConfig, run_id: str, items_version: int | None = None) -> CommitResult:
    """Encode all items of ``items`` (pinned to ``items_version``) and commit `item_content_emb`."""
    tables = Tables.from_config(cfg)
    snap = tables.snapshot("items", items_version)
    if snap.rows == 0:
        raise ValueError(f"table 'items' (version {snap.version}) has 0 rows; ingest items first")
    if done := tables.already_committed(ITEM_CONTENT_EMB.name, run_id):
        log.info("run %s already committed item_content_emb; nothing to do", run_id)
        return done
    ray_init(cfg)
    device = torch_device(cfg)
    ec = cfg.encoder
    check_cpu_budget(ec.actors, ec.cpus_per_actor, ("encoder.actors", "encoder.cpus_per_actor"))
    log.info("embedding %d items with %s on %s (%d actors)", snap.rows, ec.name, device, ec.actors)
    return write_mapped(
        tables.ray("items", snap.version, columns=["item_id", "text"]),
        ContentEmbedder,
        {"encoder": ec.name, "device": device, "batch_size": ec.batch_size, "threads": ec.threads_per_actor},
        tables,
        ITEM_CONTENT_EMB.name,
        run_id,
        encoder_dim(ec.name),
        actors=ec.actors,
        cpus_per_actor=ec.cpus_per_actor,
        gpus_per_actor=(1.0 / ec.actors) if device == "cuda" else 0,
        rows_per_block=ec.rows_per_block,
        mode="overwrite",
        info={"items_version": snap.version, "encoder": ec.name},
    )
