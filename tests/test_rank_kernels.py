"""Ranker kernels alone: metrics vs scikit-learn, history and negative sampling, features, sparse tables."""

from __future__ import annotations

import os
import socket

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import log_loss, roc_auc_score

from qarm_dist.rank.embeddings import EmbeddingBagConfig, EmbeddingTables, sparse_optimizer, sync_sparse_grads
from qarm_dist.rank.features import PAD, Codes, FeatureSpec, ItemFeatures, featurize
from qarm_dist.rank.metrics import auc, bucket_names, logloss, task_metrics, uauc_gauc, user_level_auc
from qarm_dist.rank.samples import negatives, prior_events


def test_auc_and_logloss_agree_with_scikit_learn_including_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    s = np.round(rng.random(2000), 2)  # many ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    p = rng.random(2000)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-9)
    assert np.isnan(auc(np.ones(5), rng.random(5)))  # one class: undefined, not 0.5


def test_uauc_and_gauc_are_per_user_aucs_averaged_and_impression_weighted():
    rng = np.random.default_rng(1)
    users = rng.integers(0, 30, 3000)
    y = (rng.random(3000) < 0.3 + 0.01 * users).astype(int)
    s = rng.random(3000) + 0.3 * y
    y[users == 7] = 1  # a user with one class is left out of both
    uauc, gauc, n = uauc_gauc(users, y, s)
    ok = [u for u in np.unique(users) if len(set(y[users == u])) == 2]
    per = [roc_auc_score(y[users == u], s[users == u]) for u in ok]
    rows = [(users == u).sum() for u in ok]
    assert n == len(ok) == 29
    assert uauc == pytest.approx(np.mean(per), abs=1e-12)
    assert gauc == pytest.approx(np.average(per, weights=rows), abs=1e-12)


def test_user_level_auc_orders_users_by_their_mean_score_and_ignores_order_within_a_user():
    rng = np.random.default_rng(2)
    users = rng.integers(0, 40, 4000)
    y = (rng.random(4000) < 0.1 + 0.02 * users).astype(int)  # users differ in how much they like
    s = rng.random(4000) + 0.01 * users
    mean = np.array([s[users == u].mean() for u in range(40)])
    assert user_level_auc(users, y, s) == pytest.approx(roc_auc_score(y, mean[users]), abs=1e-12)
    shuffled = s.copy()  # reorder scores within every user: the user means, so the figure, stay
    for u in range(40):
        shuffled[users == u] = rng.permutation(s[users == u])
    assert user_level_auc(users, y, shuffled) == pytest.approx(user_level_auc(users, y, s), abs=1e-12)
    flat = mean[users]  # scores constant within each user: AUC is all between users
    assert user_level_auc(users, y, flat) == pytest.approx(auc(y, flat), abs=1e-12)
    assert user_level_auc(users, y, s) > 0.6  # the planted per-user rates, seen through the means


def test_task_metrics_split_by_popularity_and_cold_start():
    users = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    y = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    p = np.array([0.9, 0.1, 0.2, 0.8, 0.7, 0.3, 0.6, 0.4])
    pop = np.array([0, 0, 5, 5, 50, 50, 500, 500])
    m = task_metrics(users, y, p, pop, np.ones(8, np.int64), [1, 10, 100])
    assert bucket_names([1, 10, 100]) == ["0", "1-9", "10-99", "100+"]
    assert m["auc_cold"] == 1.0 and m["auc_by_popularity"]["1-9"] == 0.0
    assert m["rows_by_popularity"] == {"0": 2, "1-9": 2, "10-99": 2, "100+": 2}
    assert m["cold_rows"] == 2 and m["users_with_both_classes"] == 4


def test_task_metrics_split_new_from_returning_users():
    rng = np.random.default_rng(3)
    users = rng.integers(0, 30, 3000)
    user_pop = np.where(users < 10, 0, users)  # users 0-9 have no training-window interaction
    y = (rng.random(3000) < 0.4).astype(int)
    p = np.where(users < 10, rng.random(3000), 0.5 * y + 0.5 * rng.random(3000))  # returning: signal
    m = task_metrics(users, y, p, np.ones(3000, np.int64), user_pop, [1, 10, 100])
    new = users < 10
    assert m["auc_new_users"] == pytest.approx(roc_auc_score(y[new], p[new]), abs=1e-12)
    assert m["auc_returning_users"] == pytest.approx(roc_auc_score(y[~new], p[~new]), abs=1e-12)
    assert m["auc_returning_users"] > 0.8 and abs(m["auc_new_users"] - 0.5) < 0.05
    assert m["new_users"] == len(np.unique(users[new])) and m["new_user_rows"] == int(new.sum())


