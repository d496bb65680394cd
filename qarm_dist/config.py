"""One validated config for every stage.

The config is data (YAML, validated by pydantic). Every field's default is the
embedded one-machine setting, so an empty file, or no file, runs the demo; the
same file with other addresses runs on a cluster. No code branches on "demo".

Overrides: ``--set section.field=value`` (value parsed as YAML, so ``3``,
``0.5``, ``true`` and ``[1, 2]`` get their types) and ``--root DIR``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field."""


class _Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TablesConfig(_Section):
    root: str = Field("./qarm-data", description="Folder (or s3:// URI) holding every Delta table.")
    storage_options: dict[str, str] = Field(
        default_factory=dict, description="deltalake/object-store options (endpoint, keys, region)."
    )
    target_file_rows: int = Field(
        262_144, gt=0, description="Rows per Parquet file a writer aims for; bigger files, fewer commits."
    )

    @field_validator("storage_options", mode="before")
    @classmethod
    def _options_as_strings(cls, given: Any) -> Any:
        """YAML and ``--set`` read ``AWS_ALLOW_HTTP: true`` as a bool; deltalake wants the string 'true'."""
        if not isinstance(given, dict):
            return given
        out = {}
        for key, value in given.items():
            if isinstance(value, bool):
                value = str(value).lower()
            elif isinstance(value, (int, float)):
                value = str(value)  # a port or a timeout
            out[key] = value
        return out


class SparkConfig(_Section):
    master: str = Field("local[*]", description="Spark master URL, e.g. spark://host:7077.")
    app_name: str = "qarm"
    driver_memory: str = "4g"
    shuffle_partitions: int = Field(8, gt=0)
    conf: dict[str, str] = Field(default_factory=dict, description="Extra spark.* settings, passed as is.")


class RayConfig(_Section):
    address: str | None = Field(None, description="Ray address (ray://, host:port or 'auto'); None = local.")
    num_cpus: int | None = Field(None, gt=0, description="CPUs for a local Ray; None = all cores.")
    object_store_memory: int | None = Field(None, gt=0, description="Bytes for a local object store.")


class ClusterConfig(_Section):
    """A cluster `qarm submit` can run stages on (cluster/README.md); nothing else reads these entries.

    Spark stages run in client mode (the driver on the submitting machine, executors on the cluster);
    Ray stages run as Ray jobs (the driver inside the cluster).
    """

    spark_master: str | None = Field(None, description="spark://host:7077, k8s://...; None: no Spark stages")
    ray_jobs: str | None = Field(
        None, description="Ray Jobs API (the head's dashboard), http://head:8265; None = no Ray stages."
    )
    ray_address: str = Field(
        "auto",
        description="What a Ray job's driver connects to, inside the cluster (auto = its own); `refresh`'s "
        "Spark driver connects to it from the submitting machine, so it must be reachable there.",
    )
    root: str | None = Field(
        None, description="Table root every node and the submitting machine see; None = tables.root."
    )
    python: str | None = Field(
        None, description="Python with qarm-dist's dependencies on the nodes; None = the submitting one."
    )
    executor_memory: str = Field("2g", description="spark.executor.memory")
    executor_cores: int | None = Field(None, gt=0, description="spark.executor.cores; None = Spark default.")
    cores_max: int | None = Field(None, gt=0, description="spark.cores.max: cores a job takes; None = all.")
    spark_conf: dict[str, str] = Field(
        default_factory=dict, description="More spark-submit --conf (driver host and bind address, ...)."
    )
    entrypoint_num_cpus: float = Field(
        0.0, ge=0, description="CPUs a Ray job's driver holds; 0 leaves them all to the stage's workers."
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Job environment: Ray runtime_env env_vars, spark.executorEnv.*."
    )
    overrides: list[str] = Field(
        default_factory=list, description="--set values for every job here (e.g. encoder.actors=8)."
    )


def _default_clusters() -> dict[str, ClusterConfig]:
    # `local` is cluster/local/up: the ports are the conventions of ENVIRONMENT.md §3-4.
    local = ClusterConfig(
        spark_master="spark://127.0.0.1:7077",
        ray_jobs="http://127.0.0.1:8265",
        ray_address="127.0.0.1:6379",
        executor_memory="1g",
        spark_conf={"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1"},
    )
    return {"local": local}


