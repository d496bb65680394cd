"""The judge stage (QARM V2): a filter applied to candidate pairs after generation.

QARM V2 asks an LLM whether two items really belong together and drops the
pairs it rejects (a small LLM rejected over 10 % of Swing pairs, a large one
over 70 % of U2I pairs). Here a judge is anything with a ``name``, the item
columns it ``needs`` ("emb" for `item_content_emb.emb`, "text" for
`items.text`), and ``keep(batch) -> bool mask``. The stage joins the needed
columns onto every candidate as ``trigger_<col>`` / ``target_<col>`` and calls
``keep`` once per Arrow batch inside the Spark tasks.

Plugging in an LLM judge: write a class with ``needs = ("text",)`` whose
``keep`` sends ``batch["trigger_text"]`` and ``batch["target_text"]`` to the
model (batched) and returns the verdicts, register it in `JUDGES`, and set
``pairs.judge`` to its name. Everything else (stats per source, filtering)
is the stage's.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class PairJudge(Protocol):
    name: str
    needs: tuple[str, ...]

    def keep(self, batch: pa.Table) -> np.ndarray:
        """Boolean mask over the batch's rows: True keeps the pair."""
        ...


class ContentJudge:
    """Rejects pairs whose content embeddings disagree: cosine below ``min_cosine``.

    Only pairs far apart in content are dropped: pairs that look different but
    behave alike are exactly what alignment learns from, so the default
    threshold is low.
    """

    name = "content"
    needs = ("emb",)

    def __init__(self, min_cosine: float = 0.0):
        self.min_cosine = min_cosine

    def keep(self, batch: pa.Table) -> np.ndarray:
        a, b = batch.column("trigger_emb"), batch.column("target_emb")
        ok = ~(pc.is_null(a).to_numpy(zero_copy_only=False) | pc.is_null(b).to_numpy(zero_copy_only=False))
        keep = np.ones(batch.num_rows, dtype=bool)  # a pair the judge cannot see is kept
        if ok.any():
            rows = np.flatnonzero(ok)
            dim = len(a[int(rows[0])])
            ea = pc.list_flatten(a.filter(pa.array(ok))).to_numpy().reshape(-1, dim)
            eb = pc.list_flatten(b.filter(pa.array(ok))).to_numpy().reshape(-1, dim)
            keep[rows] = (ea * eb).sum(axis=1) >= self.min_cosine
        return keep


class KeepAll:
    name = "none"
    needs: tuple[str, ...] = ()

    def keep(self, batch: pa.Table) -> np.ndarray:
        return np.ones(batch.num_rows, dtype=bool)


def make_judge(name: str, min_cosine: float) -> PairJudge:
    if name == "content":
        return ContentJudge(min_cosine)
    if name == "none":
        return KeepAll()
    raise ValueError(f"unknown pair judge {name!r}; known: content, none")
