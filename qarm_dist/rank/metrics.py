"""Ranking metrics, numpy in and numpy out: AUC, UAUC, GAUC, logloss (checked against scikit-learn).

- AUC: the Mann-Whitney statistic, ties counted half (average ranks), O(n log n).
- UAUC: the mean of per-user AUCs over users who have both classes.
- GAUC: the same per-user AUCs weighted by the user's impressions (QARM's
  industrial metric): a user with many rows counts more.
- user-level AUC: the AUC of every row scored by its user's mean score, i.e.
  how well the model orders *users* by how much they like. It is the part of
  the AUC that GAUC leaves out: with few users (MovieLens' evaluation window
  has 73) AUC can move against GAUC through it alone.
- AUC of new and of returning users: the rows of users with no interaction
  in the training window, and of the others. A new user's rows are scored
  from their history alone (their id was never trained), so when most rows
  are theirs (MovieLens: 47 of the 73 users, 85 % of the rows) the AUC and
  its spread over seeds are mostly about them.
- logloss: mean binary cross-entropy of probabilities clipped to [1e-7, 1 - 1e-7].

Per-user AUCs are computed for all users at once (one sort by user and score),
never in a Python loop over users.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_EPS = 1e-7


def grouped_auc(
    groups: np.ndarray, labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group AUC. Returns (group ids, AUC per group (NaN without both classes), rows per group)."""
    groups = np.asarray(groups)
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((scores, groups))
    g, y, s = groups[order], labels[order], scores[order]
    n = len(g)
    if n == 0:
        return np.zeros(0, groups.dtype), np.zeros(0), np.zeros(0, np.int64)
    new_group = np.concatenate([[True], g[1:] != g[:-1]])
    new_tie = new_group | np.concatenate([[True], s[1:] != s[:-1]])
    group_start = np.flatnonzero(new_group)
    tie_start = np.flatnonzero(new_tie)
    tie_len = np.diff(np.append(tie_start, n))
    # rank within the group (1-based) of each tie block's first row, then the block's average rank
    group_of_tie = np.searchsorted(group_start, tie_start, side="right") - 1
    first_rank = tie_start - group_start[group_of_tie] + 1
    avg_rank = np.repeat(first_rank + (tie_len - 1) / 2.0, tie_len)
    group_idx = np.cumsum(new_group) - 1
    k = len(group_start)
    n_pos = np.bincount(group_idx, weights=y, minlength=k)
    rows = np.bincount(group_idx, minlength=k)
    n_neg = rows - n_pos
    rank_sum = np.bincount(group_idx, weights=np.where(y, avg_rank, 0.0), minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return g[group_start], auc, rows.astype(np.int64)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present."""
    return (
        float(grouped_auc(np.zeros(len(labels), np.int64), labels, scores)[1][0])
        if len(labels)
        else float("nan")
    )


def uauc_gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[float, float, int]:
    """(UAUC, GAUC, users with both classes)."""
    _, per_user, rows = grouped_auc(users, labels, scores)
    ok = ~np.isnan(per_user)
    if not ok.any():
        return float("nan"), float("nan"), 0
    return float(per_user[ok].mean()), float(np.average(per_user[ok], weights=rows[ok])), int(ok.sum())


def user_level_auc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """AUC of each row scored by the mean score of its user: the between-user part of the AUC."""
    _, inv = np.unique(np.asarray(users), return_inverse=True)
    scores = np.asarray(scores, dtype=np.float64)
    mean = np.bincount(inv, weights=scores) / np.bincount(inv)
    return auc(labels, mean[inv])


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    y = np.asarray(labels, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()) if len(y) else float("nan")


def bucket_names(edges: list[int]) -> list[str]:
    """Popularity buckets from edges [1, 10, 100]: "0" (cold), "1-9", "10-99", "100+"."""
    names = ["0"]
    for lo, hi in zip(edges, [*edges[1:], None]):
        names.append(f"{lo}+" if hi is None else f"{lo}-{hi - 1}")
    return names


# the figures of `task_metrics` that reports give as mean and spread over seeds, and its counts
FIGURES = (
    "auc",
    "uauc",
    "gauc",
    "auc_user_level",
    "logloss",
    "auc_cold",
    "auc_new_users",
    "auc_returning_users",
)
COUNTS = (
    "rows",
    "positives",
    "users",
    "users_with_both_classes",
    "cold_rows",
    "new_users",
    "new_user_rows",
    "rows_by_popularity",
)


def task_metrics(
    users: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    item_pop: np.ndarray,
    user_pop: np.ndarray,
    edges: list[int],
) -> dict[str, Any]:
    """Every figure of one task on one evaluation set, with its counts.

    ``item_pop`` / ``user_pop``: each row's item's / user's interactions in the training window.
    """
    u, g, n_users = uauc_gauc(users, labels, probs)
    cold = item_pop == 0
    new = user_pop == 0
    bucket = np.searchsorted(np.asarray(edges), item_pop, side="right")
    by_pop = {}
    for i, name in enumerate(bucket_names(edges)):
        sel = bucket == i
        by_pop[name] = {"auc": auc(labels[sel], probs[sel]), "rows": int(sel.sum())}
    return {
        "auc": auc(labels, probs),
        "uauc": u,
        "gauc": g,
        "auc_user_level": user_level_auc(users, labels, probs),
        "logloss": logloss(labels, probs),
        "auc_cold": auc(labels[cold], probs[cold]),
        "auc_new_users": auc(labels[new], probs[new]),
        "auc_returning_users": auc(labels[~new], probs[~new]),
        "auc_by_popularity": {k: v["auc"] for k, v in by_pop.items()},
        "rows": int(len(labels)),
        "positives": int(np.asarray(labels).sum()),
        "users": int(len(np.unique(users))),
        "users_with_both_classes": n_users,
        "cold_rows": int(cold.sum()),
        "new_users": int(len(np.unique(users[new]))),
        "new_user_rows": int(new.sum()),
        "rows_by_popularity": {k: v["rows"] for k, v in by_pop.items()},
    }
