"""`qarm demo --world tiny` through the installed console script, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

QARM = str(Path(sys.executable).parent / "qarm")


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([QARM, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.timeout(1500)  # pytest-timeout counts the shared demo fixture's setup
def test_demo_tiny_end_to_end(demo_root):
    root = demo_root
    report = json.loads((root / "report.json").read_text())
    assert {"dataset", "pairs", "alignment", "codes", "ranker", "tables"} <= set(report)
    d = report["dataset"]
    assert d["catalogue_items"] == 600 and d["users"] == 400
    assert d["train"]["rows"] + d["eval"]["rows"] == d["rows"]
    assert d["eval"]["cold_rows"] > 0 and d["popularity"]["train_top1pct_share"] > 0.1
    assert report["tables"]["item_content_emb"]["rows"] == 600
    assert report["tables"]["interactions"]["rows"] == d["rows"]
    pairs = report["pairs"]
    assert pairs["i2i"] > 0 and pairs["u2i"] > 0 and pairs["heldout"] > 0
    assert set(pairs["judge_rejected"]) == {"i2i", "u2i"}
    assert report["tables"]["item_pairs"]["rows"] == pairs["i2i"] + pairs["u2i"]

    a = report["alignment"]
    assert set(a["hit_rate"]) == {"raw", "aligned", "behaviour"}
    assert set(a["hit_rate"]["aligned"]) == {"10", "50", "200"}
    assert a["heldout_pairs"] == pairs["heldout"] and a["train_pairs"] > 0 and a["epochs"] == 6
    assert report["tables"]["item_aligned_emb"]["rows"] == 600  # every item, cold ones included

    keys = {"collision_rate", "items_per_code", "largest_bucket", "gini", "normalized_entropy", "levels"}
    for name, n_levels in (("rq", 3), ("rkfsq", 3)):  # rkfsq: 2 K-means levels + FSQ
        q = report["codes"][name]
        assert keys <= set(q) and len(q["levels"]) == n_levels and q["items"] == 600
        assert 0 <= q["collision_rate"] <= 1 and 0 < q["normalized_entropy"] <= 1

    r = report["ranker"]
    assert set(r["variants"]) == {"id_only", "vq_rq", "vq_rq_gsu"} and r["main_task"] == "like"
    for variant in r["variants"].values():
        for task in ("click", "like"):
            m = variant[task]
            assert {"auc", "uauc", "gauc", "logloss", "auc_cold", "auc_by_popularity"} <= set(m)
            assert 0 < m["auc"] < 1 and m["counts"]["rows"] == d["eval"]["rows"]
            assert m["counts"]["cold_rows"] == d["eval"]["cold_rows"]  # the same cold-start set
    assert report["tables"]["samples"]["rows"] == d["rows"]  # the world has real negatives: none sampled

    md = (root / "report.md").read_text()
    for section in (
        "## Dataset",
        "## Pairs",
        "## Alignment",
        "## Semantic IDs",
        "## Ranker ablation",
        "## Tables",
    ):
        assert section in md
    for plot in ("popularity.png", "alignment.png", "codes_utilization.png", "ranker_ablation.png"):
        assert (root / "plots" / plot).stat().st_size > 1000

    listed = run("tables", "--root", str(root))
    assert listed.returncode == 0 and "item_content_emb" in listed.stdout and "dim 384" in listed.stdout


def test_cli_errors_are_one_clear_line(tmp_path):
    p = run("tables", "--set", "world.sise=3")
    assert p.returncode == 2 and "config field 'world.sise'" in p.stderr
    p = run("ingest", "movielens", "--path", str(tmp_path), "--root", str(tmp_path / "r"))
    assert p.returncode == 2 and "is not a MovieLens folder" in p.stderr
    assert not (tmp_path / "r").exists()
    p = run("embed", "--root", str(tmp_path / "r"))
    assert p.returncode == 2 and "table 'items' does not exist" in p.stderr
    for stage in (
        ["pairs"],
        ["codebook", "assign"],
        ["align", "train"],
        ["samples"],
        ["rank", "train"],
    ):  # every stage is wired to the parser and fails cleanly
        p = run(*stage, "--root", str(tmp_path / "r"))
        assert p.returncode == 2 and ("does not exist" in p.stderr or "no version yet" in p.stderr), p.stderr
    h = run("--help")
    commands = ("demo", "world", "ingest", "embed", "pairs", "codebook", "align", "samples", "rank", "tables")
    assert all(c in h.stdout for c in commands)
