"""From sample rows to the ranker's input tensors: item side features, hashing, dedup.

`ItemFeatures` holds, per item id, what the ranker looks up about an item: the
semantic codes of the chosen codebook versions (RQ levels, FSQ, VQ neighbour
ids) and the reduced aligned embedding (`qarm_dist.rank.feature_store` loads it
from the tables). An item without codes (not yet assigned) gets the padding id
0 in every code table: the documented fallback, counted in the training metrics.
This module reads no table, so the model and these kernels import with torch,
numpy and pyarrow alone (a GPU box or a serving process needs no storage stack).

`featurize` turns a batch of samples into tensors. Item features are computed
once per distinct item of the batch (targets and history together) and
indexed by position, so a history of 50 items with 25 VQ neighbours each costs
a lookup per distinct item, not per position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from qarm_dist.hashing import mix64

PAD = 0  # row 0 of every table is padding (and the fallback for unknown codes)


def hashed_rows(ids: np.ndarray, rows: int, salt: int) -> np.ndarray:
    """Table rows 1..rows-1 for arbitrary int64 ids (row 0 stays padding); negative ids → padding."""
    ids = np.asarray(ids, dtype=np.int64)
    out = (1 + mix64(ids, salt) % np.uint64(rows - 1)).astype(np.int64)
    return np.where(ids < 0, PAD, out)


@dataclass
class Codes:
    """One codebook version's codes, aligned with `ItemFeatures.ids`; 0 = no code."""

    version: int
    k: list[int]  # centroids per RQ level
    rq: np.ndarray  # (n, L) int64, code + 1
    vq: np.ndarray  # (n, K) int64 neighbour item ids, -1 = none
    fsq: np.ndarray | None  # (n,) int64 packed FSQ code + 1
    fsq_size: int  # distinct FSQ codes


@dataclass
class ItemFeatures:
    ids: np.ndarray  # (n,) sorted item ids
    codes: dict[str, Codes] = field(default_factory=dict)  # by role: "rq", "rkfsq"
    emb: np.ndarray | None = None  # (n, e) projected aligned embeddings

    def rows(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index of each id in `ids` and whether it is there."""
        if len(self.ids) == 0:
            return np.zeros(len(item_ids), np.int64), np.zeros(len(item_ids), bool)
        r = np.minimum(np.searchsorted(self.ids, item_ids), len(self.ids) - 1)
        return r, self.ids[r] == item_ids


@dataclass(frozen=True)
class FeatureSpec:
    """What `featurize` builds: table sizes and which item features the variant uses."""

    user_rows: int
    item_rows: int
    ngram_rows: int
    roles: tuple[str, ...]  # RQ-style code features used, by role ("rq", "rkfsq")
    vq: bool  # VQ code (neighbour ids) of the "rq" role's version
    emb: bool
    tasks: tuple[str, ...]
    exposure_task: str = "click"  # the only task sampled negatives carry a label for


def _combined(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def featurize(batch: pa.Table, feats: ItemFeatures, spec: FeatureSpec) -> dict[str, Any]:
    """Tensors for one batch of samples (see `qarm_dist.rank.model.Ranker.forward`)."""
    b = batch.num_rows
    user = batch.column("user_id").to_numpy()
    target = batch.column("item_id").to_numpy()
    hist = _combined(batch.column("history"))
    lengths = pc.list_value_length(hist).to_numpy(zero_copy_only=False)
    n = max(int(lengths.max()) if b else 0, 1)
    flat = pc.list_flatten(hist).to_numpy()
    # right-align histories so the latest item is always in the last column
    pos = np.arange(n)[None, :] >= (n - lengths)[:, None]
    hist_ids = np.full((b, n), -1, np.int64)
    hist_ids[pos] = flat
    uniq, inverse = np.unique(np.concatenate([target, flat]), return_inverse=True)
    u = len(uniq)
    hist_pos = np.full((b, n), u, np.int64)  # u = the padding position (a zero row)
    hist_pos[pos] = inverse[b:]
    # what the user thought of each history item: 0 padding, 1 not liked, 2 liked
    flag = np.zeros((b, n), np.int64)
    flag[pos] = pc.list_flatten(_combined(batch.column("history_like"))).to_numpy() + 1
    out: dict[str, Any] = {
        "user": torch.from_numpy(hashed_rows(user, spec.user_rows, 11)),
        "hist_like": torch.from_numpy(flag),
        "target_pos": torch.from_numpy(inverse[:b].astype(np.int64)),
        "hist_pos": torch.from_numpy(hist_pos),
        "hist_mask": torch.from_numpy(pos),
        "item": torch.from_numpy(hashed_rows(uniq, spec.item_rows, 13)),
    }
    r, found = feats.rows(uniq)
    out["missing_codes"] = int((~found).sum()) if (spec.roles or spec.vq) else 0
    for role in spec.roles:
        c = feats.codes[role]
        rq = np.where(found[:, None], c.rq[r], PAD)
        for lv in range(rq.shape[1]):
            out[f"{role}_l{lv}"] = torch.from_numpy(rq[:, lv])
        for width in range(2, rq.shape[1] + 1):  # prefix n-grams (c1, c2), (c1, c2, c3), ...
            key = np.zeros(u, np.uint64)
            for lv in range(width):
                key = mix64(key ^ rq[:, lv].astype(np.uint64), 17 + lv)
            rows = (1 + key % np.uint64(spec.ngram_rows - 1)).astype(np.int64)
            out[f"{role}_p{width}"] = torch.from_numpy(np.where(rq[:, width - 1] == PAD, PAD, rows))
        if c.fsq is not None:
            out[f"{role}_fsq"] = torch.from_numpy(np.where(found, c.fsq[r], PAD))
    if spec.vq:
        vq = np.where(found[:, None], feats.codes["rq"].vq[r], -1)
        out["vq"] = torch.from_numpy(hashed_rows(vq, spec.item_rows, 19))
    if spec.emb:
        out["emb"] = torch.from_numpy(np.where(found[:, None], feats.emb[r], 0.0).astype(np.float32))
    labels = np.stack([batch.column(t).to_numpy().astype(np.float32) for t in spec.tasks], axis=1)
    sampled = batch.column("sampled").to_numpy() == 1
    mask = np.ones_like(labels, dtype=bool)
    mask[sampled] = np.array([t == spec.exposure_task for t in spec.tasks])
    out["labels"] = torch.from_numpy(labels)
    out["label_mask"] = torch.from_numpy(mask)
    return out
