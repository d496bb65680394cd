"""Every table of the pipeline, declared once.

A `TableSpec` is the single source of truth for a table: its Arrow schema, its
key (rows that must be unique), and which columns hold embeddings. Embedding
dimensions depend on the encoder or the quantizer, so a spec builds its schema
for a given ``dim``; the dimension a table was created with is stored in the
Delta table's metadata (see `qarm_dist.io.delta`) and checked on every write.

Tables are not Delta-partitioned: `interactions` carries a plain ``day``
column instead. Every reader (pyarrow over the file list, Spark over the file
list, Ray Data) then sees the same columns without partition discovery, and
Parquet row-group statistics still prune by day.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

#: placeholder type for an embedding column; `TableSpec.schema(dim)` fixes its size
EMB = "embedding"

TASKS = ("click", "like")
"""Task labels every interaction (and sample) carries, each 0 or 1."""


@dataclass(frozen=True)
class TableSpec:
    name: str
    fields: tuple[tuple[str, pa.DataType | str], ...]
    key: tuple[str, ...] = ()
    #: columns whose values must be 0 or 1
    labels: tuple[str, ...] = ()
    doc: str = ""
    nullable: frozenset[str] = field(default_factory=frozenset)
    #: (column, table): ids in the column must be keys of that table (checked on foreign writes)
    refs: tuple[tuple[str, str], ...] = ()
    #: rows are only ever added: a commit that would replace them is refused
    append_only: bool = False

    @property
    def columns(self) -> list[str]:
        return [n for n, _ in self.fields]

    @property
    def emb_columns(self) -> list[str]:
        return [n for n, t in self.fields if t == EMB]

    def schema(self, dim: int | None = None) -> pa.Schema:
        """Arrow schema; embedding columns become ``fixed_size_list<float32>[dim]``."""
        out = []
        for name, typ in self.fields:
            if typ == EMB:
                if dim is None:
                    raise ValueError(f"table {self.name}: schema needs the embedding dimension")
                typ = pa.list_(pa.float32(), dim)
            nullable = name in self.nullable
            out.append(pa.field(name, typ, nullable=nullable))
        return pa.schema(out)


_LABELS = tuple((t, pa.int8()) for t in TASKS)

INTERACTIONS = TableSpec(
    "interactions",
    (("user_id", pa.int64()), ("item_id", pa.int64()), ("ts", pa.int64()), ("day", pa.date32()), *_LABELS),
    key=("user_id", "item_id", "ts"),
    labels=TASKS,
    refs=(("item_id", "items"),),
    doc="One row per impression or rating; ts in epoch seconds, day = UTC date of ts.",
)
ITEMS = TableSpec(
    "items",
    (("item_id", pa.int64()), ("text", pa.string()), ("category", pa.string()), ("created_ts", pa.int64())),
    key=("item_id",),
    doc="Content the encoder reads; created_ts is when the item entered the catalogue.",
)
ITEM_CONTENT_EMB = TableSpec(
    "item_content_emb",
    (("item_id", pa.int64()), ("emb", EMB), ("encoder", pa.string())),
    key=("item_id",),
    doc="The frozen content ('MLLM') view of every item, L2-normalised.",
)
ITEM_PAIRS = TableSpec(
    "item_pairs",
    (
        ("trigger_id", pa.int64()),
        ("target_id", pa.int64()),
        ("source", pa.string()),
        ("score", pa.float32()),
        ("split", pa.string()),
    ),
    key=("trigger_id", "target_id"),
    refs=(("trigger_id", "items"), ("target_id", "items")),
    doc="Behaviour pairs for alignment; source in {i2i, u2i}, split in {train, heldout}.",
)
ITEM_ALIGNED_EMB = TableSpec(
    "item_aligned_emb",
    (("item_id", pa.int64()), ("emb", EMB), ("model_version", pa.string())),
    key=("item_id", "model_version"),
    doc="Item embeddings after alignment, one row per item and model version.",
)
CODEBOOKS = TableSpec(
    "codebooks",
    (
        ("version", pa.int64()),
        ("level", pa.int32()),
        ("code", pa.int32()),
        ("centroid", EMB),
        ("params", pa.string()),
    ),
    key=("version", "level", "code"),
    nullable=frozenset({"params"}),
    append_only=True,  # codebook versions are immutable: item codes and trained rankers refer to them
    doc="Residual K-means centroids per level; params holds FSQ parameters and fit metadata (JSON).",
)
ITEM_CODES = TableSpec(
    "item_codes",
    (
        ("item_id", pa.int64()),
        ("version", pa.int64()),
        ("rq", pa.list_(pa.int32())),
        ("vq", pa.list_(pa.int64())),
        ("fsq", pa.list_(pa.int32())),
    ),
    key=("item_id", "version"),
    nullable=frozenset({"fsq"}),
    doc="Semantic IDs: RQ code per level, VQ code = ids of the K nearest pool items, FSQ code if fitted.",
)
SAMPLES = TableSpec(
    "samples",
    (
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("ts", pa.int64()),
        *_LABELS,
        ("history", pa.list_(pa.int64())),
        ("history_like", pa.list_(pa.int8())),
        ("split", pa.string()),
        ("sampled", pa.int8()),
        ("item_pop", pa.int64()),
        ("user_pop", pa.int64()),
    ),
    key=("user_id", "item_id", "ts"),
    labels=(*TASKS, "sampled"),
    refs=(("item_id", "items"),),
    doc="Ranker input: labels, the user's prior items (oldest first) and their like labels, split in "
    "{train, eval}; sampled = 1 "
    "for a sampled negative; item_pop / user_pop = the item's / the user's interactions in the train "
    "window (0: a cold-start item / a user new in the evaluation window).",
)

TABLES: dict[str, TableSpec] = {
    s.name: s
    for s in (
        INTERACTIONS,
        ITEMS,
        ITEM_CONTENT_EMB,
        ITEM_PAIRS,
        ITEM_ALIGNED_EMB,
        CODEBOOKS,
        ITEM_CODES,
        SAMPLES,
    )
}


def spec(name: str) -> TableSpec:
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"unknown table {name!r}; known: {', '.join(TABLES)}") from None
