"""Streamed look-ups for notebooks: nearest neighbours of a few items, a few rows by key."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from qarm_dist.align.evaluate import nearest_neighbours
from qarm_dist.data.summary import lookup
from qarm_dist.io.delta import Tables


def _emb_table(root: str, n: int = 300, dim: int = 8) -> tuple[Tables, np.ndarray, np.ndarray]:
    """An embedding table in several files (so several batches), ids not in row order."""
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(1000, 1000 + n))
    x = rng.normal(size=(n, dim)).astype(np.float32)
    t = Tables(root)
    w = t.writer("item_content_emb", "emb", dim=dim, target_rows=64)
    for lo in range(0, n, 50):
        sl = slice(lo, lo + 50)
        w.write(
            pa.table(
                {
                    "item_id": ids[sl],
                    "emb": pa.FixedSizeListArray.from_arrays(pa.array(x[sl].ravel()), dim),
                    "encoder": [f"e{i}" for i in ids[sl]],
                }
            )
        )
    w.commit()
    assert len(t.snapshot("item_content_emb").files) > 1
    return t, ids, x


def test_nearest_neighbours_match_brute_force_and_leave_out_the_query(root):
    t, ids, x = _emb_table(root)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    queries = [int(ids[3]), int(ids[150]), int(ids[299]), 5]  # 5 is not in the table
    got = nearest_neighbours(t, "item_content_emb", queries, k=7)
    assert set(got) == set(queries[:3])
    for q in queries[:3]:
        row = int(np.flatnonzero(ids == q)[0])
        sims = unit @ unit[row]
        sims[row] = -np.inf
        best = np.argsort(-sims)[:7]
        assert [i for i, _ in got[q]] == ids[best].tolist()
        np.testing.assert_allclose([s for _, s in got[q]], sims[best], rtol=1e-5, atol=1e-6)
    # k beyond the table: every other item, once
    everything = nearest_neighbours(t, "item_content_emb", [int(ids[0])], k=1000)[int(ids[0])]
    assert len(everything) == len(ids) - 1 and int(ids[0]) not in {i for i, _ in everything}
    assert nearest_neighbours(t, "item_content_emb", [5], k=3) == {}


def test_lookup_returns_only_the_rows_asked_for(root):
    t, ids, _ = _emb_table(root)
    want = [int(ids[10]), int(ids[200]), 7]
    got = lookup(t, "item_content_emb", want, columns=["item_id", "encoder"])
    assert got.column_names == ["item_id", "encoder"]
    assert sorted(got.column("item_id").to_pylist()) == sorted(want[:2])
    assert set(got.column("encoder").to_pylist()) == {f"e{i}" for i in want[:2]}
    by_other_column = lookup(
        t, "item_content_emb", ["e1010"], column="encoder", columns=["item_id", "encoder"]
    )
    assert by_other_column.column("item_id").to_pylist() == [1010]
    assert lookup(t, "item_content_emb", [1], columns=["item_id"]).num_rows == 0
