"""The demo's stages on a large generated world, with the peak memory of every process they start.

Each stage runs as a user runs it, `qarm <stage> --root ROOT --run-id load-<stage>` in its own
process group, while a sampler reads, every ``--interval`` seconds, the RSS of the stage's driver
and of every process it started (found by parent links and by session: the Spark JVM and its
Python workers, the local Ray's GCS, raylet and workers). It records per stage the wall time, the
driver's peak RSS, the peak of each group's summed RSS (Spark JVM, Spark Python workers, Ray), the
largest single process, the peak of the whole tree's sum, and the table root's size afterwards.
A flat driver peak as the world grows is what shows that no stage collects a table.

Ray's object store is shared memory: every process that maps a block counts it in its RSS, so the
summed figures over-count it (they are upper bounds). Stages are resumable: a stage whose run id
already committed skips its work, so a run cut short can go on with ``--stages``.

    python bench/load.py --root /tmp/qarm-load                       # all stages, world `large`
    python bench/load.py --root /tmp/qarm-load --stages samples rank-train --set rank.epochs=1

Prints one JSON line per stage and the whole result last (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

QARM = str(Path(sys.executable).parent / "qarm")

STAGES = {
    "world": ["world", "--emit-embeddings"],
    "pairs": ["pairs"],
    "align-train": ["align", "train"],
    "align-embed": ["align", "embed"],
    "codebook-fit": ["codebook", "fit"],
    "codebook-assign": ["codebook", "assign"],
    "samples": ["samples"],
    "rank-train": ["rank", "train"],
}


def group(p: psutil.Process) -> str:
    """Which part of the job a process is: the Spark JVM, a Spark Python worker, Ray, or other."""
    try:
        name, cmd = p.name(), " ".join(p.cmdline()[:4])
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "other"
    if name == "java":
        return "spark_jvm"
    if "pyspark.daemon" in cmd or "pyspark.worker" in cmd:
        return "spark_python"
    if name.startswith("ray::") or "ray" in name or "/ray/" in cmd or "raylet" in cmd or "gcs_server" in cmd:
        return "ray"
    return "other"


class Sampler(threading.Thread):
    """Peak RSS of a job's process tree, sampled until `stop` is set."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval, self.stop = pid, interval, threading.Event()
        self.driver = self.total = 0
        self.groups: dict[str, int] = {}
        self.largest = (0, "")
        self.samples = 0

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            procs = {p.pid: p for p in root.children(recursive=True)}
        except psutil.NoSuchProcess:
            return []
        for p in psutil.process_iter():  # daemons that left the tree but kept the job's session
            try:
                if p.pid not in procs and p.pid != self.pid and os.getsid(p.pid) == self.pid:
                    procs[p.pid] = p
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                continue
        return list(procs.values())

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                driver = psutil.Process(self.pid).memory_info().rss
            except psutil.NoSuchProcess:
                break
            groups: dict[str, int] = {}
            total = driver
            for p in self._tree():
                try:
                    rss = p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                g = group(p)
                groups[g] = groups.get(g, 0) + rss
                total += rss
                if rss > self.largest[0]:
                    self.largest = (rss, f"{g}:{p.name()}")
            self.driver, self.total = max(self.driver, driver), max(self.total, total)
            for g, v in groups.items():
                self.groups[g] = max(self.groups.get(g, 0), v)
            self.samples += 1
            self.stop.wait(self.interval)


def gib(n: int) -> float:
    return round(n / 2**30, 2)


def du(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_stage(name: str, root: str, overrides: list[str], interval: float, timeout: float, log: Path) -> dict:
    cmd = [QARM, *STAGES[name], "--root", root, "--run-id", f"load-{name}", "-q"]
    cmd += [a for o in overrides for a in ("--set", o)]
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = Sampler(proc.pid, interval)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            rc = proc.wait()
        sampler.stop.set()
        sampler.join()
    with contextlib.suppress(ProcessLookupError):  # what the job left behind (normally nothing)
        os.killpg(proc.pid, 9)
    return {
        "stage": name,
        "exit": rc,
        "seconds": round(time.time() - t0, 1),
        "driver_peak_gib": gib(sampler.driver),
        "group_peak_gib": {g: gib(v) for g, v in sorted(sampler.groups.items())},
        "largest_process": {"gib": gib(sampler.largest[0]), "what": sampler.largest[1]},
        "tree_peak_gib": gib(sampler.total),
        "samples": sampler.samples,
        "root_gib": gib(du(root)),
        "command": " ".join(cmd[1:]),
        "log": str(log),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="table root (a fresh folder; it can grow to tens of GB)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    ap.add_argument("--world", default="large", choices=["tiny", "small", "large"])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between memory samples")
    ap.add_argument(
        "--timeout", type=float, default=3600, help="seconds a stage may run before it is stopped"
    )
    ap.add_argument("--out", default="bench/out/load.json")
    args = ap.parse_args()

    overrides = [f"world.size={args.world}", *args.overrides]
    logs = Path(args.out).parent / "load-logs"
    logs.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.stages:
        r = run_stage(name, args.root, overrides, args.interval, args.timeout, logs / f"{name}.log")
        results.append(r)
        print(json.dumps(r), flush=True)
        if r["exit"] != 0:
            break
    summary = {
        "world": args.world,
        "overrides": overrides,
        "cpus": os.cpu_count(),
        "memory_gib": gib(psutil.virtual_memory().total),
        "disk_free_gib": gib(shutil.disk_usage(args.root).free),
        "stages": results,
    }
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
