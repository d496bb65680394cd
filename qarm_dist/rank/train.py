"""`qarm rank train | ablate`: the multi-task ranker on Ray Train.

One `TorchTrainer` run trains a list of *jobs* (variant, seed) in turn: one job
for `qarm rank train`, every variant x seed for `qarm rank ablate`, so an
ablation pays for one worker-group start, not one per model. Per step each
worker featurizes its shard's batch, runs the model, and:

- dense parameters (everything after the table lookups) are inside DDP, which
  averages their gradients over workers;
- the embedding tables are outside DDP: their gradients are sparse (only the
  rows the batch touched), all-reduced by `sync_sparse_grads` and applied by a
  sparse optimizer, so no step holds a dense gradient of a large table.

Every epoch rank 0 checkpoints (job, epoch, weights, both optimizers, results)
and all ranks report the epoch's metrics; a killed worker makes Ray Train
restart the group from the last checkpoint. When a job's last epoch ends,
rank 0 evaluates the model on the evaluation window (`evaluate.predict` +
`evaluate.metrics`) and the figures travel with the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from qarm_dist import faults, models, training
from qarm_dist.codebook import store
from qarm_dist.config import QarmConfig
from qarm_dist.engines import ray_init
from qarm_dist.io.delta import Tables
from qarm_dist.io.schemas import TASKS
from qarm_dist.rank.embeddings import sparse_optimizer, sync_sparse_grads
from qarm_dist.rank.evaluate import check_samples, metrics, predict
from qarm_dist.rank.feature_store import check_feature_tables, code_versions, load_item_features
from qarm_dist.rank.features import featurize
from qarm_dist.rank.metrics import COUNTS, FIGURES
from qarm_dist.rank.model import Ranker, RankerSpec, loss_fn, save_ranker, variant

log = logging.getLogger(__name__)

KIND = "rank"
STATE, RESULTS = "train_state.pt", "results.json"


# ------------------------------------------------------------------ inputs


def plan(
    cfg: QarmConfig, tables: Tables, names: list[str], seeds: list[int]
) -> tuple[list[dict], dict[str, str], dict]:
    """Jobs (variant x seed, as data), the variants skipped and why, and what the workers load."""
    versions = code_versions(tables)
    has_aligned = tables.exists("item_aligned_emb")
    rc = cfg.rank
    code_k, fsq_size = {}, {}
    for role, v in versions.items():
        cb = store.load(tables, v)
        code_k[role] = [len(c) for c in cb.book.centroids]
        fsq_size[role] = int(np.prod(cb.fsq.levels)) if cb.fsq is not None else 0
    jobs, skipped = [], {}
    for name in names:
        v = variant(name)
        missing = [r for r in v.roles if r not in versions] + (
            ["rq"] if v.vq and "rq" not in versions else []
        )
        if missing:
            skipped[name] = f"no codebook version with role {missing[0]} (run `qarm codebook fit`)"
            continue
        if v.needs_aligned and not has_aligned:
            skipped[name] = "no item_aligned_emb (run `qarm align train` and `qarm align embed`)"
            continue
        spec = RankerSpec(
            name,
            TASKS,
            code_k,
            fsq_size,
            rc.user_rows,
            rc.item_rows,
            rc.ngram_rows,
            rc.embedding_dim,
            rc.d_model,
            rc.experts,
            rc.expert_hidden,
            rc.tower_hidden,
            rc.gsu_k,
            rc.emb_dim,
            rc.history_feedback,
        )
        jobs += [{"variant": name, "seed": s, "spec": spec.to_json()} for s in seeds]
    needs_aligned = any(variant(j["variant"]).needs_aligned for j in jobs)
    load = {
        "code_versions": versions,
        "emb_dim": rc.emb_dim if needs_aligned else None,
        "projection_seed": rc.seed,
    }
    return jobs, skipped, load


# ------------------------------------------------------------------ worker


def _unwrap(m: torch.nn.Module) -> torch.nn.Module:
    return m.module if isinstance(m, torch.nn.parallel.DistributedDataParallel) else m


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: every job in turn, resuming at the checkpoint's job and epoch."""
    import ray.train

    ctx = ray.train.get_context()
    rank, size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    load = config["load"]
    feats = load_item_features(
        Tables(config["root"], config["storage_options"]),
        load["code_versions"],
        load["emb_dim"],
        load["projection_seed"],
    )
    state = None
    if ckpt := ray.train.get_checkpoint():
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=False)
        print(f"[rank] worker {rank}: resumed at job {state['job']}, after epoch {state['epoch']}")
    results = state["results"] if state else []  # one per finished job, with its evaluation
    history = state["history"] if state else []  # one per epoch
    train_shard = ray.train.get_dataset_shard("train")
    eval_data = ray.train.get_dataset_shard("eval")
    per_worker = config["batch_size"] // size
    progress = training.Progress("rank", rank, config["batch_size"], config["train_rows"])
    for j in range(state["job"] if state else 0, len(config["jobs"])):
        job = config["jobs"][j]
        spec = RankerSpec.from_json(job["spec"])
        torch.manual_seed(job["seed"])
        model = Ranker(spec)
        opt_dense = torch.optim.AdamW(model.dense.parameters(), lr=config["lr"])
        opt_sparse = sparse_optimizer(
            config["sparse_optimizer"], list(model.sparse.parameters()), config["sparse_lr"]
        )
        start = 0
        if state and state["job"] == j:
            model.load_state_dict(state["model"])
            opt_dense.load_state_dict(state["opt_dense"])
            opt_sparse.load_state_dict(state["opt_sparse"])
            start = state["epoch"] + 1
        dense = torch.nn.parallel.DistributedDataParallel(model.dense) if size > 1 else model.dense
        fspec = spec.feature_spec()
        for epoch in range(start, config["epochs"]):
            model.train()
            progress.start(epoch)
            t0, steps, loss_sum, missing, t_wait = time.time(), 0, 0.0, 0, 0.0
            t_ready = time.time()
            for batch in train_shard.iter_batches(
                batch_size=per_worker,
                batch_format="pyarrow",
                drop_last=True,  # equal steps on every worker: DDP and the sparse all-reduce need it
                local_shuffle_buffer_size=config["shuffle_buffer"] or None,
                local_shuffle_seed=job["seed"] * 1000 + epoch,
            ):
                t_wait += time.time() - t_ready  # time the worker waited on Ray Data for this batch
                faults.maybe_fail(config["fault"], "rank.step", job=j, epoch=epoch, step=steps, rank=rank)
                f = featurize(batch, feats, fspec)
                loss, _ = loss_fn(dense(model.lookups(f), f), f["labels"], f["label_mask"])
                opt_dense.zero_grad(set_to_none=True)
                opt_sparse.zero_grad(set_to_none=True)
                loss.backward()
                sync_sparse_grads(model.sparse)
                opt_dense.step()
                opt_sparse.step()
                steps, loss_sum, missing = (
                    steps + 1,
                    loss_sum + float(loss.detach()),
                    missing + f["missing_codes"],
                )
                progress.step(steps, loss_sum)
                t_ready = time.time()
            totals = torch.tensor([loss_sum, steps, missing], dtype=torch.float64)
            if size > 1:
                dist.all_reduce(totals)
            report = {
                "job": j,
                "variant": job["variant"],
                "seed": job["seed"],
                "epoch": epoch,
                "loss": float(totals[0] / max(totals[1], 1)),
                "samples": int(totals[1]) * per_worker,
                "items_without_codes": int(totals[2]),
                "seconds": time.time() - t0,
                "seconds_waiting_for_data": t_wait,
                "resumed_from": state["epoch"]
                if state and state["job"] == j and epoch == start and start
                else None,
            }
            last = epoch == config["epochs"] - 1
            if last and rank == 0:
                model.eval()
                report["eval"] = metrics(
                    (
                        predict(model, feats, b)
                        for b in eval_data.iter_batches(batch_size=8192, batch_format="pyarrow")
                    ),
                    spec.tasks,
                    config["popularity_buckets"],
                )
            history.append({k: v for k, v in report.items() if k != "eval"})
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:
                    if last:
                        results.append(report)
                    done = {"job": j + 1, "epoch": -1} if last else {"job": j, "epoch": epoch}
                    torch.save(
                        {
                            **done,
                            "model": model.state_dict(),
                            "opt_dense": opt_dense.state_dict(),
                            "opt_sparse": opt_sparse.state_dict(),
                            "results": results,
                            "history": history,
                        },
                        os.path.join(d, STATE),
                    )
                    save_ranker(model, d)
                    with open(os.path.join(d, RESULTS), "w") as fh:
                        json.dump({"results": results, "history": history}, fh)
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                ray.train.report({k: v for k, v in report.items() if k != "eval"}, checkpoint=checkpoint)
        state = None


