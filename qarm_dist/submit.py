"""`qarm submit`: run one stage on a named cluster, through spark-submit or the Ray Jobs API.

A stage's code is the same everywhere; only where it runs changes. The cluster's entry in the config
(`clusters.NAME`) says where: a Spark master, a Ray Jobs API, a table root every node sees, the Python on
the nodes, and what each job gets. Submitting is four steps, each a function here:

1. `resolve`: the stage (from `STAGES`), the cluster entry, and the job's config: the user's config with
   the cluster's settings applied under the command line's ``--set``/``--root``, validated here, so a bad
   value fails before anything is shipped.
2. `package`: a folder ``./.qarm/submit/<submission id>/`` with the `jobs/` scripts, the resolved
   config as ``config.yaml``, and the code (`qarm_dist/` as a Ray working dir, or ``qarm_dist.zip`` for
   spark-submit's ``--py-files``). The shipped copy is the code that runs, on the driver and the workers.
3. `spark_command` / `ray_job`: the exact request, pure functions of the above (what ``--dry-run`` prints).
4. `run`: submit, stream the job's log here, wait, and return the job's exit status.

Spark stages run in client mode: the driver (which commits the Delta tables) runs on the submitting
machine and the executors on the cluster. Ray stages run as Ray jobs: the driver runs in the cluster, so
its ``python`` must be spelled out (a bare ``python`` resolves through the cluster's PATH, ENVIRONMENT.md §4).
The refresh uses both engines from one driver: it runs as a Spark stage, and that driver (here) also joins
the cluster's Ray at ``ray_address`` for its Ray Data steps.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from qarm_dist.config import ClusterConfig, QarmConfig, load_config
from qarm_dist.io.delta import new_run_id

PROJECT = Path(__file__).resolve().parents[1]
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


class SubmitError(ValueError):
    """A submission that cannot go ahead (unknown stage or cluster, a cluster without that engine)."""


@dataclass(frozen=True)
class Stage:
    """A stage that `qarm submit` can run: its engine and the `qarm` sub-command its job script runs.

    ``ray_steps``: a Spark stage whose driver also runs Ray Data steps (the refresh); the job's config
    then points ``ray.address`` at the cluster's Ray too, since in client mode that driver runs here.
    """

    name: str
    engine: Literal["spark", "ray"]
    argv: tuple[str, ...]
    ray_steps: bool = False

    @property
    def script(self) -> str:
        """The thin entry point under jobs/ (the stage's name with underscores)."""
        return f"jobs/{self.name.replace('-', '_')}.py"


# Driver-only stages (world, ingest) run as Ray jobs: the cluster, not the submitting machine, does the work.
STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("world", "ray", ("world",)),
        Stage("ingest-movielens", "ray", ("ingest", "movielens")),
        Stage("embed", "ray", ("embed",)),
        Stage("pairs", "spark", ("pairs",)),
        Stage("align-train", "ray", ("align", "train")),
        Stage("align-embed", "ray", ("align", "embed")),
        Stage("codebook-fit", "spark", ("codebook", "fit")),
        Stage("codebook-assign", "spark", ("codebook", "assign")),
        Stage("refresh", "spark", ("refresh",), ray_steps=True),
        Stage("samples", "spark", ("samples",)),
        Stage("rank-train", "ray", ("rank", "train")),
        Stage("rank-ablate", "ray", ("rank", "ablate")),
    )
}


@dataclass(frozen=True)
class Submission:
    """Everything about one job before it is sent: what `--dry-run` shows and `run` executes."""

    stage: Stage
    cluster_name: str
    cluster: ClusterConfig
    cfg: QarmConfig
    submission_id: str
    run_id: str
    stage_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Package:
    """A packaged job: ``dir`` holds jobs/, config.yaml and the code in the form the engine takes."""

    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def code_zip(self) -> Path:
        return self.dir / "qarm_dist.zip"


@dataclass(frozen=True)
class RayJob:
    """One Ray Jobs API request (`JobSubmissionClient.submit_job` keyword arguments, plus the address)."""

    address: str
    submission_id: str
    entrypoint: str
    runtime_env: dict
    entrypoint_num_cpus: float

    def cli(self) -> list[str]:
        """The same request as a `ray job submit` command line."""
        return [
            str(Path(sys.executable).parent / "ray"),
            "job",
            "submit",
            "--address",
            self.address,
            "--submission-id",
            self.submission_id,
            "--runtime-env-json",
            json.dumps(self.runtime_env),
            "--entrypoint-num-cpus",
            f"{self.entrypoint_num_cpus:g}",
            "--",
            *shlex.split(self.entrypoint),
        ]


