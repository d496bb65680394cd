"""A seeded, streamable world of users, items and behaviour.

What it plants, and why (QARM's problem in miniature):

- every item has a *content topic* (what its text and content embedding say)
  and a *behaviour topic* (how users actually treat it). For a share
  ``mismatch`` of items the two differ: items that read alike are used
  differently, and the reverse. Alignment has to learn the behaviour view.
- popularity is heavy-tailed (Pareto weights, a Zipf-like rank curve);
- items arrive over time: ~70 % exist before the first day, the rest arrive
  uniformly over the days and get a share of impressions while new, so the
  latest window has cold-start items with enough rows to measure;
- two task labels: ``click`` and ``like`` (like implies click), both driven
  by the user-item behaviour affinity.

Every item attribute is a pure function of ``(seed, item_id)`` computed with
a vectorised hash, so any chunk of items or users can be produced alone: the
world streams at any size and never holds all items' rows in memory. Item
ids are in creation order, so "items available at time t" is an id prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from qarm_dist.hashing import mix64, uniform01

if TYPE_CHECKING:
    from qarm_dist.config import WorldConfig

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_users": 400, "n_items": 600, "impressions_per_user": 40},
    "small": {"n_users": 3000, "n_items": 3000, "impressions_per_user": 60},
    "large": {"n_users": 200_000, "n_items": 2_000_000, "impressions_per_user": 100},
}

# Real words, so that a real sentence encoder sees meaning in the item text.
TOPICS: dict[str, tuple[str, ...]] = {
    "space": (
        "rocket",
        "galaxy",
        "astronaut",
        "orbit",
        "planet",
        "telescope",
        "comet",
        "nebula",
        "moon",
        "satellite",
        "asteroid",
        "launch",
    ),
    "cooking": (
        "recipe",
        "oven",
        "pasta",
        "spices",
        "baking",
        "kitchen",
        "sauce",
        "chef",
        "bread",
        "soup",
        "garlic",
        "dessert",
    ),
    "football": (
        "goal",
        "striker",
        "stadium",
        "referee",
        "penalty",
        "league",
        "midfield",
        "coach",
        "tackle",
        "cup",
        "keeper",
        "fans",
    ),
    "music": (
        "guitar",
        "concert",
        "melody",
        "drums",
        "album",
        "singer",
        "piano",
        "chorus",
        "band",
        "rhythm",
        "orchestra",
        "lyrics",
    ),
    "finance": (
        "stocks",
        "investment",
        "bank",
        "interest",
        "budget",
        "market",
        "savings",
        "loan",
        "dividend",
        "inflation",
        "tax",
        "portfolio",
    ),
    "gardening": (
        "roses",
        "soil",
        "seeds",
        "compost",
        "tulips",
        "pruning",
        "greenhouse",
        "shrubs",
        "watering",
        "herbs",
        "lawn",
        "bulbs",
    ),
    "cars": (
        "engine",
        "sedan",
        "tires",
        "racing",
        "motor",
        "garage",
        "brakes",
        "turbo",
        "highway",
        "fuel",
        "gearbox",
        "dashboard",
    ),
    "fashion": (
        "dress",
        "jacket",
        "runway",
        "fabric",
        "designer",
        "shoes",
        "handbag",
        "denim",
        "silk",
        "boutique",
        "tailor",
        "scarf",
    ),
    "travel": (
        "passport",
        "beach",
        "hotel",
        "flight",
        "luggage",
        "island",
        "tourist",
        "resort",
        "cruise",
        "backpack",
        "map",
        "airport",
    ),
    "history": (
        "empire",
        "castle",
        "medieval",
        "pharaoh",
        "revolution",
        "ancient",
        "dynasty",
        "knight",
        "ruins",
        "monarchy",
        "battle",
        "archive",
    ),
    "medicine": (
        "doctor",
        "vaccine",
        "hospital",
        "surgery",
        "nurse",
        "diagnosis",
        "therapy",
        "patient",
        "clinic",
        "pharmacy",
        "symptoms",
        "cure",
    ),
    "pets": (
        "puppy",
        "kitten",
        "leash",
        "aquarium",
        "parrot",
        "veterinarian",
        "hamster",
        "collar",
        "grooming",
        "litter",
        "fetch",
        "treats",
    ),
    "gaming": (
        "console",
        "joystick",
        "level",
        "multiplayer",
        "quest",
        "arcade",
        "controller",
        "boss",
        "esports",
        "pixel",
        "respawn",
        "loot",
    ),
    "fitness": (
        "workout",
        "gym",
        "yoga",
        "running",
        "muscles",
        "cardio",
        "dumbbell",
        "stretching",
        "marathon",
        "protein",
        "squats",
        "treadmill",
    ),
    "ocean": (
        "whale",
        "coral",
        "diving",
        "shark",
        "waves",
        "submarine",
        "reef",
        "dolphin",
        "tide",
        "seashell",
        "lighthouse",
        "sailor",
    ),
    "computers": (
        "software",
        "laptop",
        "keyboard",
        "algorithm",
        "server",
        "processor",
        "database",
        "network",
        "compiler",
        "monitor",
        "python",
        "code",
    ),
}
ADJECTIVES = (
    "a classic",
    "an amazing",
    "a quick",
    "the ultimate",
    "a beginner's",
    "an expert",
    "a fun",
    "a complete",
)
FORMATS = (
    "guide to",
    "story about",
    "review of",
    "video on",
    "collection of",
    "podcast about",
    "tour of",
    "lesson on",
)

_TOPIC_NAMES = np.array(list(TOPICS))
_WORDS = np.array([w for ws in TOPICS.values() for w in ws])
_WORDS_PER_TOPIC = len(next(iter(TOPICS.values())))
_N_NOISE = 4096  # rows of the shared noise tables that per-item noise is drawn from
_BEHAVIOUR_DIM = 32
_T0 = 1_704_067_200  # 2024-01-01T00:00:00Z
_DAY = 86_400
_OLD_SHARE = 0.7  # share of items that exist before the first day
_CANDIDATES = 16  # items a user is shown per impression slot; the choice among them follows affinity
_FRESH = 4  # of those, drawn from items created in the last week (a feed's push for new items)
_FRESH_DAYS = 7


def _normalize(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class World:
    n_users: int
    n_items: int
    impressions_per_user: int
    mismatch: float = 0.4
    content_dim: int = 64
    days: int = 60
    seed: int = 0
    pareto_shape: float = 1.5  # smaller = more skewed; 1.5 puts ~20 % of impressions on the top 1 % of items

    @classmethod
    def named(cls, size: str, **overrides: object) -> World:
        if size not in SIZES:
            raise ValueError(f"unknown world size {size!r}; choose one of {', '.join(SIZES)}")
        return cls(**{**SIZES[size], **{k: v for k, v in overrides.items() if v is not None}})  # type: ignore[arg-type]

    @classmethod
    def from_config(cls, wc: WorldConfig) -> World:
        return cls.named(
            wc.size,
            n_users=wc.n_users,
            n_items=wc.n_items,
            impressions_per_user=wc.impressions_per_user,
            mismatch=wc.mismatch,
            content_dim=wc.content_dim,
            days=wc.days,
            seed=wc.seed,
        )

    def with_seed(self, seed: int) -> World:
        return replace(self, seed=seed)

    # ------------------------------------------------------------ item truth
    def _tables(self) -> dict[str, np.ndarray]:
        """Small shared tables (prototypes, noise) drawn from the seed; O(topics + 4096) memory."""
        rng = np.random.default_rng(self.seed)
        t = len(TOPICS)
        return {
            # orthonormal: a user's taste for one topic says nothing about another
            "behaviour_proto": np.linalg.qr(rng.standard_normal((_BEHAVIOUR_DIM, t)))[0].T.astype(np.float32),
            # unit rows, so that "prototype + 0.45 * noise" means a 0.45 perturbation
            "behaviour_noise": _normalize(rng.standard_normal((_N_NOISE, _BEHAVIOUR_DIM))),
            "content_proto": _normalize(rng.standard_normal((t, self.content_dim))),
            "word_vec": _normalize(rng.standard_normal((len(_WORDS), self.content_dim))),
        }

    def item_truth(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The planted attributes of items: topics, mismatch flag, behaviour factor, popularity weight."""
        ids = np.asarray(ids, dtype=np.int64)
        tab = self._tables()
        t = len(TOPICS)
        s = self.seed * 1000
        content = (mix64(ids, s + 1) % np.uint64(t)).astype(np.int64)
        mismatched = uniform01(ids, s + 2) < self.mismatch
        shift = 1 + (mix64(ids, s + 3) % np.uint64(t - 1)).astype(np.int64)
        behaviour = np.where(mismatched, (content + shift) % t, content)
        noise = tab["behaviour_noise"][(mix64(ids, s + 4) % np.uint64(_N_NOISE)).astype(np.int64)]
        factor = _normalize(tab["behaviour_proto"][behaviour] + 0.45 * noise)
        return {
            "content_topic": content,
            "behaviour_topic": behaviour,
            "mismatched": mismatched,
            "factor": factor,
            "popularity": self.popularity(ids),
        }

    def popularity(self, ids: np.ndarray) -> np.ndarray:
        """Pareto weight of each item: how often it is drawn as a candidate."""
        u = np.clip(uniform01(np.asarray(ids, dtype=np.int64), self.seed * 1000 + 5), 1e-9, 1.0)
        return np.minimum(u ** (-1.0 / self.pareto_shape), 1e4)

    def _popularity_cdf(self, chunk_rows: int = 1_000_000) -> np.ndarray:
        """Cumulative popularity over item ids: 8 bytes per item, built a chunk at a time."""
        cdf = np.empty(self.n_items, dtype=np.float64)
        total = 0.0
        for start in range(0, self.n_items, chunk_rows):
            stop = min(start + chunk_rows, self.n_items)
            part = np.cumsum(self.popularity(np.arange(start, stop))) + total
            cdf[start:stop], total = part, part[-1]
        return cdf

    def _word_index(self, ids: np.ndarray, content: np.ndarray) -> np.ndarray:
        """Three distinct words of the item's content topic, as indices into the word list."""
        s = self.seed * 1000
        first = (mix64(ids, s + 6) % np.uint64(_WORDS_PER_TOPIC)).astype(np.int64)
        step = 1 + (mix64(ids, s + 7) % np.uint64(_WORDS_PER_TOPIC // 3)).astype(np.int64)
        k = (first[:, None] + step[:, None] * np.arange(3)) % _WORDS_PER_TOPIC
        return content[:, None] * _WORDS_PER_TOPIC + k

    def created_ts(self, ids: np.ndarray) -> np.ndarray:
        """Creation time, increasing with id: old items over the prior year, new ones over the days."""
        ids = np.asarray(ids, dtype=np.int64)
        n_old = int(self.n_items * _OLD_SHARE)
        jitter = uniform01(ids, self.seed * 1000 + 8)
        old = _T0 - ((n_old - ids) - jitter) * (365 * _DAY / max(n_old, 1))
        new = _T0 + ((ids - n_old) + jitter) / max(self.n_items - n_old, 1) * self.days * _DAY
        return np.where(ids < n_old, old, new).astype(np.int64)

    def _available(self, ts: np.ndarray) -> np.ndarray:
        """How many items (an id prefix) exist at each time."""
        n_old = int(self.n_items * _OLD_SHARE)
        frac = np.clip((ts - _T0) / (self.days * _DAY), 0.0, 1.0)
        return np.maximum(n_old + np.floor(frac * (self.n_items - n_old)).astype(np.int64), 1)

    # ---------------------------------------------------------------- tables
    def items(self, chunk_rows: int = 100_000) -> Iterator[pa.Table]:
        """Rows of the `items` table, ``chunk_rows`` at a time."""
        for start in range(0, self.n_items, chunk_rows):
            ids = np.arange(start, min(start + chunk_rows, self.n_items), dtype=np.int64)
            content = self.item_truth(ids)["content_topic"]
            w = _WORDS[self._word_index(ids, content)]
            s = self.seed * 1000
            adj = np.array(ADJECTIVES)[(mix64(ids, s + 9) % np.uint64(len(ADJECTIVES))).astype(np.int64)]
            fmt = np.array(FORMATS)[(mix64(ids, s + 10) % np.uint64(len(FORMATS))).astype(np.int64)]
            text = adj
            for part in (" ", fmt, " ", w[:, 0], ", ", w[:, 1], " and ", w[:, 2]):
                text = np.char.add(text, part)
            yield pa.table(
                {
                    "item_id": ids,
                    "text": pa.array(text.tolist(), pa.string()),
                    "category": pa.array(_TOPIC_NAMES[content].tolist(), pa.string()),
                    "created_ts": self.created_ts(ids),
                }
            )

    def content_embeddings(self, chunk_rows: int = 100_000) -> Iterator[pa.Table]:
        """The content view emitted directly (topic prototype + the item's words), for scale runs."""
        tab = self._tables()
        for start in range(0, self.n_items, chunk_rows):
            ids = np.arange(start, min(start + chunk_rows, self.n_items), dtype=np.int64)
            content = self.item_truth(ids)["content_topic"]
            words = tab["word_vec"][self._word_index(ids, content)].sum(axis=1)
            emb = _normalize(tab["content_proto"][content] + 0.5 * words)
            yield pa.table(
                {
                    "item_id": ids,
                    "emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), self.content_dim),
                    "encoder": pa.array(["world"] * len(ids), pa.string()),
                }
            )

    def user_factor(self, users: np.ndarray) -> np.ndarray:
        """Each user likes two behaviour topics, one more than the other."""
        tab = self._tables()
        t = len(TOPICS)
        s = self.seed * 1000 + 100
        a = (mix64(users, s + 1) % np.uint64(t)).astype(np.int64)
        b = (a + 1 + (mix64(users, s + 2) % np.uint64(t - 1)).astype(np.int64)) % t
        noise = tab["behaviour_noise"][(mix64(users, s + 3) % np.uint64(_N_NOISE)).astype(np.int64)]
        return _normalize(tab["behaviour_proto"][a] + 0.6 * tab["behaviour_proto"][b] + 0.3 * noise)

    def interactions(self, users_per_chunk: int = 2000) -> Iterator[pa.Table]:
        """Rows of `interactions`, a chunk of users at a time, time-ordered per user.

        Per impression slot the user is shown a few candidates drawn by
        popularity among the items that exist at that moment (a few of them
        among the last week's new items) and picks one by affinity (a softmax,
        via Gumbel-max); click and like then follow the affinity of the picked
        item.
        """
        cdf = self._popularity_cdf()
        for start in range(0, self.n_users, users_per_chunk):
            users = np.arange(start, min(start + users_per_chunk, self.n_users), dtype=np.int64)
            rng = np.random.default_rng([self.seed, 7, start])
            activity = np.exp(rng.normal(0.0, 0.5, len(users)))
            counts = np.maximum(1, np.round(self.impressions_per_user * activity / np.exp(0.125))).astype(
                np.int64
            )
            uid = np.repeat(users, counts)
            ts = _T0 + rng.integers(0, self.days * _DAY, len(uid))
            hi = self._available(ts)
            lo = np.zeros_like(hi)
            fresh_lo = self._available(ts - _FRESH_DAYS * _DAY)
            fresh_lo = np.where(fresh_lo < hi, fresh_lo, 0)  # no fresh items yet: draw from all
            lo = np.broadcast_to(lo[:, None], (len(uid), _CANDIDATES)).copy()
            lo[:, :_FRESH] = fresh_lo[:, None]
            base = np.where(lo > 0, cdf[np.maximum(lo - 1, 0)], 0.0)
            r = base + rng.random((len(uid), _CANDIDATES)) * (cdf[hi - 1][:, None] - base)
            cand = np.clip(np.searchsorted(cdf, r), lo, hi[:, None] - 1)
            uf = self.user_factor(users)[uid - start]
            affinity = np.einsum(
                "nd,ncd->nc", uf, self.item_truth(cand.ravel())["factor"].reshape(*cand.shape, -1)
            )
            pick = np.argmax(4.0 * affinity + rng.gumbel(size=cand.shape), axis=1)
            item = cand[np.arange(len(uid)), pick]
            aff = affinity[np.arange(len(uid)), pick]
            click = rng.random(len(uid)) < 1 / (1 + np.exp(-(5.0 * aff - 1.0)))
            like = click & (rng.random(len(uid)) < 1 / (1 + np.exp(-(5.0 * aff - 2.0))))
            keys = np.stack([uid, item, ts], axis=1)
            _, first = np.unique(keys, axis=0, return_index=True)
            order = np.lexsort((ts[first], uid[first]))
            keep = first[order]
            yield pa.table(
                {
                    "user_id": uid[keep],
                    "item_id": item[keep],
                    "ts": ts[keep],
                    "day": pa.array((ts[keep] // _DAY).astype(np.int32), pa.int32()).cast(pa.date32()),
                    "click": click[keep].astype(np.int8),
                    "like": like[keep].astype(np.int8),
                }
            )
