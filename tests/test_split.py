import numpy as np
import pytest

from qarm_dist.data.split import eval_start


def test_known_cutoff_on_hour_boundaries():
    ts = np.repeat(np.arange(1000) * 3600 + 1_700_000_000 // 3600 * 3600, 5)  # 5 rows per hour, 1000 hours
    cut = eval_start(lambda: [ts], 0.1)
    assert cut == ts[0] + 900 * 3600
    assert (ts >= cut).mean() == pytest.approx(0.1)


def test_streamed_chunks_match_one_array():
    rng = np.random.default_rng(0)
    ts = rng.integers(1_600_000_000, 1_600_000_000 + 90 * 86400, 20_000)
    chunks = np.array_split(ts, 7)
    assert eval_start(lambda: chunks, 0.2) == eval_start(lambda: [ts], 0.2)
    assert abs((ts >= eval_start(lambda: [ts], 0.2)).mean() - 0.2) < 0.01


def test_empty_and_bad_fraction():
    with pytest.raises(ValueError, match="empty"):
        eval_start(lambda: [np.array([], np.int64)], 0.1)
    with pytest.raises(ValueError, match="eval_fraction"):
        eval_start(lambda: [np.arange(3)], 1.0)
