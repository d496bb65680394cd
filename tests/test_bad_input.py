"""Bad input against every stage's command: one clear error line, exit 2, and no table changes version.

Each case copies a finished tiny-world pipeline root (every table and a published alignment model
and ranker), breaks one thing (a table written by something else, an empty table, a config, the
root), runs one ``qarm`` command on it and checks the promise of docs/reliability.md:

- exit status 2 and exactly one ``qarm: error:`` line, no traceback;
- the line names what is wrong: the table, the column and the count of bad rows (or the config
  field, or the root), and the exact substrings listed in the case;
- every table's Delta version and the published models are what they were before the command.

The commands run through `qarm_dist.cli.main` in this process, so they share the module's Spark
session and Ray instance (a fresh JVM and Ray per case would cost minutes); the cases marked
``process=True`` and `test_the_console_script_reports_bad_input_on_one_line` run the installed
console script as a user does.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import PIPELINE, read_all
from deltalake import write_deltalake
from reliability import error_line, foreign_commit, run_qarm, state

from qarm_dist import cli
from qarm_dist.io.delta import Tables
from qarm_dist.io.schemas import spec

pytestmark = pytest.mark.slow

# ------------------------------------------------------------------ corruptions


def nan_embeddings(table: str) -> Callable[[Tables], None]:
    """Rewrite ``table`` with 3 rows of NaN and 1 of +inf in their embeddings (4 bad rows)."""

    def corrupt(t: Tables) -> None:
        rows = read_all(t, table)
        x = np.stack(rows["emb"].to_numpy(zero_copy_only=False)).astype(np.float32)
        x[:3, 0], x[3, 5] = np.nan, np.inf
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
        foreign_commit(t, table, rows.set_column(1, "emb", emb), mode="overwrite")

    return corrupt


def short_embeddings(table: str) -> Callable[[Tables], None]:
    """Append 5 rows whose embeddings have 8 numbers instead of the table's dimension."""

    def corrupt(t: Tables) -> None:
        rows = read_all(t, table).slice(0, 5)
        ids = pa.array(np.arange(10**6, 10**6 + 5), pa.int64())
        emb = pa.array([[0.5] * 8] * 5, pa.list_(pa.float32()))
        foreign_commit(t, table, rows.set_column(0, "item_id", ids).set_column(1, "emb", emb))

    return corrupt


def duplicate_rows(table: str, n: int = 3) -> Callable[[Tables], None]:
    """Append a copy of the first ``n`` rows: 2n rows then share their key."""
    return lambda t: foreign_commit(t, table, read_all(t, table).slice(0, n))


def unknown_ids(table: str, column: str, n: int = 4) -> Callable[[Tables], None]:
    """Append ``n`` rows whose ``column`` names items that do not exist."""

    def corrupt(t: Tables) -> None:
        rows = read_all(t, table).slice(0, n)
        ids = pa.array(np.arange(10**9, 10**9 + n), pa.int64())
        foreign_commit(t, table, rows.set_column(rows.schema.get_field_index(column), column, ids))

    return corrupt


def bad_labels(table: str, column: str, n: int = 5) -> Callable[[Tables], None]:
    """Append ``n`` rows (fresh keys) whose ``column`` label is 2."""

    def corrupt(t: Tables) -> None:
        rows = read_all(t, table).slice(0, n)
        ts = pa.array(rows["ts"].to_numpy() + 1, pa.int64())  # one second later: new keys
        rows = rows.set_column(rows.schema.get_field_index("ts"), "ts", ts)
        labels = pa.array(np.full(n, 2, np.int8))
        foreign_commit(t, table, rows.set_column(rows.schema.get_field_index(column), column, labels))

    return corrupt


def empty(table: str) -> Callable[[Tables], None]:
    """Overwrite ``table`` with no rows, through the table layer (valid, but nothing to work on)."""

    def corrupt(t: Tables) -> None:
        w = t.writer(table, f"empty-{table}", dim=t.snapshot(table).dim)
        w.write(spec(table).schema(t.snapshot(table).dim).empty_table())
        w.commit(mode="overwrite")

    return corrupt


