"""Ray Data side of the table layer: run a model over blocks in actors, stage each output block.

Batch inference stages (`qarm embed`, `qarm align embed`) share one shape: an
actor loads a model once, maps a block of input rows to output rows, and
stages them as one Parquet file of the output table (`qarm_dist.io.delta.stage`).
Only the small staged-file records come back to the driver, which commits them
in one Delta transaction, so a failed run commits nothing and a re-run of its
run id adds no rows. The same model classes also serve reads that must not
commit (evaluation streams their output with `map_blocks(...).iter_batches()`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from qarm_dist import faults
from qarm_dist.io.delta import CommitResult, Tables, stage
from qarm_dist.io.schemas import spec

if TYPE_CHECKING:
    import ray.data


class _StageBlocks:
    """Actor: a block in, the model's rows staged as one file, the file record out."""

    def __init__(
        self,
        model_cls: type,
        model_kwargs: dict[str, Any],
        table_uri: str,
        table: str,
        run_id: str,
        dim: int | None,
        storage_options: dict[str, str],
        fault: faults.FaultSpec | None = None,
    ):
        self.model = model_cls(**model_kwargs)
        self.table_uri, self.table, self.run_id = table_uri, table, run_id
        self.dim, self.storage_options, self.fault = dim, storage_options, fault

    def __call__(self, block: pa.Table) -> pa.Table:
        out = self.model(block)
        staged = stage(self.table_uri, spec(self.table), out, self.run_id, self.dim, self.storage_options)
        faults.maybe_fail(self.fault, "ray.stage", table=self.table)
        return pa.Table.from_pylist([staged.to_dict()])


def check_cpu_budget(actors: int, cpus_per_actor: float, fields: tuple[str, str]) -> None:
    """Refuse a layout that would hang: actors holding every CPU starve Ray Data's read tasks.

    ``fields`` names the two config fields, so the message says what to change.
    """
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    held = actors * cpus_per_actor
    if total - held < 1.0:
        raise ValueError(
            f"{fields[0]} x {fields[1]} = {actors} x {cpus_per_actor} holds {held:g} of the "
            f"cluster's {total:g} CPUs, leaving less than 1 for Ray Data's read and write tasks (the pipeline "
            f"would hang); lower {fields[0]} or {fields[1]}"
        )


def map_blocks(
    ds: ray.data.Dataset,
    model_cls: type,
    model_kwargs: dict[str, Any],
    *,
    actors: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
    rows_per_block: int,
) -> ray.data.Dataset:
    """``ds`` mapped block by block through ``model_cls(**model_kwargs)`` in an actor pool (lazy)."""
    import ray.data

    return ds.map_batches(
        model_cls,
        fn_constructor_kwargs=model_kwargs,
        batch_size=rows_per_block,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
    )


def write_mapped(
    ds: ray.data.Dataset,
    model_cls: type,
    model_kwargs: dict[str, Any],
    tables: Tables,
    name: str,
    run_id: str,
    dim: int | None,
    *,
    actors: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
    rows_per_block: int,
    mode: str = "overwrite",
    info: dict[str, Any] | None = None,
) -> CommitResult:
    """Map ``ds`` through the model in actors, stage every output block, commit once under ``run_id``."""
    tables.check_writable(name)
    stager = {
        "model_cls": model_cls,
        "model_kwargs": model_kwargs,
        "table_uri": tables.uri(name),
        "table": name,
        "run_id": run_id,
        "dim": dim,
        "storage_options": tables.storage_options,
        "fault": faults.from_env(),  # read in the driver: the actors may predate the variable
    }
    staged = map_blocks(
        ds,
        _StageBlocks,
        stager,
        actors=actors,
        cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor,
        rows_per_block=rows_per_block,
    ).take_all()  # one small record per staged file, never the rows
    return tables.commit(name, staged, run_id, mode=mode, dim=dim, info=info)