def test_prior_events_are_the_last_n_strictly_earlier_events_oldest_first():
    event_ts = np.array([10, 20, 20, 30, 40])
    event_items = np.array([1, 2, 3, 4, 5])
    offsets, idx = prior_events(np.array([5, 20, 31, 100]), event_ts, n=2)
    got = [event_items[idx[a:b]].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    assert got == [[], [1], [3, 4], [4, 5]]  # ts 20 excludes the events at 20 itself
    assert offsets.dtype == np.int32 and idx.dtype.kind == "i"


def test_negatives_are_items_that_exist_at_the_rows_time_and_are_deterministic():
    created = np.array([0, 0, 100, 200, 300])
    ids = np.array([10, 11, 12, 13, 14])
    rows = pa.RecordBatch.from_pydict(
        {
            "user_id": [1, 1, 2],
            "item_id": [10, 11, 13],
            "ts": [150, 150, 250],
            "history": pa.array([[10], [10], [11, 12]], pa.list_(pa.int64())),
            "history_like": pa.array([[1], [1], [0, 1]], pa.list_(pa.int8())),
        }
    )
    a = negatives(rows, 3, 7, created, ids)
    b = negatives(rows, 3, 7, created, ids)
    assert a.to_pylist() == b.to_pylist()
    t = a.to_pydict()
    for item, ts in zip(t["item_id"], t["ts"]):
        assert created[np.searchsorted(ids, item)] <= ts
    assert set(t["click"]) == {0} and set(t["like"]) == {0}
    assert t["history"][-1] == [11, 12] and t["history_like"][-1] == [0, 1]
    assert t["item_id"][:3] != t["item_id"][3:6]  # same user and time, different real item: other draws


def _batch(users, items, hists, sampled):
    n = len(users)
    return pa.table(
        {
            "user_id": pa.array(users, pa.int64()),
            "item_id": pa.array(items, pa.int64()),
            "history": pa.array(hists, pa.list_(pa.int64())),
            "history_like": pa.array([[i % 2 for i in range(len(h))] for h in hists], pa.list_(pa.int8())),
            "click": pa.array([1] * n, pa.int8()),
            "like": pa.array([1] * n, pa.int8()),
            "sampled": pa.array(sampled, pa.int8()),
        }
    )


def test_featurize_dedups_items_falls_back_for_items_without_codes_and_masks_sampled_rows():
    feats = ItemFeatures(
        np.array([1, 2, 3]),
        {
            "rq": Codes(
                1, [4, 4], np.array([[1, 2], [3, 4], [4, 1]]), np.array([[2, 3], [1, 3], [1, 2]]), None, 0
            )
        },
    )
    spec = FeatureSpec(64, 64, 64, ("rq",), True, False, ("click", "like"))
    f = featurize(_batch([5, 6], [1, 99], [[2, 3], []], [0, 1]), feats, spec)
    assert f["item"].shape[0] == 4  # distinct items 1, 2, 3, 99
    assert f["missing_codes"] == 1  # item 99 has no codes ...
    row99 = int(f["target_pos"][1])
    assert int(f["rq_l0"][row99]) == PAD and int(f["rq_p2"][row99]) == PAD and (f["vq"][row99] == PAD).all()
    assert f["hist_mask"].tolist() == [[True, True], [False, False]]
    assert f["hist_like"].tolist() == [[1, 2], [0, 0]]  # not liked, liked; padding
    assert f["label_mask"].tolist() == [[True, True], [True, False]]  # a sampled row: click only


def test_a_10m_row_table_trains_with_a_sparse_gradient():
    torch.manual_seed(0)
    tables = EmbeddingTables([EmbeddingBagConfig("item", 10_000_000, 16, ("item",))])
    w = tables.tables["item"].weight
    opt = sparse_optimizer("adagrad", [w], lr=0.1)
    ids = torch.tensor([[5, 7, 0], [9_999_999, 5, 0]])  # bags of ids, 0 = padding
    before = w[[5, 7, 9_999_999, 6]].detach().clone()
    tables("item", ids).pow(2).sum().backward()
    g = w.grad
    assert g.is_sparse and g.shape == w.shape
    assert set(g.coalesce().indices()[0].tolist()) <= {5, 7, 9_999_999, 0}
    assert g.coalesce().values().numel() <= 4 * 16  # not 10M x 16
    opt.step()
    after = w[[5, 7, 9_999_999, 6]].detach()
    assert (after[:3] != before[:3]).any(dim=1).all() and torch.equal(after[3], before[3])


def test_a_lookup_reads_each_distinct_id_once_and_equals_a_plain_embedding_bag():
    torch.manual_seed(0)
    tables = EmbeddingTables([EmbeddingBagConfig("t", 50, 8, ("t",))])
    plain = torch.nn.EmbeddingBag(50, 8, mode="mean", padding_idx=0)
    plain.weight.data.copy_(tables.tables["t"].weight.data)
    ids = torch.randint(0, 12, (40, 6))  # many repeats, some padding
    ids[3] = 0  # a bag of padding only pools to zero
    out, want = tables("t", ids), plain(ids)
    assert torch.allclose(out, want, atol=1e-6) and torch.equal(out[3], torch.zeros(8))
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (want * upstream).sum().backward()
    g = tables.tables["t"].weight.grad
    assert g.is_sparse and g._nnz() == len(torch.unique(ids[ids > 0]))  # a row per distinct id, not 240
    assert torch.allclose(g.to_dense(), plain.weight.grad, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    tables = EmbeddingTables([EmbeddingBagConfig("t", 100, 4, ("t",))])
    ids = torch.tensor([[3], [4]]) if rank == 0 else torch.tensor([[4], [50]])
    tables("t", ids).sum().backward()
    sync_sparse_grads(tables)
    torch.save(tables.tables["t"].weight.grad.to_dense(), f"{out}.{rank}")
    dist.destroy_process_group()


def test_sparse_gradients_are_averaged_over_gloo_workers(tmp_path):
    out = str(tmp_path / "g")
    mp.start_processes(_sync_worker, args=(_free_port(), out), nprocs=2, start_method="spawn")
    want = torch.zeros(100, 4)
    want[3], want[4], want[50] = 0.5, 1.0, 0.5  # (worker 0 + worker 1) / 2
    for rank in range(2):
        assert torch.equal(torch.load(f"{out}.{rank}"), want)
