"""Scoring and evaluation of the ranker on the evaluation window.

`predict` scores a batch of samples; the same function runs inside the
training workers (the ablation evaluates each model when it finishes) and
inside the Ray Data actors of `qarm rank eval`. `metrics` turns predictions
into every figure of every task (`qarm_dist.rank.metrics`), on the rows that
carry the task's label: sampled negatives count for the exposure task (click)
only. Leak-free by construction: the samples' split, the item popularity
(train window only), the codes and the alignment all come from before the
evaluation window.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from qarm_dist import models
from qarm_dist.config import QarmConfig
from qarm_dist.engines import ray_init
from qarm_dist.io.delta import TableError, Tables
from qarm_dist.io.raydata import map_blocks
from qarm_dist.io.schemas import TASKS
from qarm_dist.rank.feature_store import check_feature_tables, load_item_features
from qarm_dist.rank.features import ItemFeatures, featurize
from qarm_dist.rank.metrics import task_metrics
from qarm_dist.rank.model import Ranker, load_ranker

log = logging.getLogger(__name__)

KIND = "rank"


@torch.no_grad()
def predict(model: Ranker, feats: ItemFeatures, batch: pa.Table) -> pa.Table:
    """Per row: user, item and user train-window counts, and per task the label, whether it is observed, the probability."""
    spec = model.spec
    f = featurize(batch, feats, spec.feature_spec())
    probs = torch.sigmoid(model(f)).numpy()
    cols = {
        "user_id": batch.column("user_id"),
        "item_pop": batch.column("item_pop"),
        "user_pop": batch.column("user_pop"),
    }
    mask = f["label_mask"].numpy()
    for i, task in enumerate(spec.tasks):
        cols[f"label_{task}"] = pa.array(f["labels"][:, i].numpy().astype(np.int8))
        cols[f"observed_{task}"] = pa.array(mask[:, i])
        cols[f"prob_{task}"] = pa.array(probs[:, i])
    return pa.table(cols)


def metrics(
    predictions: Iterable[pa.Table | pa.RecordBatch], tasks: tuple[str, ...], edges: list[int]
) -> dict[str, Any]:
    """{task: figures} over all predictions (held in memory: 4 numbers per evaluation row)."""
    parts = [p if isinstance(p, pa.Table) else pa.Table.from_batches([p]) for p in predictions]
    if not parts:
        raise ValueError("no predictions to evaluate")
    t = pa.concat_tables(parts)
    out = {}
    for task in tasks:
        keep = t.filter(pc.field(f"observed_{task}"))
        out[task] = task_metrics(
            keep.column("user_id").to_numpy(),
            keep.column(f"label_{task}").to_numpy(),
            keep.column(f"prob_{task}").to_numpy(),
            keep.column("item_pop").to_numpy(),
            keep.column("user_pop").to_numpy(),
            edges,
        )
    return out


def _sample_counts(batch: pa.Table) -> pa.Table:
    split = batch.column("split").to_numpy(zero_copy_only=False)
    sampled = batch.column("sampled").to_numpy() == 1
    bad = {t: (~np.isin(batch.column(t).to_numpy(), (0, 1))).sum() for t in (*TASKS, "sampled")}
    return pa.table(
        {
            "train": [int((split == "train").sum())],
            "eval": [int((split == "eval").sum())],
            "eval_real": [int(((split == "eval") & ~sampled).sum())],
            "eval_cold": [int(((split == "eval") & (batch.column("item_pop").to_numpy() == 0)).sum())],
            **{f"bad_{t}": [int(n)] for t, n in bad.items()},
        }
    )


def check_samples(tables: Tables) -> dict[str, int]:
    """Counts by split, and a clear error for labels outside {0, 1} or an empty window (one Ray Data pass)."""
    snap = tables.snapshot("samples")
    if snap.rows == 0:
        raise TableError("samples", None, 0, 0, "exist: the table is empty; run `qarm samples`")
    cols = ["split", "sampled", "item_pop", *TASKS]
    sums = (
        tables.ray("samples", snap.version, cols)
        .map_batches(_sample_counts, batch_format="pyarrow")
        .sum(["train", "eval", "eval_real", "eval_cold", *(f"bad_{t}" for t in (*TASKS, "sampled"))])
    )
    counts = {k[4:-1]: int(v) for k, v in sums.items()}
    for t in (*TASKS, "sampled"):
        if counts[f"bad_{t}"]:
            raise TableError("samples", t, counts[f"bad_{t}"], snap.rows, "have a label outside {0, 1}")
    for split in ("train", "eval"):
        if counts[split] == 0:
            raise TableError(
                "samples",
                "split",
                0,
                snap.rows,
                f"are in split '{split}': the {'evaluation' if split == 'eval' else 'training'} window is empty; "
                "rebuild `qarm samples` with another split.eval_fraction",
            )
    return {k: v for k, v in counts.items() if not k.startswith("bad_")}


def load_published(info: models.ModelInfo, storage_options: dict[str, str] | None = None) -> Ranker:
    """A published run's final model (its last job), in eval mode."""
    with models.local_checkpoint(info, storage_options) as d:
        return load_ranker(d)


class RankScorer:
    """Ray Data actor model: eval samples in, predictions out, with a published ranker."""

    def __init__(self, info: models.ModelInfo, root: str, storage_options: dict[str, str], threads: int):
        torch.set_num_threads(threads)
        self.model = load_published(info, storage_options)
        meta = info.meta
        self.feats = load_item_features(
            Tables(root, storage_options), meta["code_versions"], meta["emb_dim"], meta["projection_seed"]
        )

    def __call__(self, block: pa.Table) -> pa.Table:
        return predict(self.model, self.feats, block)


def evaluate(cfg: QarmConfig, version: str | None = None) -> dict[str, Any]:
    """Metrics of a published ranker on the evaluation window, scored by Ray Data actors."""
    tables = Tables.from_config(cfg)
    info = models.find(tables, KIND, version)
    counts = check_samples(tables)
    check_feature_tables(tables, info.meta["code_versions"], info.meta["emb_dim"])
    ray_init(cfg)
    ds = tables.ray("samples").filter(expr="split == 'eval'")
    scored = map_blocks(
        ds,
        RankScorer,
        {"info": info, "root": tables.root, "storage_options": tables.storage_options, "threads": 1},
        actors=1,
        cpus_per_actor=cfg.rank.cpus_per_worker,
        gpus_per_actor=0,
        rows_per_block=8192,
    )
    out = metrics(
        scored.iter_batches(batch_size=None, batch_format="pyarrow"),
        tuple(info.meta["tasks"]),
        cfg.rank.popularity_buckets,
    )
    return {
        "model": info.version,
        "variant": info.meta["jobs"][-1]["variant"],
        "samples": counts,
        "metrics": out,
    }
