"""Content embeddings: `qarm embed` (Ray Data batch inference over `items`)."""

from qarm_dist.embed.stage import embed_new, run_embed

__all__ = ["embed_new", "run_embed"]
