"""Codebook kernels: K-means by sufficient statistics, residual K-means, FSQ.

Every test is tiny (at most a few thousand points) so the file runs in seconds.
"""

from __future__ import annotations

import itertools

import faiss
import numpy as np
import pytest

from qarm_dist.codebook.fsq import FSQParams, fit_fsq, fsq_decode, fsq_encode, fsq_pack, fsq_unpack
from qarm_dist.codebook.kmeans import (
    ResidualCodebook,
    assign,
    init_centroids,
    kmeans,
    residual_kmeans,
    rq_decode,
    rq_encode,
    update,
)


def _blobs(n: int, k: int, d: int, seed: int, spread: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian blobs: unit noise around centres spread ~`spread` apart."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * spread
    labels = rng.integers(k, size=n)
    return (centres[labels] + rng.normal(size=(n, d))).astype(np.float32), labels


def _brute_force(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reference assignment from the full float64 distance matrix."""
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    d2 = ((x64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)
    codes = d2.argmin(1)
    onehot = np.eye(len(c))[codes]
    return codes, d2[np.arange(len(x)), codes], onehot.T @ x64, onehot.sum(0).astype(np.int64)


# --- assign ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_assign_matches_brute_force(backend):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    c = rng.normal(size=(24, 16)).astype(np.float32)
    a = assign(x, c, backend=backend, block_rows=64)  # several blocks, a ragged last one
    codes, dist, sums, counts = _brute_force(x, c)
    np.testing.assert_array_equal(a.codes, codes)
    assert a.codes.dtype == np.int64 and a.dist.dtype == np.float32
    assert a.sums.dtype == np.float64 and a.counts.dtype == np.int64
    np.testing.assert_allclose(a.dist, dist, rtol=1e-4)
    np.testing.assert_allclose(a.sums, sums, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(a.counts, counts)
    assert np.all(a.sums[a.counts == 0] == 0)
    assert a.inertia == pytest.approx(dist.sum(), rel=1e-5)


def test_faiss_and_torch_backends_agree():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 32)).astype(np.float32)
    c = rng.normal(size=(40, 32)).astype(np.float32)
    a, b = assign(x, c, backend="faiss"), assign(x, c, backend="torch", block_rows=128)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_allclose(a.dist, b.dist, rtol=1e-4)
    np.testing.assert_allclose(a.sums, b.sums, rtol=1e-12)
    np.testing.assert_array_equal(a.counts, b.counts)


def test_assign_statistics_add_over_partitions():
    """The identity the Spark job relies on: stats of the parts add up to the stats of the whole."""
    x, _ = _blobs(700, 5, 8, seed=2)
    c = init_centroids(x, 6, seed=3)
    whole = assign(x, c)
    parts = [assign(x[:250], c), assign(x[250:250], c), assign(x[250:], c)]  # one empty partition
    assert parts[1].counts.sum() == 0 and parts[1].inertia == 0.0
    np.testing.assert_allclose(sum(p.sums for p in parts), whole.sums, rtol=1e-12)
    np.testing.assert_array_equal(sum(p.counts for p in parts), whole.counts)
    assert sum(p.inertia for p in parts) == pytest.approx(whole.inertia, rel=1e-12)
    np.testing.assert_array_equal(np.concatenate([p.codes for p in parts]), whole.codes)


def test_assign_casts_input_and_rejects_bad_arguments():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(50, 4))  # float64, cast to float32
    c = rng.normal(size=(3, 4))
    np.testing.assert_array_equal(assign(x, c).codes, _brute_force(x, c)[0])
    with pytest.raises(ValueError, match="faiss, torch"):
        assign(x, c, backend="gpu")
    with pytest.raises(ValueError, match="dimension"):
        assign(x, c[:, :3])
    x[7, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        assign(x, c)


# --- update ---------------------------------------------------------------------------------


def test_update_known_answer():
    sums = np.array([[2.0, 4.0], [9.0, 3.0]])
    counts = np.array([2, 3])
    new, repaired = update(sums, counts, np.zeros((2, 2), np.float32))
    np.testing.assert_allclose(new, [[1.0, 2.0], [3.0, 1.0]])
    assert new.dtype == np.float32 and repaired == 0


def test_update_repairs_empty_cluster_from_a_large_one():
    old = np.array([[100.0, 100.0, 100.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]], np.float32)
    counts = np.array([0, 10, 1])  # only cluster 1 has points to spare
    sums = np.array([[0.0, 0.0, 0.0], [10.0, 20.0, -30.0], [5.0, 5.0, 5.0]])
    new, repaired = update(sums, counts, old, seed=7)
    assert repaired == 1 and np.isfinite(new).all()
    donor = np.array([1.0, 2.0, -3.0])
    np.testing.assert_allclose(new[0], donor, rtol=2 / 1024)  # the repaired centroid sits at the donor
    assert not np.allclose(new[0], new[1])  # but split from it ...
    np.testing.assert_allclose((new[0] + new[1]) / 2, donor, rtol=1e-6)  # ... symmetrically
    np.testing.assert_allclose(np.abs(new[0] - donor), np.abs(donor) / 1024, rtol=1e-5)
    np.testing.assert_allclose(new[2], [5.0, 5.0, 5.0])
    again, _ = update(sums, counts, old, seed=7)
    np.testing.assert_array_equal(new, again)  # deterministic by seed


def test_update_leaves_empty_cluster_when_nothing_can_be_split():
    old = np.array([[9.0, 9.0], [1.0, 1.0]], np.float32)
    new, repaired = update(np.array([[0.0, 0.0], [2.0, 4.0]]), np.array([0, 1]), old)
    assert repaired == 0
    np.testing.assert_allclose(new, [[9.0, 9.0], [2.0, 4.0]])


# --- init_centroids -------------------------------------------------------------------------


def test_init_random_is_deterministic_and_distinct():
    x = np.random.default_rng(5).normal(size=(200, 6)).astype(np.float32)
    a, b = init_centroids(x, 20, seed=1), init_centroids(x, 20, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, init_centroids(x, 20, seed=2))
    assert len(np.unique(a, axis=0)) == 20
    assert all((x == row).all(1).any() for row in a)  # rows of the sample
    np.testing.assert_array_equal(init_centroids(x, 20, "kmeans++", 3), init_centroids(x, 20, "kmeans++", 3))


def test_kmeans_plus_plus_hits_every_blob():
    x, labels = _blobs(400, 4, 5, seed=6, spread=20.0)
    centres = np.stack([x[labels == j].mean(0) for j in range(4)])
    for seed in range(5):
        c = init_centroids(x, 4, "kmeans++", seed)
        hit = _brute_force(c, centres)[0]
        assert sorted(hit) == [0, 1, 2, 3], seed


def test_kmeans_plus_plus_with_duplicate_points():
    x = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)  # only 3 distinct points
    c = init_centroids(x, 5, "kmeans++", seed=0)
    assert len(np.unique(c, axis=0)) == 3  # all distinct points are taken before repeats


def test_init_rejects_too_large_k_and_unknown_method():
    x = np.zeros((10, 2), np.float32)
    with pytest.raises(ValueError, match="k=11 is larger than the 10 vectors"):
        init_centroids(x, 11)
    with pytest.raises(ValueError, match="random, kmeans\\+\\+"):
        init_centroids(x, 2, method="forgy")


# --- kmeans ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_kmeans_inertia_non_increasing(backend):
    x = np.random.default_rng(8).normal(size=(800, 8)).astype(np.float32)
    res = kmeans(x, 16, iters=15, seed=8, backend=backend)
    assert len(res.inertia) == 15
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(res.inertia))
    assert res.inertia[-1] < res.inertia[0]
    final = assign(x, res.centroids)
    np.testing.assert_array_equal(res.codes, final.codes)
    assert final.inertia <= res.inertia[-1] * (1 + 1e-6)
    assert res.centroids.shape == (16, 8) and res.centroids.dtype == np.float32


def test_kmeans_same_lloyd_as_faiss_and_sklearn():
    """From the same initial centroids, our Lloyd ends where faiss' and sklearn's do."""
    from sklearn.cluster import KMeans

    x, _ = _blobs(1000, 4, 8, seed=2)  # n <= 256 k: faiss does not subsample
    c0 = init_centroids(x, 4, "random", seed=0)
    ours = assign(x, kmeans(x, 4, iters=25, centroids=c0).centroids).inertia
    fk = faiss.Kmeans(8, 4, niter=25, seed=0)
    fk.train(x, init_centroids=c0.copy())
    theirs = float(fk.index.search(x, 1)[0].sum(dtype=np.float64))
    assert ours == pytest.approx(theirs, rel=0.01)
    sk = KMeans(n_clusters=4, init=c0, n_init=1, max_iter=25, tol=0.0, algorithm="lloyd").fit(x)
    assert ours == pytest.approx(sk.inertia_, rel=0.02)


def test_kmeans_as_good_as_faiss_own_init():
    """faiss with its own init versus ours with k-means++: both reach the blobs' optimum.

    With k equal to the number of blobs a single random init often leaves Lloyd in a local
    optimum (two centroids in one blob), so faiss gets its best of 5 restarts (`nredo`).
    """
    for seed in range(3):
        x, labels = _blobs(1000, 4, 8, seed=seed)
        res = kmeans(x, 4, iters=25, init="kmeans++", seed=seed)
        ours = assign(x, res.centroids).inertia
        fk = faiss.Kmeans(8, 4, niter=25, seed=seed, nredo=5)
        fk.train(x)
        theirs = float(fk.index.search(x, 1)[0].sum(dtype=np.float64))
        assert ours == pytest.approx(theirs, rel=0.01), seed
        truth = sum(((x[labels == j] - x[labels == j].mean(0)) ** 2).sum() for j in range(4))
        assert ours == pytest.approx(truth, rel=0.01), seed


def test_kmeans_repairs_duplicate_initial_centroids():
    x, _ = _blobs(600, 6, 4, seed=9)
    c0 = np.repeat(x[:3], 2, axis=0)  # every centroid twice: the second copy starts empty
    res = kmeans(x, 6, iters=10, centroids=c0)
    assert res.repaired >= 3
    assert np.isfinite(res.centroids).all()
    assert np.bincount(res.codes, minlength=6).min() > 0


def test_kmeans_tol_stops_early_and_argument_checks():
    x = np.random.default_rng(10).normal(size=(300, 4)).astype(np.float32)
    res = kmeans(x, 4, iters=100, tol=1e-2, seed=1)
    assert 2 <= len(res.inertia) < 100
    with pytest.raises(ValueError, match="shape"):
        kmeans(x, 4, centroids=x[:3])


# --- residual K-means -----------------------------------------------------------------------


def test_residual_kmeans_refines_level_by_level():
    x = np.random.default_rng(11).normal(size=(1000, 8)).astype(np.float32)
    book, codes = residual_kmeans(x, levels=3, k=16, iters=8, seed=0)
    assert codes.shape == (1000, 3) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < 16
    errors = [
        float(((x - rq_decode(codes[:, : lv + 1], ResidualCodebook(book.centroids[: lv + 1]))) ** 2).sum())
        for lv in range(3)
    ]
    total = float((x.astype(np.float64) ** 2).sum())
    assert total > errors[0] > errors[1] > errors[2]
    enc, residual = rq_encode(x, book)
    np.testing.assert_array_equal(enc, codes)
    np.testing.assert_allclose(rq_decode(enc, book), x - residual, atol=1e-5)
    assert float((residual**2).sum()) == pytest.approx(errors[2], rel=1e-4)


def test_residual_kmeans_per_level_sizes_and_errors():
    x = np.random.default_rng(12).normal(size=(200, 4)).astype(np.float32)
    book, codes = residual_kmeans(x, levels=3, k=[8, 4, 2], iters=3, backend="torch")
    assert [c.shape for c in book.centroids] == [(8, 4), (4, 4), (2, 4)]
    assert (codes.max(0) < [8, 4, 2]).all()
    with pytest.raises(ValueError, match="levels"):
        residual_kmeans(x, levels=0, k=4)
    with pytest.raises(ValueError, match="2 cluster counts for 3 levels"):
        residual_kmeans(x, levels=3, k=[4, 4])
    with pytest.raises(ValueError, match="shape"):
        rq_decode(codes[:, :2], book)


# --- FSQ ------------------------------------------------------------------------------------


def test_fsq_codes_in_range_even_for_extreme_inputs():
    rng = np.random.default_rng(13)
    r = rng.normal(size=(500, 16)).astype(np.float32)
    p = fit_fsq(r, (8, 5, 3))
    probe = np.vstack([r, 1e30 * np.ones((1, 16)), -1e30 * np.ones((1, 16))]).astype(np.float32)
    codes = fsq_encode(probe, p)
    assert codes.shape == (502, 3) and codes.dtype == np.int32
    assert (codes.min(0) == 0).all() and (codes.max(0) == [7, 4, 2]).all()
    assert np.allclose(p.projection.T @ p.projection, np.eye(3), atol=1e-5)


def test_fsq_pack_unpack_round_trip():
    levels = (3, 4, 5)
    codes = np.array(list(itertools.product(*[range(v) for v in levels])), dtype=np.int32)
    ids = fsq_pack(codes, levels)
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, np.arange(60))  # dense, first dimension most significant
    np.testing.assert_array_equal(fsq_unpack(ids, levels), codes)
    with pytest.raises(ValueError):
        fsq_pack(np.array([[0, 4, 0]]), levels)


def test_fsq_json_round_trip():
    r = np.random.default_rng(14).normal(size=(300, 10)).astype(np.float32)
    p = fit_fsq(r, (4, 6))
    q = FSQParams.from_json(p.to_json())
    for name in ("projection", "mean", "scale"):
        np.testing.assert_array_equal(getattr(p, name), getattr(q, name))
        assert getattr(q, name).dtype == np.float32
    assert q.levels == (4, 6)
    np.testing.assert_array_equal(fsq_encode(r, p), fsq_encode(r, q))


def test_fsq_reconstructs_a_low_rank_residual():
    rng = np.random.default_rng(15)
    latent = rng.normal(size=(2000, 3)) * [3.0, 2.0, 1.0]
    r = (latent @ rng.normal(size=(3, 24)) + 0.01 * rng.normal(size=(2000, 24)) + 0.5).astype(np.float32)
    p = fit_fsq(r, (8, 8, 8))
    rec = fsq_decode(fsq_encode(r, p), p)
    assert rec.shape == r.shape and rec.dtype == np.float32
    err = float(((rec - r) ** 2).sum())
    assert err < float((r**2).sum())  # better than reconstructing zero
    assert err < 0.1 * float(((r - r.mean(0)) ** 2).sum())  # and than the mean, by far


def test_fsq_has_no_dead_codes():
    r = np.random.default_rng(16).normal(size=(20000, 12)).astype(np.float32)
    p = fit_fsq(r, (4, 4, 4))
    used = np.unique(fsq_pack(fsq_encode(r, p), p.levels))
    np.testing.assert_array_equal(used, np.arange(64))


def test_fsq_rejects_bad_levels():
    r = np.random.default_rng(17).normal(size=(50, 4)).astype(np.float32)
    for levels in [(4, 1), (), (2, 2, 2, 2, 2)]:
        with pytest.raises(ValueError):
            fit_fsq(r, levels)
    with pytest.raises(ValueError):
        fsq_pack(np.zeros((1, 1), np.int32), (1,))
