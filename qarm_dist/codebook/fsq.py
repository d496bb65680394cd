"""FSQ (finite scalar quantisation) kernels for QARM V2's Res-KmeansFSQ.

After the residual K-means levels, what is left of each item is projected onto the top
`m` principal directions of a residual sample, standardised, bounded with a sigmoid and
cut into `levels[j]` equal-width bins per dimension. There is no learned codebook, so
there are no dead codes: on standardised input every bin of the sigmoid has mass. The
fitted state is a projection, a mean and a scale, small enough to ship as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(v) for v in levels)
    if not out:
        raise ValueError("FSQ needs at least one dimension (levels is empty)")
    if any(v < 2 for v in out):
        raise ValueError(f"every FSQ level count must be at least 2, got {out}")
    return out


@dataclass(frozen=True, eq=False)
class FSQParams:
    """Fitted FSQ state. `eq=False` because the fields are arrays; compare them with numpy."""

    projection: np.ndarray  # (d, m) float32, orthonormal columns (PCA of the residual sample)
    mean: np.ndarray  # (d,) float32
    scale: np.ndarray  # (m,) float32, per-dim std of the projected sample
    levels: tuple[int, ...]  # per-dim level counts, e.g. (8, 8, 8)

    def __post_init__(self) -> None:
        levels = _check_levels(self.levels)
        projection = np.ascontiguousarray(self.projection, dtype=np.float32)
        mean = np.ascontiguousarray(self.mean, dtype=np.float32)
        scale = np.ascontiguousarray(self.scale, dtype=np.float32)
        m = len(levels)
        if projection.ndim != 2 or projection.shape[1] != m:
            raise ValueError(f"projection must have shape (d, {m}), got {projection.shape}")
        if mean.shape != (projection.shape[0],) or scale.shape != (m,):
            raise ValueError(
                f"mean must have shape ({projection.shape[0]},) and scale ({m},), got {mean.shape} and {scale.shape}"
            )
        if not (scale > 0).all():
            raise ValueError("scale must be positive")
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "projection", projection)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "scale", scale)

    def to_json(self) -> str:
        """JSON text that `from_json` turns back into bit-identical parameters.

        float32 -> Python float is exact and json writes the shortest round-tripping repr,
        so no precision is lost (the codebooks table stores this string).
        """
        return json.dumps(
            {
                "kind": "fsq",
                "levels": list(self.levels),
                "projection": self.projection.tolist(),
                "mean": self.mean.tolist(),
                "scale": self.scale.tolist(),
            }
        )

    @classmethod
    def from_json(cls, s: str) -> FSQParams:
        obj = json.loads(s)
        if obj.get("kind") != "fsq":
            raise ValueError(f"not FSQ parameters (kind={obj.get('kind')!r})")
        m = len(obj["levels"])
        d = len(obj["mean"])
        projection = np.asarray(obj["projection"], dtype=np.float32).reshape(d, m)
        return cls(projection, np.asarray(obj["mean"]), np.asarray(obj["scale"]), tuple(obj["levels"]))


def fit_fsq(residual_sample: np.ndarray, levels: Sequence[int]) -> FSQParams:
    """Fit the projection (PCA via SVD of the centred sample) and per-dim scale.

    The top principal directions keep as much of the residual's variance as `m` scalars
    can, and dividing by their std makes the sigmoid input standardised, so its bins are
    all populated whatever the residual's magnitude. Directions are sign-normalised
    (largest-magnitude entry positive) so a fit is reproducible across LAPACK builds.
    A direction with zero variance (rank-deficient sample) gets scale 1.
    """
    lv = _check_levels(levels)
    x = np.asarray(residual_sample, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"residual_sample must be a 2-D (n, d) array, got shape {x.shape}")
    n, d = x.shape
    m = len(lv)
    if m > d:
        raise ValueError(f"FSQ has {m} dimensions but the residual only {d}")
    if n < max(2, m):
        raise ValueError(f"need at least {max(2, m)} residual vectors to fit {m} FSQ dimensions, got {n}")
    mean = x.mean(axis=0)
    centred = x - mean
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    proj = vt[:m].T.copy()
    flip = np.sign(proj[np.abs(proj).argmax(axis=0), np.arange(m)])
    proj *= np.where(flip == 0, 1.0, flip)
    scale = sv[:m] / np.sqrt(n)
    scale = np.where(scale > sv[0] * 1e-6 / np.sqrt(n), scale, 1.0)
    return FSQParams(proj.astype(np.float32), mean.astype(np.float32), scale.astype(np.float32), lv)


def _levels_array(p: FSQParams) -> np.ndarray:
    return np.asarray(p.levels, dtype=np.float32)


def fsq_encode(residual: np.ndarray, p: FSQParams) -> np.ndarray:
    """(n, m) int32 codes, code[:, j] in [0, levels[j] - 1].

    z = ((r - mean) @ P) / scale, code = floor(sigmoid(z) * L) clipped to [0, L-1]; the
    clip only matters where sigmoid rounds to exactly 1.
    """
    r = np.asarray(residual, dtype=np.float32)
    if r.ndim != 2 or r.shape[1] != p.mean.shape[0]:
        raise ValueError(f"residual must have shape (n, {p.mean.shape[0]}), got {r.shape}")
    z = ((r - p.mean) @ p.projection) / p.scale
    s = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without exp overflow
    lv = _levels_array(p)
    return np.clip(np.floor(s * lv), 0, lv - 1).astype(np.int32)


def fsq_decode(codes: np.ndarray, p: FSQParams) -> np.ndarray:
    """(n, d) float32 reconstruction from the bin centres: the inverse of each encode step."""
    c = np.asarray(codes)
    m = len(p.levels)
    if c.ndim != 2 or c.shape[1] != m:
        raise ValueError(f"codes must have shape (n, {m}), got {c.shape}")
    lv = _levels_array(p)
    u = (c.astype(np.float32) + 0.5) / lv
    z = np.log(u) - np.log1p(-u)  # logit, inverse of the sigmoid
    return (z * p.scale) @ p.projection.T + p.mean


def fsq_pack(codes: np.ndarray, levels: Sequence[int]) -> np.ndarray:
    """One int64 id per row, mixed radix with the first dimension most significant.

    Raises ValueError for a code outside its range or if prod(levels) overflows int64.
    """
    lv = _check_levels(levels)
    c = np.asarray(codes)
    if c.ndim != 2 or c.shape[1] != len(lv):
        raise ValueError(f"codes must have shape (n, {len(lv)}), got {c.shape}")
    return np.ravel_multi_index(tuple(c.T.astype(np.intp)), lv).astype(np.int64)


def fsq_unpack(ids: np.ndarray, levels: Sequence[int]) -> np.ndarray:
    """Inverse of `fsq_pack`: (n,) ids -> (n, m) int32 codes."""
    lv = _check_levels(levels)
    i = np.asarray(ids, dtype=np.int64)
    if i.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {i.shape}")
    return np.stack(np.unravel_index(i, lv), axis=1).astype(np.int32).reshape(i.shape[0], len(lv))
