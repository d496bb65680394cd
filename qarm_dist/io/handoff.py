"""Rows one table lacks, found by Spark and handed to Ray Data through Parquet files.

The refresh's inference steps (`embed.embed_new`, `align.infer.embed_new`) must map only the items
that have no row in their output table yet. Spark finds them with an anti-join on ``item_id`` (a
hash join across the executors, so no set of ids is ever held in one process), and its tasks stage
the rows as Parquet files in a scratch folder under the table root, ``<root>/_scratch/<random>/``.
Ray Data reads those files, so the rows never pass through the driver; the folder is removed when
the step ends (one left by a killed job holds nothing committed and can be deleted at any time).

Why Spark and not a Ray Data join: on the tiny world on 2 loaded cores, a Ray Data hash anti-join
took about 30 s per call (it starts its aggregator actors anew each time) and the Spark one 1.5-2 s
in a warm session, and a refresh runs two of them even when nothing is new. When nothing is missing,
Ray is not started at all.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

from qarm_dist.config import QarmConfig
from qarm_dist.engines import ray_init, spark_session
from qarm_dist.io.delta import Tables, filesystem
from qarm_dist.io.spark import stage_dataframe

if TYPE_CHECKING:
    import ray.data


@contextlib.contextmanager
def missing_rows(
    cfg: QarmConfig,
    tables: Tables,
    source: str,
    version: int | None,
    target: str,
    columns: list[str],
    run_id: str,
) -> Iterator[tuple[ray.data.Dataset | None, int]]:
    """The rows of table ``source`` (at ``version``) whose ``item_id`` has no row in ``target``: a Ray
    Dataset of their ``columns`` and how many there are, or ``(None, 0)`` when there are none.

    The Dataset reads files that exist only inside the ``with`` block.
    """
    spark = spark_session(cfg)
    snap = tables.snapshot(source, version)
    have = tables.spark(spark, target, columns=["item_id"])
    new = tables.spark(spark, source, snap.version).join(have, "item_id", "left_anti")
    folder = f"{tables.root.rstrip('/')}/_scratch/{uuid.uuid4().hex}"
    fs, base = filesystem(folder, tables.storage_options)
    try:
        staged = stage_dataframe(new, tables, source, run_id, snap.dim, folder=folder)
        rows = sum(f.rows for f in staged)
        if rows == 0:
            yield None, 0
            return
        ray_init(cfg)
        import ray.data

        yield (
            ray.data.read_parquet([f"{base}/{f.path}" for f in staged], filesystem=fs, columns=columns),
            rows,
        )
    finally:
        with contextlib.suppress(FileNotFoundError, OSError):
            fs.delete_dir(base)
