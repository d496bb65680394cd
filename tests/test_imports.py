"""The model code imports without the storage and engine stack.

`bench/gpu.py` runs the models on a GPU box that has torch, numpy and pyarrow but
neither Ray, Spark, deltalake, faiss nor pydantic; a serving process would be the
same. This fails when one of those imports creeps into a model module.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BLOCKED = ("deltalake", "faiss", "ray", "pyspark", "pydantic")
MODEL_MODULES = (
    "qarm_dist.align.model",
    "qarm_dist.align.loss",
    "qarm_dist.rank.model",
    "qarm_dist.rank.features",
    "qarm_dist.rank.embeddings",
    "plain",  # bench/plain.py, the peers bench/gpu.py runs
)

PROGRAM = """
import sys
class Block:
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import importlib
for m in {modules!r}:
    importlib.import_module(m)
print("ok")
"""


def _import_with_the_stack_blocked(modules: tuple[str, ...]) -> subprocess.CompletedProcess:
    """Import ``modules`` in a fresh interpreter where every ``BLOCKED`` package fails to import."""
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-c", PROGRAM.format(blocked=BLOCKED, modules=modules)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{root}:{root / 'bench'}"},
        cwd=root,
    )


def test_model_modules_import_without_the_storage_and_engine_stack():
    p = _import_with_the_stack_blocked(MODEL_MODULES)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"


def test_the_blocker_blocks():
    """The check above would pass vacuously if blocking did nothing: importing a blocked module fails."""
    p = _import_with_the_stack_blocked(("qarm_dist.rank.feature_store",))
    assert p.returncode != 0 and "blocked: " in p.stderr