# ------------------------------------------------------------------ driver


def fit(cfg: QarmConfig, version: str, names: list[str], seeds: list[int]) -> models.ModelInfo:
    """Train (and evaluate) every (variant, seed) job in one Ray Train run; publish the run as ``version``."""
    tables = Tables.from_config(cfg)
    try:
        return models.find(tables, KIND, version)
    except FileNotFoundError:
        pass
    rc = cfg.rank
    if rc.batch_size % rc.workers:
        raise ValueError(f"rank.batch_size {rc.batch_size} must be a multiple of rank.workers {rc.workers}")
    ray_init(cfg)
    counts = check_samples(tables)
    jobs, skipped, load = plan(cfg, tables, names, seeds)
    check_feature_tables(tables, load["code_versions"], load["emb_dim"])
    for name, why in skipped.items():
        log.warning("rank: variant %s skipped: %s", name, why)
    if not jobs:
        raise ValueError(f"no ranker variant can run here: {skipped}")
    log.info(
        "rank: %d jobs (%s x seeds %s) on %s samples",
        len(jobs),
        [n for n in names if n not in skipped],
        seeds,
        counts,
    )
    snap = tables.snapshot("samples")
    samples = tables.ray("samples", snap.version)
    datasets = {
        "train": samples.filter(expr="split == 'train'"),
        "eval": samples.filter(expr="split == 'eval'"),
    }
    loop_config = {
        "root": tables.root,
        "storage_options": tables.storage_options,
        "load": load,
        "jobs": jobs,
        "epochs": rc.epochs,
        "batch_size": rc.batch_size,
        "lr": rc.lr,
        "sparse_lr": rc.sparse_lr,
        "sparse_optimizer": rc.sparse_optimizer,
        "threads": max(1, int(rc.cpus_per_worker)),
        "shuffle_buffer": rc.shuffle_buffer,
        "train_rows": counts["train"],
        "popularity_buckets": rc.popularity_buckets,
        "fault": faults.from_env(),
    }
    uri, run = training.run(
        tables,
        KIND,
        version,
        train_loop,
        loop_config,
        datasets,
        # gloo: the sparse all-reduce of the tables needs it (NCCL has none)
        training.Scaling(rc.workers, rc.cpus_per_worker, False, "gloo", rc.max_failures, keep=1),
        RESULTS,
        split=["train"],  # rank 0 evaluates the whole window
    )
    return models.publish(
        tables,
        KIND,
        version,
        uri,
        {
            "jobs": [{k: v for k, v in j.items() if k != "spec"} for j in jobs],
            "skipped": skipped,
            "tasks": list(TASKS),
            "samples_version": snap.version,
            "samples": counts,
            **load,
            "config": rc.model_dump(),
            **run,
        },
    )


