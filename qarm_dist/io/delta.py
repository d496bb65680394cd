"""Delta tables: validated staged writes, one atomic commit, streamed reads.

How a job writes (the same on one machine and on a cluster):

1. Wherever the data is (the driver, a Spark task, a Ray Data actor), call
   `stage(...)` per batch: it validates the rows, writes one Parquet file
   inside the table folder and returns a small `StagedFile` record.
2. The driver gathers those records (a few hundred bytes per file) and calls
   `Tables.commit(...)`: it checks the files, checks key uniqueness by
   streaming only the key columns, and commits every file in ONE Delta
   transaction tagged with the run id (a Delta app transaction).

So a failed job commits nothing (its staged files are never referenced by
the log, and are deleted on a clean failure), and a re-run of the same run
id commits nothing twice. deltalake's own readers (`to_pyarrow_*`,
`to_pandas`) can abort the process at exit, so every read goes through the
file list of a snapshot, here and only here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import AddAction

from qarm_dist import faults
from qarm_dist.io import objectstore
from qarm_dist.io.schemas import TableSpec, spec

if TYPE_CHECKING:  # engines are optional at import time
    import ray.data
    from pyspark.sql import DataFrame, SparkSession

DIM_KEY = "qarm.dim"
#: key hashes held in memory at once by the duplicate check (8 bytes each)
_HASHES_PER_PASS = 32_000_000
#: tries of a commit that other writers keep beating to the next version
_COMMIT_ATTEMPTS = 20
#: operations that change no rows: a history of these and the table layer's own commits needs no re-check
_NO_DATA_OPERATIONS = frozenset({"CREATE TABLE", "VACUUM START", "VACUUM END", "OPTIMIZE"})
#: (table uri, Delta table id, version) whose rows this process has found valid: versions never change
_CHECKED: set[tuple[str, str, int]] = set()


class TableError(ValueError):
    """Bad rows or a bad table; names the table, the column and how many rows."""

    def __init__(self, table: str, column: str | None, bad_rows: int, total_rows: int, problem: str):
        self.table, self.column, self.bad_rows, self.total_rows = table, column, bad_rows, total_rows
        self.problem = problem
        where = f"table '{table}'" + (f", column '{column}'" if column else "")
        super().__init__(
            f"{where}: {bad_rows} of {total_rows} rows {problem}; nothing was committed "
            f"(the table stays at its previous version)"
        )

    def __reduce__(self):  # raised in a Spark task or a Ray worker, it must cross back to the driver intact
        return TableError, (self.table, self.column, self.bad_rows, self.total_rows, self.problem)


def _refused(table: str, column: str | None, files: list[StagedFile], problem: str) -> TableError:
    """A commit refused as a whole: every staged row counts as bad."""
    rows = sum(f.rows for f in files)
    return TableError(table, column, rows, rows, problem)


# ---------------------------------------------------------------- validation


def _emb_dim_problems(col: pa.ChunkedArray | pa.Array, dim: int) -> tuple[int, str] | None:
    """Count rows of a list<float> column that are null, of the wrong length or not finite."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_fixed_size_list(arr.type) and arr.type.list_size != dim:
        return len(arr), f"have dimension {arr.type.list_size}, the table's is {dim}"
    if not (
        pa.types.is_list(arr.type)
        or pa.types.is_large_list(arr.type)
        or pa.types.is_fixed_size_list(arr.type)
    ):
        return len(arr), f"are {arr.type}, expected a list of float32 of length {dim}"
    nulls = arr.null_count
    if nulls:
        return nulls, "have a null embedding"
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    wrong = int((lengths != dim).sum())
    if wrong:
        return wrong, f"have an embedding length other than {dim}"
    flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    bad_values = ~np.isfinite(flat)
    if bad_values.any():
        rows = np.unique(np.nonzero(bad_values)[0] // dim)
        return len(rows), "have NaN or infinite values"
    return None


def _lacks(table_spec: TableSpec, column: str) -> str:
    return f"lack column '{column}' (expected {table_spec.columns})"


def _check_column(
    table_spec: TableSpec, f: pa.Field, col: pa.ChunkedArray | pa.Array, dim: int | None
) -> tuple[pa.ChunkedArray | pa.Array, tuple[int, str] | None]:
    """``col`` cast to field ``f``, or how many of its rows are bad and what is wrong with them."""
    n = len(col)
    if col.null_count and not f.nullable:
        return col, (col.null_count, "are null")
    if f.name in table_spec.emb_columns:
        problem = _emb_dim_problems(col, dim)  # type: ignore[arg-type]
        if problem:
            return col, problem
        flat = pc.list_flatten(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
        col = pa.FixedSizeListArray.from_arrays(flat.cast(pa.float32()), dim)
    else:
        try:
            col = col.cast(f.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return col, (n, f"are {col.type}, not convertible to {f.type}")
    if f.name in table_spec.labels:
        bad = n - int(pc.sum(pc.is_in(col, pa.array([0, 1], f.type))).as_py() or 0)
        if bad:
            return col, (bad, "have a label outside {0, 1}")
    return col, None


def problems(
    table_spec: TableSpec, data: pa.Table | pa.RecordBatch, dim: int | None = None
) -> Iterator[tuple[str, int, str]]:
    """``(column, bad rows, what is wrong)`` for every column of the spec that has bad rows in ``data``."""
    n = data.num_rows
    target = table_spec.schema(dim) if table_spec.emb_columns else table_spec.schema()
    for f in target:
        if f.name not in data.column_names:
            yield f.name, n, _lacks(table_spec, f.name)
            continue
        _, problem = _check_column(table_spec, f, data.column(f.name), dim)
        if problem:
            yield f.name, problem[0], problem[1]


def validate(table_spec: TableSpec, data: pa.Table | pa.RecordBatch, dim: int | None = None) -> pa.Table:
    """Check rows against the spec and return them cast to its exact schema.

    Raises `TableError` for the first column with bad rows. Duplicate keys are
    checked at commit time, across every staged file.
    """
    t = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
    n, name = t.num_rows, table_spec.name
    missing = [c for c in table_spec.columns if c not in t.column_names]
    if missing:
        raise TableError(name, missing[0], n, n, _lacks(table_spec, missing[0]))
    if table_spec.emb_columns and dim is None:
        raise ValueError(f"table {name}: writing embeddings needs their dimension")
    target = table_spec.schema(dim)
    cols = []
    for f in target:
        col, problem = _check_column(table_spec, f, t.column(f.name), dim)
        if problem:
            raise TableError(name, f.name, problem[0], n, problem[1])
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=target)


# ------------------------------------------------------------------- staging


@dataclass(frozen=True)
class StagedFile:
    """A Parquet file written inside a table folder, not yet in the Delta log."""

    path: str  # relative to the table folder
    size: int
    mtime_ms: int
    rows: int
    stats: str  # Delta stats JSON; numRecords is what dt.count() relies on

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def filesystem(uri: str, storage_options: dict[str, str] | None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``uri`` and the path inside it (local paths made absolute).

    ``s3://`` and ``s3a://`` URIs get an S3 filesystem built from the same deltalake-style options
    the Delta log uses (endpoint, keys, region), so staged files and reads go where commits go.
    A fresh filesystem per call: it is cheap, and nothing process-bound travels to workers.
    """
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    if objectstore.is_s3(uri):
        return objectstore.s3_filesystem(storage_options), uri.split("://", 1)[1]
    return pafs.FileSystem.from_uri(uri)


def _stats(t: pa.Table) -> str:
    mins, maxs = {}, {}
    for f in t.schema:
        if pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_date(f.type):
            mm = pc.min_max(t.column(f.name))
            if mm["min"].is_valid:
                mins[f.name], maxs[f.name] = mm["min"].as_py(), mm["max"].as_py()
    for d in (mins, maxs):
        for k, v in d.items():
            if hasattr(v, "isoformat"):
                d[k] = v.isoformat()
    nulls = {f.name: t.column(f.name).null_count for f in t.schema}
    return json.dumps({"numRecords": t.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls})


def stage(
    table_uri: str,
    table_spec: TableSpec,
    data: pa.Table | pa.RecordBatch,
    run_id: str,
    dim: int | None = None,
    storage_options: dict[str, str] | None = None,
) -> StagedFile:
    """Validate ``data`` and write it as one Parquet file inside the table folder.

    Safe to call from any process that can reach the table folder. The file is
    invisible to readers until the driver commits it.
    """
    t = validate(table_spec, data, dim)
    fs, base = filesystem(table_uri, storage_options)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", run_id)  # the run id names files; keep it path-safe
    rel = f"part-{safe}-{uuid.uuid4().hex[:12]}.parquet"
    if isinstance(fs, pafs.LocalFileSystem):  # object stores have no folders to make
        fs.create_dir(base, recursive=True)
    full = f"{base}/{rel}"
    pq.write_table(t, full, filesystem=fs, compression="zstd")
    info = fs.get_file_info(full)
    mtime = info.mtime.timestamp() if info.mtime else time.time()
    return StagedFile(rel, int(info.size), int(mtime * 1000), t.num_rows, _stats(t))


def read_file(
    uri: str, storage_options: dict[str, str] | None, schema: pa.Schema, batch_rows: int = 65_536
) -> Iterator[pa.RecordBatch]:
    """Stream one Parquet file of a table as batches of ``schema``: its columns, cast to its types.

    The cast makes every batch identical in type, whichever writer made the file (deltalake
    appends store fixed-size lists as plain lists), which Spark's Arrow exchange requires.
    """
    fs, path = filesystem(uri, storage_options)
    with fs.open_input_file(path) as fh:
        for rb in pq.ParquetFile(fh).iter_batches(batch_size=batch_rows, columns=schema.names):
            yield rb.cast(schema)


# ------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Snapshot:
    """A pinned version of a table: what every reader reads."""

    name: str
    uri: str
    version: int
    files: list[str]
    dim: int | None
    rows: int
    file_rows: list[int]  # rows per file, in the order of `files` (from the log's stats)


@dataclass(frozen=True)
class CommitResult:
    table: str
    version: int
    rows: int
    files: int
    skipped: bool  # True when this run id had already committed to the table


class Tables:
    """The tables under one root (a folder or an object-store URI)."""

    def __init__(self, root: str, storage_options: dict[str, str] | None = None):
        objectstore.check_options(root, storage_options)
        self.root = root if "://" in root else os.path.abspath(root)
        self.storage_options = dict(storage_options or {})

    @classmethod
    def from_config(cls, cfg: Any) -> Tables:
        return cls(cfg.tables.root, cfg.tables.storage_options)

    # -- metadata
    def uri(self, name: str) -> str:
        spec(name)  # unknown names fail early
        return f"{self.root.rstrip('/')}/{name}"

    def _open(self, name: str, version: int | None = None) -> DeltaTable | None:
        try:
            return DeltaTable(self.uri(name), version=version, storage_options=self.storage_options or None)
        except TableNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return DeltaTable.is_deltatable(self.uri(name), storage_options=self.storage_options or None)

    def version(self, name: str) -> int | None:
        dt = self._open(name)
        return None if dt is None else dt.version()

    def snapshot(self, name: str, version: int | None = None) -> Snapshot:
        dt = self._open(name, version)
        if dt is None:
            raise FileNotFoundError(
                f"table '{name}' does not exist under {self.root}; run the stage that writes it"
            )
        dim = self._check_schema(name, dt)
        files = dt.file_uris()
        actions = pa.table(dt.get_add_actions(flatten=True))
        # the log stores paths URL-encoded, file_uris() may not: compare decoded names
        by_name = dict(
            zip(
                (unquote(os.path.basename(p)) for p in actions.column("path").to_pylist()),
                actions.column("num_records").to_pylist(),
            )
        )
        file_rows = [int(by_name.get(unquote(os.path.basename(f))) or 0) for f in files]
        snap = Snapshot(name, self.uri(name), dt.version(), files, dim, sum(file_rows), file_rows)
        checked = (snap.uri, dt.metadata().id, snap.version)
        if checked not in _CHECKED:
            foreign = _written_elsewhere(dt, snap.version)
            if foreign is not None:
                self._check_rows(snap, foreign)
            _CHECKED.add(checked)
        return snap

    def _check_rows(self, snap: Snapshot, foreign: int) -> None:
        """Validate on read the rows of a version that something other than this layer wrote.

        Such rows skipped `validate` and the commit's key check, so they get both now (streamed, in
        the process that reads the table first), plus the ids they must share with other tables.
        """
        table_spec = spec(snap.name)
        hint = (
            f"(version {foreign} was written by something other than qarm: fix that writer, "
            "or rewrite the table with the stage that makes it)"
        )
        bad: dict[str, tuple[int, str]] = {}
        for uri in snap.files:
            fs, path = filesystem(uri, self.storage_options)
            with fs.open_input_file(path) as fh:
                pf = pq.ParquetFile(fh)
                present = [c for c in table_spec.columns if c in pf.schema_arrow.names]
                for rb in pf.iter_batches(batch_size=65_536, columns=present):
                    for column, rows, problem in problems(table_spec, rb, snap.dim):
                        seen = bad.get(column, (0, problem))
                        bad[column] = (seen[0] + rows, seen[1])
        for column in table_spec.columns:
            if column in bad:
                raise TableError(snap.name, column, bad[column][0], snap.rows, f"{bad[column][1]} {hint}")
        if table_spec.key:
            self._check_unique(snap.name, table_spec.key, snap.files, snap.rows, hint)
        for column, other in table_spec.refs:
            if self.exists(other):
                unknown = self._count_unknown(snap, column, self.snapshot(other))
                if unknown:
                    raise TableError(
                        snap.name,
                        column,
                        unknown,
                        snap.rows,
                        f"name ids that are not in table '{other}' {hint}",
                    )

    def _count_unknown(self, snap: Snapshot, column: str, keys: Snapshot) -> int:
        """Rows of ``snap`` whose ``column`` is not a key of ``keys``; bounded memory, like `_check_unique`."""
        key = spec(keys.name).key[0]
        n_pass = max(1, math.ceil(keys.rows / _HASHES_PER_PASS))
        unknown = 0
        for bucket in range(n_pass):
            known = np.unique(
                np.concatenate(
                    [np.zeros(0, np.int64)]
                    + [ids[ids % n_pass == bucket] for ids in self._column_values(keys.files, key)]
                )
            )
            for ids in self._column_values(snap.files, column):
                ids = ids[ids % n_pass == bucket]
                unknown += int((~np.isin(ids, known)).sum())
        return unknown

    def _column_values(self, uris: list[str], column: str) -> Iterator[np.ndarray]:
        for uri in uris:
            fs, path = filesystem(uri, self.storage_options)
            with fs.open_input_file(path) as fh:
                for rb in pq.ParquetFile(fh).iter_batches(batch_size=1 << 20, columns=[column]):
                    yield rb.column(0).to_numpy(zero_copy_only=False)

    def _check_schema(self, name: str, dt: DeltaTable) -> int | None:
        """Validate on read: the stored schema must carry the spec's columns and types."""
        table_spec = spec(name)
        stored = pa.schema(dt.schema().to_arrow())
        dim = None
        for f in table_spec.schema(1) if table_spec.emb_columns else table_spec.schema():
            if f.name not in stored.names:
                raise TableError(
                    name, f.name, dt.count(), dt.count(), "are missing this column in the stored table"
                )
            got = stored.field(f.name)
            if f.name in table_spec.emb_columns:
                meta = got.metadata or {}
                raw = meta.get(DIM_KEY.encode()) or meta.get(DIM_KEY)
                if raw is None:
                    raise TableError(name, f.name, dt.count(), dt.count(), "have no declared dimension")
                dim = int(raw)
                continue
            want = f.type
            if pa.types.is_list(want):
                ok = pa.types.is_list(got.type) and got.type.value_type == want.value_type
            else:
                ok = got.type == want
            if not ok:
                raise TableError(
                    name, f.name, dt.count(), dt.count(), f"are stored as {got.type}, expected {want}"
                )
        return dim

    def dim(self, name: str) -> int | None:
        return self.snapshot(name).dim

    # -- reads (all through the snapshot's file list)
    def read_batches(
        self,
        name: str,
        version: int | None = None,
        columns: list[str] | None = None,
        batch_rows: int = 65_536,
        snapshot: Snapshot | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """Stream a table version as record batches in the spec's schema."""
        snap = snapshot or self.snapshot(name, version)
        target = spec(name).schema(snap.dim) if spec(name).emb_columns else spec(name).schema()
        if columns is not None:
            target = pa.schema([target.field(c) for c in columns])
        for uri in snap.files:
            yield from read_file(uri, self.storage_options, target, batch_rows)

    def spark(
        self, session: SparkSession, name: str, version: int | None = None, columns: list[str] | None = None
    ) -> DataFrame:
        """A Spark DataFrame over a pinned snapshot (no delta-spark jars needed).

        Spark's Parquet reader reads local files; object-store files are read by pyarrow inside
        the Python tasks (`qarm_dist.io.spark.read_files`), since pip's pyspark has no S3A connector.
        """
        from pyspark.sql.pandas.types import from_arrow_schema

        snap = self.snapshot(name, version)
        target = spec(name).schema(snap.dim) if spec(name).emb_columns else spec(name).schema()
        if snap.files and objectstore.is_s3(snap.uri):
            from qarm_dist.io.spark import read_files

            chosen = pa.schema([target.field(c) for c in columns or target.names])
            return read_files(session, snap.files, chosen, self.storage_options)
        if snap.files:
            df = session.read.parquet(*snap.files)
        else:
            df = session.createDataFrame([], from_arrow_schema(target))
        return df.select(*(columns or target.names))

    def ray(
        self, name: str, version: int | None = None, columns: list[str] | None = None
    ) -> ray.data.Dataset:
        """A Ray Dataset over a pinned snapshot."""
        import ray.data

        snap = self.snapshot(name, version)
        target = spec(name).schema(snap.dim) if spec(name).emb_columns else spec(name).schema()
        if not snap.files:
            empty = target.empty_table()
            return ray.data.from_arrow(empty.select(columns) if columns else empty)
        fs, _ = filesystem(snap.uri, self.storage_options)  # one filesystem for every file, S3 or local
        paths = [filesystem(f, self.storage_options)[1] for f in snap.files]
        return ray.data.read_parquet(paths, filesystem=fs, columns=columns or target.names)

    # -- writes
    def writer(
        self, name: str, run_id: str, dim: int | None = None, target_rows: int = 262_144
    ) -> TableWriter:
        self.check_writable(name)
        return TableWriter(self, name, run_id, dim, target_rows)

    def check_writable(self, name: str) -> None:
        """Fail now, in the driver, if table ``name``'s folder cannot take files (a root that is a file,
        a read-only mount, missing permissions), rather than in every worker after the job's work."""
        fs, base = filesystem(self.uri(name), self.storage_options)
        probe = f"{base}/_qarm_probe-{uuid.uuid4().hex[:12]}"
        try:
            if isinstance(fs, pafs.LocalFileSystem):
                fs.create_dir(base, recursive=True)
            with fs.open_output_stream(probe):
                pass
            fs.delete_file(probe)
        except OSError as err:
            raise ValueError(
                f"table root {self.root} is not writable: table '{name}' cannot take files "
                f"({err.strerror or err}); give a writable --root (tables.root)"
            ) from None

    def committed(self, name: str, run_id: str) -> bool:
        return _has_committed(self._open(name), run_id)

    def already_committed(self, name: str, run_id: str) -> CommitResult | None:
        """The table's current state if ``run_id`` already committed to it (so a re-run skips its work)."""
        if not self.committed(name, run_id):
            return None
        snap = self.snapshot(name)
        return CommitResult(name, snap.version, snap.rows, len(snap.files), skipped=True)

    def commit(
        self,
        name: str,
        staged: Iterable[StagedFile | dict[str, Any]],
        run_id: str,
        mode: str = "append",
        dim: int | None = None,
        info: dict[str, Any] | None = None,
    ) -> CommitResult:
        """Commit staged files as one new version, once per run id.

        On any failure the staged files are deleted and the table keeps its
        version. A run id that already committed here commits nothing again.

        Concurrent writers (other processes or machines) are handled optimistically: the checks
        run against the version read, and the commit must land on exactly the next version
        (deltalake's own retries are off, as they would skip our checks). When another writer
        took that version, everything that depends on the table is checked again against the new
        one and the commit retried: a key check never passes against a stale table, and when the
        winner was a twin with the same run id, this commit becomes a skip.
        """
        files = [s if isinstance(s, StagedFile) else StagedFile(**s) for s in staged]
        target = None
        fault = faults.from_env()
        try:
            self._check_mode(name, files, mode)
            for attempt in range(_COMMIT_ATTEMPTS):
                done = self.already_committed(name, run_id)  # after a lost race: the winner may be a twin
                if done is not None:
                    self._discard(name, files)
                    return done
                if target is None:  # the staged files themselves: checked once
                    target = self._target(name, dim)
                    self._check_files(name, files, target)
                faults.maybe_fail(fault, "commit.before", table=name)  # staged and checked, not committed
                version = self._try_commit(name, files, run_id, mode, dim, target, info)
                if version is not None:
                    faults.maybe_fail(fault, "commit.after", table=name)  # committed, job not finished
                    snap = self.snapshot(name, version)
                    return CommitResult(name, version, snap.rows, len(files), skipped=False)
                time.sleep(random.uniform(0.05, 0.2) * (attempt + 1))  # another writer won: back off
            raise _refused(
                name, None, files, f"lost the next version to other writers {_COMMIT_ATTEMPTS} times in a row"
            )
        except BaseException:
            self._discard(name, files)
            raise

    def _try_commit(
        self,
        name: str,
        files: list[StagedFile],
        run_id: str,
        mode: str,
        dim: int | None,
        target: pa.Schema,
        info: dict[str, Any] | None,
    ) -> int | None:
        """Check against the latest version and commit on the next one: its number, or None if taken.

        None too when a twin with the same run id committed since `commit` last looked: its rows
        would fail the key check against this version, and the caller's next look skips instead.
        """
        table_spec = spec(name)
        dt = self._open(name)
        if _has_committed(dt, run_id):
            return None
        self._check_against(name, files, mode, dim, dt)
        try:
            if dt is None:  # a racing creator makes this fail, rather than commit a second version 0
                dt = DeltaTable.create(
                    self.uri(name),
                    self._delta_schema(target, table_spec),
                    mode="ignore",
                    name=name,
                    description=table_spec.doc,
                    storage_options=self.storage_options or None,
                    commit_properties=CommitProperties(max_commit_retries=0),
                )
                if dt.version() != 0:  # another writer created it and committed: check against that
                    return None
            props = CommitProperties(
                app_transactions=[Transaction(app_id=run_id, version=1)],
                custom_metadata={"qarm.run_id": run_id, "qarm.info": json.dumps(info or {})},
                max_commit_retries=0,
            )
            adds = [AddAction(f.path, f.size, {}, f.mtime_ms, True, f.stats) for f in files]
            # an overwrite replaces the schema too (a table rebuilt after a column was added)
            schema = self._delta_schema(target, table_spec) if mode == "overwrite" else dt.schema()
            dt.create_write_transaction(adds, mode=mode, schema=schema, commit_properties=props)
        except CommitFailedError:
            return None
        return dt.version() + 1

    def check_staged(
        self,
        name: str,
        staged: Iterable[StagedFile | dict[str, Any]],
        mode: str = "append",
        dim: int | None = None,
    ) -> None:
        """Every check `commit` makes, committing nothing.

        A job that writes several tables checks them all before it commits the first, so bad rows
        in a later table leave the earlier ones unchanged too.
        """
        files = [s if isinstance(s, StagedFile) else StagedFile(**s) for s in staged]
        self._check_mode(name, files, mode)
        self._check_files(name, files, self._target(name, dim))
        self._check_against(name, files, mode, dim, self._open(name))

    @staticmethod
    def _target(name: str, dim: int | None) -> pa.Schema:
        table_spec = spec(name)
        if table_spec.emb_columns and dim is None:
            raise ValueError(f"table {name}: commit needs the embedding dimension")
        return table_spec.schema(dim) if table_spec.emb_columns else table_spec.schema()

    def _check_mode(self, name: str, files: list[StagedFile], mode: str) -> None:
        """A known mode, and never a replacement of an append-only table's rows."""
        if mode not in ("append", "overwrite"):
            raise ValueError(f"mode must be 'append' or 'overwrite', not {mode!r}")
        if mode == "overwrite" and spec(name).append_only and self.exists(name):
            raise _refused(
                name,
                None,
                files,
                "would replace the table's rows, which are immutable (an append-only table): append "
                "new versions instead",
            )

    def _check_against(
        self, name: str, files: list[StagedFile], mode: str, dim: int | None, dt: DeltaTable | None
    ) -> None:
        """The checks that depend on the table's current version: its schema, the embedding dimension, unique keys.

        An append must match the stored schema (a table written before a column was added has to be
        rebuilt by an overwrite, which commits the spec's schema).
        """
        table_spec = spec(name)
        if dt is not None and mode == "append":
            try:
                self._check_schema(name, dt)
            except TableError as err:
                problem = f"cannot be appended: the stored table differs (its rows {err.problem}); rebuild it"
                raise _refused(name, err.column, files, problem + " with an overwrite") from None
        if table_spec.emb_columns and dt is not None:
            stored_dim = self._check_schema(name, dt)
            if stored_dim != dim:
                raise _refused(
                    name,
                    table_spec.emb_columns[0],
                    files,
                    f"have dimension {dim}, the table's is {stored_dim} (its readers were built for that "
                    "dimension: write the new embeddings under a new table root)",
                )
        if table_spec.key:
            existing = dt.file_uris() if (dt is not None and mode == "append") else []
            base = self.uri(name)
            uris = existing + [f"{base}/{f.path}" for f in files]
            total = sum(f.rows for f in files) + (dt.count() if existing else 0)
            self._check_unique(name, table_spec.key, uris, total)

    @staticmethod
    def _delta_schema(target: pa.Schema, table_spec: TableSpec) -> pa.Schema:
        fields = []
        for f in target:
            if f.name in table_spec.emb_columns:
                f = f.with_metadata({DIM_KEY: str(f.type.list_size)})
            fields.append(f)
        return pa.schema(fields)

    def _check_files(self, name: str, files: list[StagedFile], target: pa.Schema) -> None:
        base = self.uri(name)
        fs, root = filesystem(base, self.storage_options)
        for f in files:
            full = f"{root}/{f.path}"
            if fs.get_file_info(full).type != pafs.FileType.File:
                raise FileNotFoundError(
                    f"table '{name}': staged file {f.path} is missing; nothing was committed"
                )
            with fs.open_input_file(full) as fh:
                got = pq.read_schema(fh)
            if not got.remove_metadata().equals(target.remove_metadata()):
                raise TableError(
                    name, None, f.rows, f.rows, f"in {f.path} do not have the table's schema ({got})"
                )

    def _check_unique(
        self, name: str, key: tuple[str, ...], uris: list[str], total: int, hint: str = ""
    ) -> None:
        """Stream the key columns of ``uris`` (``total`` rows), hash them, and count rows whose key occurs twice.

        Memory stays bounded: with more keys than one pass holds, the hashes are
        split by bucket and the files are read once per bucket.
        """
        n_pass = max(1, math.ceil(total / _HASHES_PER_PASS))
        dup_rows = 0
        for bucket in range(n_pass):
            parts = []
            for uri in uris:
                fs, path = filesystem(uri, self.storage_options)
                with fs.open_input_file(path) as fh:
                    for rb in pq.ParquetFile(fh).iter_batches(batch_size=1 << 20, columns=list(key)):
                        h = pd.util.hash_pandas_object(rb.to_pandas(), index=False).to_numpy()
                        parts.append(h[h % n_pass == bucket] if n_pass > 1 else h)
            if parts:
                _, counts = np.unique(np.concatenate(parts), return_counts=True)
                dup_rows += int(counts[counts > 1].sum())
        if dup_rows:
            problem = f"share their key with another row {hint}".rstrip()
            raise TableError(name, ",".join(key), dup_rows, total, problem)

    def _discard(self, name: str, files: list[StagedFile]) -> None:
        fs, root = filesystem(self.uri(name), self.storage_options)
        for f in files:
            with contextlib.suppress(FileNotFoundError, OSError):
                fs.delete_file(f"{root}/{f.path}")


class TableWriter:
    """Stage rows from one process in files of about ``target_rows``, then commit once.

    For writes that stream through the driver (ingest, the generated world);
    distributed stages call `stage` in their tasks and `Tables.commit` here.
    """

    def __init__(self, tables: Tables, name: str, run_id: str, dim: int | None, target_rows: int):
        self.tables, self.name, self.run_id, self.dim = tables, name, run_id, dim
        self.target_rows = target_rows
        self.staged: list[StagedFile] = []
        self._buf: list[pa.Table] = []
        self._buf_rows = 0

    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        t = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
        self._buf.append(t)
        self._buf_rows += t.num_rows
        if self._buf_rows >= self.target_rows:
            try:
                self._flush()
            except BaseException:
                self.abort()
                raise

    def check(self, mode: str = "append") -> None:
        """Stage what is buffered and run every check of `commit`, committing nothing (see `check_staged`)."""
        try:
            self._flush()
            self.tables.check_staged(self.name, self.staged, mode, self.dim)
        except BaseException:
            self.abort()
            raise

    def _flush(self) -> None:
        if not self._buf_rows:
            return
        t = pa.concat_tables(self._buf, promote_options="permissive")
        self._buf, self._buf_rows = [], 0
        self.staged.append(
            stage(
                self.tables.uri(self.name),
                spec(self.name),
                t,
                self.run_id,
                self.dim,
                self.tables.storage_options,
            )
        )

    def commit(self, mode: str = "append", info: dict[str, Any] | None = None) -> CommitResult:
        try:
            self._flush()
        except BaseException:
            self.abort()
            raise
        return self.tables.commit(self.name, self.staged, self.run_id, mode=mode, dim=self.dim, info=info)

    def abort(self) -> None:
        self.tables._discard(self.name, self.staged)
        self.staged, self._buf, self._buf_rows = [], [], 0


def _has_committed(dt: DeltaTable | None, run_id: str) -> bool:
    """Whether ``run_id`` committed to the table as of ``dt``'s version (its Delta app transaction)."""
    return dt is not None and dt.transaction_version(run_id) is not None


def _written_elsewhere(dt: DeltaTable, version: int) -> int | None:
    """The latest version up to ``version`` whose rows something other than this table layer wrote.

    The layer marks each of its commits with the run id. Walking back from ``version``, an
    overwrite of ours ends the search (no older row survives it); a commit without the mark that
    may change rows is foreign. None when every surviving row came through `validate`.
    """
    for c in sorted(dt.history(), key=lambda c: -c.get("version", -1)):
        v = c.get("version", -1)
        if not 0 <= v <= version:
            continue
        if "qarm.run_id" in c:
            if (c.get("operationParameters") or {}).get("mode") == "Overwrite":
                return None
        elif c.get("operation") not in _NO_DATA_OPERATIONS:
            return v
    return None


def new_run_id(stage: str) -> str:
    """A fresh run id: ``<stage>-<UTC time>-<random>``. Pass your own to make a job idempotent."""
    return f"{stage}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
