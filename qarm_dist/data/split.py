"""The time split every stage agrees on.

The evaluation window is the latest ``eval_fraction`` of interactions by time.
Everything a model evaluated on that window uses (alignment, codebooks, text
drawn from user activity, popularity buckets) must be fitted on data before
``eval_start`` only (DESIGN.md, "Evaluation protocol"). The cutoff is computed
from a streamed hourly histogram of timestamps, so it needs O(hours) memory
whatever the number of interactions, and every stage recomputes the same value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

_BIN = 3600  # one hour: the cutoff's resolution


def eval_start(ts_chunks: Callable[[], Iterable[np.ndarray]], eval_fraction: float) -> int:
    """First timestamp (epoch s, on an hour boundary) of the evaluation window.

    ``ts_chunks`` returns a fresh iterator of timestamp arrays; it is read twice
    (range, then histogram).
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    lo, hi, n = None, None, 0
    for ts in ts_chunks():
        if len(ts):
            lo = int(ts.min()) if lo is None else min(lo, int(ts.min()))
            hi = int(ts.max()) if hi is None else max(hi, int(ts.max()))
            n += len(ts)
    if n == 0 or lo is None or hi is None:
        raise ValueError("cannot split an empty interactions table by time")
    first = lo // _BIN
    counts = np.zeros(hi // _BIN - first + 1, dtype=np.int64)
    for ts in ts_chunks():
        counts += np.bincount(np.asarray(ts) // _BIN - first, minlength=len(counts))
    before = np.cumsum(counts)
    cut = int(np.searchsorted(before, (1.0 - eval_fraction) * n, side="left")) + 1
    return int((first + min(cut, len(counts) - 1)) * _BIN)


def tables_eval_start(tables, eval_fraction: float, version: int | None = None) -> int:
    """`eval_start` over the ``interactions`` table of a `Tables` root."""
    snap = tables.snapshot("interactions", version)

    def chunks():
        for rb in tables.read_batches("interactions", columns=["ts"], snapshot=snap):
            yield rb.column(0).to_numpy()

    return eval_start(chunks, eval_fraction)
