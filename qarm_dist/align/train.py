"""`qarm align train`: sharded contrastive alignment on Ray Train.

The driver builds the training set once (`data.load_pairs`), and a
`TorchTrainer` runs `train_loop` on ``align.workers`` workers (DDP, gloo on
CPU, NCCL on GPU). Each worker holds its shard of the pairs in memory when it
fits (`ShardCache`; else it streams the shard every epoch), embeds both sides
with the tower, and takes a step on the symmetric InfoNCE of the *global*
batch (`loss.info_nce`). Every epoch, rank 0 checkpoints the tower
and optimiser and every rank reports the epoch's metrics; a worker that dies
makes Ray Train restart the group from the last checkpoint
(``align.max_failures`` times). When the run finishes the driver publishes
the model (`qarm_dist.models`): its version is the run id.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from qarm_dist import faults, models, training
from qarm_dist.align.data import PairData, load_pairs, log_frequency
from qarm_dist.align.loss import Batch, info_nce
from qarm_dist.align.model import ResidualTower, TextTower, build_tower, save_tower
from qarm_dist.config import QarmConfig
from qarm_dist.engines import ray_init, torch_device
from qarm_dist.io.delta import Tables

log = logging.getLogger(__name__)

KIND = "align"
STATE, HISTORY = "train_state.pt", "history.json"


def tower_spec(cfg: QarmConfig, dim: int | None) -> dict[str, Any]:
    if cfg.align.mode == "finetune":
        return {"kind": "text", "encoder": cfg.encoder.name}
    return {"kind": "residual", "dim": dim, "hidden": cfg.align.hidden}


def _ids(batch: pa.Table, col: str) -> torch.Tensor:
    return torch.from_numpy(batch.column(col).to_numpy().astype(np.int64))


def _logq(batch: pa.Table, col: str, endpoints: int) -> torch.Tensor:
    counts = pc.fill_null(batch.column(col), 1).to_numpy().astype(np.float64)
    return torch.from_numpy(log_frequency(counts, endpoints))


# a step's inputs: the tower's input of both sides (a's rows, then b's), ids (2, n), logQ (2, n) or None
Step = tuple[Any, torch.Tensor, torch.Tensor | None]


def step_inputs(batch: pa.Table, tower: ResidualTower | TextTower, logq: bool, endpoints: int) -> Step:
    """One Arrow batch of n pairs → the tower's input (2n rows), ids (2, n) and logQ (2, n) or None."""
    col = tower.column
    x = tower.inputs(batch.column(f"trigger_{col}"), batch.column(f"target_{col}"))
    ids = torch.stack([_ids(batch, "trigger_id"), _ids(batch, "target_id")])
    q = None
    if logq:
        q = torch.stack([_logq(batch, "trigger_n", endpoints), _logq(batch, "target_n", endpoints)])
    return x, ids, q


