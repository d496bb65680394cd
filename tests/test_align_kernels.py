"""The alignment trainer's in-memory shard (`ShardCache`): no engines, Arrow batches in, step inputs out."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from qarm_dist.align.data import log_frequency
from qarm_dist.align.model import ResidualTower
from qarm_dist.align.train import ShardCache, shard_bytes, step_inputs

DIM, ITEMS, PAIRS = 8, 30, 203


def _batches(rng: np.random.Generator, emb: np.ndarray, counts: np.ndarray, size: int) -> list[pa.Table]:
    """Pair batches as the joined Ray Dataset gives them: ids, both sides' content and endpoint counts."""
    a, b = rng.integers(0, ITEMS, PAIRS), rng.integers(0, ITEMS, PAIRS)
    out = []
    for i in range(0, PAIRS, size):
        sa, sb = a[i : i + size], b[i : i + size]
        out.append(
            pa.table(
                {
                    "trigger_id": sa,
                    "target_id": sb,
                    "trigger_emb": list(emb[sa]),
                    "target_emb": list(emb[sb]),
                    "trigger_n": counts[sa],
                    "target_n": counts[sb],
                }
            )
        )
    return out


def _cache(seed: int = 0) -> tuple[ShardCache, np.ndarray, np.ndarray, list[pa.Table]]:
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(ITEMS, DIM)).astype(np.float32)
    counts = rng.integers(1, 50, ITEMS)
    batches = _batches(rng, emb, counts, size=64)  # the last batch is short, as a shard's tail is
    tower = ResidualTower(DIM, 4)
    return ShardCache(step_inputs(b, tower, True, 2 * PAIRS) for b in batches), emb, counts, batches


def test_every_batch_holds_its_pairs_content_ids_and_logq():
    cache, emb, counts, _ = _cache()
    for x, ids, q in cache.batches(32, seed=5):
        a, b = ids.numpy()
        np.testing.assert_array_equal(x.numpy(), np.concatenate([emb[a], emb[b]]))  # a's rows, then b's
        np.testing.assert_allclose(q[0].numpy(), log_frequency(counts[a], 2 * PAIRS))
        np.testing.assert_allclose(q[1].numpy(), log_frequency(counts[b], 2 * PAIRS))


def test_an_epoch_is_a_permutation_of_the_shard_in_full_batches():
    cache, _, _, batches = _cache()
    a, b = (np.concatenate([t[c].to_numpy() for t in batches]) for c in ("trigger_id", "target_id"))
    assert cache.pairs == PAIRS and len(cache.content) == len(np.union1d(a, b))  # each item's content once
    epoch = list(cache.batches(32, seed=1))
    assert len(epoch) == PAIRS // 32 and all(ids.shape == (2, 32) for _, ids, _ in epoch)
    seen = sorted(tuple(p) for _, ids, _ in epoch for p in ids.T.tolist())
    # each pair at most once: taking what the epoch saw out of the shard leaves the short tail
    rest = sorted(zip(a.tolist(), b.tolist()))
    for p in seen:
        rest.remove(p)
    assert len(rest) == PAIRS % 32


def test_the_order_is_the_seeds():
    cache, _, _, _ = _cache()
    first = [ids for _, ids, _ in cache.batches(32, seed=7)]
    again = [ids for _, ids, _ in cache.batches(32, seed=7)]
    other = [ids for _, ids, _ in cache.batches(32, seed=8)]
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(first, other, strict=True))


def test_truncate_keeps_the_first_pairs_for_equal_steps_on_every_worker():
    cache, _, _, batches = _cache()
    cache.truncate(100)
    assert cache.pairs == 100 and len(list(cache.batches(32, seed=0))) == 3
    head = batches[0].slice(0, 64), batches[1].slice(0, 36)
    expect = np.concatenate([t["trigger_id"].to_numpy() for t in head])
    np.testing.assert_array_equal(cache.ids[0].numpy(), expect)


def test_shard_bytes_bounds_what_the_cache_holds():
    cache, _, _, _ = _cache()
    held = sum(t.numel() * t.element_size() for t in (cache.content, cache.ids, cache.rows, cache.logq))
    assert held <= shard_bytes(PAIRS, 1, DIM)
    assert shard_bytes(PAIRS, 2, DIM) == shard_bytes(PAIRS + 1, 2, DIM) < shard_bytes(PAIRS, 1, DIM)
