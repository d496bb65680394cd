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

from qarm_dist import faults
from qarm_dist.io.delta import CommitResult, StagedFile, Tables, read_file, stage
from qarm_dist.io.schemas import spec

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

_RECORD_SCHEMA = "path string, size long, mtime_ms long, rows long, stats string"


class _ReadFiles:
    """Task body of `read_files`: the files named in its input rows, read by pyarrow."""

    def __init__(self, schema: pa.Schema, storage_options: dict[str, str]):
        self.schema, self.storage_options = schema, storage_options

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            for uri in b.column("uri").to_pylist():
                yield from read_file(uri, self.storage_options, self.schema)


def read_files(
    session: SparkSession, files: list[str], schema: pa.Schema, storage_options: dict[str, str]
) -> DataFrame:
    """A DataFrame of table files that Spark cannot open itself (object stores without S3A jars).

    One task per file reads it with pyarrow in the Python worker and yields Arrow batches in
    ``schema``, with fixed-size lists as plain lists (Spark's arrays). The file URIs travel as
    data, so a task ships only its own.
    """
    from pyspark.sql.pandas.types import from_arrow_schema

    spark_schema = pa.schema(
        [
            pa.field(f.name, pa.list_(f.type.value_type), f.nullable)
            if pa.types.is_fixed_size_list(f.type)
            else f
            for f in schema
        ]
    )
    uris = session.createDataFrame(
        session.sparkContext.parallelize([(u,) for u in files], len(files)), "uri string"
    )
    return uris.mapInArrow(_ReadFiles(spark_schema, storage_options), from_arrow_schema(spark_schema))


def stage_dataframe(
    df: DataFrame, tables: Tables, name: str, run_id: str, dim: int | None = None, folder: str | None = None
) -> list[StagedFile]:
    """Write every non-empty partition of ``df`` as one staged file of table ``name``.

    ``folder`` (default: the table's own) stages the rows elsewhere, to hand them to another engine
    (`qarm_dist.io.handoff`) rather than commit them.
    """
    tables.check_writable(name)
    uri, table_spec, options = folder or tables.uri(name), spec(name), tables.storage_options
    columns = table_spec.columns
    fault = faults.from_env()  # read here: the Python workers may predate the variable

    def write_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        parts = [b for b in batches if b.num_rows]
        if not parts:
            return
        staged = stage(uri, table_spec, pa.Table.from_batches(parts).select(columns), run_id, dim, options)
        if fault is not None:
            from pyspark import TaskContext

            ctx = TaskContext.get()
            faults.maybe_fail(
                fault, "spark.stage", table=name, partition=ctx.partitionId(), attempt=ctx.attemptNumber()
            )
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