class WorldConfig(_Section):
    """The generated world: sizes come from `size`; any field set here overrides that size."""

    size: Literal["tiny", "small", "large"] = "small"
    seed: int = 0
    n_users: int | None = Field(None, gt=0)
    n_items: int | None = Field(None, gt=0)
    impressions_per_user: int | None = Field(None, gt=0)
    mismatch: float = Field(
        0.4, ge=0.0, le=1.0, description="Share of items whose behaviour topic differs from their text topic."
    )
    content_dim: int = Field(64, gt=0, description="Dimension of the content embedding the world emits.")
    days: int = Field(60, gt=1, description="Days the interactions span; items arrive over them.")


class SplitConfig(_Section):
    eval_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="Share of interactions (latest by time) that form the evaluation window.",
    )


class EncoderConfig(_Section):
    name: Literal["minilm"] = Field("minilm", description="Registered encoder (qarm_dist.embed.encoders).")
    batch_size: int = Field(64, gt=0, description="Sentences per forward pass.")
    actors: int = Field(1, gt=0, description="Ray Data actors running the encoder (one per node or GPU).")
    cpus_per_actor: float = Field(
        1.0, gt=0, description="Ray CPUs an actor holds; leave some for read/write tasks (ENVIRONMENT.md §6)."
    )
    threads_per_actor: int = Field(
        2, gt=0, description="torch threads per actor (measured: 1 actor x 2 threads beats 2 x 1 on 2 cores)."
    )
    rows_per_block: int = Field(
        512, gt=0, description="Items per Ray Data batch: one actor call and one staged Parquet file."
    )


class PairsConfig(_Section):
    """`qarm pairs`: behaviour pairs for alignment (QARM's pre-order alignment data)."""

    positive: Literal["click", "like"] = Field("like", description="Which interactions count as positive.")
    seed: int = Field(0, description="Seed of every deterministic sample (caps, down-sampling, ALS).")
    # Swing I2I
    swing_alpha: float = Field(1.0, gt=0, description="Swing's smoothing: 1 / (alpha + |I_u & I_v|).")
    swing_user_weight: bool = Field(True, description="Weight each user by 1/sqrt(|I_u|).")
    max_items_per_user: int = Field(
        100, gt=1, description="Swing cap: items kept per user (sampled by seed)."
    )
    max_users_per_item: int = Field(
        300, gt=1, description="Swing cap: users kept per item (sampled by seed)."
    )
    swing_top_n: int = Field(20, gt=0, description="Partners kept per item, best Swing score first.")
    swing_min_support: int = Field(2, gt=0, description="User pairs that must back an item pair.")
    # U2I triggers
    als_rank: int = Field(32, gt=0)
    als_iters: int = Field(10, gt=0)
    als_reg: float = Field(0.05, ge=0)
    als_alpha: float = Field(10.0, gt=0, description="ALS implicit-feedback confidence scale.")
    history: int = Field(50, gt=0, description="U2I: the trigger is chosen among this many latest positives.")
    # popularity control
    max_pairs_per_item: int = Field(50, gt=0, description="Pairs (per source) any one item may appear in.")
    popular_quantile: float = Field(
        0.95, gt=0, lt=1, description="Items above this popularity quantile count as very popular."
    )
    popular_power: float = Field(
        0.5, ge=0, description="Keep a pair of a very popular item with prob (threshold/popularity)^power."
    )
    # judge (QARM V2)
    judge: Literal["content", "none"] = Field("content", description="PairJudge applied to candidates.")
    judge_min_cosine: float = Field(
        0.0, ge=-1, le=1, description="Content judge: reject pairs whose content cosine is below this."
    )


