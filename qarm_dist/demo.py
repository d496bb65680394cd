"""`qarm demo`: every stage that exists, in order, on one data source, then the report.

The stages are the same public functions the CLI, the jobs and the notebooks
call; the demo only chooses the order and gathers the report sections.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qarm_dist.align.evaluate import evaluate as evaluate_alignment
from qarm_dist.align.infer import run_embed as embed_aligned
from qarm_dist.align.train import train_models as train_alignment
from qarm_dist.codebook import stage as codebook
from qarm_dist.config import QarmConfig
from qarm_dist.data.ingest import write_movielens, write_world
from qarm_dist.data.split import tables_eval_start
from qarm_dist.data.summary import dataset_summary
from qarm_dist.embed import run_embed
from qarm_dist.engines import spark_session
from qarm_dist.io.delta import Tables
from qarm_dist.pairs import run_pairs
from qarm_dist.rank import train as rank_train
from qarm_dist.rank.samples import run_samples
from qarm_dist.report import tables_section, write_report

log = logging.getLogger(__name__)


def run_codes(cfg: QarmConfig, run_id: str) -> dict[str, Any]:
    """Fit and assign the two quantizers the papers compare; their SID quality by name."""
    cc = cfg.codebook
    variants = {
        "rq": cc.model_copy(update={"fsq_levels": []}),
        "rkfsq": cc.model_copy(update={"levels": cc.rkfsq_levels, "fsq_levels": cc.rkfsq_fsq}),
    }
    out = {}
    for name, variant in variants.items():
        _, cb = codebook.run_fit(cfg, f"{run_id}-{name}", variant)
        codebook.run_assign(cfg, f"{run_id}-{name}", cb.version)
        out[name] = codebook.quality(cfg, cb.version)
    return out


def run_alignment(cfg: QarmConfig, run_id: str) -> dict[str, Any]:
    """Train ``align.seeds`` models, embed every item with the first, and evaluate them all."""
    ac = cfg.align
    infos = train_alignment(cfg, f"{run_id}-align", list(range(ac.seed, ac.seed + ac.seeds)))
    embed_aligned(cfg, run_id, infos[0].version)
    return evaluate_alignment(cfg, infos)


def run_ranker(cfg: QarmConfig, run_id: str) -> dict[str, Any]:
    """Build the samples, then train and evaluate every ranker variant x seed (the QARM ablation)."""
    run_samples(cfg, run_id)
    return rank_train.ablate(cfg, f"{run_id}-rank")


def run_demo(cfg: QarmConfig, run_id: str, movielens: str | None = None) -> dict[str, Any]:
    """Run the pipeline on the configured world (or a MovieLens folder) and write the report.

    Returns the report; ``report.json`` and ``report.md`` land in the table root.
    """
    tables = Tables.from_config(cfg)
    if "://" in tables.root:
        raise ValueError("qarm demo writes its report next to the tables: give a local --root")
    if movielens:
        log.info("[1/7] ingest MovieLens from %s", movielens)
        write_movielens(cfg, movielens, run_id)
        name = f"movielens ({Path(movielens).name})"
    else:
        log.info("[1/7] generate the %s world (seed %d)", cfg.world.size, cfg.world.seed)
        write_world(cfg, run_id)
        name = f"world:{cfg.world.size} (seed {cfg.world.seed})"
    log.info("[2/7] embed item text with %s", cfg.encoder.name)
    run_embed(cfg, run_id)
    log.info("[3/7] build item pairs")
    _, pairs = run_pairs(cfg, run_id)
    log.info("[4/7] align item embeddings to the pairs (%d seeds)", cfg.align.seeds)
    alignment = run_alignment(cfg, run_id)
    log.info("[5/7] codebooks on the aligned embeddings: residual K-means (rq) and Res-KmeansFSQ (rkfsq)")
    codes = run_codes(cfg, run_id)
    log.info("[6/7] ranker: samples, then %d variants x %d seeds", len(cfg.rank.variants), cfg.rank.seeds)
    ranker = run_ranker(cfg, run_id)
    log.info("[7/7] summarise and write the report")
    spark = spark_session(cfg)
    report: dict[str, Any] = {
        "run_id": run_id,
        "dataset": dataset_summary(spark, tables, tables_eval_start(tables, cfg.split.eval_fraction), name),
        "pairs": pairs,
        "alignment": alignment,
        "codes": codes,
        "ranker": ranker,
    }
    report["tables"] = tables_section(tables)
    json_path, md_path = write_report(report, tables.root)
    log.info("report: %s and %s", json_path, md_path)
    return report
