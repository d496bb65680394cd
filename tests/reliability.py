"""Helpers of the reliability suites (test_bad_input.py, test_faults.py): table states, foreign writes, the CLI.

A reliability check compares the state of every table before and after something went wrong,
so `state` captures exactly that: each table's Delta version, plus the published models.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
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
    # what a terminal shows: a progress bar's carriage returns and cursor moves can share the error's line
    shown = [
        re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line).split("\r")[-1].lstrip() for line in stderr.splitlines()
    ]
    lines = [line for line in shown if line.startswith("qarm: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# Each writer process stages its rows, waits for a shared start time, then commits: the commits of a
# round start within a millisecond of each other.
_WRITER = """
import json, sys, time
import pyarrow as pa
from qarm_dist.io.delta import TableError, Tables, stage
from qarm_dist.io.schemas import spec
root, options, rounds = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
t, out = Tables(root, options), []
for r in rounds:
    ids = pa.array(range(r["first"], r["first"] + r["rows"]), pa.int64())
    rows = pa.table({"item_id": ids, "text": ["x"] * len(ids), "category": ["c"] * len(ids), "created_ts": ids})
    staged = stage(t.uri("items"), spec("items"), rows, r["run_id"], None, options)
    while time.time() < r["at"]:
        time.sleep(0.0005)
    try:
        c = t.commit("items", [staged], r["run_id"])
        out.append({"version": c.version, "skipped": c.skipped})
    except TableError as e:
        out.append({"error": str(e)})
print(json.dumps(out))
"""


def race_two_writers(t: Tables, lead_s: float) -> None:
    """Two processes commit to ``t``'s `items` in three rounds that start at the same moment, then check.

    Round 0: a fresh table, disjoint keys: both commit, on versions 1 and 2 (one also creates it).
    Round 1: the same run id in both: one commits, the other skips, one version.
    Round 2: other run ids, the same keys: one commits, the other is refused for duplicate keys, which
    proves its key check saw the winner's rows. ``lead_s``: time for both to import and stage first.
    """
    at = time.time() + lead_s
    rounds = {
        w: [{"run_id": f"{w}-0", "first": first, "rows": 100, "at": at}]
        for w, first in (("a", 0), ("b", 100))
    }
    for w in ("a", "b"):
        rounds[w].append({"run_id": "twin", "first": 200, "rows": 50, "at": at + 2})
        rounds[w].append({"run_id": f"{w}-2", "first": 300, "rows": 50, "at": at + 4})
    options = json.dumps(t.storage_options or {})
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, t.root, options, json.dumps(rounds[w])],
            stdout=subprocess.PIPE,
            text=True,
        )
        for w in ("a", "b")
    ]
    try:
        a, b = (json.loads(p.communicate(timeout=120)[0]) for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:  # only after a timeout
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs)
    assert "error" not in a[0] and "error" not in b[0] and {a[0]["version"], b[0]["version"]} == {1, 2}
    assert sorted([a[1]["skipped"], b[1]["skipped"]]) == [False, True]
    assert a[1]["version"] == b[1]["version"] == 3
    won, lost = sorted([a[2], b[2]], key=lambda o: "error" in o)
    assert won["version"] == 4 and "share their key" in lost["error"]
    assert t.version("items") == 4