class CodebookConfig(_Section):
    """`qarm codebook`: distributed residual K-means (+ FSQ) and VQ neighbour codes."""

    source: Literal["auto", "item_aligned_emb", "item_content_emb"] = Field(
        "auto", description="Embedding table to quantise; auto = item_aligned_emb when it exists."
    )
    levels: int = Field(3, gt=0, description="Residual K-means levels.")
    k: int = Field(64, gt=1, description="Centroids per level.")
    fsq_levels: list[int] = Field(
        default_factory=list, description="FSQ level count per dim on the last residual ([] = no FSQ)."
    )
    iters: int = Field(20, gt=0, description="Lloyd iterations per level.")
    tol: float = Field(
        1e-4, ge=0, description="Stop a level when inertia improves by less than this (relative)."
    )
    init: Literal["random", "kmeans++"] = "kmeans++"
    init_sample: int = Field(50_000, gt=0, description="Rows sampled for init (and for FSQ's fit).")
    sample_fraction: float = Field(1.0, gt=0, le=1, description="Rows used by the early iterations.")
    sample_iters: int = Field(0, ge=0, description="How many early iterations use sample_fraction.")
    fit_window: Literal["train", "all"] = Field(
        "train", description="train = fit on items created before the evaluation window only (leak-free)."
    )
    seed: int = 0
    partitions: int = Field(
        0, ge=0, description="Spark tasks per pass; 0 = the cluster's default parallelism."
    )
    threads_per_task: int = Field(1, gt=0, description="faiss threads inside one Spark task.")
    backend: Literal["faiss", "torch"] = Field(
        "faiss", description="Assignment kernel (see docs/benchmarks.md)."
    )
    worker_cache_mb: int = Field(
        8192, ge=0, description="Vectors a Python worker keeps between passes; 0 = re-read every pass."
    )
    rkfsq_levels: int = Field(
        2, gt=0, description="Res-KmeansFSQ variant (the demo fits it beside plain RQ): K-means levels ..."
    )
    rkfsq_fsq: list[int] = Field(
        default_factory=lambda: [4, 4, 4], description="... then FSQ levels per dim."
    )
    vq_k: int = Field(25, gt=0, description="VQ code length: nearest pool items per item (QARM: 25).")
    pool_max: int = Field(
        200_000, gt=0, description="VQ pool: all items up to this many, else a seeded sample."
    )


class AlignConfig(_Section):
    """`qarm align`: contrastive alignment of item embeddings to behaviour pairs (Ray Train)."""

    mode: Literal["tower", "finetune"] = Field(
        "tower",
        description="tower = an MLP over the frozen content embedding; finetune = train the text encoder "
        "itself end to end on item text (QARM's setting; slow on CPU).",
    )
    workers: int = Field(2, gt=0, description="Ray Train workers (one per GPU on a GPU cluster).")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs each worker holds (and torch threads).")
    batch_size: int = Field(
        512, gt=1, description="Global batch (pairs per step over all workers); in-batch negatives = 2x this."
    )
    epochs: int = Field(6, gt=0)
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate (finetune_lr for the text encoder).")
    finetune_lr: float = Field(5e-5, gt=0, description="Learning rate when mode=finetune.")
    weight_decay: float = Field(0.0, ge=0)
    temperature: float = Field(0.1, gt=0, description="InfoNCE temperature.")
    hidden: int = Field(512, gt=0, description="Hidden width of the tower's residual MLP.")
    logq: bool = Field(
        True, description="Popularity (logQ) correction: subtract log(item frequency in pairs) from logits."
    )
    seed: int = Field(0, description="Seed of the model that `qarm align embed` writes by default.")
    seeds: int = Field(
        3,
        gt=0,
        description="Models (seeds seed..seed+seeds-1) the evaluation averages over (spread reported).",
    )
    max_failures: int = Field(2, ge=0, description="Worker-group restarts from the last checkpoint.")
    shuffle_buffer: int = Field(
        4096, ge=0, description="Rows of the local shuffle buffer per worker, when the shard is streamed."
    )
    worker_cache_mb: int = Field(
        1024,
        ge=0,
        description="Memory (MiB) a worker may use to hold its shard of pairs (tower mode): a shard that fits "
        "is read from Ray Data once and every epoch shuffles it in memory; larger shards (and 0) stream "
        "from Ray Data every epoch.",
    )
    join_partitions: int = Field(
        0, ge=0, description="Ray Data join partitions; 0 = one per million pairs, at most one per CPU."
    )
    eval_k: list[int] = Field(default_factory=lambda: [10, 50, 200], description="Hit rate cut-offs.")
    infer_actors: int = Field(1, gt=0, description="Ray Data actors running inference.")
    infer_rows_per_block: int = Field(4096, gt=0, description="Items per inference block (one staged file).")


class SamplesConfig(_Section):
    """`qarm samples`: time-ordered ranker samples with user history (Spark)."""

    history: int = Field(50, gt=0, description="Prior items kept per sample (the user's last N).")
    history_event: Literal["click", "like"] = Field(
        "click", description="Which prior interactions enter the history (label = 1), strictly before ts."
    )
    negatives: int | None = Field(
        None,
        ge=0,
        description="Sampled negatives per real row (all labels 0, sampled = 1), drawn uniformly by a "
        "seeded hash among items created by the row's time. None = auto: 1 when no row has click = 0 "
        "(implicit data such as MovieLens ratings), else 0.",
    )
    seed: int = 0


