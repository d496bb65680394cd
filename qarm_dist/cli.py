"""The `qarm` command line: one sub-command per stage, each a thin call of its public function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from qarm_dist import submit
from qarm_dist.config import ConfigError, QarmConfig, load_config
from qarm_dist.data.movielens import MovieLensError
from qarm_dist.engines import set_process_env
from qarm_dist.io.delta import TableError, Tables, new_run_id
from qarm_dist.io.schemas import TABLES

log = logging.getLogger("qarm")


def _common() -> argparse.ArgumentParser:
    # SUPPRESS lets these options stand before or after the sub-command.
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--config", default=argparse.SUPPRESS, metavar="FILE", help="YAML config (default: built-in)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=argparse.SUPPRESS,
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set encoder.actors=1 (repeatable)",
    )
    p.add_argument(
        "--root", default=argparse.SUPPRESS, metavar="DIR", help="table root (default ./qarm-data)"
    )
    p.add_argument(
        "--run-id",
        default=argparse.SUPPRESS,
        help="job id; re-running an id that committed adds no rows (default: a new id)",
    )
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings only")
    return p


def _cfg(args: argparse.Namespace) -> QarmConfig:
    return load_config(
        getattr(args, "config", None), getattr(args, "overrides", None), getattr(args, "root", None)
    )


def _run_id(args: argparse.Namespace, stage: str) -> str:
    return getattr(args, "run_id", None) or new_run_id(stage)


def _print_commits(results: dict) -> None:
    for name, r in results.items():
        state = "already committed, skipped" if r.skipped else f"{r.files} files"
        print(f"{name}: version {r.version}, {r.rows} rows ({state})")


def cmd_world(args: argparse.Namespace) -> None:
    cfg = _cfg(args)
    from qarm_dist.data.ingest import write_world

    _print_commits(write_world(cfg, _run_id(args, "world"), emit_embeddings=args.emit_embeddings))


def cmd_ingest(args: argparse.Namespace) -> None:
    cfg = _cfg(args)
    from qarm_dist.data.ingest import write_movielens

    _print_commits(write_movielens(cfg, args.path, _run_id(args, "ingest")))


def cmd_embed(args: argparse.Namespace) -> None:
    cfg = _cfg(args)
    from qarm_dist.embed import run_embed

    _print_commits({"item_content_emb": run_embed(cfg, _run_id(args, "embed"), args.items_version)})


def cmd_pairs(args: argparse.Namespace) -> None:
    cfg = _cfg(args)
    from qarm_dist.pairs import run_pairs

    result, section = run_pairs(cfg, _run_id(args, "pairs"))
    _print_commits({"item_pairs": result})
    print(
        f"i2i {section['i2i']}, u2i {section['u2i']}, heldout {section['heldout']}; "
        f"judge '{section['judge']}' rejected {section['judge_rejected']}"
    )


def cmd_codebook(args: argparse.Namespace) -> None:
    overrides = list(getattr(args, "overrides", None) or [])
    for flag, key in (("levels", "levels"), ("k", "k"), ("iters", "iters"), ("seed", "seed")):
        if getattr(args, flag, None) is not None:
            overrides.append(f"codebook.{key}={getattr(args, flag)}")
    if getattr(args, "fsq_levels", None):
        dims = args.fsq_dims or len(args.fsq_levels)
        levels = args.fsq_levels * dims if len(args.fsq_levels) == 1 else args.fsq_levels
        if len(levels) != dims:
            raise ValueError(f"--fsq-dims {dims} needs one --fsq-levels value or {dims} of them")
        overrides.append(f"codebook.fsq_levels={levels}")
    args.overrides = overrides
    cfg = _cfg(args)
    from qarm_dist.codebook import stage

    if args.action == "fit":
        result, cb = stage.run_fit(cfg, _run_id(args, "codebook-fit"))
        _print_commits({"codebooks": result})
        mse = ", ".join(f"{m:.4g}" for m in cb.info["recon_mse"])
        print(
            f"version {cb.version}: {cb.levels} levels on {cb.info['rows']} rows of {cb.info['source']} "
            f"v{cb.info['source_version']}; reconstruction MSE per level {mse}"
        )
    elif args.action == "assign":
        result, cb = stage.run_assign(cfg, _run_id(args, "codebook-assign"), args.version)
        _print_commits({"item_codes": result})
    elif args.action == "diff":
        print(json.dumps(stage.diff(cfg, args.v1, args.v2)))
    else:
        print(json.dumps(stage.quality(cfg, args.version), indent=2))


def cmd_refresh(args: argparse.Namespace) -> None:
    cfg = _cfg(args)
    from qarm_dist.refresh import Step, run_refresh

    summary = run_refresh(cfg, _run_id(args, "refresh"), refit=args.refit)
    for step in summary["steps"]:
        print(Step(**step).describe())
    done = [f"{summary['new_items_embedded']} new items embedded"]
    if summary["new_items_aligned"] is not None:
        done.append(f"{summary['new_items_aligned']} aligned")
    if summary["codebook_version"] is not None:
        done.append(f"{summary['codes_assigned']} codes of version {summary['codebook_version']} assigned")
    if summary["fitted_version"] is not None:
        done.append(f"version {summary['fitted_version']} fitted, {summary['refit_codes_assigned']} codes")
    print(f"refresh {summary['run_id']}: {', '.join(done)}")


def cmd_align(args: argparse.Namespace) -> None:
    cfg = _cfg(args)
    from qarm_dist import models
    from qarm_dist.align.evaluate import evaluate
    from qarm_dist.align.infer import run_embed
    from qarm_dist.align.train import train, train_models

    tables = Tables.from_config(cfg)
    if args.action == "train":
        run_id = _run_id(args, "align")
        if args.seeds:
            seeds = list(range(cfg.align.seed, cfg.align.seed + args.seeds))
            infos = train_models(cfg, run_id, seeds)
        else:
            infos = [train(cfg, run_id)]
        for info in infos:
            m = info.meta["metrics"]
            print(
                f"model {info.version}: {info.meta['train_pairs']} pairs, {info.meta['epochs']} epochs, "
                f"last epoch loss {m.get('loss', float('nan')):.4f}, in-batch accuracy {m.get('accuracy', 0):.3f}"
            )
    elif args.action == "embed":
        result, info = run_embed(cfg, _run_id(args, "align-embed"), args.model)
        _print_commits({"item_aligned_emb": result})
        print(f"model {info.version}")
    elif args.action == "eval":
        infos = [models.find(tables, "align", v) for v in args.model] or [models.find(tables, "align")]
        print(json.dumps(evaluate(cfg, infos, behaviour=not args.no_behaviour), indent=2))
    else:
        for info in models.published(tables, "align"):
            print(
                f"{info.version}  seed {info.meta['seed']}  {info.meta['train_pairs']} pairs  {info.checkpoint}"
            )


def cmd_samples(args: argparse.Namespace) -> None:
    cfg = _cfg(args)
    from qarm_dist.rank.samples import run_samples

    result, stats = run_samples(cfg, _run_id(args, "samples"))
    _print_commits({"samples": result})
    if stats:
        print(json.dumps(stats["counts"]))


def cmd_rank(args: argparse.Namespace) -> None:
    overrides = list(getattr(args, "overrides", None) or [])
    if getattr(args, "variant", None):
        overrides.append(f"rank.variant={args.variant}")
    args.overrides = overrides
    cfg = _cfg(args)
    from qarm_dist.rank import evaluate, train

    if args.action == "train":
        info = train.train(cfg, _run_id(args, "rank"))
        result = info.meta["results"][-1]
        main = result["eval"][cfg.rank.main_task]
        print(
            f"model {info.version} ({result['variant']}, seed {result['seed']}): {cfg.rank.main_task} "
            f"AUC {main['auc']:.4f}, GAUC {main['gauc']:.4f}, cold-start AUC {main['auc_cold']:.4f} "
            f"on {main['rows']} eval rows ({main['cold_rows']} cold)"
        )
    elif args.action == "eval":
        print(json.dumps(evaluate.evaluate(cfg, args.model), indent=2))
    else:
        print(json.dumps(train.ablate(cfg, _run_id(args, "rank-ablate")), indent=2))


def cmd_submit(args: argparse.Namespace) -> int:
    sub = submit.resolve(
        args.stage,
        args.cluster,
        getattr(args, "config", None),
        getattr(args, "overrides", None),
        getattr(args, "root", None),
        getattr(args, "run_id", None),
        args.stage_args,
    )
    pkg = submit.package(sub)
    line = submit.command_line(sub, pkg)
    if args.dry_run:
        print(line)
        print(f"dry run: nothing submitted; the package is in {pkg.dir}", file=sys.stderr)
        return 0
    print(f"qarm submit: {sub.stage.name} on {sub.cluster_name}, run {sub.run_id}: {line}", file=sys.stderr)
    return submit.run(sub, pkg, args.timeout)


def cmd_tables(args: argparse.Namespace) -> None:
    tables = Tables.from_config(_cfg(args))
    for name in TABLES:
        if tables.exists(name):
            s = tables.snapshot(name)
            dim = f", dim {s.dim}" if s.dim else ""
            print(f"{name:18s} version {s.version:3d}  {s.rows:>12,d} rows  {len(s.files):5d} files{dim}")
        else:
            print(f"{name:18s} (not written yet)")


def cmd_demo(args: argparse.Namespace) -> None:
    overrides = list(getattr(args, "overrides", None) or [])
    if args.world:
        overrides.append(f"world.size={args.world}")
    args.overrides = overrides
    cfg = _cfg(args)
    from qarm_dist.demo import run_demo

    run_demo(cfg, _run_id(args, "demo"), movielens=args.movielens)
    root = Path(cfg.tables.root)
    print((root / "report.md").read_text())
    print(f"full report: {root / 'report.json'} and {root / 'report.md'}")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="qarm",
        parents=[common],
        description="QARM semantic IDs on Spark and Ray. Stages read and write Delta tables under --root.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", parents=[common], help="run every stage end to end and write report.{json,md}")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--world", choices=["tiny", "small", "large"], help="generated world size (default: config)"
    )
    src.add_argument("--movielens", metavar="PATH", help="a MovieLens-format folder instead of the world")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("world", parents=[common], help="generate the world into items and interactions")
    p.add_argument(
        "--emit-embeddings",
        action="store_true",
        help="also write item_content_emb straight from the world (scale runs skip the encoder)",
    )
    p.set_defaults(func=cmd_world)

    p = sub.add_parser("ingest", parents=[common], help="load a data source into items and interactions")
    isub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    pm = isub.add_parser(
        "movielens", parents=[common], help="a MovieLens folder (movies, ratings, tags .csv)"
    )
    pm.add_argument("--path", required=True, help="e.g. ../shared/data/ml-latest-small")
    pm.set_defaults(func=cmd_ingest)

    p = sub.add_parser("embed", parents=[common], help="encode item text into item_content_emb (Ray Data)")
    p.add_argument("--items-version", type=int, default=None, help="pin the items table version")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser(
        "pairs", parents=[common], help="Swing I2I + U2I trigger pairs into item_pairs (Spark)"
    )
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser(
        "codebook", parents=[common], help="semantic-ID codebooks: fit, assign, diff, quality (Spark)"
    )
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    pf = csub.add_parser(
        "fit", parents=[common], help="fit a new codebook version (residual K-means [+ FSQ])"
    )
    pf.add_argument("--levels", type=int, help="residual K-means levels (config codebook.levels)")
    pf.add_argument("--k", type=int, help="centroids per level (config codebook.k)")
    pf.add_argument("--iters", type=int, help="Lloyd iterations per level")
    pf.add_argument("--seed", type=int)
    pf.add_argument("--fsq-dims", type=int, help="FSQ on the last residual: number of dims")
    pf.add_argument(
        "--fsq-levels", type=int, nargs="+", help="FSQ levels per dim (one value, or one per dim)"
    )
    pa_ = csub.add_parser("assign", parents=[common], help="write item_codes (RQ, FSQ, VQ) for uncoded items")
    pa_.add_argument("--version", type=int, help="codebook version (default: the latest)")
    pd_ = csub.add_parser("diff", parents=[common], help="how many items changed code between two versions")
    pd_.add_argument("v1", type=int)
    pd_.add_argument("v2", type=int)
    pq_ = csub.add_parser("quality", parents=[common], help="SID quality report of a version (JSON)")
    pq_.add_argument("--version", type=int)
    p.set_defaults(func=cmd_codebook)

    p = sub.add_parser(
        "refresh",
        parents=[common],
        help="new items: embed, code with the current codebook [and refit] (Ray Data + Spark)",
    )
    p.add_argument("--refit", action="store_true", help="also fit a new codebook version and code every item")
    p.set_defaults(func=cmd_refresh)

    p = sub.add_parser(
        "align", parents=[common], help="align item embeddings to behaviour pairs: train, embed, eval (Ray)"
    )
    asub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    pt = asub.add_parser("train", parents=[common], help="train an alignment model (Ray Train)")
    pt.add_argument(
        "--seeds", type=int, help="train this many models (seeds align.seed, +1, ...) as <run-id>-s<seed>"
    )
    pe = asub.add_parser("embed", parents=[common], help="write item_aligned_emb for every item (Ray Data)")
    pe.add_argument("--model", help="model version (default: the latest published)")
    pv = asub.add_parser("eval", parents=[common], help="held-out hit rate, raw vs aligned (JSON)")
    pv.add_argument(
        "--model", action="append", default=[], help="model version (repeatable; default: latest)"
    )
    pv.add_argument("--no-behaviour", action="store_true", help="skip the ALS behaviour-only baseline")
    asub.add_parser("models", parents=[common], help="list published alignment models")
    p.set_defaults(func=cmd_align)

    p = sub.add_parser(
        "submit",
        parents=[common],
        help="run a stage on a named cluster (spark-submit or the Ray Jobs API); see cluster/README.md",
        epilog="Arguments after -- go to the stage as is, e.g. qarm submit codebook-fit --cluster local -- --k 8",
    )
    p.add_argument("stage", help=f"one of: {', '.join(submit.STAGES)}")
    p.add_argument("--cluster", required=True, help="a name under clusters in the config (built in: local)")
    p.add_argument("--dry-run", action="store_true", help="print the exact command, submit nothing")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="stop the job after this long (exit 2)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "samples", parents=[common], help="ranker samples with user history into samples (Spark)"
    )
    p.set_defaults(func=cmd_samples)

    p = sub.add_parser(
        "rank", parents=[common], help="the multi-task semantic-ID ranker: train, eval, ablate (Ray)"
    )
    rsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    pt = rsub.add_parser("train", parents=[common], help="train one variant (rank.variant) and evaluate it")
    pt.add_argument(
        "--variant", help="a variant of qarm_dist.rank.model.VARIANTS (default: config rank.variant)"
    )
    pv = rsub.add_parser(
        "eval", parents=[common], help="evaluate a published ranker on the eval window (JSON)"
    )
    pv.add_argument("--model", help="model version (default: the latest published)")
    rsub.add_parser("ablate", parents=[common], help="every rank.variants x rank.seeds, same data (JSON)")
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser(
        "tables", parents=[common], help="list the tables under the root with version and rows"
    )
    p.set_defaults(func=cmd_tables)
    return parser


def main(argv: list[str] | None = None) -> int:
    set_process_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    stage_args: list[str] = []
    if "--" in argv:  # `qarm submit STAGE ... -- ARGS`: ARGS go to the stage's own command line as is
        cut = argv.index("--")
        argv, stage_args = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    if stage_args and args.func is not cmd_submit:
        parser.error("only `qarm submit` takes arguments after --")
    args.stage_args = stage_args
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        status = args.func(args)  # None, or a job's exit status (qarm submit)
    except (ConfigError, TableError, MovieLensError, FileNotFoundError, ValueError) as err:
        print(f"qarm: error: {err}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
