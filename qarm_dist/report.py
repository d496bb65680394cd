"""The demo's report: ``report.json`` for machines, ``report.md`` (+ plots) for people.

Sections use the keys of DESIGN.md: dataset, tables, pairs, alignment, codes,
ranker. Each stage adds its own section and, optionally, a renderer here.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from qarm_dist.io.delta import Tables
from qarm_dist.io.schemas import TABLES
from qarm_dist.rank.metrics import FIGURES


def tables_section(tables: Tables) -> dict[str, dict[str, int]]:
    out = {}
    for name in TABLES:
        if tables.exists(name):
            snap = tables.snapshot(name)
            out[name] = {"version": snap.version, "rows": snap.rows}
    return out


def _date(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def _popularity_plot(dataset: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = dataset["popularity"]["items_by_log2_count"]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([f"{2**b}" for b, _ in hist], [n for _, n in hist], color="#4477aa")
    ax.set_xlabel("train interactions per item (lower edge, log2 bins)")
    ax.set_ylabel("items")
    ax.set_yscale("log")
    ax.set_title(f"{dataset['name']}: item popularity (train window)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _dataset_md(d: dict[str, Any], plots: Path) -> list[str]:
    _popularity_plot(d, plots / "popularity.png")
    rows = [("all", d), ("train", d["train"]), ("eval", d["eval"])]
    lines = [
        f"## Dataset: {d['name']}",
        "",
        f"{d['catalogue_items']} items in the catalogue; interactions from {_date(d['first_ts'])} to "
        f"{_date(d['last_ts'])} UTC; the evaluation window starts {_date(d['eval_start_ts'])}.",
        "",
        "| split | rows | users | items | click rate | like rate |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *[
            f"| {n} | {r['rows']} | {r['users']} | {r['items']} | {r['click_rate']} | {r['like_rate']} |"
            for n, r in rows
        ],
        "",
        f"Cold start in the eval window: {d['eval']['cold_items']} items with no train interaction, "
        f"{d['eval']['cold_rows']} rows. The top 1 % of items hold "
        f"{100 * d['popularity']['train_top1pct_share']:.1f} % of train interactions.",
        "",
        "![item popularity](plots/popularity.png)",
        "",
    ]
    return lines


def _pairs_plot(p: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    for key, colour in (("before", "#bbbbbb"), ("after", "#4477aa")):
        hist = p["popularity"].get(key, [])
        ax.plot(
            [2**b for b, _ in hist], [s for _, s in hist], marker="o", color=colour, label=f"{key} control"
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("popularity of a pair's item (train positives, log2 bins)")
    ax.set_ylabel("share of pair endpoints")
    ax.set_title("pair items by popularity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pairs_md(p: dict[str, Any], plots: Path) -> list[str]:
    _pairs_plot(p, plots / "pairs_popularity.png")
    rej = ", ".join(f"{s}: {100 * r:.1f} %" for s, r in sorted(p["judge_rejected"].items()))
    sw = p.get("swing", {})
    return [
        "## Pairs",
        "",
        f"{p['i2i']} I2I (Swing) and {p['u2i']} U2I pairs; {p['heldout']} of them held out "
        f"(from interactions in the eval window, for alignment evaluation).",
        f"Judge `{p['judge']}` rejected {rej or 'nothing'} of the candidates.",
        f"Swing caps kept {sw.get('after_caps')} of {sw.get('positives')} train positives "
        f"({sw.get('max_items_per_user')} items per user, {sw.get('max_users_per_item')} users per item).",
        "",
        "![pair popularity](plots/pairs_popularity.png)",
        "",
    ]


def _alignment_md(a: dict[str, Any], plots: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hr = a["hit_rate"]
    ks = sorted(int(k) for k in hr["raw"])
    std = a["spread"]["aligned_std"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    styles = {
        "raw": ("#bbbbbb", "raw content"),
        "aligned": ("#4477aa", "aligned"),
        "behaviour": ("#cc6677", "behaviour (ALS)"),
    }
    for key, (colour, label) in styles.items():
        if key in hr:
            left.plot(ks, [hr[key][str(k)] for k in ks], marker="o", color=colour, label=label)
    left.fill_between(
        ks,
        [hr["aligned"][str(k)] - std[str(k)] for k in ks],
        [hr["aligned"][str(k)] + std[str(k)] for k in ks],
        color="#4477aa",
        alpha=0.2,
    )
    left.set_xscale("log")
    left.set_xlabel("K")
    left.set_ylabel("hit rate@K")
    left.set_title(f"held-out pairs ({a['heldout_pairs']}, both directions)")
    left.legend()
    hist = a.get("history", [])
    right.plot([h["epoch"] for h in hist], [h["loss"] for h in hist], marker="o", color="#4477aa")
    right.set_xlabel("epoch")
    right.set_ylabel("InfoNCE loss (global batch)")
    right.set_title(f"training, seed {a['spread']['seeds'][0] if a['spread']['seeds'] else '?'}")
    fig.tight_layout()
    fig.savefig(plots / "alignment.png", dpi=110)
    plt.close(fig)
    seeds = len(a["spread"]["seeds"])
    lines = [
        "## Alignment",
        "",
        f"Trained on {a['train_pairs']} train pairs for {a['epochs']} epochs, {seeds} seeds; evaluated on "
        f"{a['heldout_pairs']} held-out pairs from the evaluation window ({a['queries']} queries, both "
        f"directions) searching all {a['items']} items.",
        "",
        "| K | raw content | aligned (mean ± std over seeds) | aligned / raw | behaviour-only (ALS) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for k in ks:
        raw, al = hr["raw"][str(k)], hr["aligned"][str(k)]
        ratio = f"{al / raw:.2f}x" if raw else "n/a"
        beh = f"{hr['behaviour'][str(k)]:.4f}" if "behaviour" in hr else "n/a"
        lines.append(f"| {k} | {raw:.4f} | {al:.4f} ± {std[str(k)]:.4f} | {ratio} | {beh} |")
    return [*lines, "", "![alignment](plots/alignment.png)", ""]


def _codes_md(codes: dict[str, Any], plots: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    width = 0.8 / max(len(codes), 1)
    n_levels = max(len(q["levels"]) for q in codes.values())
    for ax, (metric, label) in zip(axes, (("utilization", "codes used / k"), ("evenness", "perplexity / k"))):
        for i, (name, q) in enumerate(codes.items()):
            vals = [
                lv["utilization"] if metric == "utilization" else lv["perplexity"] / lv["k"]
                for lv in q["levels"]
            ]
            ax.bar(
                [j + (i - (len(codes) - 1) / 2) * width for j in range(len(vals))], vals, width, label=name
            )
        ax.set_xticks(range(n_levels))
        ax.set_xlabel("level (rkfsq's last is FSQ)")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.05)
    axes[0].legend(loc="lower left")
    fig.suptitle("semantic-ID levels: utilisation and evenness")
    fig.tight_layout()
    fig.savefig(plots / "codes_utilization.png", dpi=110)
    plt.close(fig)
    keys = [
        "items",
        "sids",
        "collision_rate",
        "items_per_code",
        "largest_bucket",
        "gini",
        "normalized_entropy",
    ]
    lines = [
        "## Semantic IDs",
        "",
        "| quantizer | " + " | ".join(keys) + " |",
        "| --- |" + " ---: |" * len(keys),
    ]
    for name, q in codes.items():
        cells = [f"{q[k]:.4g}" if isinstance(q[k], float) else str(q[k]) for k in keys]
        lines.append(f"| {name} (v{q['version']}) | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| quantizer | level | k | utilisation | dead codes | perplexity | reconstruction MSE |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, q in codes.items():
        for i, lv in enumerate(q["levels"]):
            mse = lv.get("reconstruction_mse")
            lines.append(
                f"| {name} | {i} | {lv['k']} | {lv['utilization']:.3f} | {lv['dead_codes']} | "
                f"{lv['perplexity']:.1f} | {'' if mse is None else f'{mse:.4g}'} |"
            )
    return [*lines, "", "![utilisation](plots/codes_utilization.png)", ""]


def _ranker_md(r: dict[str, Any], plots: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = r["main_task"]
    variants = list(r["variants"])
    rows = {v: r["variants"][v][task] for v in variants}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key in zip(axes, ("auc", "gauc", "auc_cold")):
        vals = [rows[v][key] for v in variants]
        errs = [rows[v][f"{key}_std"] for v in variants]
        ax.bar(range(len(variants)), vals, yerr=errs, color="#4477aa", capsize=3)
        lo = min(x for x in vals if x == x) if any(x == x for x in vals) else 0.5
        ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(vals) + 0.03) if vals else 1.0)
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels(variants, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{task}: {key.upper().replace('_COLD', ' (cold start)')}")
    fig.tight_layout()
    fig.savefig(plots / "ranker_ablation.png", dpi=110)
    plt.close(fig)
    any_row = rows[variants[0]]
    c = any_row["counts"]
    # None: a run published before user_pop existed did not count its new users
    new = (
        "new users not counted"
        if c["new_users"] is None
        else f"{c['new_users']} new in the window, with {c['new_user_rows']} rows"
    )
    lines = [
        "## Ranker ablation",
        "",
        f"Main task `{task}`, evaluated on the evaluation window: {c['rows']} rows, {c['users']} users "
        f"({c['users_with_both_classes']} with both classes; {new}), "
        f"{c['cold_rows']} cold-start rows; "
        f"{r['epochs']} epochs, mean ± std over {any_row['seeds']} seeds (same data, same seeds per variant). "
        "User-level AUC scores every row by its user's mean prediction: the part of the AUC that orders "
        "users, which GAUC leaves out. New users have no interaction in the training window, so their "
        "rows are scored from their history alone.",
        "",
        "| variant | AUC | UAUC | GAUC | user-level AUC | logloss | cold-start AUC | new users' AUC "
        "| returning users' AUC |",
        "| --- |" + " ---: |" * 8,
    ]
    for v in variants:
        x = rows[v]
        cells = [_mean_pm(x[k], x[f"{k}_std"]) for k in FIGURES]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    buckets = list(any_row["auc_by_popularity"])
    lines += [
        "",
        "AUC by item popularity (train-window interactions per item; rows per bucket: "
        + ", ".join(f"{b}: {c['rows_by_popularity'][b]}" for b in buckets)
        + "):",
        "",
        "| variant | " + " | ".join(buckets) + " |",
        "| --- |" + " ---: |" * len(buckets),
    ]
    for v in variants:
        lines.append(
            f"| {v} | " + " | ".join(f"{rows[v]['auc_by_popularity'][b]:.4f}" for b in buckets) + " |"
        )
    if r.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k} ({why})" for k, why in r["skipped"].items())]
    return [*lines, "", "![ranker ablation](plots/ranker_ablation.png)", ""]


def _mean_pm(mean: float, std: float) -> str:
    """A table cell: mean ± std, or n/a where the figure is NaN on every seed (no new users, say)."""
    return "n/a" if mean != mean else f"{mean:.4f} ± {std:.4f}"


def _tables_md(t: dict[str, dict[str, int]]) -> list[str]:
    return [
        "## Tables",
        "",
        "| table | version | rows |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {v['version']} | {v['rows']} |" for name, v in t.items()],
        "",
    ]


_RENDERERS = {
    "dataset": _dataset_md,
    "pairs": _pairs_md,
    "alignment": _alignment_md,
    "codes": _codes_md,
    "ranker": _ranker_md,
    "tables": lambda t, _: _tables_md(t),
}


def _nan_to_none(value: Any) -> Any:
    """``value`` with every float NaN (an AUC over a group with one class, say) replaced by None."""
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return None if isinstance(value, float) and value != value else value


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write report.json and report.md (with plots/) into ``out_dir``."""
    out = Path(out_dir)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "report.json", out / "report.md"
    # strict JSON (jq, browsers and Spark reject NaN): a figure with nothing to measure is null
    json_path.write_text(json.dumps(_nan_to_none(report), indent=2, allow_nan=False) + "\n")
    lines = ["# qarm-dist demo report", "", f"run id: `{report.get('run_id', '?')}`", ""]
    for key, section in report.items():
        if key in _RENDERERS:
            lines += _RENDERERS[key](section, plots)
    md_path.write_text("\n".join(lines))
    return json_path, md_path
