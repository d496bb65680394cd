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

PROGRAM = f"""
import sys
class Block:
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import importlib
for m in {MODEL_MODULES!r}:
    importlib.import_module(m)
print("ok")
"""


def test_model_modules_import_without_the_storage_and_engine_stack():
    root = Path(__file__).resolve().parents[1]
    env_path = f"{root}:{root / 'bench'}"
    p = subprocess.run(
        [sys.executable, "-c", PROGRAM],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": env_path},
        cwd=root,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"


def test_the_blocker_blocks():
    """The check above would pass vacuously if blocking did nothing: importing a blocked module fails."""
    program = PROGRAM.replace(repr(MODEL_MODULES), repr(("qarm_dist.rank.feature_store",)))
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env={"PYTHONPATH": str(root)}
    )
    assert p.returncode != 0 and "blocked: " in p.stderr