def shard_bytes(rows: int, workers: int, dim: int) -> int:
    """At most the memory a worker's `ShardCache` takes: its pairs' ids, rows and logQ, and content."""
    return -(-rows // workers) * 2 * (dim * 4 + 8 + 8 + 4)


class ShardCache:
    """A worker's whole shard of pairs in memory, for the residual tower's epochs.

    Why: Ray Data's streaming split feeds a worker from threads of its own process and from
    the split coordinator, beside the steps. On a node whose cores the workers fill, they
    wait for their batches (two one-core workers on two cores: 31 % of the time, against
    1 % from memory; docs/benchmarks.md, "Alignment training"). A shard that fits in
    ``align.worker_cache_mb`` is read from Ray Data once; every epoch is then a permutation of it
    drawn in memory, as a single-process loop does. The permutation is seeded by the
    epoch, so a run restarted from a checkpoint sees the batches the uninterrupted run saw.

    The content is held once per distinct item (``content``), and each pair side as a row of
    it (``rows``), so a batch gathers from a table of the shard's items, not of its pairs.
    """

    def __init__(self, steps: Iterable[Step]):
        seen_ids, seen_x, ids, logq = [], [], [], []
        for x, i, q in steps:  # keep each batch's distinct items only: the peak stays near the shard's items
            distinct, first = np.unique(i.reshape(-1).numpy(), return_index=True)  # x's rows: a's, then b's
            seen_ids.append(distinct)
            seen_x.append(x[torch.from_numpy(first)])
            ids.append(i)
            logq.append(q)
        items, first = np.unique(np.concatenate(seen_ids), return_index=True)
        self.content = torch.cat(seen_x)[torch.from_numpy(first)]  # (distinct items, dim)
        self.ids = torch.cat(ids, dim=1)  # (2, pairs)
        self.rows = torch.from_numpy(np.searchsorted(items, self.ids.numpy()))  # rows of content
        self.logq = None if logq[0] is None else torch.cat(logq, dim=1)

    @property
    def pairs(self) -> int:
        return self.ids.shape[1]

    def truncate(self, pairs: int) -> None:
        """Keep the first ``pairs`` pairs (every worker takes the same number of steps)."""
        self.ids, self.rows = self.ids[:, :pairs], self.rows[:, :pairs]
        self.logq = None if self.logq is None else self.logq[:, :pairs]

    def batches(self, size: int, seed: int) -> Iterator[Step]:
        """The epoch's full batches of ``size`` pairs, in a permutation seeded by ``seed``."""
        perm = torch.randperm(self.pairs, generator=torch.Generator().manual_seed(seed))
        for i in range(0, self.pairs - size + 1, size):
            idx = perm[i : i + size]
            q = None if self.logq is None else self.logq[:, idx]
            yield self.content[self.rows[:, idx].reshape(-1)], self.ids[:, idx], q


def _load_shard(shard: Any, tower: ResidualTower, config: dict[str, Any], device: torch.device) -> ShardCache:
    """Read the worker's shard once; with several workers, keep the pairs every worker has.

    The count goes through the training process group, so it lives on the training device (NCCL
    reduces CUDA tensors only).
    """
    t0 = time.time()
    batches = shard.iter_batches(batch_size=8192, batch_format="pyarrow")
    cache = ShardCache(step_inputs(b, tower, config["logq"], config["endpoints"]) for b in batches)
    if dist.is_available() and dist.is_initialized():
        pairs = torch.tensor([cache.pairs], device=device)
        dist.all_reduce(pairs, op=dist.ReduceOp.MIN)
        cache.truncate(int(pairs))
    print(
        f"[align] holding {cache.pairs:,} pairs of {len(cache.content):,} items in memory "
        f"(read in {time.time() - t0:.1f} s)",
        flush=True,
    )
    return cache


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: resume from the last checkpoint if any, then epochs of InfoNCE steps."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    tower = build_tower(config["tower"])
    lr = config["lr"]
    opt = torch.optim.AdamW(tower.parameters(), lr=lr, weight_decay=config["weight_decay"])
    start, history = 0, []
    if ckpt := ray.train.get_checkpoint():
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, STATE), map_location="cpu")
        tower.load_state_dict(state["tower"])
        opt.load_state_dict(state["optimizer"])
        start, history = state["epoch"] + 1, state["history"]
        print(f"[align] rank {rank}: resumed from the checkpoint of epoch {state['epoch']}")
    model = ray.train.torch.prepare_model(tower)  # DDP when size > 1, and the right device
    device = next(model.parameters()).device
    shard = ray.train.get_dataset_shard("train")
    per_worker = config["batch_size"] // size
    cache = _load_shard(shard, tower, config, device) if config["cache"] else None
    progress = training.Progress("align", rank, config["batch_size"], config["train_rows"])
    for epoch in range(start, config["epochs"]):
        progress.start(epoch)
        seed = config["seed"] * 1000 + epoch
        if cache is not None:
            steps_in = cache.batches(per_worker, seed)
        else:
            arrow = shard.iter_batches(
                batch_size=per_worker,
                batch_format="pyarrow",
                drop_last=True,  # every worker takes the same number of equal steps (the all-gather needs it)
                local_shuffle_buffer_size=config["shuffle_buffer"] or None,
                local_shuffle_seed=seed,
            )
            steps_in = (step_inputs(b, tower, config["logq"], config["endpoints"]) for b in arrow)
        t0, steps, loss_sum, acc_sum, t_wait = time.time(), 0, 0.0, 0.0, 0.0
        model.train()
        t_ready = time.time()
        for x, ids, q in steps_in:
            t_wait += time.time() - t_ready  # time the worker waited for this batch (Ray Data or memory)
            faults.maybe_fail(config["fault"], "align.step", epoch=epoch, step=steps, rank=rank)
            emb = model(x.to(device) if isinstance(x, torch.Tensor) else x)
            n, ids = ids.shape[1], ids.to(device)
            b = Batch(emb[:n], emb[n:], ids[0], ids[1])
            if q is not None:
                b.a_logq, b.b_logq = q[0].to(device), q[1].to(device)
            to_backward, loss, acc = info_nce(b, config["temperature"])
            opt.zero_grad(set_to_none=True)
            to_backward.backward()
            opt.step()
            steps, loss_sum, acc_sum = steps + 1, loss_sum + float(loss), acc_sum + float(acc)
            progress.step(steps, loss_sum)
            t_ready = time.time()
        metrics = {
            "epoch": epoch,
            "loss": loss_sum / max(steps, 1),
            "accuracy": acc_sum / max(steps, 1),
            "steps": steps,
            "pairs": steps * config["batch_size"],
            "seconds": time.time() - t0,
            "seconds_waiting_for_data": t_wait,
            "shard_in_memory": cache is not None,
            "resumed_from": start - 1 if start else None,
        }
        history.append(metrics)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                state = {"tower": tower.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch}
                torch.save({**state, "history": history}, os.path.join(d, STATE))
                with open(os.path.join(d, HISTORY), "w") as fh:
                    json.dump(history, fh)
                save_tower(tower, d)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)


