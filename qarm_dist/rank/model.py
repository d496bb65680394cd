"""The ranker: item representations from id + semantic-code features, history, cross, GSU/ESU, MMoE.

    item (id, VQ bag, RQ levels + prefix n-grams, FSQ, [aligned emb]) ─► Linear ─► item rep
    target rep ─┬─ DIN over history reps (the code cross) ───┐
                ├─ GSU (aligned emb top-k) ─► ESU attention ──┤
    history ────┴─ mean pool ─────────────────────────────────┼─► MMoE ─► one logit per task
    user id ──────────────────────────────────────────────────┘

A `Variant` switches features on and off; the ablation trains every variant
with the same seed and data. `RankerSpec` is the whole model as data (JSON in
a checkpoint), so inference rebuilds it without the training config.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qarm_dist.rank.din import DIN
from qarm_dist.rank.embeddings import EmbeddingBagConfig, EmbeddingTables
from qarm_dist.rank.features import FeatureSpec
from qarm_dist.rank.gsu_esu import ESU, gsu_topk
from qarm_dist.rank.mmoe import MMoE


@dataclass(frozen=True)
class Variant:
    vq: bool = False  # VQ code: the K nearest items' ids, pooled
    rq: bool = False  # RQ levels + prefix n-grams of the plain residual K-means codebook
    rkfsq: bool = False  # the same from the Res-KmeansFSQ codebook, plus its FSQ code
    emb: bool = False  # the frozen aligned embedding as a dense input
    history_codes: bool = True  # code features on history items too (else on the target only)
    din: bool = True  # target-aware attention over the history (else mean pooling only)
    gsu: bool = False  # GSU/ESU over the history (needs aligned embeddings)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(r for r, on in (("rq", self.rq), ("rkfsq", self.rkfsq)) if on)

    @property
    def needs_aligned(self) -> bool:
        return self.emb or self.gsu


VARIANTS: dict[str, Variant] = {
    "id_only": Variant(),
    "emb": Variant(emb=True),
    "vq": Variant(vq=True),
    "rq": Variant(rq=True),
    "vq_rq": Variant(vq=True, rq=True),
    "rkfsq": Variant(vq=True, rkfsq=True),
    # where the gain comes from: target-only codes (the simple model), no cross, + GSU/ESU
    "vq_rq_target": Variant(vq=True, rq=True, history_codes=False),
    "vq_rq_nocross": Variant(vq=True, rq=True, din=False),
    "vq_rq_gsu": Variant(vq=True, rq=True, gsu=True),
}


def variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown ranker variant {name!r}; known: {', '.join(VARIANTS)}") from None


@dataclass(frozen=True)
class RankerSpec:
    variant: str
    tasks: tuple[str, ...]
    code_k: dict[str, list[int]]  # role → centroids per RQ level
    fsq_size: dict[str, int]  # role → distinct FSQ codes (0 = none)
    user_rows: int
    item_rows: int
    ngram_rows: int
    embedding_dim: int
    d_model: int
    experts: int
    expert_hidden: int
    tower_hidden: int
    gsu_k: int
    emb_dim: int
    history_feedback: bool = False  # the like label of each history item (False in specs saved before it)
    extra: dict = field(default_factory=dict)

    @property
    def v(self) -> Variant:
        return variant(self.variant)

    def tables(self) -> list[EmbeddingBagConfig]:
        d = self.embedding_dim
        out = [
            EmbeddingBagConfig("user", self.user_rows, d, ("user",)),
            EmbeddingBagConfig("item", self.item_rows, d, ("item",)),
        ]
        if self.v.vq:
            out.append(EmbeddingBagConfig("vq", self.item_rows, d, ("vq",)))
        for role in self.v.roles:
            ks = self.code_k[role]
            out += [
                EmbeddingBagConfig(f"{role}_l{lv}", k + 1, d, (f"{role}_l{lv}",)) for lv, k in enumerate(ks)
            ]
            out += [
                EmbeddingBagConfig(f"{role}_p{w}", self.ngram_rows, d, (f"{role}_p{w}",))
                for w in range(2, len(ks) + 1)
            ]
            if self.fsq_size.get(role):
                out.append(EmbeddingBagConfig(f"{role}_fsq", self.fsq_size[role] + 1, d, (f"{role}_fsq",)))
        return out

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(
            self.user_rows,
            self.item_rows,
            self.ngram_rows,
            self.v.roles,
            self.v.vq,
            self.v.needs_aligned,
            self.tasks,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RankerSpec:
        d = json.loads(text)
        d["tasks"] = tuple(d["tasks"])
        return cls(**d)


class DenseArch(nn.Module):
    """Everything after the table lookups; the part DDP wraps (the tables sync their sparse gradients)."""

    def __init__(self, spec: RankerSpec, n_codes: int):
        super().__init__()
        self.spec, v, d = spec, spec.v, spec.d_model
        n_in = spec.embedding_dim * (1 + n_codes) + (spec.emb_dim if v.emb else 0)
        self.item_proj = nn.Sequential(nn.Linear(n_in, d), nn.ReLU(), nn.Linear(d, d))
        # padding / not liked / liked, added to each history item's representation
        self.feedback = nn.Embedding(3, d) if spec.history_feedback else None
        self.din = DIN(d) if v.din else None
        self.esu = ESU(d) if v.gsu else None
        n_top = spec.embedding_dim + d * (2 + int(v.din) + int(v.gsu))
        self.mmoe = MMoE(n_top, len(spec.tasks), spec.experts, spec.expert_hidden, spec.tower_hidden)

    def forward(self, looked_up: dict[str, torch.Tensor], f: dict) -> torch.Tensor:
        v = self.spec.v
        ids, codes = looked_up["item"], looked_up["codes"]
        dense = [f["emb"]] if v.emb else []
        target_in = torch.cat([ids, codes, *dense], dim=1)
        rep_t = self.item_proj(target_in)
        if v.history_codes:
            rep_h = rep_t
        else:  # the history sees item ids only: code (and embedding) inputs zeroed
            rep_h = self.item_proj(torch.cat([ids, torch.zeros_like(target_in[:, ids.shape[1] :])], dim=1))
        rep_h = torch.cat([rep_h, rep_h.new_zeros(1, rep_h.shape[1])])  # the padding position
        t = rep_t[f["target_pos"]]
        hist, mask = rep_h[f["hist_pos"]], f["hist_mask"]
        if self.feedback is not None:
            hist = hist + self.feedback(f["hist_like"])
        m = mask.to(hist.dtype)
        mean = (hist * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
        parts = [looked_up["user"], t, mean]
        if self.din is not None:
            parts.append(self.din(t, hist, mask))
        if self.esu is not None:
            emb = torch.cat([f["emb"], f["emb"].new_zeros(1, f["emb"].shape[1])])
            idx, valid = gsu_topk(emb[f["target_pos"]], emb[f["hist_pos"]], mask, self.spec.gsu_k)
            picked = hist.gather(1, idx[..., None].expand(-1, -1, hist.shape[-1]))
            parts.append(self.esu(t, picked, valid))
        return self.mmoe(torch.cat(parts, dim=1))


class Ranker(nn.Module):
    """Sparse tables (``self.sparse``) then the dense architecture (``self.dense``)."""

    def __init__(self, spec: RankerSpec):
        super().__init__()
        self.spec = spec
        self.sparse = EmbeddingTables(spec.tables())
        self.code_features = [c.name for c in spec.tables() if c.name not in ("user", "item")]
        self.dense = DenseArch(spec, len(self.code_features))

    def lookups(self, f: dict) -> dict[str, torch.Tensor]:
        ids = self.sparse("item", f["item"])
        codes = [self.sparse(name, f[name]) for name in self.code_features]
        return {
            "user": self.sparse("user", f["user"]),
            "item": ids,
            "codes": torch.cat(codes, dim=1) if codes else ids.new_zeros(ids.shape[0], 0),
        }

    def forward(self, f: dict) -> torch.Tensor:
        """Logits (B, tasks) of a batch from `qarm_dist.rank.features.featurize`."""
        return self.dense(self.lookups(f), f)


WEIGHTS, SPEC_FILE = "weights.pt", "ranker.json"


def save_ranker(model: Ranker, folder: str) -> None:
    """Weights and the spec (the model as data), so `load_ranker` needs no training config."""
    torch.save(model.state_dict(), os.path.join(folder, WEIGHTS))
    with open(os.path.join(folder, SPEC_FILE), "w") as fh:
        fh.write(model.spec.to_json())


def load_ranker(folder: str) -> Ranker:
    with open(os.path.join(folder, SPEC_FILE)) as fh:
        model = Ranker(RankerSpec.from_json(fh.read()))
    model.load_state_dict(torch.load(os.path.join(folder, WEIGHTS), map_location="cpu"))
    return model.eval()


def loss_fn(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, list[float]]:
    """Sum over tasks of each task's mean BCE over its labelled rows; per-task values for logging."""
    per = F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * mask
    task = per.sum(0) / mask.sum(0).clamp_min(1)
    return task.sum(), [float(x) for x in task.detach()]
