"""MovieLens-format folders (ml-latest-small and its larger siblings) as tables.

- items: title, genres and tags as text; category = first genre; created_ts =
  the movie's first rating (MovieLens has no catalogue date; unrated movies get
  the last rating's time, i.e. they arrive at the end).
- interactions: every rating is a ``click`` (the user chose to watch and rate
  it); ``like`` = rating >= 4. Negatives for ranking are sampled later.
- tags are user activity: only tags applied before the evaluation window's
  start go into the text, so no text leaks from the window (DESIGN.md).

Files are read in blocks with pyarrow's streaming CSV reader; only per-movie
aggregates (first rating time, tag lists) are held, never all ratings.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from qarm_dist.data.split import eval_start

REQUIRED = {
    "movies.csv": ("movieId", "title", "genres"),
    "ratings.csv": ("userId", "movieId", "rating", "timestamp"),
    "tags.csv": ("userId", "movieId", "tag", "timestamp"),
}
_BLOCK = 4 << 20  # bytes per CSV block


class MovieLensError(ValueError):
    pass


def check_folder(path: str | Path) -> Path:
    """Fail with one message listing every missing file or column."""
    p = Path(path)
    if not p.is_dir():
        raise MovieLensError(f"MovieLens folder {p} does not exist")
    problems = []
    for name, cols in REQUIRED.items():
        f = p / name
        if not f.is_file():
            problems.append(f"{name} is missing")
            continue
        header = f.open().readline().strip().split(",")
        lacking = [c for c in cols if c not in header]
        if lacking:
            problems.append(f"{name} lacks column(s) {', '.join(lacking)} (has {', '.join(header)})")
    if problems:
        raise MovieLensError(f"{p} is not a MovieLens folder: " + "; ".join(problems))
    return p


def _blocks(path: Path, types: dict[str, pa.DataType]) -> Iterator[pa.RecordBatch]:
    opts = pacsv.ConvertOptions(column_types=types, include_columns=list(types))
    try:
        reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=_BLOCK), convert_options=opts)
        yield from reader
    except (
        pa.ArrowInvalid
    ) as err:  # a value of the wrong type: say which file, not only pyarrow's column number
        columns = ", ".join(f"{c} ({t})" for c, t in types.items())
        raise MovieLensError(
            f"{path}: {err} (columns read: {columns}); fix the file and ingest again"
        ) from None


_RATING_TYPES = {"userId": pa.int64(), "movieId": pa.int64(), "rating": pa.float32(), "timestamp": pa.int64()}


def interactions(path: str | Path) -> Iterator[pa.Table]:
    """Rows of `interactions`, one CSV block at a time."""
    for rb in _blocks(check_folder(path) / "ratings.csv", _RATING_TYPES):
        ts = rb.column("timestamp")
        yield pa.table(
            {
                "user_id": rb.column("userId"),
                "item_id": rb.column("movieId"),
                "ts": ts,
                "day": pc.divide(ts, 86_400).cast(pa.int32()).cast(pa.date32()),
                "click": pa.array(np.ones(rb.num_rows, dtype=np.int8)),
                "like": pc.greater_equal(rb.column("rating"), 4.0).cast(pa.int8()),
            }
        )


def ratings_eval_start(path: str | Path, eval_fraction: float) -> int:
    """The evaluation window's start over the ratings file (same rule as `split.eval_start`)."""
    p = check_folder(path) / "ratings.csv"
    return eval_start(
        lambda: (rb.column(0).to_numpy() for rb in _blocks(p, {"timestamp": pa.int64()})), eval_fraction
    )


def _first_rating(p: Path) -> tuple[pa.Table, int]:
    """Per movie, its first rating time; plus the last rating time overall."""
    parts, last = [], 0
    for rb in _blocks(p / "ratings.csv", {"movieId": pa.int64(), "timestamp": pa.int64()}):
        parts.append(pa.table(rb).group_by("movieId").aggregate([("timestamp", "min")]))
        last = max(last, pc.max(rb.column("timestamp")).as_py() or 0)
    first = pa.concat_tables(parts).group_by("movieId").aggregate([("timestamp_min", "min")])
    return first.rename_columns(["movieId", "first_ts"]), last


def _tags_before(p: Path, cutoff: int) -> pa.Table:
    parts = []
    types = {"movieId": pa.int64(), "tag": pa.string(), "timestamp": pa.int64()}
    for rb in _blocks(p / "tags.csv", types):
        t = pa.table(rb).filter(pc.less(rb.column("timestamp"), cutoff))
        parts.append(t.select(["movieId", "tag"]).set_column(1, "tag", pc.utf8_lower(t.column("tag"))))
    if not parts:
        return pa.table({"movieId": pa.array([], pa.int64()), "tags": pa.array([], pa.string())})
    grouped = pa.concat_tables(parts).group_by("movieId").aggregate([("tag", "distinct")])
    joined = pc.binary_join(grouped.column("tag_distinct"), ", ")
    return pa.table({"movieId": grouped.column("movieId"), "tags": joined})


def items(path: str | Path, tags_before_ts: int) -> Iterator[pa.Table]:
    """Rows of `items`, one CSV block of movies at a time."""
    p = check_folder(path)
    first, last = _first_rating(p)
    tags = _tags_before(p, tags_before_ts)
    types = {"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()}
    for rb in _blocks(p / "movies.csv", types):
        t = (
            pa.table(rb)
            .join(first, "movieId", join_type="left outer")
            .join(tags, "movieId", join_type="left outer")
        )
        t = t.sort_by("movieId")
        genres = pc.replace_substring(t.column("genres"), "|", ", ")
        tag_part = pc.if_else(
            pc.is_null(t.column("tags")), "", pc.binary_join_element_wise(". Tags: ", t.column("tags"), "")
        )
        text = pc.binary_join_element_wise(t.column("title"), ". Genres: ", genres, tag_part, "")
        category = pc.list_element(pc.split_pattern(t.column("genres"), "|"), 0)
        yield pa.table(
            {
                "item_id": t.column("movieId"),
                "text": text,
                "category": category,
                "created_ts": pc.fill_null(t.column("first_ts"), last),
            }
        )
