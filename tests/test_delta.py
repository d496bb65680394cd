"""The table layer: schemas, validation, atomic and idempotent commits, pinned reads."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
from deltalake import write_deltalake

from qarm_dist.io import delta
from qarm_dist.io.delta import TableError, Tables
from qarm_dist.io.schemas import TABLES, spec

DESIGN_TABLES = {
    "interactions",
    "items",
    "item_content_emb",
    "item_pairs",
    "item_aligned_emb",
    "codebooks",
    "item_codes",
    "samples",
}


def emb_rows(ids, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((len(ids), dim)).astype(np.float32)
    return pa.table({"item_id": np.asarray(ids, np.int64), "emb": list(e), "encoder": ["t"] * len(ids)})


def write(tables, name, data, run_id, dim=None, mode="append"):
    w = tables.writer(name, run_id, dim=dim, target_rows=4)
    for t in data if isinstance(data, list) else [data]:
        w.write(t)
    return w.commit(mode=mode)


def files_in(tables, name):
    return sorted(f for f in os.listdir(tables.uri(name)) if f.endswith(".parquet"))


def test_every_design_table_is_declared_once():
    assert set(TABLES) == DESIGN_TABLES
    s = spec("item_content_emb").schema(384)
    assert s.field("emb").type == pa.list_(pa.float32(), 384)
    with pytest.raises(ValueError, match="dimension"):
        spec("item_content_emb").schema()
    with pytest.raises(KeyError, match="unknown table"):
        spec("nope")


def test_roundtrip_streams_batches_in_the_declared_schema(root):
    t = Tables(root)
    r = write(t, "item_content_emb", [emb_rows(range(0, 5)), emb_rows(range(5, 10), seed=1)], "r1", dim=8)
    assert (r.version, r.rows, r.skipped) == (1, 10, False)
    assert r.files >= 2  # target_rows=4 forces several staged files in one commit
    batches = list(t.read_batches("item_content_emb", batch_rows=3))
    assert all(b.schema.field("emb").type == pa.list_(pa.float32(), 8) for b in batches)
    got = pa.Table.from_batches(batches).sort_by("item_id")
    want = pa.concat_tables([emb_rows(range(0, 5)), emb_rows(range(5, 10), seed=1)])
    np.testing.assert_array_equal(
        np.stack(got["emb"].to_numpy(zero_copy_only=False)),
        np.stack(want["emb"].to_numpy(zero_copy_only=False)),
    )
    assert t.snapshot("item_content_emb").dim == 8


def test_same_run_id_adds_no_rows(root):
    t = Tables(root)
    write(t, "item_content_emb", emb_rows(range(6)), "run-a", dim=8)
    again = write(t, "item_content_emb", emb_rows(range(6, 9)), "run-a", dim=8)
    assert again.skipped and again.rows == 6 and again.version == 1
    committed = sorted(os.path.basename(f) for f in t.snapshot("item_content_emb").files)
    assert files_in(t, "item_content_emb") == committed  # the retry's staged files were deleted
    other = write(t, "item_content_emb", emb_rows(range(6, 9)), "run-b", dim=8)
    assert (other.version, other.rows) == (2, 9)


def test_a_twin_that_lands_between_the_look_and_the_commit_makes_it_a_skip(root):
    """Two jobs with one run id race: the loser looked before the winner committed, then checks keys after.

    Its rows then share every key with the winner's, so the key check must not run: the commit step
    yields the version, and the next look turns the commit into a skip (the race in test_faults).
    """
    t, name = Tables(root), "item_content_emb"
    write(t, name, emb_rows(range(6)), "twin", dim=8)  # the winner
    staged = [delta.stage(t.uri(name), spec(name), emb_rows(range(6)), "twin", dim=8)]
    assert t._try_commit(name, staged, "twin", "append", 8, spec(name).schema(8), None) is None
    loser = t.commit(name, staged, "twin", dim=8)
    assert (loser.skipped, loser.version, loser.rows) == (True, 1, 6)
    assert files_in(t, name) == sorted(os.path.basename(f) for f in t.snapshot(name).files)


BAD_CASES = [
    # (name, table, dim, rows, column named in the error, bad row count)
    (
        "nan",
        "item_content_emb",
        8,
        pa.table(
            {
                "item_id": [1, 2, 3],
                "emb": [[np.nan] * 8, [0.1] * 8, [np.inf] + [0.0] * 7],
                "encoder": ["t"] * 3,
            }
        ),
        "emb",
        2,
    ),
    (
        "wrong dim",
        "item_content_emb",
        8,
        pa.table({"item_id": [1, 2], "emb": [[0.1] * 8, [0.1] * 7], "encoder": ["t"] * 2}),
        "emb",
        1,
    ),
    (
        "null key",
        "items",
        None,
        pa.table(
            {
                "item_id": [1, None, None],
                "text": ["a", "b", "c"],
                "category": ["x"] * 3,
                "created_ts": [0] * 3,
            }
        ),
        "item_id",
        2,
    ),
    ("missing column", "items", None, pa.table({"item_id": [1, 2], "text": ["a", "b"]}), "category", 2),
    (
        "mistyped",
        "items",
        None,
        pa.table(
            {"item_id": [1, 2], "text": ["a", "b"], "category": ["x", "y"], "created_ts": ["now", "later"]}
        ),
        "created_ts",
        2,
    ),
    (
        "label",
        "interactions",
        None,
        pa.table(
            {
                "user_id": [1, 1, 2],
                "item_id": [1, 2, 3],
                "ts": [0, 1, 2],
                "day": pa.array([0, 0, 0], pa.int32()).cast(pa.date32()),
                "click": [1, 2, 0],
                "like": [0, 0, -1],
            }
        ),
        "click",
        1,
    ),
    (
        "duplicate keys",
        "items",
        None,
        pa.table(
            {"item_id": [1, 2, 2, 3, 3], "text": ["a"] * 5, "category": ["x"] * 5, "created_ts": [0] * 5}
        ),
        "item_id",
        4,
    ),
]


@pytest.mark.parametrize(
    ("case", "name", "dim", "rows", "column", "bad"), BAD_CASES, ids=[c[0] for c in BAD_CASES]
)
def test_bad_rows_commit_nothing_and_name_table_column_count(root, case, name, dim, rows, column, bad):
    t = Tables(root)
    good = {
        "item_content_emb": emb_rows([100, 101]),
        "items": pa.table({"item_id": [100], "text": ["ok"], "category": ["x"], "created_ts": [0]}),
        "interactions": pa.table(
            {
                "user_id": [9],
                "item_id": [9],
                "ts": [9],
                "day": pa.array([0], pa.int32()).cast(pa.date32()),
                "click": [1],
                "like": [1],
            }
        ),
    }
    write(t, name, good[name], "setup", dim=dim)
    before = (t.version(name), files_in(t, name))
    with pytest.raises(TableError) as err:
        write(t, name, rows, "bad", dim=dim)
    e = err.value
    assert (e.table, e.column, e.bad_rows, e.total_rows) == (
        name,
        column,
        bad,
        rows.num_rows + (t.snapshot(name).rows if case == "duplicate keys" else 0),
    )
    assert f"table '{name}'" in str(e) and f"column '{column}'" in str(e) and f"{bad} of" in str(e)
    assert (t.version(name), files_in(t, name)) == before


def test_duplicates_against_existing_rows_on_append(root):
    t = Tables(root)
    write(t, "item_content_emb", emb_rows(range(5)), "r1", dim=8)
    with pytest.raises(TableError, match="2 of 8 rows share their key"):
        write(t, "item_content_emb", emb_rows([4, 5, 6]), "r2", dim=8)
    # overwrite replaces the old rows, so the same keys are fine there
    assert write(t, "item_content_emb", emb_rows([4, 5, 6]), "r3", dim=8, mode="overwrite").rows == 3


def test_duplicate_check_in_several_passes_keeps_bounded_memory(root, monkeypatch):
    monkeypatch.setattr(delta, "_HASHES_PER_PASS", 7)  # 40 keys -> 6 passes over the key columns
    t = Tables(root)
    ids = list(range(39)) + [17]
    with pytest.raises(TableError, match="2 of 40 rows share their key"):
        write(t, "item_content_emb", emb_rows(ids), "r1", dim=8)
    assert write(t, "item_content_emb", emb_rows(range(40)), "r2", dim=8).rows == 40


def test_a_write_that_fails_midway_leaves_the_previous_version(root):
    t = Tables(root)
    write(t, "item_content_emb", emb_rows(range(3)), "r1", dim=8)

    def chunks():
        yield emb_rows(range(10, 15))
        yield emb_rows(range(15, 20))
        raise RuntimeError("worker died")

    w = t.writer("item_content_emb", "r2", dim=8, target_rows=4)
    with pytest.raises(RuntimeError):
        try:
            for c in chunks():
                w.write(c)
        except RuntimeError:
            w.abort()
            raise
    assert t.version("item_content_emb") == 1
    assert t.snapshot("item_content_emb").rows == 3
    assert len(files_in(t, "item_content_emb")) == 1


def test_dimension_is_part_of_the_table(root):
    t = Tables(root)
    write(t, "item_content_emb", emb_rows(range(3)), "r1", dim=8)
    with pytest.raises(TableError, match="dimension 4, the table's is 8"):
        write(t, "item_content_emb", emb_rows(range(3, 6), dim=4), "r2", dim=4)
    with pytest.raises(TableError, match="dimension 4, the table's is 8.*new table root") as refused:
        write(t, "item_content_emb", emb_rows(range(3, 6), dim=4), "r3", dim=4, mode="overwrite")
    assert "overwrite" not in str(refused.value)  # an overwrite is refused too: never suggest one
    assert t.version("item_content_emb") == 1


def test_pinned_versions_read_what_they_committed(root):
    t = Tables(root)
    write(t, "item_content_emb", emb_rows(range(3)), "r1", dim=8)
    write(t, "item_content_emb", emb_rows(range(3, 10)), "r2", dim=8)
    assert sum(b.num_rows for b in t.read_batches("item_content_emb", version=1)) == 3
    assert sum(b.num_rows for b in t.read_batches("item_content_emb")) == 10


def test_a_foreign_table_with_another_schema_is_refused_on_read(root):
    t = Tables(root)
    write_deltalake(t.uri("items"), pa.table({"item_id": pa.array([1], pa.int64()), "title": ["x"]}))
    with pytest.raises(TableError, match="column 'text'"):
        t.snapshot("items")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        t.snapshot("item_pairs")


def test_an_overwrite_rebuilds_a_table_written_before_a_column_was_added(root):
    t = Tables(root)
    # an `items` table from before `created_ts` existed
    write_deltalake(
        t.uri("items"),
        pa.table({"item_id": pa.array([1, 2], pa.int64()), "text": ["a", "b"], "category": ["c", "c"]}),
    )
    rows = pa.table(
        {
            "item_id": pa.array([3], pa.int64()),
            "text": ["x"],
            "category": ["c"],
            "created_ts": pa.array([5], pa.int64()),
        }
    )
    with pytest.raises(TableError, match="column 'created_ts': 1 of 1 rows cannot be appended"):
        write(t, "items", rows, "r1")
    assert t.version("items") == 0 and len(files_in(t, "items")) == 1  # the staged file is gone
    assert write(t, "items", rows, "r2", mode="overwrite").version == 1
    got = pa.Table.from_batches(list(t.read_batches("items")))  # read in the spec's schema again
    assert got.column("created_ts").to_pylist() == [5] and t.snapshot("items").rows == 1


def test_run_ids_with_odd_characters_count_their_rows(root):
    t = Tables(root)
    r = write(t, "item_content_emb", emb_rows(range(5)), "run with spaces/and%signs", dim=8)
    assert r.rows == 5 and t.snapshot("item_content_emb").file_rows == [5]
    assert t.committed("item_content_emb", "run with spaces/and%signs")