def reschema(table: str, drop: str | None = None, as_string: str | None = None) -> Callable[[Tables], None]:
    """Overwrite ``table`` with another writer's schema: without column ``drop`` or with ``as_string`` a string."""

    def corrupt(t: Tables) -> None:
        rows = read_all(t, table)
        if drop:
            rows = rows.drop_columns([drop])
        if as_string:
            i = rows.schema.get_field_index(as_string)
            rows = rows.set_column(i, as_string, rows[as_string].cast(pa.string()))
        write_deltalake(t.uri(table), rows, mode="overwrite", schema_mode="overwrite")

    return corrupt


def remove_root(t: Tables) -> None:
    shutil.rmtree(t.root)


def root_under_a_file(t: Tables) -> None:
    """The root's parent becomes a regular file: nothing can be written below it."""
    parent = Path(t.root).parent
    shutil.rmtree(parent)
    parent.write_text("not a folder")


# ------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # the command and its own options
    corrupt: Callable[[Tables], None] | None
    expect: tuple[str, ...]  # substrings of the error line
    process: bool = False  # run the installed console script (cases that fail before any engine starts)


NAN = ("table 'item_content_emb', column 'emb': 4 of 600 rows have NaN or infinite values", "rewrite")
NAN_ALIGNED = ("table 'item_aligned_emb', column 'emb': 4 of 600 rows have NaN or infinite values",)
SHORT = ("table 'item_content_emb', column 'emb': 5 of 605 rows have an embedding length other than 64",)
DUP_ITEMS = ("table 'items', column 'item_id': 6 of 603 rows share their key",)
DUP_CONTENT = ("table 'item_content_emb', column 'item_id': 6 of 603 rows share their key",)
UNKNOWN_INTER = (
    "table 'interactions', column 'item_id': 4 of 16404 rows name ids that are not in table 'items'",
)
LIKE_2 = ("table 'interactions', column 'like': 5 of 16405 rows have a label outside {0, 1}",)
NO_TS = ("table 'interactions', column 'ts': 16400 of 16400 rows are missing this column",)
SAMPLES = ("samples",)
CONTENT_SRC = ("--set", "codebook.source=item_content_emb")

