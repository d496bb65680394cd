"""`qarm embed`: encode every item's text into `item_content_emb` with Ray Data.

Each actor loads the encoder once, encodes a block of items and stages the
block as a Parquet file of the output table (`qarm_dist.io.raydata`); the
driver gathers only the staged-file records and commits them in one Delta
transaction. A failed run commits nothing, a re-run of its run id adds no rows.
`run_embed` encodes every item and overwrites; `embed_new` (the refresh path)
encodes only items without a row yet and appends.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pyarrow as pa

from qarm_dist.config import QarmConfig
from qarm_dist.embed.encoders import ENCODERS, encoder_dim, make_encoder
from qarm_dist.engines import ray_init, torch_device
from qarm_dist.io.delta import CommitResult, Tables
from qarm_dist.io.handoff import missing_rows
from qarm_dist.io.raydata import check_cpu_budget, write_mapped
from qarm_dist.io.schemas import ITEM_CONTENT_EMB

if TYPE_CHECKING:
    import ray.data

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


def _write(
    cfg: QarmConfig, tables: Tables, items: ray.data.Dataset, rows: int, run_id: str, mode: str, info: dict
) -> CommitResult:
    """Encode the ``item_id, text`` rows of ``items`` in the actor pool and commit them in ``mode``."""
    device = torch_device(cfg)
    ec = cfg.encoder
    check_cpu_budget(ec.actors, ec.cpus_per_actor, ("encoder.actors", "encoder.cpus_per_actor"))
    log.info("embedding %d items with %s on %s (%d actors)", rows, ec.name, device, ec.actors)
    return write_mapped(
        items,
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
        mode=mode,
        info={**info, "encoder": ec.name},
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
    ray_init(cfg)  # before the Dataset: Ray Data would start a default local Ray of its own
    items = tables.ray("items", snap.version, columns=["item_id", "text"])
    return _write(cfg, tables, items, snap.rows, run_id, "overwrite", {"items_version": snap.version})


def embed_new(cfg: QarmConfig, run_id: str) -> tuple[CommitResult | None, int]:
    """Encode only the items that have no row in `item_content_emb` yet, and append them.

    The refresh path: new items arrive continuously, and re-encoding the whole catalogue for each
    batch would cost O(items) encoder time for O(new) rows. Spark finds the new items and hands them
    to Ray Data as files (`qarm_dist.io.handoff`), so no id set is collected anywhere. Returns the
    commit (None when nothing was new: no empty version is written) and how many items were encoded.
    Appending keeps the table one encoder's space: another encoder than the table's is refused.
    """
    tables = Tables.from_config(cfg)
    if not tables.exists(ITEM_CONTENT_EMB.name):  # nothing embedded yet: every item is new
        result = run_embed(cfg, run_id)
        return result, result.rows
    if done := tables.already_committed(ITEM_CONTENT_EMB.name, run_id):
        log.info("run %s already committed item_content_emb; nothing to do", run_id)
        return done, 0
    version = tables.version("items")
    missing = missing_rows(cfg, tables, "items", version, ITEM_CONTENT_EMB.name, ["item_id", "text"], run_id)
    with missing as (new, n):
        if new is None:
            return None, 0
        first = next(tables.read_batches(ITEM_CONTENT_EMB.name, columns=["encoder"], batch_rows=1), None)
        have = first.column(0)[0].as_py() if first is not None else None
        want = ENCODERS[cfg.encoder.name].name
        if have is not None and have != want:
            raise ValueError(
                f"table '{ITEM_CONTENT_EMB.name}' holds embeddings of encoder {have!r}, and the {n} new items "
                f"would be encoded with {want!r} (encoder.name={cfg.encoder.name!r}), another space: re-embed "
                "every item with `qarm embed`, or append the new items' embeddings as the existing ones were made"
            )
        return _write(cfg, tables, new, n, run_id, "append", {"items_version": version, "new_items": n}), n
