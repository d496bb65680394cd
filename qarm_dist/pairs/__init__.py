"""Item-pair corpora for alignment: `qarm pairs` (Swing I2I, U2I triggers, judge, popularity control)."""

from qarm_dist.pairs.stage import build_pairs, run_pairs

__all__ = ["build_pairs", "run_pairs"]