class RankConfig(_Section):
    """`qarm rank`: the multi-task semantic-ID ranker (Ray Train) and its ablation."""

    workers: int = Field(2, gt=0, description="Ray Train workers (DDP for dense, all-reduce for sparse).")
    cpus_per_worker: float = Field(1.0, gt=0)
    batch_size: int = Field(1024, gt=1, description="Global batch (samples per step over all workers).")
    epochs: int = Field(2, gt=0)
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate of the dense parameters.")
    sparse_lr: float = Field(0.05, gt=0, description="Learning rate of the embedding tables.")
    sparse_optimizer: Literal["adagrad", "sparse_adam", "sgd"] = Field(
        "adagrad", description="Optimizer of the sparse-gradient tables (see docs/benchmarks.md)."
    )
    embedding_dim: int = Field(16, gt=0, description="Dimension of every embedding table.")
    d_model: int = Field(32, gt=0, description="Width of an item representation (id + code features).")
    experts: int = Field(4, gt=0, description="MMoE experts.")
    expert_hidden: int = Field(64, gt=0)
    tower_hidden: int = Field(32, gt=0)
    user_rows: int = Field(1 << 18, gt=1, description="Hashed rows of the user-id table.")
    item_rows: int = Field(1 << 18, gt=1, description="Hashed rows of the item-id and VQ tables.")
    ngram_rows: int = Field(1 << 16, gt=1, description="Hashed rows of each RQ prefix n-gram table.")
    gsu_k: int = Field(10, gt=0, description="GSU: history items the ESU attends over.")
    history_feedback: bool = Field(
        True,
        description="Add the like label of each history item (an earlier event's feedback) to its "
        "representation; every variant gets it.",
    )
    emb_dim: int = Field(
        32, gt=0, description="Aligned embeddings are reduced to this by a seeded random projection."
    )
    main_task: Literal["click", "like"] = Field("like", description="The task the targets are judged on.")
    seeds: int = Field(3, gt=0, description="Seeds per ablation variant (mean and spread reported).")
    seed: int = 0
    variants: list[str] = Field(
        default_factory=lambda: ["id_only", "emb", "vq", "rq", "vq_rq", "rkfsq", "vq_rq_target", "vq_rq_gsu"],
        description="`qarm rank ablate` variants (qarm_dist.rank.model.VARIANTS); rkfsq runs when present.",
    )
    variant: str = Field("vq_rq_gsu", description="The variant `qarm rank train` trains.")
    popularity_buckets: list[int] = Field(
        default_factory=lambda: [1, 10, 100],
        description="Bucket edges of train-window interactions per item: [0], [1, 10), [10, 100), [100, inf).",
    )
    max_failures: int = Field(2, ge=0)
    shuffle_buffer: int = Field(8192, ge=0, description="Rows of the local shuffle buffer per worker.")


class QarmConfig(_Section):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present, else CPU.")
    tables: TablesConfig = Field(default_factory=TablesConfig)
    spark: SparkConfig = Field(default_factory=SparkConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    clusters: dict[str, ClusterConfig] = Field(
        default_factory=_default_clusters, description="Named clusters for `qarm submit`, `local` built in."
    )
    world: WorldConfig = Field(default_factory=WorldConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    codebook: CodebookConfig = Field(default_factory=CodebookConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    samples: SamplesConfig = Field(default_factory=SamplesConfig)
    rank: RankConfig = Field(default_factory=RankConfig)

    @field_validator("clusters", mode="before")
    @classmethod
    def _onto_default_clusters(cls, given: Any) -> Any:
        """Entries add to the built-in clusters; naming one (``--set clusters.local.root=X``) changes only
        the fields given, instead of dropping the rest of that entry."""
        if not isinstance(given, dict):
            return given
        merged: dict[str, Any] = {name: c.model_dump() for name, c in _default_clusters().items()}
        for name, entry in given.items():
            merged[name] = {**merged.get(name, {}), **entry} if isinstance(entry, dict) else entry
        return merged


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is a value, not a section")
        node = child
    node[leaf] = value


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = e.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"config field '{field}': {e['msg']}{shown}")
    return "; ".join(lines)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, root: str | None = None
) -> QarmConfig:
    """Read YAML (optional), apply ``key=value`` overrides and ``root``, validate once."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping, not {type(loaded).__name__}")
        tree = loaded
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw else None)
    if root is not None:
        _set_dotted(tree, "tables.root", root)
    try:
        return QarmConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None
