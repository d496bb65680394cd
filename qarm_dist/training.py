"""Ray Train plumbing shared by the trainers (alignment, ranker): one run under the model registry.

A stage supplies its worker loop, the loop's config and its datasets; `run` builds
the `TorchTrainer` (workers, CPUs, GPUs, backend, failure policy, checkpoints kept)
with its storage under ``<root>/_models/<kind>/<version>`` (local or object store),
fits, and returns the final checkpoint's URI with the JSON summary the loop wrote
into it. Publishing stays with the stage, which knows what its model.json says.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from qarm_dist import models
from qarm_dist.io.delta import Tables


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
        dataset_config=DataConfig(datasets_to_split=split if split is not None else "all"),
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