def train(
    cfg: QarmConfig, version: str, seed: int | None = None, data: PairData | None = None
) -> models.ModelInfo:
    """Train one alignment model (``seed`` defaults to ``align.seed``) and publish it as ``version``.

    A version that is already published is returned as is (re-running a run id trains nothing);
    one that started but did not finish resumes from its last checkpoint.
    """
    tables = Tables.from_config(cfg)
    ac = cfg.align
    seed = ac.seed if seed is None else seed
    try:
        return models.find(tables, KIND, version)
    except FileNotFoundError:
        pass
    if ac.batch_size % ac.workers:
        raise ValueError(f"align.batch_size {ac.batch_size} must be a multiple of align.workers {ac.workers}")
    ray_init(cfg)
    column = "text" if ac.mode == "finetune" else "emb"
    data = data or load_pairs(tables, column, ac.logq, ac.join_partitions)
    if data.rows < ac.batch_size:
        raise ValueError(
            f"table 'item_pairs' has {data.rows} train pairs, fewer than one batch (align.batch_size "
            f"{ac.batch_size}); lower align.batch_size"
        )
    use_gpu = torch_device(cfg) == "cuda"
    # decided here, once, so every worker takes the same path (the all-gather needs equal steps)
    in_memory = (
        ac.mode == "tower" and shard_bytes(data.rows, ac.workers, data.dim) <= ac.worker_cache_mb * 2**20
    )
    loop_config = {
        "tower": tower_spec(cfg, data.dim),
        "lr": ac.finetune_lr if ac.mode == "finetune" else ac.lr,
        "weight_decay": ac.weight_decay,
        "epochs": ac.epochs,
        "batch_size": ac.batch_size,
        "temperature": ac.temperature,
        "logq": ac.logq,
        "endpoints": data.endpoints,
        "train_rows": data.rows,
        "seed": seed,
        "threads": max(1, int(ac.cpus_per_worker)),
        "shuffle_buffer": ac.shuffle_buffer,
        "cache": in_memory,
        "fault": faults.from_env(),
    }
    log.info(
        "align: training %s (%s tower, seed %d) on %d pairs, %d workers x batch %d, %d epochs, shards %s",
        version,
        loop_config["tower"]["kind"],
        seed,
        data.rows,
        ac.workers,
        ac.batch_size // ac.workers,
        ac.epochs,
        "in memory" if in_memory else "streamed",
    )
    uri, history = training.run(
        tables,
        KIND,
        version,
        train_loop,
        loop_config,
        {"train": data.dataset},
        training.Scaling(
            ac.workers, ac.cpus_per_worker, use_gpu, "nccl" if use_gpu else "gloo", ac.max_failures, keep=2
        ),
        HISTORY,
    )
    return models.publish(
        tables,
        KIND,
        version,
        uri,
        {
            "seed": seed,
            "tower": loop_config["tower"],
            "config": ac.model_dump(),
            "pairs_version": data.pairs_version,
            "train_pairs": data.rows,
            "content": data.content,
            "content_version": data.content_version,
            "column": data.column,
            "dim": data.dim,
            "epochs": ac.epochs,
            "metrics": history[-1],
            "history": history,
        },
    )


def train_models(cfg: QarmConfig, run_id: str, seeds: list[int]) -> list[models.ModelInfo]:
    """One model per seed, versions ``<run_id>-s<seed>``, sharing one materialised training set."""
    tables = Tables.from_config(cfg)
    todo = [s for s in seeds if not _published(tables, f"{run_id}-s{s}")]
    data = None
    if todo:
        ray_init(cfg)
        column = "text" if cfg.align.mode == "finetune" else "emb"
        data = load_pairs(tables, column, cfg.align.logq, cfg.align.join_partitions)
    return [train(cfg, f"{run_id}-s{s}", s, data) for s in seeds]


def _published(tables: Tables, version: str) -> bool:
    try:
        models.find(tables, KIND, version)
        return True
    except FileNotFoundError:
        return False
