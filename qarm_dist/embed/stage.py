"""`qarm embed`: encode every item's text into `item_content_emb` with Ray Data.

Each actor loads the encoder once, encodes a block of items and stages the
block as a Parquet file of the output table (`qarm_dist.io.delta.stage`); the
driver gathers only the staged-file records and commits them in one Delta
transaction. A failed run commits nothing, a re-run of its run id adds no rows.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from qarm_dist.config import QarmConfig
from qarm_dist.embed.encoders import encoder_dim, make_encoder
from qarm_dist.engines import ray_init, torch_device
from qarm_dist.io.delta import CommitResult, Tables, stage
from qarm_dist.io.schemas import ITEM_CONTENT_EMB

log = logging.getLogger(__name__)


class _EmbedAndStage:
    """Ray Data actor: text block in, one staged Parquet file record out."""

    def __init__(
        self,
        encoder: str,
        device: str,
        batch_size: int,
        threads: int,
        table_uri: str,
        run_id: str,
        storage_options: dict[str, str],
    ):
        self.encoder = make_encoder(encoder, device=device, batch_size=batch_size, threads=threads)
        self.table_uri, self.run_id, self.storage_options = table_uri, run_id, storage_options

    def __call__(self, block: pa.Table) -> pa.Table:
        emb = self.encoder.encode(block.column("text").to_pylist())
        out = pa.table(
            {
                "item_id": block.column("item_id"),
                "emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), self.encoder.dim),
                "encoder": pa.array([self.encoder.name] * block.num_rows, pa.string()),
            }
        )
        staged = stage(
            self.table_uri, ITEM_CONTENT_EMB, out, self.run_id, self.encoder.dim, self.storage_options
        )
        return pa.Table.from_pylist([staged.to_dict()])


def _check_cpu_budget(actors: int, cpus_per_actor: float) -> None:
    """Refuse a layout that would hang: actors holding every CPU starve Ray Data's read tasks."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    held = actors * cpus_per_actor
    if total - held < 1.0:
        raise ValueError(
            f"encoder.actors x encoder.cpus_per_actor = {actors} x {cpus_per_actor} holds {held:g} of the "
            f"cluster's {total:g} CPUs, leaving less than 1 for Ray Data's read and write tasks (the pipeline "
            "would hang); lower encoder.actors or encoder.cpus_per_actor"
        )


def run_embed(cfg: QarmConfig, run_id: str, items_version: int | None = None) -> CommitResult:
    """Encode all items of ``items`` (pinned to ``items_version``) and commit `item_content_emb`."""
    import ray.data

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
    _check_cpu_budget(ec.actors, ec.cpus_per_actor)
    log.info("embedding %d items with %s on %s (%d actors)", snap.rows, ec.name, device, ec.actors)
    ctor: dict[str, Any] = {
        "encoder": ec.name,
        "device": device,
        "batch_size": ec.batch_size,
        "threads": ec.threads_per_actor,
        "table_uri": tables.uri(ITEM_CONTENT_EMB.name),
        "run_id": run_id,
        "storage_options": tables.storage_options,
    }
    staged = (
        tables.ray("items", snap.version, columns=["item_id", "text"])
        .map_batches(
            _EmbedAndStage,
            fn_constructor_kwargs=ctor,
            batch_size=ec.rows_per_block,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=ec.actors),
            num_cpus=ec.cpus_per_actor,
            num_gpus=(1.0 / ec.actors) if device == "cuda" else 0,
        )
        .take_all()  # one small record per staged file, never the embeddings
    )
    return tables.commit(
        ITEM_CONTENT_EMB.name,
        staged,
        run_id,
        mode="overwrite",
        dim=encoder_dim(ec.name),
        info={"items_version": snap.version, "encoder": ec.name},
    )
