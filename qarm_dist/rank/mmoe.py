"""Multi-gate mixture of experts (MMoE, Ma et al. 2018): the multi-task head of QARM's ranker.

Every task shares a set of expert MLPs and mixes their outputs with its own
softmax gate, then a small tower gives the task's logit. Tasks that disagree
(click vs like) can weight experts differently instead of fighting over one
shared bottom.
"""

from __future__ import annotations

import torch
from torch import nn


class MMoE(nn.Module):
    def __init__(self, d_in: int, tasks: int, experts: int, expert_hidden: int, tower_hidden: int):
        super().__init__()
        self.experts = nn.ModuleList(
            nn.Sequential(
                nn.Linear(d_in, expert_hidden), nn.ReLU(), nn.Linear(expert_hidden, expert_hidden), nn.ReLU()
            )
            for _ in range(experts)
        )
        self.gates = nn.ModuleList(nn.Linear(d_in, experts) for _ in range(tasks))
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(expert_hidden, tower_hidden), nn.ReLU(), nn.Linear(tower_hidden, 1))
            for _ in range(tasks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, d_in) → logits (B, tasks)."""
        e = torch.stack([expert(x) for expert in self.experts], dim=1)  # (B, E, h)
        out = []
        for gate, tower in zip(self.gates, self.towers):
            w = torch.softmax(gate(x), dim=-1)  # (B, E)
            out.append(tower(torch.einsum("be,beh->bh", w, e)))
        return torch.cat(out, dim=1)
