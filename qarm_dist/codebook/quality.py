"""Semantic-ID quality from code counts (the metric set of TorchEasyRec's SID report).

Inputs are small aggregates a Spark job computes: how many SIDs have each
bucket size, and per level how many items each code holds. Nothing here sees
one row per item.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def sid_metrics(sizes: np.ndarray, n_buckets: np.ndarray) -> dict[str, float]:
    """Metrics of the full-SID buckets: ``n_buckets[j]`` SIDs hold ``sizes[j]`` items each."""
    order = np.argsort(sizes)
    s, c = np.asarray(sizes, np.float64)[order], np.asarray(n_buckets, np.float64)[order]
    items, used = float((s * c).sum()), float(c.sum())
    p = s / items
    # Gini of bucket sizes, exact from the grouped Lorenz curve (trapezoids)
    lorenz = np.concatenate([[0.0], np.cumsum(s * c) / items])
    gini = 1.0 - float(((c / used) * (lorenz[:-1] + lorenz[1:])).sum())
    entropy = float(-(c * p * np.log(p)).sum())
    return {
        "items": int(items),
        "sids": int(used),
        "collision_rate": float((s * c)[s > 1].sum() / items),
        "items_per_code": items / used,
        "largest_bucket": int(s.max()),
        "gini": max(0.0, gini),
        "normalized_entropy": entropy / np.log(items) if items > 1 else 1.0,
    }


def level_metrics(counts: np.ndarray, k: int, recon_mse: float | None = None) -> dict[str, Any]:
    """One level: ``counts[j]`` items hold code j (codes never used may be absent or 0)."""
    counts = np.asarray(counts, np.float64)
    used = int((counts > 0).sum())
    p = counts[counts > 0] / counts.sum()
    out: dict[str, Any] = {
        "k": k,
        "utilization": used / k,
        "dead_codes": k - used,
        "perplexity": float(np.exp(-(p * np.log(p)).sum())),
    }
    if recon_mse is not None:
        out["reconstruction_mse"] = recon_mse
    return out
