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
``process=True`` (those that fail before any engine starts) run the installed console script as a
user does.
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


def movielens_folder(
    movies: str = "1,A (1995),Comedy\n2,B (1996),Drama\n",
    ratings: str = "1,1,4.0,1000000000\n2,2,3.0,1000000100\n",
    header: str = "userId,movieId,rating,timestamp",
) -> Callable[[Tables], None]:
    """A small MovieLens folder beside the case's root (``{ml}`` in its command), from these CSV bodies."""

    def write(t: Tables) -> None:
        ml = Path(t.root).parent.parent / "ml"
        ml.mkdir()
        (ml / "movies.csv").write_text("movieId,title,genres\n" + movies)
        (ml / "ratings.csv").write_text(f"{header}\n" + ratings)
        (ml / "tags.csv").write_text("userId,movieId,tag,timestamp\n1,1,funny,1000000050\n")

    return write


def null_texts(t: Tables) -> None:
    """Append 2 items whose text is null."""
    ids = pa.array([10**6, 10**6 + 1], pa.int64())
    rows = {"item_id": ids, "text": pa.nulls(2, pa.string()), "category": ["c", "c"], "created_ts": ids}
    foreign_commit(t, "items", pa.table(rows))


def remove_root(t: Tables) -> None:
    shutil.rmtree(t.root)


def root_under_a_file(t: Tables) -> None:
    """The root's parent becomes a regular file: nothing can be written below it."""
    parent = Path(t.root).parent
    shutil.rmtree(parent)
    parent.write_text("not a folder")


def unwritable_ingest(t: Tables) -> None:
    movielens_folder()(t)
    root_under_a_file(t)


# ------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # the command, then its own options ({ml}: the MovieLens folder beside the root)
    corrupt: Callable[[Tables], None] | None
    expect: tuple[str, ...]  # substrings of the error line
    process: bool = False  # run the installed console script (cases that fail before any engine starts)


def case(
    id: str, argv: str, corrupt: Callable[[Tables], None] | None, *expect: str, process: bool = False
) -> Case:
    return Case(id, tuple(argv.split()), corrupt, expect, process)


CONTENT = "item_content_emb"
ALIGNED = "item_aligned_emb"
TO_CONTENT = "--set codebook.source=item_content_emb"
NAN = "table 'item_content_emb', column 'emb': 4 of 600 rows have NaN or infinite values"
NAN_ALIGNED = "table 'item_aligned_emb', column 'emb': 4 of 600 rows have NaN or infinite values"
SHORT = "table 'item_content_emb', column 'emb': 5 of 605 rows have an embedding length other than 64"
FOREIGN = "was written by something other than qarm"  # ... and what to do about it
DUP_ITEMS = "table 'items', column 'item_id': 6 of 603 rows share their key"
DUP_CONTENT = "table 'item_content_emb', column 'item_id': 6 of 603 rows share their key"
UNKNOWN = "table 'interactions', column 'item_id': 4 of 16404 rows name ids that are not in table 'items'"
LIKE_2 = "table 'interactions', column 'like': 5 of 16405 rows have a label outside {0, 1}"
CLICK_2 = "table 'samples', column 'click': 5 of 16405 rows have a label outside {0, 1}"
NO_TS = "table 'interactions', column 'ts': 16400 of 16400 rows are missing this column"
NOT_IN_ITEMS = "4 of 16404 rows name ids that are not in table 'items'"