def _known(kind: str, name: str, known: list[str]) -> SubmitError:
    return SubmitError(f"unknown {kind} {name!r}; known: {', '.join(known) or '(none configured)'}")


def _set(key: str, value: str) -> str:
    # JSON strings are YAML strings: the value arrives verbatim (a root named "2024" stays a string).
    return f"{key}={json.dumps(value)}"


def resolve(
    stage: str,
    cluster: str,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    root: str | None = None,
    run_id: str | None = None,
    stage_args: list[str] | None = None,
) -> Submission:
    """The stage, the cluster entry and the job's validated config, before anything is written or sent.

    Precedence, lowest first: the config file, the cluster entry (its root, its Spark master or Ray
    address, its ``overrides``), the command line's ``overrides``, then ``root``. A local table root is made
    absolute here: a Ray job's driver runs in a temporary working dir on the cluster.
    """
    if stage not in STAGES:
        raise _known("stage", stage, list(STAGES))
    st = STAGES[stage]
    clusters = load_config(config, overrides).clusters
    if cluster not in clusters:
        raise _known("cluster", cluster, list(clusters))
    cl = clusters[cluster]
    placed: list[str] = []
    if st.engine == "spark":
        if not cl.spark_master:
            raise SubmitError(f"stage {stage!r} runs on Spark, but cluster {cluster!r} sets no spark_master")
        placed.append(_set("spark.master", cl.spark_master))
        if st.ray_steps and cl.ray_jobs:  # a cluster without Ray: those steps use a local one
            if cl.ray_address == "auto":
                raise SubmitError(
                    f"stage {stage!r} runs Ray Data steps from its Spark driver on this machine: set "
                    f"clusters.{cluster}.ray_address to an address this machine reaches (head:6379 from "
                    "inside the cluster's network, or Ray Client ray://head:10001)"
                )
            placed.append(_set("ray.address", cl.ray_address))
    else:
        if not cl.ray_jobs:
            raise SubmitError(
                f"stage {stage!r} runs on Ray, but cluster {cluster!r} sets no ray_jobs address"
            )
        placed.append(_set("ray.address", cl.ray_address))
    if cl.root:
        placed.append(_set("tables.root", cl.root))
    cfg = load_config(config, [*placed, *cl.overrides, *(overrides or [])], root)
    if "://" not in cfg.tables.root:
        cfg.tables.root = os.path.abspath(cfg.tables.root)
    submission_id = new_run_id(st.name)
    return Submission(st, cluster, cl, cfg, submission_id, run_id or submission_id, tuple(stage_args or ()))


