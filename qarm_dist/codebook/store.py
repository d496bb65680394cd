"""Codebook versions in the `codebooks` table: immutable, one version per fit.

Rows: one per (level, code) with its centroid. FSQ, when fitted, is one more
row at level = number of K-means levels, code -1: its centroid column holds the
FSQ mean and ``params`` the FSQ parameters (JSON). The fit's metadata (source
table and version, config, run id, reconstruction errors, cost) is the JSON in
``params`` of row (level 0, code 0). Versions are only ever appended: the
table's key (version, level, code) makes a second write of a version fail.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qarm_dist.codebook.fsq import FSQParams
from qarm_dist.codebook.kmeans import ResidualCodebook
from qarm_dist.io.delta import Tables


@dataclass
class Codebook:
    version: int
    book: ResidualCodebook
    fsq: FSQParams | None
    info: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.book.centroids[0].shape[1])

    @property
    def levels(self) -> int:
        return len(self.book.centroids)

    def to_table(self) -> pa.Table:
        version, level, code, cent, params = [], [], [], [], []
        for lv, c in enumerate(self.book.centroids):
            version += [self.version] * len(c)
            level += [lv] * len(c)
            code += list(range(len(c)))
            cent.append(c)
            params += [json.dumps(self.info) if lv == 0 and j == 0 else None for j in range(len(c))]
        if self.fsq is not None:
            version.append(self.version)
            level.append(self.levels)
            code.append(-1)
            cent.append(self.fsq.mean[None, :])
            params.append(self.fsq.to_json())
        flat = np.concatenate(cent).astype(np.float32)
        return pa.table(
            {
                "version": pa.array(version, pa.int64()),
                "level": pa.array(level, pa.int32()),
                "code": pa.array(code, pa.int32()),
                "centroid": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), self.dim),
                "params": pa.array(params, pa.string()),
            }
        )


def versions(tables: Tables) -> list[int]:
    if not tables.exists("codebooks"):
        return []
    seen: set[int] = set()
    for rb in tables.read_batches("codebooks", columns=["version"]):
        seen.update(pc.unique(rb.column(0)).to_pylist())
    return sorted(seen)


def load(tables: Tables, version: int | None = None) -> Codebook:
    """A codebook version (the latest when ``version`` is None)."""
    known = versions(tables)
    if not known:
        raise FileNotFoundError("table 'codebooks' has no version yet: run `qarm codebook fit` first")
    v = known[-1] if version is None else version
    if v not in known:
        raise ValueError(f"codebook version {v} does not exist; versions: {known}")
    parts = [
        pa.Table.from_batches([rb]).filter(pc.equal(rb.column("version"), v))
        for rb in tables.read_batches("codebooks")
    ]
    t = pa.concat_tables(parts).sort_by([("level", "ascending"), ("code", "ascending")])
    level, code = t.column("level").to_numpy(), t.column("code").to_numpy()
    dim = t.schema.field("centroid").type.list_size
    cent = pc.list_flatten(t.column("centroid")).to_numpy().reshape(-1, dim)
    params = t.column("params").to_pylist()
    fsq_rows = np.flatnonzero(code == -1)
    fsq = FSQParams.from_json(params[fsq_rows[0]]) if len(fsq_rows) else None
    n_levels = int(level[code >= 0].max()) + 1
    books = [np.ascontiguousarray(cent[(level == lv) & (code >= 0)]) for lv in range(n_levels)]
    info = json.loads(params[int(np.flatnonzero((level == 0) & (code == 0))[0])])
    return Codebook(v, ResidualCodebook(books), fsq, info)
