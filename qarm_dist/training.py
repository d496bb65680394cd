"""Ray Train plumbing shared by the trainers (alignment, ranker): one run under the model registry.

A stage supplies its worker loop, the loop's config and its datasets; `run` builds
the `TorchTrainer` (workers, CPUs, GPUs, backend, failure policy, checkpoints kept)
with its storage under ``<root>/_models/<kind>/<version>`` (local or object store),
fits, and returns the final checkpoint's URI with the JSON summary the loop wrote
into it. Publishing stays with the stage, which knows what its model.json says.

Training input is read in order (the ingest options of `run`, and the dataset's
own context when `run` materialises it): Ray Data's output splitter then hands
every worker the same blocks in the same sequence on every run, so a run repeats
with its seed, and a run restarted from a checkpoint trains on exactly the
batches the uninterrupted run saw.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from qarm_dist import models
from qarm_dist.io.delta import Tables

log = logging.getLogger(__name__)


class Progress:
    """Rank 0 prints a line every ``every_s`` seconds of an epoch, so an hour-long epoch shows it moves.

    ``batch_size`` is the global batch (rows per step over all workers); ``rows_per_epoch``, when
    known, turns the line into a share of the epoch.
    """

    def __init__(
        self, label: str, rank: int, batch_size: int, rows_per_epoch: int | None = None, every_s: float = 60.0
    ):
        self.label, self.on, self.batch_size = label, rank == 0, batch_size
        self.total, self.every_s = rows_per_epoch, every_s
        self.start(0)

    def start(self, epoch: int) -> None:
        self.epoch, self.t0 = epoch, time.time()
        self.due = self.t0 + self.every_s

    def step(self, steps: int, loss_sum: float) -> None:
        """After ``steps`` steps of this epoch whose losses sum to ``loss_sum``."""
        if not self.on:
            return
        now = time.time()
        if now < self.due:
            return
        self.due = now + self.every_s
        rows = steps * self.batch_size
        share = f" of {self.total:,} ({100 * rows / self.total:.0f} %)" if self.total else ""
        print(
            f"[{self.label}] epoch {self.epoch}: step {steps:,}, {rows:,} rows{share}, "
            f"{rows / (now - self.t0):,.0f} rows/s, mean loss {loss_sum / steps:.4f}",
            flush=True,
        )


@dataclass(frozen=True)
class Scaling:
    workers: int
    cpus_per_worker: float
    use_gpu: bool = False
    backend: str = "gloo"
    max_failures: int = 2
    keep: int = 2  # checkpoints kept


def run(
    tables: Tables,
    kind: str,
    version: str,
    loop,
    loop_config: dict[str, Any],
    datasets: dict,
    scaling: Scaling,
    summary_file: str,
    split: list[str] | None = None,
) -> tuple[str, Any]:
    """Fit ``loop`` as run ``version`` of ``kind``; the final checkpoint's URI and its ``summary_file``.

    ``split`` names the datasets sharded across workers (default: all); the others reach every worker whole.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage, storage_fs = models.train_storage(tables, kind)
    datasets = _readable(datasets, scaling)
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # a fixed split: see the module's docstring
    gpu = {"GPU": 1} if scaling.use_gpu else {}
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=scaling.backend),
        scaling_config=ScalingConfig(
            num_workers=scaling.workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **gpu},
        ),
        datasets=datasets,
        dataset_config=DataConfig(
            datasets_to_split=split if split is not None else "all", execution_options=ingest
        ),
        run_config=RunConfig(
            name=version,
            storage_path=storage,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=scaling.keep),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"{kind} training {version} failed: {result.error}")
    uri = models.checkpoint_uri(tables, result.checkpoint.path)
    info = models.ModelInfo(kind, version, uri, {})
    with (
        models.local_checkpoint(info, tables.storage_options) as d,
        open(os.path.join(d, summary_file)) as fh,
    ):
        return uri, json.load(fh)


def _readable(datasets: dict, scaling: Scaling) -> dict:
    """``datasets``, materialised first (in input order) when the workers would hold every CPU.

    Ray Data's read tasks need a CPU beside the workers; on a machine the workers fill, a
    streaming read would wait for one forever.
    """
    import ray
    from ray.data.dataset import MaterializedDataset

    if ray.cluster_resources().get("CPU", 0) - scaling.workers * scaling.cpus_per_worker >= 1:
        return datasets
    out = {}
    for name, ds in datasets.items():
        if not isinstance(ds, MaterializedDataset):
            log.info("%s: no CPU left for Ray Data beside the workers; materialising it first", name)
            ds.context.execution_options.preserve_order = True  # the materialised order is the read order
            ds = ds.materialize()
        out[name] = ds
    return out
