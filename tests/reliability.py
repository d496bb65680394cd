"""Helpers of the reliability suites (test_bad_input.py, test_faults.py): table states, foreign writes, the CLI.

A reliability check compares the state of every table before and after something went wrong,
so `state` captures exactly that: each table's Delta version, plus the published models.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake.transaction import AddAction

from qarm_dist.io.delta import Tables
from qarm_dist.io.schemas import TABLES

QARM = str(Path(sys.executable).parent / "qarm")


def state(root: str | Path) -> dict[str, object]:
    """Every table's Delta version (None: absent) and the published model versions under ``root``."""
    t = Tables(str(root))
    out: dict[str, object] = {name: t.version(name) for name in TABLES}
    out["_models"] = sorted(
        str(p.parent.relative_to(root)) for p in Path(root).glob("_models/*/*/model.json")
    )
    return out


def foreign_commit(t: Tables, name: str, table: pa.Table, mode: str = "append") -> None:
    """Commit ``table`` as one Parquet file with none of the table layer's checks: a write by something else."""
    rel = f"foreign-{t.version(name)}.parquet"
    path = os.path.join(t.uri(name), rel)
    pq.write_table(table, path)
    add = AddAction(
        rel,
        os.path.getsize(path),
        {},
        int(os.path.getmtime(path) * 1000),
        True,
        json.dumps({"numRecords": table.num_rows}),
    )
    dt = DeltaTable(t.uri(name))
    dt.create_write_transaction([add], mode=mode, schema=dt.schema(), commit_properties=CommitProperties())


def run_qarm(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """The installed console script as a user runs it, in its own process group (a timeout stops its engines)."""
    proc = subprocess.Popen(
        [QARM, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n[killed after {timeout} s]"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def error_line(stderr: str) -> str:
    """The CLI's one error line; fails on a traceback or on more than one error line."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("qarm: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]
