"""Fault injection for the reliability tests: a named point of a job dies once, on purpose.

A test sets, in the driver's environment,

    QARM_FAULT="align.step:epoch=1,rank=1,sleep=3"   # a point, where it fires, and an optional delay
    QARM_FAULT_ONCE=/tmp/x/fired                     # a marker: fire only if absent, then create it

Stages read the spec in the driver (`from_env`) and hand it to their workers
explicitly (the Ray Train loop config, a Spark task's closure), because a Ray
or Spark worker may have been started before the test set the variable. At the
named point a worker calls `maybe_fail(spec, point, **where)`: when the point
and every ``key=value`` match, the process exits with ``os._exit``, which skips
every cleanup handler, like a SIGKILL. ``sleep=S`` waits S seconds first (Ray
Train registers a reported checkpoint up to 2 s after the report, so a crash
right after one would test a lost checkpoint, not a resume). The marker file
makes a fault fire once across retries and processes, so the retried work can
finish.

With no spec (the normal case) `maybe_fail` is a dict lookup and returns.

The points, and the ``key=value`` each one matches on (docs/reliability.md says what
each fault must leave behind):

- ``commit.before`` (driver, `Tables.commit`; ``table``): the files are staged and
  checked, the Delta transaction not yet made: the job dies with the table unchanged;
- ``commit.after`` (driver, `Tables.commit`; ``table``): the table's version is
  committed and the job has not finished; in a job that writes several tables (the
  world: items, interactions, item_content_emb) this is the point between two commits;
- ``spark.stage`` (a Spark task, `qarm_dist.io.spark.stage_dataframe`; ``table``,
  ``partition``, ``attempt``): the partition's file is staged and its record not yet
  returned: the task dies, and Spark retries it if ``spark.task.maxFailures`` allows
  (``local[N,F]`` in local mode), else the job fails;
- ``ray.stage`` (a Ray Data actor, `qarm_dist.io.raydata`; ``table``): the block's
  file is staged and its record not yet returned: Ray Data restarts the actor and
  retries the block (always; use a marker, or it dies on every retry);
- ``align.step`` (a Ray Train worker; ``epoch``, ``step``, ``rank``) and ``rank.step``
  (``job``, ``epoch``, ``step``, ``rank``): a training step; Ray Train restarts the
  worker group from the last checkpoint.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

FAULT_ENV = "QARM_FAULT"
ONCE_ENV = "QARM_FAULT_ONCE"
EXIT_CODE = 137  # what a SIGKILLed process reports


@dataclass(frozen=True)
class FaultSpec:
    point: str
    where: dict[str, str] = field(default_factory=dict)
    once: str | None = None  # marker file path

    @classmethod
    def parse(cls, text: str, once: str | None = None) -> FaultSpec:
        point, _, rest = text.partition(":")
        where = {}
        for part in filter(None, rest.split(",")):
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"{FAULT_ENV}={text!r}: expected point:key=value,..., got {part!r}")
            where[key.strip()] = value.strip()
        return cls(point.strip(), where, once)


def from_env() -> FaultSpec | None:
    """The fault the driver's environment asks for, or None."""
    text = os.environ.get(FAULT_ENV)
    return FaultSpec.parse(text, os.environ.get(ONCE_ENV)) if text else None


def maybe_fail(spec: FaultSpec | None, point: str, **where: object) -> None:
    """Exit this process now if ``spec`` names ``point`` and ``where`` matches (once per marker)."""
    if spec is None or spec.point != point:
        return
    if any(str(where.get(k)) != v for k, v in spec.where.items() if k != "sleep"):
        return
    if spec.once is not None:
        try:
            fd = os.open(spec.once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: one process wins
        except FileExistsError:
            return
        os.close(fd)
    time.sleep(float(spec.where.get("sleep", 0)))
    os._exit(EXIT_CODE)
