"""Alignment training throughput: `qarm align train` (Ray Train) vs a plain single-process torch loop.

Both train the same residual tower with the same global batch, temperature, logQ
correction and loss (`qarm_dist.align.loss.info_nce`) on the same train pairs and
the same cores. The plain loop (`bench/plain.py`) holds the pairs in memory and runs
in this process: with all cores' torch threads and with one thread (the peer of one
Ray worker on one CPU) before Ray starts, then with all cores beside the idle local
Ray the trainer uses (what Ray's own processes cost, apart from Ray Train). Ray Train
runs three layouts: one worker holding all cores (the plain loop's layout), one
worker on one core, and one worker per core. Its steady-state pairs/s come from the
per-epoch times the workers report (epochs after the first), with the share of that
time spent waiting for its batches; its wall time (worker start, the shard's read)
is reported apart, as is the Ray Data join. Every run repeats ``--repeats`` times, and
each round starts a fresh local Ray (plain loops, Ray, the join, the plain loop beside
Ray, the three layouts, shut down), because a two-core machine's run-to-run spread is
as wide as the effects measured: every ratio is taken within a round, and figures are
medians over rounds with their least and most. Prints a JSON line per round, and the
summary last.

    python bench/align.py --world small          # builds world + pairs in a temp root
    python bench/align.py --root qarm-data       # an existing root with item_pairs and item_content_emb
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from plain import AlignSettings, PlainPairs, align_loop

from qarm_dist.align.data import load_pairs, log_frequency
from qarm_dist.align.train import train
from qarm_dist.config import load_config
from qarm_dist.data.ingest import write_world
from qarm_dist.engines import ray_init, set_process_env
from qarm_dist.io.delta import Tables
from qarm_dist.pairs import run_pairs


def plain_pairs(tables: Tables) -> PlainPairs:
    """Read the content embeddings and train pairs once, for every run of the plain loop."""
    emb = pa.Table.from_batches(list(tables.read_batches("item_content_emb", columns=["item_id", "emb"])))
    ids = emb["item_id"].to_numpy()
    order = np.argsort(ids)
    ids, dim = ids[order], tables.snapshot("item_content_emb").dim
    x = torch.from_numpy(pc.list_flatten(emb["emb"]).to_numpy().reshape(-1, dim)[order].copy())
    pairs = pa.Table.from_batches(list(tables.read_batches("item_pairs")))
    pairs = pairs.filter(pc.equal(pairs["split"], "train"))
    a = np.searchsorted(ids, pairs["trigger_id"].to_numpy())
    b = np.searchsorted(ids, pairs["target_id"].to_numpy())
    counts = np.bincount(np.concatenate([a, b]), minlength=len(ids))
    return PlainPairs(x, a, b, torch.from_numpy(log_frequency(counts, 2 * len(a))))


def ray_train(cfg, data, workers: int, cpus: int, tag: str) -> dict:
    """Steady-state pairs/s of `qarm align train` with ``workers`` x ``cpus`` (= torch threads each)."""
    c = cfg.model_copy(
        update={"align": cfg.align.model_copy(update={"workers": workers, "cpus_per_worker": cpus})}
    )
    t0 = time.perf_counter()
    info = train(c, f"bench-{tag}-w{workers}x{cpus}", data=data)
    wall = time.perf_counter() - t0
    hist = info.meta["history"]
    steady = [h["pairs"] / h["seconds"] for h in hist[1:]] or [hist[0]["pairs"] / hist[0]["seconds"]]
    waits = [h["seconds_waiting_for_data"] / h["seconds"] for h in hist[1:] or hist]
    return {
        "workers": workers,
        "cpus_per_worker": cpus,
        "pairs_per_s": statistics.median(steady),
        "share_waiting_for_data": statistics.median(waits),
        "fit_wall_s": wall,
    }


def one_round(
    cfg, tables: Tables, in_memory: PlainPairs, settings: AlignSettings, args, layouts, tag: str
) -> dict:
    """One round on a fresh local Ray: the plain loop before Ray starts, then beside it, then Ray Train.

    Starting Ray anew each round puts both sides of every ratio in the same round, so a slow stretch of
    the machine (their spread is as wide as the effects) moves both.
    """
    out: dict = {}
    torch.set_num_threads(1)  # the peer of one Ray worker with one CPU
    out["plain_one_thread"] = align_loop(in_memory, settings, args.epochs)
    torch.set_num_threads(args.threads)
    out["plain"] = align_loop(in_memory, settings, args.epochs)  # the machine holds nothing else
    ray_init(cfg)
    try:
        t0 = time.perf_counter()
        data = load_pairs(tables, "emb", cfg.align.logq, cfg.align.join_partitions)
        out["join_s"], out["train_pairs"], out["dim"] = time.perf_counter() - t0, data.rows, data.dim
        # the plain loop again, now beside the idle local Ray the trainer runs on (its GCS, raylet,
        # dashboard, log monitor and Ray Data's actors share the cores): what Ray's presence costs
        out["plain_beside_ray"] = align_loop(in_memory, settings, args.epochs)
        for w, c in layouts:
            run = ray_train(cfg, data, w, c, tag)
            out[f"{w}x{c}"], out[f"{w}x{c}_waiting"] = run["pairs_per_s"], run["share_waiting_for_data"]
            out[f"{w}x{c}_wall_s"] = run["fit_wall_s"]
    finally:
        ray.shutdown()  # the processes of the Ray this round started, and only those
    return out


def main() -> None:
    set_process_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", help="an existing root with item_pairs and item_content_emb")
    ap.add_argument("--world", default="small", choices=["tiny", "small"], help="else build this world")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the plain loop")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every run; figures are medians")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    root = args.root or tempfile.mkdtemp(prefix="qarm-bench-align-")
    cfg = load_config(
        overrides=[f"world.size={args.world}", f"align.epochs={args.epochs}", *args.overrides], root=root
    )
    tables = Tables.from_config(cfg)
    if not tables.exists("item_pairs"):
        write_world(cfg, "bench-world", emit_embeddings=True)
        run_pairs(cfg, "bench-pairs")
    in_memory = plain_pairs(tables)
    ac = cfg.align
    settings = AlignSettings(ac.hidden, ac.lr, ac.weight_decay, ac.temperature, ac.logq, ac.batch_size)
    # all cores in one worker (the plain loop's layout), then one core, then one worker per core
    layouts = [(1, args.threads), (1, 1), (args.threads, 1)]
    names = [f"{w}x{c}" for w, c in layouts]
    # each layout's peer: the plain loop with as many torch threads as the layout has cores
    peers = {names[0]: "plain", names[1]: "plain_one_thread", names[2]: "plain"}
    rounds: list[dict] = []
    tag = str(int(time.time()))
    for r in range(args.repeats):
        rounds.append(one_round(cfg, tables, in_memory, settings, args, layouts, f"{tag}-r{r}"))
        print(json.dumps({"round": r, **rounds[-1]}), flush=True)

    def med(key: str) -> float:
        return statistics.median(x[key] for x in rounds)

    def ratios(num, den) -> dict[str, float]:
        """Median, least and most of a per-round ratio: both sides from the same round."""
        v = [num(x) / den(x) for x in rounds]
        return {"median": statistics.median(v), "min": min(v), "max": max(v)}

    layout_runs = {
        n: {
            "pairs_per_s": med(n),
            "runs_pairs_per_s": [x[n] for x in rounds],
            "share_waiting_for_data": med(f"{n}_waiting"),
            "fit_wall_s": med(f"{n}_wall_s"),
        }
        for n in names
    }
    out = {
        "bench": "align",
        "train_pairs": rounds[0]["train_pairs"],
        "dim": rounds[0]["dim"],
        "batch": cfg.align.batch_size,
        "epochs": args.epochs,
        "repeats": args.repeats,
        **{f"{k}_pairs_per_s": med(k) for k in ("plain", "plain_one_thread", "plain_beside_ray")},
        **{f"{k}_runs": [x[k] for x in rounds] for k in ("plain", "plain_one_thread", "plain_beside_ray")},
        "ray_data_join_s": med("join_s"),
        "ray": layout_runs,
        # what an idle local Ray costs a plain loop on the same cores: the bound of any Ray job here
        "ratio_plain_beside_ray_vs_plain": ratios(lambda x: x["plain_beside_ray"], lambda x: x["plain"]),
        # each layout against its peer run just before Ray started, in the same round
        "ratio_ray_vs_plain": {n: ratios(lambda x, n=n: x[n], lambda x, n=n: x[peers[n]]) for n in names},
        # the layouts holding all cores against the plain loop of the same round, beside the same idle Ray
        "ratio_ray_vs_plain_beside_ray": {
            n: ratios(lambda x, n=n: x[n], lambda x: x["plain_beside_ray"]) for n in (names[0], names[2])
        },
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
