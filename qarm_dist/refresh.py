"""`qarm refresh`: keep semantic IDs current while new items arrive, as one idempotent job.

In production items arrive continuously; re-encoding and re-coding the whole catalogue for each
batch would cost O(items) for O(new) rows. A refresh does only the new work, in order:

1. ``content``: encode the items of `items` that have no row in `item_content_emb` and append them
   (`embed.embed_new`: Spark finds them, Ray Data encodes them, `qarm_dist.io.handoff`);
2. ``aligned``: when a codebook in play (the current one, or the refit's source) is fitted on
   `item_aligned_emb`, embed the new content rows with the model that produced that table's rows and
   append them (`align.infer.embed_new`, the same way), so the table stays one model;
3. ``assign``: codes of the current (latest) codebook version for every item without them
   (`codebook.stage.run_assign`, Spark): the new items, and any that an earlier run left uncoded;
4. with ``refit``: ``fit`` a new codebook version (`codebook.stage.run_fit`, Spark), then
   ``assign-refit`` it to every item.

Each step commits at most one table version, under its own run id derived from the job's
(``<run id>.<step>``, `step_run_id`): `item_codes` is written twice by a refit, and a Delta app
transaction marks one run id per table. Every step first asks whether its run id already committed
and skips if so, so a job that died between two tables is finished by re-running its run id: the
committed steps are skipped, the later ones done, and no rows are added twice. A step that finds
nothing to do commits nothing (no empty versions), so a refresh without new items is a no-op.

Engines: one driver runs both, Ray Data for the inference (`ray.address`) and Spark for the
anti-joins and the codes (`spark.master`); `qarm submit refresh` runs it through spark-submit and
points that driver at the cluster's Ray as well (`qarm_dist.submit`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from qarm_dist.align.infer import embed_new as embed_aligned_new
from qarm_dist.codebook import stage, store
from qarm_dist.config import QarmConfig
from qarm_dist.embed.stage import embed_new as embed_content_new
from qarm_dist.engines import spark_session
from qarm_dist.io.delta import CommitResult, Tables

log = logging.getLogger(__name__)

ALIGNED = "item_aligned_emb"


@dataclass(frozen=True)
class Step:
    """What one step did: ``status`` is committed, already committed (by this run id), or nothing new."""

    step: str
    table: str
    status: str
    rows: int  # rows this call added to ``table``
    version: int | None  # ``table``'s version after the step (None: the table does not exist)
    codebook: int | None = None  # the codebook version, for fit and assign steps

    def describe(self) -> str:
        cb = f" (codebook v{self.codebook})" if self.codebook is not None else ""
        added = f", {self.rows} rows added" if self.status == "committed" else ""
        return f"{self.step}{cb}: {self.status}{added}; {self.table} version {self.version}"


def step_run_id(run_id: str, step: str) -> str:
    """The run id under which ``step`` of refresh ``run_id`` commits (one per table write)."""
    return f"{run_id}.{step}"


def _append(
    cfg: QarmConfig,
    tables: Tables,
    run_id: str,
    step: str,
    table: str,
    embed_new: Callable[[QarmConfig, str], tuple[CommitResult | None, int]],
) -> Step:
    """An incremental embedding step: ``embed_new`` appends rows for the items ``table`` lacks."""
    result, rows = embed_new(cfg, step_run_id(run_id, step))
    if result is None:
        return Step(step, table, "nothing new", 0, tables.version(table))
    return Step(step, table, "already committed" if result.skipped else "committed", rows, result.version)


def _assign(cfg: QarmConfig, tables: Tables, run_id: str, step: str, version: int) -> Step:
    """Codes of codebook ``version`` for the items without them; nothing committed when there are none."""
    step_id = step_run_id(run_id, step)
    if done := tables.already_committed("item_codes", step_id):
        return Step(step, "item_codes", "already committed", 0, done.version, version)
    todo = stage.uncoded(spark_session(cfg), tables, store.load(tables, version)).count()
    if todo == 0:
        return Step(step, "item_codes", "nothing new", 0, tables.version("item_codes"), version)
    result, _ = stage.run_assign(cfg, step_id, version)
    return Step(step, "item_codes", "committed", todo, result.version, version)


def _fit(cfg: QarmConfig, tables: Tables, run_id: str, fitted: int | None) -> Step:
    """A new codebook version, unless this run id already fitted one (``fitted``): never two."""
    if fitted is not None:
        return Step("fit", "codebooks", "already committed", 0, tables.version("codebooks"), fitted)
    result, cb = stage.run_fit(cfg, step_run_id(run_id, "fit"))
    return Step("fit", "codebooks", "committed", cb.to_table().num_rows, result.version, cb.version)


def _fitted_by(tables: Tables, fit_id: str) -> int | None:
    """The codebook version the run id ``fit_id`` fitted, if it did (a resumed refit)."""
    if not tables.committed("codebooks", fit_id):
        return None
    return next(
        (v for v in reversed(store.versions(tables)) if store.load(tables, v).info["run_id"] == fit_id), None
    )


def run_refresh(cfg: QarmConfig, run_id: str, refit: bool = False) -> dict[str, Any]:
    """Embed new items, code them with the current codebook and (``refit``) fit and assign a new version.

    Returns a summary: each step's outcome (``steps``), the new items embedded and aligned, the
    codes assigned, and the codebook versions involved. Re-running ``run_id`` resumes a job that
    died, or adds nothing when it had finished.
    """
    tables = Tables.from_config(cfg)
    fitted = _fitted_by(tables, step_run_id(run_id, "fit")) if refit else None
    current = max((v for v in store.versions(tables) if v != fitted), default=None)
    if current is None and not refit:
        raise ValueError(
            "no codebook version to refresh yet: run `qarm codebook fit`, or `qarm refresh --refit` to fit one"
        )
    sources = set()
    if current is not None:
        sources.add(store.load(tables, current).info["source"])
    if refit:
        fit_source = store.load(tables, fitted).info["source"] if fitted is not None else None
        sources.add(fit_source or stage.source_table(cfg.codebook, tables))

    steps: list[Step] = []

    def record(step: Step) -> Step:
        log.info("refresh %s: %s", run_id, step.describe())
        steps.append(step)
        return step

    record(_append(cfg, tables, run_id, "content", "item_content_emb", embed_content_new))
    if ALIGNED in sources:
        record(_append(cfg, tables, run_id, "aligned", ALIGNED, embed_aligned_new))
    if current is not None:
        record(_assign(cfg, tables, run_id, "assign", current))
    if refit:
        fitted = record(_fit(cfg, tables, run_id, fitted)).codebook
        record(_assign(cfg, tables, run_id, "assign-refit", fitted))

    by = {s.step: s for s in steps}
    return {
        "run_id": run_id,
        "new_items_embedded": by["content"].rows,
        "new_items_aligned": by["aligned"].rows if "aligned" in by else None,
        "codebook_version": current,
        "codes_assigned": by["assign"].rows if "assign" in by else 0,
        "fitted_version": fitted,
        "refit_codes_assigned": by["assign-refit"].rows if refit else None,
        "steps": [asdict(s) for s in steps],
    }
