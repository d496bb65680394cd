"""Semantic-ID codebooks: residual K-means, FSQ, VQ codes."""
