"""Trained models, versioned under the table root: ``<root>/_models/<kind>/<version>/``.

Ray Train writes a run's checkpoints there (the run's storage path), and when
the run finishes the driver *publishes* it: ``model.json`` beside the
checkpoints names the checkpoint that is the model, the table versions it was
trained on, its config and its metrics. A folder without ``model.json`` is an
unfinished (or failed) run and is never served. The version is the training
run id, so re-running a run id finds the published model instead of training
again. Models live beside the tables so that one root (a folder or an object
store URI) holds everything a pipeline produced.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from qarm_dist.io.delta import Tables, filesystem

MODEL_FILE = "model.json"


@dataclass(frozen=True)
class ModelInfo:
    kind: str
    version: str
    checkpoint: str  # URI of the checkpoint folder that holds the weights
    meta: dict[str, Any]


def storage_path(tables: Tables, kind: str) -> str:
    """Where Ray Train keeps the runs of ``kind`` (``RunConfig.storage_path``)."""
    return f"{tables.root.rstrip('/')}/_models/{kind}"


def train_storage(tables: Tables, kind: str) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig``.

    From an ``s3://`` URI alone Ray would build an S3 client without the endpoint and keys in
    ``tables.storage_options``, so an object-store root gets the filesystem of those options and the
    path inside it; a local root stays a plain path. Checkpoints then come back as paths inside that
    filesystem: `checkpoint_uri` turns them back into URIs for the registry.
    """
    uri = storage_path(tables, kind)
    if "://" not in uri:
        return uri, None
    fs, path = filesystem(uri, tables.storage_options)
    return path, fs


def checkpoint_uri(tables: Tables, path: str) -> str:
    """The URI of a checkpoint that Ray Train names by its path inside `train_storage`'s filesystem."""
    if "://" not in tables.root:
        return path
    return f"{tables.root.split('://', 1)[0]}://{path}"


def run_uri(tables: Tables, kind: str, version: str) -> str:
    return f"{storage_path(tables, kind)}/{version}"


def _read_json(tables: Tables, uri: str) -> dict[str, Any] | None:
    fs, path = filesystem(uri, tables.storage_options)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read().decode())


def publish(tables: Tables, kind: str, version: str, checkpoint: str, meta: dict[str, Any]) -> ModelInfo:
    """Make a finished run servable: write its ``model.json`` (written last, so it is all or nothing)."""
    body = {**meta, "kind": kind, "version": version, "checkpoint": checkpoint, "created": time.time()}
    fs, path = filesystem(f"{run_uri(tables, kind, version)}/{MODEL_FILE}", tables.storage_options)
    tmp = f"{path}.tmp"
    with fs.open_output_stream(tmp) as fh:
        fh.write(json.dumps(body, indent=2, default=str).encode())
    fs.move(tmp, path)
    return ModelInfo(kind, version, checkpoint, body)


def published(tables: Tables, kind: str) -> list[ModelInfo]:
    """Every published model of ``kind``, oldest first."""
    fs, base = filesystem(storage_path(tables, kind), tables.storage_options)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    out = []
    for entry in fs.get_file_info(pafs.FileSelector(base)):
        if entry.type != pafs.FileType.Directory:
            continue
        meta = _read_json(tables, f"{storage_path(tables, kind)}/{entry.base_name}/{MODEL_FILE}")
        if meta is not None:
            out.append(ModelInfo(kind, meta["version"], meta["checkpoint"], meta))
    return sorted(out, key=lambda m: m.meta["created"])


def find(tables: Tables, kind: str, version: str | None = None) -> ModelInfo:
    """A published model (the latest when ``version`` is None); a clear error when there is none."""
    if version is not None:
        meta = _read_json(tables, f"{run_uri(tables, kind, version)}/{MODEL_FILE}")
        if meta is None:
            known = ", ".join(m.version for m in published(tables, kind)) or "none"
            raise FileNotFoundError(
                f"no published {kind} model {version!r} under {tables.root}; known: {known}"
            )
        return ModelInfo(kind, meta["version"], meta["checkpoint"], meta)
    models = published(tables, kind)
    if not models:
        raise FileNotFoundError(f"no {kind} model under {tables.root}: run `qarm {kind} train` first")
    return models[-1]


@contextlib.contextmanager
def local_checkpoint(info: ModelInfo, storage_options: dict[str, str] | None = None) -> Iterator[str]:
    """A local folder with the model's checkpoint files (copied down when the root is an object store)."""
    if "://" not in info.checkpoint:
        yield info.checkpoint
        return
    fs, path = filesystem(info.checkpoint, storage_options)
    with tempfile.TemporaryDirectory() as d:
        pafs.copy_files(path, d, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield d
