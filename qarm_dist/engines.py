"""Spark and Ray, started the same way everywhere.

Local by default (Spark ``local[*]``, an in-process Ray), bound to 127.0.0.1;
a cluster address in the config is all it takes to run elsewhere. The
environment variables below must be set in every process that starts or joins
Ray or Spark (ENVIRONMENT.md §0, §4): Ray otherwise binds the host's interface
address, and Ray 2.60 otherwise turns on token auth.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from qarm_dist.config import QarmConfig

LOCAL_ENV = {
    "SPARK_LOCAL_IP": "127.0.0.1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_DISABLE_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "TOKENIZERS_PARALLELISM": "false",
    # Ray Train's controller takes a worker's report (and registers its checkpoint) when it polls; the
    # default 2 s poll made every epoch's report wait up to 2 s (a third of a tiny-world ablation's time)
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


def set_process_env() -> None:
    """Set the loopback/offline variables unless the caller already chose otherwise."""
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def spark_session(cfg: QarmConfig) -> SparkSession:
    """The Spark session for this process: ``cfg.spark.master``, Arrow on, quiet logs."""
    set_process_env()
    from pyspark.sql import SparkSession

    sc = cfg.spark
    builder = (
        SparkSession.builder.master(sc.master)
        .appName(sc.app_name)
        .config("spark.driver.memory", sc.driver_memory)
        .config("spark.sql.shuffle.partitions", str(sc.shuffle_partitions))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.log.level", "WARN")
        .config("spark.executorEnv.PYSPARK_PYTHON", os.environ["PYSPARK_PYTHON"])
    )
    if sc.master.startswith("local"):
        builder = builder.config("spark.driver.host", "127.0.0.1").config(
            "spark.driver.bindAddress", "127.0.0.1"
        )
    from qarm_dist.io.objectstore import spark_s3a_conf

    # S3A settings follow tables.storage_options; spark.conf, given after them, can still override.
    for key, value in {**spark_s3a_conf(cfg.tables.root, cfg.tables.storage_options), **sc.conf}.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    return session


_API = "RAY_API_SERVER_ADDRESS"


def ray_init(cfg: QarmConfig) -> None:
    """Connect to ``cfg.ray.address`` or start a local Ray on 127.0.0.1 (idempotent)."""
    set_process_env()
    import ray

    if ray.is_initialized():
        return
    rc = cfg.ray
    if rc.address:
        ray.init(address=rc.address, log_to_driver=True)
        return
    # Ray Train's placement-group cleaner asks the state API (served by the dashboard) whether the
    # training controller is alive. Without a dashboard, or with another Ray instance on the machine,
    # its address auto-detection fails or finds the *other* cluster, which reports the controller as
    # unknown, and the cleaner then removes the placement group of a run that is alive (seen: a
    # spurious worker-group restart after the last epoch). So run the dashboard on a port of our own
    # and name it to every process this Ray starts: they inherit the environment ray.init sees. It is
    # restored afterwards, so later subprocesses (a cluster this process starts) do not inherit it.
    port = _free_port()
    before = os.environ.get(_API)
    os.environ[_API] = f"http://127.0.0.1:{port}"
    try:
        ray.init(
            num_cpus=rc.num_cpus,
            object_store_memory=rc.object_store_memory,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            log_to_driver=True,
            configure_logging=True,
            logging_level="WARNING",
        )
    finally:
        if before is None:
            os.environ.pop(_API, None)
        else:
            os.environ[_API] = before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torch_device(cfg: QarmConfig) -> str:
    """'cuda' when asked for or (auto) present, else 'cpu'. Hardware is found, not assumed."""
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config device=cuda but torch finds no CUDA device")
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device
