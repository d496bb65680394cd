"""cluster/ and `qarm submit` without a cluster: every manifest parses and holds what the code relies on,
and the submit commands are built exactly (what `--dry-run` prints)."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import ray
import yaml

from qarm_dist.cli import main
from qarm_dist.config import QarmConfig, load_config
from qarm_dist.submit import STAGES, Package, resolve, spark_command

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
EXAMPLES = load_config(CLUSTER / "clusters.yaml").clusters


def _docs(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / rel).read_text()) if d is not None]


def _shell_vars(rel: str) -> dict[str, str]:
    return dict(re.findall(r"^(?:export )?(\w+)=(\S+)", (CLUSTER / rel).read_text(), re.M))


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["template"]["spec"]["containers"]


# -- the manifests


def test_every_config_parses_and_marks_what_a_user_must_change():
    configs = sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "local" not in p.parts)
    names = {p.relative_to(CLUSTER).as_posix() for p in configs}
    assert names >= {
        "README.md",
        "clusters.yaml",
        "ray/cluster-launcher.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "spark/standalone/spark-defaults.conf",
        "spark/standalone/spark-env.sh",
        "spark/k8s/executor-pod-template.yaml",
    }
    for p in configs:
        if p.suffix == ".yaml":
            assert all(isinstance(d, dict) for d in _docs(p.relative_to(CLUSTER).as_posix())), p
        if p.suffix in {".yaml", ".conf", ".sh"}:
            assert "CHANGE ME" in p.read_text(), f"{p} marks no value to change"
    for script in ("spark/standalone/spark-env.sh", "local/lib.sh", "local/up", "local/down"):
        subprocess.run(["bash", "-n", CLUSTER / script], check=True)


def test_example_cluster_entries_validate_and_serve_both_engines():
    assert set(EXAMPLES) == {"local", "vms", "k8s"}  # the built-in local entry stays beside a file's
    for name in ("vms", "k8s"):
        assert EXAMPLES[name].spark_master and EXAMPLES[name].ray_jobs and EXAMPLES[name].python
        for stage in ("codebook-fit", "embed"):
            resolve(stage, name, CLUSTER / "clusters.yaml")


def test_ray_launcher_has_a_cpu_head_and_a_gpu_worker_group():
    (cfg,) = _docs("ray/cluster-launcher.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not head["resources"].get("GPU")
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert any(t["resources"].get("GPU", 0) >= 1 and t["max_workers"] > 0 for t in workers)
    start = " ".join(cfg["head_start_ray_commands"])
    assert {"--port=6379", "--dashboard-host=0.0.0.0", "--dashboard-port=8265"} <= set(start.split())
    assert EXAMPLES["vms"].ray_jobs.endswith(":8265")
    # jobs name the interpreter the launcher installs and starts Ray with (ENVIRONMENT.md §4's PATH trap)
    venv_bin = str(Path(EXAMPLES["vms"].python).parent)
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert cmd.startswith(f"{venv_bin}/ray start")


def test_kuberay_cluster_has_a_cpu_head_a_gpu_group_and_a_job_that_runs_a_jobs_script():
    docs = {d["kind"]: d for rel in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml") for d in _docs(rel)}
    cluster, job, config_map = docs["RayCluster"], docs["RayJob"], docs["ConfigMap"]
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == ray.__version__
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    (head_container,) = _containers(head)
    assert {6379, 8265} <= {p["containerPort"] for p in head_container["ports"]}
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    gpu_groups = [
        g
        for g in cluster["spec"]["workerGroupSpecs"]
        if any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1 for c in _containers(g))
    ]
    assert gpu_groups

    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    argv = shlex.split(job["spec"]["entrypoint"])
    script = Path(next(a for a in argv if a.endswith(".py")))
    (stage,) = [s for s in STAGES.values() if Path(s.script).name == script.name]
    assert stage.engine == "ray" and script.parent.name == "jobs"
    # --config names the ConfigMap's key where the head mounts it, and that config validates
    config = Path(argv[argv.index("--config") + 1])
    mounts = {m["name"]: m["mountPath"] for m in head_container["volumeMounts"]}
    assert mounts["config"] == str(config.parent)
    job_cfg = QarmConfig.model_validate(yaml.safe_load(config_map["data"][config.name]))
    # the RayJob, `qarm submit --cluster k8s` and the Spark executors all see the tables at one path
    assert mounts["tables"] == job_cfg.tables.root == EXAMPLES["k8s"].root


def test_spark_configs_agree_with_the_cluster_entries():
    vms, k8s = EXAMPLES["vms"], EXAMPLES["k8s"]
    env = _shell_vars("spark/standalone/spark-env.sh")
    assert vms.spark_master == f"spark://{env['SPARK_MASTER_HOST']}:{env['SPARK_MASTER_PORT']}"
    assert env["PYSPARK_PYTHON"] == vms.python
    # spark-defaults.conf holds daemon settings only: a key that `qarm submit` passes would be ignored there
    defaults = {
        line.split()[0]
        for line in (CLUSTER / "spark/standalone/spark-defaults.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert defaults and all(k.startswith("spark.") for k in defaults)
    cmd = spark_command(resolve("codebook-fit", "vms", CLUSTER / "clusters.yaml"), Package(Path("/pkg")))
    submitted = {cmd[i + 1].split("=")[0] for i, a in enumerate(cmd) if a == "--conf"}
    assert not defaults & submitted

    assert k8s.spark_master.startswith("k8s://")
    assert {"spark.kubernetes.container.image", "spark.kubernetes.namespace"} <= set(k8s.spark_conf)
    template = REPO / k8s.spark_conf["spark.kubernetes.executor.podTemplateFile"]
    (pod,) = yaml.safe_load_all(template.read_text())
    assert pod["kind"] == "Pod" and pod["spec"]["containers"]
    mounts = [m["mountPath"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts", [])]
    assert k8s.root in mounts


def test_local_scripts_use_the_ports_of_the_local_entry():
    ports = _shell_vars("local/lib.sh")
    local = QarmConfig().clusters["local"]
    assert local.spark_master == f"spark://127.0.0.1:{ports['SPARK_MASTER_PORT']}"
    assert local.ray_jobs == f"http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}"
    assert local.ray_address == f"127.0.0.1:{ports['RAY_GCS_PORT']}"
    for script in ("up", "down"):
        assert (CLUSTER / "local" / script).stat().st_mode & 0o111


# -- the stage table and jobs/


def test_every_stage_has_a_thin_jobs_script_that_runs_its_qarm_command():
    scripts = {p.name for p in (REPO / "jobs").glob("*.py")}
    assert scripts == {Path(s.script).name for s in STAGES.values()}
    for stage in STAGES.values():
        tree = ast.parse((REPO / stage.script).read_text())
        (call,) = [
            n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "main"
        ]
        (argv,) = call.args
        leading = tuple(e.value for e in argv.elts if isinstance(e, ast.Constant))
        assert leading == stage.argv, stage.name


# -- resolving and packaging


def test_the_cluster_entry_sits_between_the_file_and_the_command_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "codebook: {k: 4, iters: 3}\n"
        "clusters:\n"
        "  lab: {spark_master: 'spark://h:7077', root: /lab/tables, overrides: [codebook.k=16, codebook.levels=2]}\n"
    )
    cfg = resolve("codebook-fit", "lab", f, ["codebook.levels=5"]).cfg
    assert (cfg.codebook.iters, cfg.codebook.k, cfg.codebook.levels) == (3, 16, 5)
    assert (cfg.spark.master, cfg.tables.root) == ("spark://h:7077", "/lab/tables")
    assert resolve("codebook-fit", "lab", f, root="here").cfg.tables.root == str(Path("here").resolve())
    # naming a built-in entry changes only the fields given
    local = load_config(overrides=["clusters.local.root=/x"]).clusters["local"]
    assert (local.root, local.spark_master) == ("/x", QarmConfig().clusters["local"].spark_master)


def test_dry_run_prints_the_exact_spark_submit_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["submit", "codebook-fit", "--cluster", "local", "--root", "t", "--set", "codebook.k=8"]
    assert main([*argv, "--run-id", "r1", "--dry-run", "--", "--levels", "2"]) == 0
    cmd = shlex.split(capsys.readouterr().out)
    assert Path(cmd[0]).name == "spark-submit"
    assert cmd[cmd.index("--master") + 1] == "spark://127.0.0.1:7077"
    conf = dict(cmd[i + 1].split("=", 1) for i, a in enumerate(cmd) if a == "--conf")
    assert conf["spark.driver.host"] == conf["spark.driver.bindAddress"] == "127.0.0.1"
    assert conf["spark.pyspark.python"] == conf["spark.pyspark.driver.python"] == sys.executable
    assert conf["spark.executor.memory"] == "1g"
    script = next(i for i, a in enumerate(cmd) if a.endswith("jobs/codebook_fit.py"))
    config = Path(cmd[script + 2])
    assert cmd[script + 1 :] == ["--config", str(config), "--run-id", "r1", "--levels", "2"]
    pkg = config.parent
    assert pkg.parent == tmp_path / ".qarm" / "submit" and Path(cmd[script]).is_file()
    assert "qarm_dist/submit.py" in zipfile.ZipFile(cmd[cmd.index("--py-files") + 1]).namelist()
    job_cfg = load_config(config)
    assert (job_cfg.spark.master, job_cfg.tables.root) == ("spark://127.0.0.1:7077", str(tmp_path / "t"))
    assert job_cfg.codebook.k == 8


def test_dry_run_prints_the_ray_job_request(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "embed", "--cluster", "local", "--root", "t", "--run-id", "r2", "--dry-run"]) == 0
    cmd = shlex.split(capsys.readouterr().out)
    assert cmd[1:5] == ["job", "submit", "--address", "http://127.0.0.1:8265"]
    env = yaml.safe_load(cmd[cmd.index("--runtime-env-json") + 1])
    pkg = Path(env["working_dir"])
    # the cluster's python spelled out, never a bare `python` resolved through the cluster's PATH
    entrypoint = cmd[cmd.index("--") + 1 :]
    assert entrypoint == [sys.executable, "jobs/embed.py", "--config", "config.yaml", "--run-id", "r2"]
    assert cmd[cmd.index("--entrypoint-num-cpus") + 1] == "0"
    assert (pkg / "jobs/embed.py").is_file() and (pkg / "qarm_dist/submit.py").is_file()
    job_cfg = load_config(pkg / "config.yaml")
    assert (job_cfg.ray.address, job_cfg.tables.root) == ("127.0.0.1:6379", str(tmp_path / "t"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["submit", "nope", "--cluster", "local"], f"unknown stage 'nope'; known: {', '.join(STAGES)}"),
        (["submit", "embed", "--cluster", "nope"], "unknown cluster 'nope'; known: local"),
        (
            ["submit", "embed", "--cluster", "s", "--set", "clusters.s.spark_master=spark://h:7077"],
            "stage 'embed' runs on Ray, but cluster 's' sets no ray_jobs address",
        ),
        (
            ["submit", "codebook-fit", "--cluster", "local", "--set", "codebook.k=many"],
            "config field 'codebook.k'",
        ),
    ],
)
def test_a_submission_that_cannot_go_ahead_is_one_line_and_sends_nothing(
    argv, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qarm: error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / ".qarm").exists()


def test_only_submit_takes_arguments_after_the_double_dash(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["tables", "--", "x"])
    assert exit_.value.code == 2 and "only `qarm submit` takes arguments after --" in capsys.readouterr().err


def test_an_unreachable_cluster_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    nowhere = "clusters.local.ray_jobs=http://127.0.0.1:9"  # discard port: nothing listens
    assert main(["submit", "world", "--cluster", "local", "--set", nowhere]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("qarm: error: Failed to connect to Ray") and "Is the cluster up?" in last