CASES = [
    # NaN / inf embeddings, read by every stage that reads embeddings
    Case("nan/pairs", ("pairs",), nan_embeddings("item_content_emb"), NAN),
    Case("nan/align-train", ("align", "train"), nan_embeddings("item_content_emb"), NAN),
    Case("nan/align-embed", ("align", "embed"), nan_embeddings("item_content_emb"), NAN),
    Case("nan/align-eval", ("align", "eval", "--no-behaviour"), nan_embeddings("item_content_emb"), NAN),
    Case("nan/codebook-fit", ("codebook", "fit", *CONTENT_SRC), nan_embeddings("item_content_emb"), NAN),
    Case("nan-aligned/codebook-fit", ("codebook", "fit"), nan_embeddings("item_aligned_emb"), NAN_ALIGNED),
    Case(
        "nan-aligned/codebook-assign", ("codebook", "assign"), nan_embeddings("item_aligned_emb"), NAN_ALIGNED
    ),
    Case(
        "nan-aligned/rank-train-emb",
        ("rank", "train", "--variant", "emb"),
        nan_embeddings("item_aligned_emb"),
        NAN_ALIGNED,
    ),
    # embeddings of the wrong dimension
    Case("short/pairs", ("pairs",), short_embeddings("item_content_emb"), SHORT),
    Case("short/align-train", ("align", "train"), short_embeddings("item_content_emb"), SHORT),
    Case(
        "short/codebook-fit", ("codebook", "fit", *CONTENT_SRC), short_embeddings("item_content_emb"), SHORT
    ),
    Case(
        "dim/world",
        ("world", "--emit-embeddings", "--set", "world.content_dim=32"),
        None,
        (
            "table 'item_content_emb', column 'emb': 600 of 600 rows have dimension 64, the world's is 32",
            "world.content_dim=64",
        ),
    ),
    # duplicate item ids
    Case("dup-items/embed", ("embed",), duplicate_rows("items"), DUP_ITEMS),
    Case("dup-items/pairs", ("pairs",), duplicate_rows("items"), DUP_ITEMS),
    Case("dup-items/samples", ("samples",), duplicate_rows("items"), DUP_ITEMS),
    Case("dup-content/align-train", ("align", "train"), duplicate_rows("item_content_emb"), DUP_CONTENT),
    Case(
        "dup-content/codebook-fit",
        ("codebook", "fit", *CONTENT_SRC),
        duplicate_rows("item_content_emb"),
        DUP_CONTENT,
    ),
    Case(
        "dup-samples/rank-train",
        ("rank", "train"),
        duplicate_rows("samples"),
        ("table 'samples', column 'user_id,item_id,ts': 6 of",),
    ),
    # empty tables
    Case("empty-items/embed", ("embed",), empty("items"), ("table 'items'", "0 rows")),
    Case(
        "empty-interactions/pairs",
        ("pairs",),
        empty("interactions"),
        ("table 'interactions'", "0 of 0 rows", "empty"),
    ),
    Case(
        "empty-interactions/samples",
        ("samples",),
        empty("interactions"),
        ("table 'interactions'", "0 of 0", "empty"),
    ),
    Case(
        "empty-pairs/align-train",
        ("align", "train"),
        empty("item_pairs"),
        ("table 'item_pairs', column 'split': 0 of 0 rows", "qarm pairs"),
    ),
    Case(
        "empty-content/codebook-fit",
        ("codebook", "fit", *CONTENT_SRC),
        empty("item_content_emb"),
        ("table 'item_content_emb', column 'emb': 0 of 0 rows",),
    ),
    Case(
        "empty-samples/rank-train",
        ("rank", "train"),
        empty("samples"),
        ("table 'samples'", "0 of 0 rows", "qarm samples"),
    ),
    Case("empty-samples/rank-eval", ("rank", "eval"), empty("samples"), ("table 'samples'", "0 of 0 rows")),
    # missing or mistyped columns: a Delta table written by something else with another schema
    Case("no-ts/pairs", ("pairs",), reschema("interactions", drop="ts"), NO_TS),
    Case("no-ts/samples", ("samples",), reschema("interactions", drop="ts"), NO_TS),
    Case(
        "text-ts/embed",
        ("embed",),
        reschema("items", as_string="created_ts"),
        ("table 'items', column 'created_ts': 600 of 600 rows are stored as string, expected int64",),
    ),
    Case(
        "no-split/align-train",
        ("align", "train"),
        reschema("item_pairs", drop="split"),
        ("table 'item_pairs', column 'split'", "missing this column"),
    ),
    Case(
        "no-history/rank-train",
        ("rank", "train"),
        reschema("samples", drop="history"),
        ("table 'samples', column 'history'", "missing this column"),
    ),
    Case(
        "no-rq/rank-train",
        ("rank", "train"),
        reschema("item_codes", drop="rq"),
        ("table 'item_codes', column 'rq'", "missing this column"),
    ),
    Case(
        "text-level/codebook-assign",
        ("codebook", "assign"),
        reschema("codebooks", as_string="level"),
        ("table 'codebooks', column 'level'", "stored as string, expected int32"),
    ),
    # ids that are not in items
    Case("unknown/pairs", ("pairs",), unknown_ids("interactions", "item_id"), UNKNOWN_INTER),
    Case("unknown/samples", ("samples",), unknown_ids("interactions", "item_id"), UNKNOWN_INTER),
    Case(
        "unknown-pairs/align-train",
        ("align", "train"),
        unknown_ids("item_pairs", "trigger_id"),
        ("table 'item_pairs', column 'trigger_id': 4 of", "not in table 'items'"),
    ),
    Case(
        "unknown-samples/rank-train",
        ("rank", "train"),
        unknown_ids("samples", "item_id"),
        ("table 'samples', column 'item_id': 4 of", "not in table 'items'"),
    ),
    Case(
        "unknown-samples/rank-eval",
        ("rank", "eval"),
        unknown_ids("samples", "item_id"),
        ("table 'samples', column 'item_id': 4 of", "not in table 'items'"),
    ),
    # labels outside {0, 1}
    Case("label/pairs", ("pairs",), bad_labels("interactions", "like"), LIKE_2),
    Case("label/samples", ("samples",), bad_labels("interactions", "like"), LIKE_2),
    Case(
        "label/rank-train",
        ("rank", "train"),
        bad_labels("samples", "click"),
        ("table 'samples', column 'click': 5 of", "label outside {0, 1}"),
    ),
    Case(
        "label/rank-ablate",
        ("rank", "ablate"),
        bad_labels("samples", "click"),
        ("table 'samples', column 'click': 5 of", "label outside {0, 1}"),
    ),
    Case(
        "label/rank-eval",
        ("rank", "eval"),
        bad_labels("samples", "click"),
        ("table 'samples', column 'click': 5 of", "label outside {0, 1}"),
    ),
    # configs with unknown fields or impossible values
    Case(
        "config/unknown-field",
        ("pairs", "--set", "pairs.swing_alfa=2"),
        None,
        ("config field 'pairs.swing_alfa'", "Extra inputs are not permitted"),
        process=True,
    ),
    Case(
        "config/levels-0",
        ("codebook", "fit", "--levels", "0"),
        None,
        ("config field 'codebook.levels'", "greater than 0"),
        process=True,
    ),
    Case(
        "config/negative-batch",
        ("align", "train", "--set", "align.batch_size=-8"),
        None,
        ("config field 'align.batch_size'", "greater than 1"),
        process=True,
    ),
    Case(
        "config/negative-items",
        ("world", "--set", "world.n_items=-5"),
        None,
        ("config field 'world.n_items'", "greater than 0"),
        process=True,
    ),
    Case(
        "config/k-above-items",
        ("codebook", "fit", "--k", "5000"),
        None,
        ("k=5000 is larger than the", "vectors of table 'item_aligned_emb'"),
    ),
    Case(
        "config/batch-not-multiple",
        ("rank", "train", "--set", "rank.batch_size=255"),
        None,
        ("rank.batch_size 255 must be a multiple of rank.workers 2",),
    ),
    Case(
        "config/actors-hold-every-cpu",
        ("embed", "--set", "encoder.actors=2"),
        None,
        ("encoder.actors x encoder.cpus_per_actor = 2 x 1", "lower encoder.actors"),
    ),
    # a root that does not exist, or cannot be written
    Case("no-root/embed", ("embed",), remove_root, ("table 'items' does not exist",), process=True),
    Case("no-root/pairs", ("pairs",), remove_root, ("table 'interactions' does not exist",)),
    Case("no-root/align-train", ("align", "train"), remove_root, ("table 'item_pairs' does not exist",)),
    Case(
        "no-root/codebook-fit", ("codebook", "fit"), remove_root, ("table 'item_content_emb' does not exist",)
    ),
    Case("no-root/samples", ("samples",), remove_root, ("table 'interactions' does not exist",)),
    Case("no-root/rank-train", ("rank", "train"), remove_root, ("does not exist",)),
    Case(
        "unwritable-root/world",
        ("world",),
        root_under_a_file,
        ("is not writable", "writable --root"),
        process=True,
    ),
]


def _run(case: Case, root: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    args = [*case.argv, "--root", str(root), "-q", *(a for s in PIPELINE for a in ("--set", s))]
    if case.process:
        p = run_qarm(*args)
        return p.returncode, p.stderr
    capsys.readouterr()
    rc = cli.main(args)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_cleanly_and_changes_no_table(
    case: Case, pipeline_root: Path, tmp_path: Path, capsys
):
    root = tmp_path / "case" / "root"
    shutil.copytree(pipeline_root, root)
    t = Tables(str(root))
    if case.corrupt is not None:
        case.corrupt(t)
    before = state(root) if root.exists() else None
    rc, err = _run(case, root, capsys)
    assert rc == 2, err[-3000:]
    line = error_line(err)
    for part in case.expect:
        assert part in line, line
    if before is not None:
        assert state(root) == before
    else:
        assert not root.exists() or not any(root.iterdir()), "a failed job wrote under a missing root"