def package(sub: Submission, under: Path | None = None) -> Package:
    """Write the job's folder (under ``under``, default ./.qarm/submit): jobs/, config.yaml, and qarm_dist/
    (a Ray working dir) or qarm_dist.zip (spark-submit --py-files). It stays there as a record of the run."""
    jobs = PROJECT / "jobs"
    if not (jobs / Path(sub.stage.script).name).is_file():
        raise SubmitError(f"{jobs} has no {Path(sub.stage.script).name}: qarm submit needs a source checkout")
    pkg = Package((under or Path(".qarm", "submit")).resolve() / sub.submission_id)
    pkg.dir.mkdir(parents=True)
    shutil.copytree(jobs, pkg.dir / "jobs", ignore=_SKIP)
    # The cluster entries stay with the submitter; the job needs only where it runs and what it does.
    pkg.config.write_text(
        yaml.safe_dump(sub.cfg.model_dump(mode="json", exclude={"clusters"}), sort_keys=False)
    )
    code = PROJECT / "qarm_dist"
    if sub.stage.engine == "ray":
        shutil.copytree(code, pkg.dir / "qarm_dist", ignore=_SKIP)
    else:
        with zipfile.ZipFile(pkg.code_zip, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(code.rglob("*.py")):
                if "__pycache__" not in f.parts:
                    zf.write(f, f.relative_to(PROJECT))
    return pkg


def _job_args(sub: Submission, config: Path | str) -> list[str]:
    return ["--config", str(config), "--run-id", sub.run_id, *sub.stage_args]


def spark_command(sub: Submission, pkg: Package) -> list[str]:
    """The spark-submit command line (client mode) for a Spark stage."""
    import pyspark

    cl = sub.cluster
    conf = {
        "spark.executor.memory": cl.executor_memory,
        **({"spark.executor.cores": str(cl.executor_cores)} if cl.executor_cores else {}),
        **({"spark.cores.max": str(cl.cores_max)} if cl.cores_max else {}),
        "spark.pyspark.python": cl.python or sys.executable,
        "spark.pyspark.driver.python": sys.executable,
        "spark.log.level": "WARN",
        **{f"spark.executorEnv.{k}": v for k, v in cl.env.items()},
        **cl.spark_conf,
    }
    cmd = [str(Path(pyspark.__file__).parent / "bin" / "spark-submit"), "--master", str(cl.spark_master)]
    cmd += ["--driver-memory", sub.cfg.spark.driver_memory, "--py-files", str(pkg.code_zip)]
    for key, value in conf.items():
        cmd += ["--conf", f"{key}={value}"]
    return [*cmd, str(pkg.dir / sub.stage.script), *_job_args(sub, pkg.config)]


def ray_job(sub: Submission, pkg: Package) -> RayJob:
    """The Ray Jobs API request for a Ray stage: the package as working dir, the cluster's python."""
    cl = sub.cluster
    entrypoint = shlex.join([cl.python or sys.executable, sub.stage.script, *_job_args(sub, "config.yaml")])
    runtime_env: dict = {"working_dir": str(pkg.dir)}
    if cl.env:
        runtime_env["env_vars"] = dict(cl.env)
    return RayJob(str(cl.ray_jobs), sub.submission_id, entrypoint, runtime_env, cl.entrypoint_num_cpus)


def command_line(sub: Submission, pkg: Package) -> str:
    """The exact command, as one shell line: spark-submit, or the `ray job submit` twin of the SDK call."""
    return shlex.join(spark_command(sub, pkg) if sub.stage.engine == "spark" else ray_job(sub, pkg).cli())


def run(sub: Submission, pkg: Package, timeout_s: float | None = None) -> int:
    """Submit, stream the job's log, wait; the job's exit status (0 = success).

    The job lives as long as this call: on a timeout or Ctrl-C it is stopped (as a client-mode Spark
    driver dies with its spark-submit), so no job outlives the command that started it.
    """
    if sub.stage.engine == "spark":
        return _run_spark(spark_command(sub, pkg), timeout_s)
    return _run_ray(ray_job(sub, pkg), timeout_s)


def _run_spark(cmd: list[str], timeout_s: float | None) -> int:
    proc = subprocess.Popen(cmd)  # inherits stdout/stderr: the driver's log streams as it runs
    try:
        return proc.wait(timeout_s)
    except BaseException as err:
        proc.terminate()  # spark-submit's shutdown hook stops the Python driver and the application
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if isinstance(err, subprocess.TimeoutExpired):
            raise SubmitError(f"spark-submit still running after {timeout_s:g} s; stopped it") from None
        raise


def _run_ray(job: RayJob, timeout_s: float | None) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(job.address)
    except ConnectionError as err:
        raise SubmitError(f"{err} Is the cluster up? (the local one: cluster/local/up)") from None
    client.submit_job(
        entrypoint=job.entrypoint,
        submission_id=job.submission_id,
        runtime_env=job.runtime_env,
        entrypoint_num_cpus=job.entrypoint_num_cpus,
    )

    async def follow() -> None:
        async for chunk in client.tail_job_logs(job.submission_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        # the log stream closes as the job ends; its status may lag a moment behind
        while not client.get_job_status(job.submission_id).is_terminal():
            await asyncio.sleep(0.5)

    try:
        asyncio.run(asyncio.wait_for(follow(), timeout_s))
    except BaseException as err:
        client.stop_job(job.submission_id)
        if isinstance(err, asyncio.TimeoutError):
            raise SubmitError(
                f"ray job {job.submission_id} still running after {timeout_s:g} s; stopped it"
            ) from None
        raise
    info = client.get_job_info(job.submission_id)
    if info.status == JobStatus.SUCCEEDED:
        print(f"ray job {job.submission_id}: {info.status}", file=sys.stderr)
        return 0
    # the message's first line says why; the rest repeats the log streamed above
    why = (info.message or "").splitlines()[:1]
    print(f"qarm: ray job {job.submission_id} {info.status}: {''.join(why)}", file=sys.stderr)
    return info.driver_exit_code or 1
