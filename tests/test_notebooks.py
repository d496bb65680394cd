"""Every notebook in notebooks/ runs top to bottom on the tiny demo root, with the venv's kernel."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from qarm_dist.engines import set_process_env

pytestmark = pytest.mark.slow

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 240  # seconds per cell; the slowest (alignment evaluation) takes well under a minute

# What the notebooks read through QARM_CONFIG: small local engines, as the other tests use.
TEST_CONFIG = """\
spark: {master: "local[2]", shuffle_partitions: 4, driver_memory: 1g}
ray: {num_cpus: 2, object_store_memory: 300000000}
"""


def test_every_notebook_is_here():
    assert [p.stem for p in NOTEBOOKS] == ["01_pairs", "02_codebooks", "03_alignment", "04_ranker"]
    for path in NOTEBOOKS:  # committed without outputs, so they stay small and diffable
        nb = nbformat.read(path, as_version=4)
        assert all(
            not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code"
        )


@pytest.mark.timeout(1500)  # the first one also waits for the shared demo_root fixture
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    set_process_env()  # loopback/offline variables; the kernel inherits this process's environment
    config = tmp_path / "config.yaml"
    config.write_text(TEST_CONFIG)
    monkeypatch.setenv("QARM_ROOT", str(demo_root))
    monkeypatch.setenv("QARM_CONFIG", str(config))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        startup_timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert images, f"{path.name} rendered no plot"
