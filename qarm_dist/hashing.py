"""Seeded, vectorised hashing: the one source of pseudo-randomness keyed by ids.

Used wherever a value must be a pure function of an id (and a salt) so that any
shard can compute it alone and every run agrees: the generated world's item
attributes, sampled negatives, and hashed embedding-table rows.
"""

from __future__ import annotations

import numpy as np


def mix64(x: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of (x, salt): a fast, vectorised, well-spread uint64 hash."""
    with np.errstate(over="ignore"):
        z = np.asarray(x).astype(np.uint64) + np.uint64((salt * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform01(x: np.ndarray, salt: int) -> np.ndarray:
    """A float64 in [0, 1) per element of ``x``, uniform over ids."""
    return (mix64(x, salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