def train(cfg: QarmConfig, version: str) -> models.ModelInfo:
    """`qarm rank train`: the configured variant and seed."""
    return fit(cfg, version, [cfg.rank.variant], [cfg.rank.seed])


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = np.array([x for x in values if x == x], dtype=np.float64)  # NaN-free
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize(info: models.ModelInfo, main_task: str) -> dict[str, Any]:
    """report.json["ranker"]: per variant and task, the mean of every figure over seeds, with spread and counts."""
    by_variant: dict[str, list[dict]] = {}
    for r in info.meta["results"]:
        by_variant.setdefault(r["variant"], []).append(r["eval"])
    out: dict[str, Any] = {}
    for name, evals in by_variant.items():
        out[name] = {}
        for task in info.meta["tasks"]:
            per_seed = [e[task] for e in evals]
            row: dict[str, Any] = {}
            for key in FIGURES:
                # .get: runs published before a figure existed report it as NaN
                row[key], row[f"{key}_std"] = _mean_std([p.get(key, float("nan")) for p in per_seed])
            buckets = per_seed[0]["auc_by_popularity"]
            row["auc_by_popularity"] = {
                b: _mean_std([p["auc_by_popularity"][b] for p in per_seed])[0] for b in buckets
            }
            row["counts"] = {k: per_seed[0].get(k) for k in COUNTS}
            row["seeds"] = len(per_seed)
            out[name][task] = row
    return {
        "variants": out,
        "main_task": main_task,
        "skipped": info.meta["skipped"],
        "samples": info.meta["samples"],
        "model": info.version,
        "epochs": info.meta["config"]["epochs"],
    }


def ablate(cfg: QarmConfig, run_id: str) -> dict[str, Any]:
    """`qarm rank ablate`: every configured variant x ``rank.seeds`` seeds, same data; the report section."""
    rc = cfg.rank
    info = fit(cfg, run_id, rc.variants, list(range(rc.seed, rc.seed + rc.seeds)))
    return summarize(info, rc.main_task)
