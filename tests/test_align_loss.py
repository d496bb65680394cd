"""The gathered InfoNCE: exact against a plain formula, and 2 gloo workers = 1 worker with both batches."""

from __future__ import annotations

import copy
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from qarm_dist.align.loss import Batch, info_nce
from qarm_dist.align.model import ResidualTower


def reference_loss(a, b, a_ids, b_ids, tau, a_logq=None, b_logq=None):
    """The formula written out row by row: softmax over the unmasked candidates of each query."""
    n, total, correct = len(a), 0.0, 0
    for q, c, q_ids, pos_ids, c_ids, c_logq in (
        (a, b, a_ids, b_ids, b_ids, b_logq),
        (b, a, b_ids, a_ids, a_ids, a_logq),
    ):
        for i in range(n):
            keep = [j for j in range(n) if j == i or (c_ids[j] != pos_ids[i] and c_ids[j] != q_ids[i])]
            logits = torch.stack(
                [q[i] @ c[j] / tau - (c_logq[j] if c_logq is not None else 0.0) for j in keep]
            )
            target = keep.index(i)
            total = total - F.log_softmax(logits, dim=0)[target]
            correct += int(int(logits.argmax()) == target)
    return total / (2 * n), correct / (2 * n)


def random_batch(n=12, d=8, seed=0, dup=True):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g), dim=1)
    b = F.normalize(torch.randn(n, d, generator=g), dim=1)
    a_ids = torch.arange(100, 100 + n)
    b_ids = torch.arange(200, 200 + n)
    if dup:
        b_ids[3] = b_ids[5]  # a popular target twice
        b_ids[7] = a_ids[2]  # query item 2 appears as a candidate target
    return a, b, a_ids, b_ids


def test_info_nce_matches_the_written_out_formula():
    a, b, a_ids, b_ids = random_batch()
    to_backward, loss, acc = info_nce(Batch(a, b, a_ids, b_ids), temperature=0.2)
    want, want_acc = reference_loss(a, b, a_ids, b_ids, 0.2)
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert float(to_backward) == pytest.approx(float(want), rel=1e-5)  # world size 1
    assert float(acc) == pytest.approx(want_acc)


def test_duplicates_are_masked_not_pushed_apart():
    a, b, a_ids, b_ids = random_batch()
    masked = float(info_nce(Batch(a, b, a_ids, b_ids), 0.2)[1])
    unmasked = float(info_nce(Batch(a, b, a_ids, b_ids), 0.2, mask_duplicates=False)[1])
    clean = float(info_nce(Batch(a, b, a_ids, torch.arange(200, 212)), 0.2)[1])
    assert masked != pytest.approx(unmasked)  # the masks changed the loss
    # with distinct ids masking changes nothing
    assert clean == pytest.approx(
        float(info_nce(Batch(a, b, a_ids, torch.arange(200, 212)), 0.2, mask_duplicates=False)[1])
    )
    # a row whose positive equals another row's positive: its duplicate gets zero gradient weight
    b2 = b.clone().requires_grad_(True)
    to_backward, _, _ = info_nce(Batch(a, b2, a_ids, b_ids), 0.2)
    to_backward.backward()
    assert torch.isfinite(b2.grad).all()


def test_logq_correction_is_subtracted_from_candidate_logits():
    a, b, a_ids, b_ids = random_batch(dup=False)
    a_logq = torch.log(torch.linspace(0.01, 0.2, len(a)))
    b_logq = torch.log(torch.linspace(0.3, 0.02, len(b)))
    got = info_nce(Batch(a, b, a_ids, b_ids, a_logq, b_logq), 0.1)[1]
    want, _ = reference_loss(a, b, a_ids, b_ids, 0.1, a_logq, b_logq)
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tower: ResidualTower, batch: tuple, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x_a, x_b, a_ids, b_ids, a_logq, b_logq = batch
    n = len(x_a) // world
    rows = slice(rank * n, (rank + 1) * n)
    model = torch.nn.parallel.DistributedDataParallel(tower)
    emb = model(torch.cat([x_a[rows], x_b[rows]]))
    to_backward, loss, acc = info_nce(
        Batch(emb[:n], emb[n:], a_ids[rows], b_ids[rows], a_logq[rows], b_logq[rows]), 0.1
    )
    to_backward.backward()
    torch.save(
        {"loss": loss, "acc": acc, "grads": {k: p.grad for k, p in tower.named_parameters()}}, f"{out}.{rank}"
    )
    dist.destroy_process_group()


def test_two_gloo_workers_equal_one_worker_with_both_batches(tmp_path):
    torch.manual_seed(0)
    d, n = 16, 8  # 2 workers x 8 rows = 1 worker x 16 rows
    tower = ResidualTower(d, 32)
    torch.nn.init.normal_(
        tower.down.weight, std=0.1
    )  # leave the identity start, so every weight gets gradient
    x_a, x_b = torch.randn(2 * n, d), torch.randn(2 * n, d)
    a_ids, b_ids = torch.arange(2 * n), torch.arange(100, 100 + 2 * n)
    b_ids[1] = b_ids[12]  # a duplicate that spans the two workers' halves
    a_logq, b_logq = torch.rand(2 * n).log(), torch.rand(2 * n).log()

    single = copy.deepcopy(tower)
    emb = single(torch.cat([x_a, x_b]))
    to_backward, loss, acc = info_nce(Batch(emb[: 2 * n], emb[2 * n :], a_ids, b_ids, a_logq, b_logq), 0.1)
    to_backward.backward()

    out = str(tmp_path / "res")
    batch = (x_a, x_b, a_ids, b_ids, a_logq, b_logq)
    mp.start_processes(_worker, args=(2, _free_port(), tower, batch, out), nprocs=2, start_method="spawn")
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        assert float(got["loss"]) == pytest.approx(float(loss), rel=1e-5)
        assert float(got["acc"]) == pytest.approx(float(acc))
        for name, p in single.named_parameters():
            np.testing.assert_allclose(got["grads"][name].numpy(), p.grad.numpy(), rtol=1e-4, atol=1e-6)
