"""Item alignment (QARM): `qarm align train | embed | eval` on Ray Train and Ray Data."""

from qarm_dist.align.evaluate import evaluate
from qarm_dist.align.infer import run_embed
from qarm_dist.align.train import train, train_models

__all__ = ["evaluate", "run_embed", "train", "train_models"]
