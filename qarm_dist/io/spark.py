"""Spark side of the table layer: stage a DataFrame's partitions inside the tasks.

Each Spark task validates its partition and writes it as one Parquet file of
the target table (`qarm_dist.io.delta.stage`); only the small file records
come back to the driver, which commits them in one Delta transaction. So a
Spark stage never collects its output, and a failed job commits nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

from qarm_dist.io.delta import CommitResult, StagedFile, Tables, stage
from qarm_dist.io.schemas import spec

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

_RECORD_SCHEMA = "path string, size long, mtime_ms long, rows long, stats string"


def stage_dataframe(
    df: DataFrame, tables: Tables, name: str, run_id: str, dim: int | None = None
) -> list[StagedFile]:
    """Write every non-empty partition of ``df`` as one staged file of table ``name``."""
    uri, table_spec, options = tables.uri(name), spec(name), tables.storage_options
    columns = table_spec.columns

    def write_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        parts = [b for b in batches if b.num_rows]
        if not parts:
            return
        staged = stage(uri, table_spec, pa.Table.from_batches(parts).select(columns), run_id, dim, options)
        yield pa.RecordBatch.from_pylist([staged.to_dict()])

    rows = df.select(*columns).mapInArrow(write_partition, _RECORD_SCHEMA).collect()
    return [StagedFile(**r.asDict()) for r in rows]


def write_dataframe(
    df: DataFrame,
    tables: Tables,
    name: str,
    run_id: str,
    mode: str = "overwrite",
    dim: int | None = None,
    info: dict | None = None,
) -> CommitResult:
    """Stage ``df`` in the Spark tasks and commit it once under ``run_id``."""
    if done := tables.already_committed(name, run_id):
        return done
    return tables.commit(
        name, stage_dataframe(df, tables, name, run_id, dim), run_id, mode=mode, dim=dim, info=info
    )