CASES = [
    # NaN / inf embeddings, for every stage that reads embeddings
    case("nan/pairs", "pairs", nan_embeddings(CONTENT), NAN, FOREIGN),
    case("nan/align-train", "align train", nan_embeddings(CONTENT), NAN, FOREIGN),
    case("nan/align-embed", "align embed", nan_embeddings(CONTENT), NAN),
    case("nan/align-eval", "align eval --no-behaviour", nan_embeddings(CONTENT), NAN),
    case("nan/codebook-fit", f"codebook fit {TO_CONTENT}", nan_embeddings(CONTENT), NAN),
    case("nan-aligned/codebook-fit", "codebook fit", nan_embeddings(ALIGNED), NAN_ALIGNED),
    case("nan-aligned/codebook-assign", "codebook assign", nan_embeddings(ALIGNED), NAN_ALIGNED),
    case("nan-aligned/rank-train", "rank train --variant emb", nan_embeddings(ALIGNED), NAN_ALIGNED),
    # embeddings of the wrong dimension
    case("short/pairs", "pairs", short_embeddings(CONTENT), SHORT, FOREIGN),
    case("short/align-train", "align train", short_embeddings(CONTENT), SHORT),
    case("short/codebook-fit", f"codebook fit {TO_CONTENT}", short_embeddings(CONTENT), SHORT),
    case(
        "dim/world",
        "world --emit-embeddings --set world.content_dim=32",
        None,
        "table 'item_content_emb', column 'emb': 600 of 600 rows have dimension 64, the world's is 32",
        "set world.content_dim=64",
    ),
    # duplicate item ids
    case("dup-items/embed", "embed", duplicate_rows("items"), DUP_ITEMS, FOREIGN),
    case("dup-items/pairs", "pairs", duplicate_rows("items"), DUP_ITEMS),
    case("dup-items/samples", "samples", duplicate_rows("items"), DUP_ITEMS),
    case("dup-content/align-train", "align train", duplicate_rows(CONTENT), DUP_CONTENT),
    case("dup-content/codebook-fit", f"codebook fit {TO_CONTENT}", duplicate_rows(CONTENT), DUP_CONTENT),
    case(
        "dup-samples/rank-train",
        "rank train",
        duplicate_rows("samples"),
        "table 'samples', column 'user_id,item_id,ts': 6 of 16403 rows share their key",
    ),
    # empty tables
    case(
        "empty/embed", "embed", empty("items"), "table 'items' (version 2) has 0 rows", "ingest items first"
    ),
    case("empty/pairs", "pairs", empty("interactions"), "table 'interactions': 0 of 0 rows", "empty"),
    case("empty/samples", "samples", empty("interactions"), "table 'interactions': 0 of 0 rows", "empty"),
    case(
        "empty/align-train", "align train", empty("item_pairs"), "table 'item_pairs', column 'split': 0 of 0"
    ),
    case(
        "empty/codebook-fit",
        f"codebook fit {TO_CONTENT}",
        empty(CONTENT),
        f"table '{CONTENT}', column 'emb': 0 of 0",
    ),
    case(
        "empty/rank-train",
        "rank train",
        empty("samples"),
        "table 'samples': 0 of 0 rows",
        "run `qarm samples`",
    ),
    case(
        "empty/rank-eval", "rank eval", empty("samples"), "table 'samples': 0 of 0 rows", "run `qarm samples`"
    ),
    # missing or mistyped columns: a Delta table written by something else with another schema
    case("no-ts/pairs", "pairs", reschema("interactions", drop="ts"), NO_TS),
    case("no-ts/samples", "samples", reschema("interactions", drop="ts"), NO_TS),
    case(
        "text-ts/embed",
        "embed",
        reschema("items", as_string="created_ts"),
        "table 'items', column 'created_ts': 600 of 600 rows are stored as string, expected int64",
    ),
    case(
        "null-text/embed",
        "embed",
        null_texts,
        "table 'items', column 'text': 2 of 602 rows are null",
    ),
    case(
        "no-split/align-train",
        "align train",
        reschema("item_pairs", drop="split"),
        "table 'item_pairs', column 'split': 2329 of 2329 rows are missing this column",
    ),
    case(
        "no-history/rank-train",
        "rank train",
        reschema("samples", drop="history"),
        "table 'samples', column 'history': 16400 of 16400 rows are missing this column",
    ),
    case(
        "no-rq/rank-train",
        "rank train",
        reschema("item_codes", drop="rq"),
        "table 'item_codes', column 'rq': 600 of 600 rows are missing this column",
    ),
    case(
        "text-level/codebook-assign",
        "codebook assign",
        reschema("codebooks", as_string="level"),
        "table 'codebooks', column 'level': 16 of 16 rows are stored as string, expected int32",
    ),
    # ids that are not in items
    case("unknown/pairs", "pairs", unknown_ids("interactions", "item_id"), UNKNOWN, FOREIGN),
    case("unknown/samples", "samples", unknown_ids("interactions", "item_id"), UNKNOWN),
    case(
        "unknown/align-train",
        "align train",
        unknown_ids("item_pairs", "trigger_id"),
        "table 'item_pairs', column 'trigger_id': 4 of 2333 rows name ids that are not in table 'items'",
    ),
    case(
        "unknown/rank-train", "rank train", unknown_ids("samples", "item_id"), "table 'samples'", NOT_IN_ITEMS
    ),
    case(
        "unknown/rank-eval", "rank eval", unknown_ids("samples", "item_id"), "table 'samples'", NOT_IN_ITEMS
    ),
    # labels outside {0, 1}
    case("label/pairs", "pairs", bad_labels("interactions", "like"), LIKE_2, FOREIGN),
    case("label/samples", "samples", bad_labels("interactions", "like"), LIKE_2),
    case("label/rank-train", "rank train", bad_labels("samples", "click"), CLICK_2),
    case("label/rank-ablate", "rank ablate", bad_labels("samples", "click"), CLICK_2),
    case("label/rank-eval", "rank eval", bad_labels("samples", "click"), CLICK_2),
    # a MovieLens folder with bad files
    case(
        "ml-duplicate-movie/ingest",
        "ingest movielens --path {ml}",
        movielens_folder(movies="1,A (1995),Comedy\n2,B (1996),Drama\n2,B again (1996),Drama\n"),
        "table 'items', column 'item_id': 2 of 3 rows share their key",
    ),
    case(
        "ml-bad-rating/ingest",
        "ingest movielens --path {ml}",
        movielens_folder(ratings="1,1,4.0,1000000000\n2,1,five,1000000200\n"),
        "ratings.csv: In CSV column #2: CSV conversion error to float: invalid value 'five'",
        "rating (float)",
    ),
    case(
        "ml-no-timestamp/ingest",
        "ingest movielens --path {ml}",
        movielens_folder(header="userId,movieId,rating"),
        "ratings.csv lacks column(s) timestamp",
        process=True,
    ),
    # configs with unknown fields or impossible values
    case(
        "config/unknown-field",
        "pairs --set pairs.swing_alfa=2",
        None,
        "config field 'pairs.swing_alfa': Extra inputs are not permitted",
        process=True,
    ),
    case(
        "config/no-file",
        "samples --config /nonexistent/qarm.yaml",
        None,
        "config file /nonexistent/qarm.yaml does not exist",
        process=True,
    ),
    case(
        "config/levels-0",
        "codebook fit --levels 0",
        None,
        "config field 'codebook.levels': Input should be greater than 0",
        process=True,
    ),
    case(
        "config/negative-batch",
        "align train --set align.batch_size=-8",
        None,
        "config field 'align.batch_size': Input should be greater than 1",
        process=True,
    ),
    case(
        "config/negative-items",
        "world --set world.n_items=-5",
        None,
        "config field 'world.n_items': Input should be greater than 0",
        process=True,
    ),
    case(
        "config/k-above-items",
        "codebook fit --k 5000",
        None,
        "k=5000 is larger than the 582 vectors of table 'item_aligned_emb'",
    ),
    case(
        "config/batch-not-multiple",
        "rank train --set rank.batch_size=255",
        None,
        "rank.batch_size 255 must be a multiple of rank.workers 2",
    ),
    case(
        "config/actors-hold-every-cpu",
        "embed --set encoder.actors=2",
        None,
        "encoder.actors x encoder.cpus_per_actor = 2 x 1.0 holds 2 of the cluster's 2 CPUs",
        "lower encoder.actors",
    ),
    case(
        "config/unknown-variant",
        "rank train --variant nope",
        None,
        "unknown ranker variant 'nope'; known: id_only",
    ),
    case(
        "config/no-codebook-version",
        "codebook assign --version 9",
        None,
        "codebook version 9 does not exist; versions: [1]",
    ),
    case(
        "config/no-align-model",
        "align embed --model nope",
        None,
        "no published align model 'nope'",
        "known: a",
    ),
    case(
        "config/no-rank-model", "rank eval --model nope", None, "no published rank model 'nope'", "known: r"
    ),
    # a root that does not exist, or cannot be written
    case("no-root/embed", "embed", remove_root, "table 'items' does not exist under", process=True),
    case("no-root/pairs", "pairs", remove_root, "table 'interactions' does not exist under"),
    case("no-root/align-train", "align train", remove_root, "table 'item_pairs' does not exist under"),
    case(
        "no-root/codebook-fit", "codebook fit", remove_root, "table 'item_content_emb' does not exist under"
    ),
    case("no-root/samples", "samples", remove_root, "table 'interactions' does not exist under"),
    case("no-root/rank-train", "rank train", remove_root, "table 'samples' does not exist under"),
    case(
        "unwritable-root/world",
        "world",
        root_under_a_file,
        "is not writable",
        "give a writable --root",
        process=True,
    ),
    case(
        "unwritable-root/ingest",
        "ingest movielens --path {ml}",
        unwritable_ingest,
        "is not writable",
        process=True,
    ),
]


def _run(case: Case, root: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run the case's command on ``root`` with the pipeline's settings; its options go last, so they win."""
    words = [a.format(ml=root.parent.parent / "ml") for a in case.argv]
    n = next((i for i, a in enumerate(words) if a.startswith("-")), len(words))
    args = [*words[:n], "--root", str(root), "-q", *(a for s in PIPELINE for a in ("--set", s)), *words[n:]]
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
    if case.corrupt is not None:
        case.corrupt(Tables(str(root)))
    before = state(root) if root.exists() else None
    rc, err = _run(case, root, capsys)
    assert rc == 2, err[-3000:]
    line = error_line(err)
    for part in case.expect:
        assert part in line, line
    if before is not None:
        assert state(root) == before
    else:  # the root was missing or could not be made: it still is
        assert not root.is_dir() or not any(root.rglob("_delta_log")), (
            "a failed job wrote under a missing root"
        )
