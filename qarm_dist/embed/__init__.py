"""Content embeddings: `qarm embed` (Ray Data batch inference over `items`)."""

from qarm_dist.embed.stage import run_embed

__all__ = ["run_embed"]
