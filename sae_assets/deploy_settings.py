"""Deployment settings of the code location: which executor runs a run's steps, and what the
steps that hold a model ask Kubernetes for.

Locally (and in docker-compose) runs use `one_process_per_step`: a run of one step (one
partition of one asset, or a ranged backfill run) executes that step in the run worker
itself, so a partition costs one process and one code load, not a run process plus a step
process; a run of several steps hands them to Dagster's multiprocess executor, whose step
processes fork from a forkserver that has the code location preloaded. The README's
"Runs and processes" gives the measurements behind the choice. On Kubernetes, `SAE_ASSETS_EXECUTOR=k8s` makes every step its own
pod (dagster-k8s `k8s_job_executor`), and `SAE_ASSETS_K8S_GPUS=<n>` gives the pods of the
device steps (`device_assets()`: those whose identity declares a torch device) n GPUs, a
toleration for GPU-node taints and, optionally, a node selector. The GPU request is the
executor's `per_step_k8s_config`, keyed by op name, so the asset modules stay free of
deployment details; `device_op_tags()` is the same request as `dagster-k8s/config` op tags
for those who prefer to tag the assets. dagster_k8s is imported only when the k8s executor is
asked for. The code location is expected to call `executor_from_env()` once when it builds its
Definitions. Tests: tests/test_deploy.py.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import dagster as dg

EXECUTOR_ENV_VAR = "SAE_ASSETS_EXECUTOR"
"""'' (one_process_per_step), 'multiprocess' (Dagster's default: a spawned process per step),
'in_process', or 'k8s' (one pod per step)."""
GPUS_ENV_VAR = "SAE_ASSETS_K8S_GPUS"
"""GPUs per device step under the k8s executor; 0 or unset asks for none (a CPU cluster)."""
GPU_NODE_SELECTOR_ENV_VAR = "SAE_ASSETS_K8S_GPU_NODE_SELECTOR"
"""Optional 'label=value[,label=value]' that device steps must run on, e.g.
'cloud.google.com/gke-accelerator=nvidia-l4'."""
MAX_CONCURRENT_ENV_VAR = "SAE_ASSETS_K8S_MAX_CONCURRENT"
"""Step pods one run may have at once (default 16); the instance's pools still apply on top."""

USER_DEFINED_K8S_CONFIG_KEY = "dagster-k8s/config"
"""The op tag dagster-k8s reads per step (dagster_k8s.job.USER_DEFINED_K8S_CONFIG_KEY)."""
GPU_RESOURCE = "nvidia.com/gpu"
"""The extended resource the NVIDIA device plugin advertises on GPU nodes."""

def device_assets() -> dict[str, str]:
    """{asset: config key of its torch device}, from each asset's identity declaration (its op
    name equals the asset name). The asset modules must be loaded (definitions loads them)."""
    from sae_assets.defs.identity import device_assets as declared

    return declared()


def device_step_k8s_config(gpus: int, node_selector: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The `dagster-k8s/config` of one device step: `gpus` GPUs (limits; Kubernetes sets the
    request equal) and a toleration for the `nvidia.com/gpu` taint GPU node pools carry."""
    if gpus < 1:
        raise ValueError(f"{GPUS_ENV_VAR}: a device step needs at least one GPU, got {gpus}")
    pod_spec: dict[str, Any] = {
        "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
    }
    if node_selector:
        pod_spec["node_selector"] = dict(node_selector)
    return {
        "container_config": {"resources": {"limits": {GPU_RESOURCE: str(gpus)}}},
        "pod_spec_config": pod_spec,
    }


def device_op_tags(gpus: int = 1, node_selector: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`op_tags` for a device asset: the same request as a `dagster-k8s/config` tag.

    Op tags apply only under the k8s executor (the run pod of K8sRunLauncher reads run tags);
    elsewhere Dagster ignores them.
    """
    return {USER_DEFINED_K8S_CONFIG_KEY: device_step_k8s_config(gpus, node_selector)}


def parse_node_selector(text: str) -> dict[str, str]:
    """'a=b,c=d' -> {'a': 'b', 'c': 'd'}; '' -> {}."""
    selector = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        label, sep, value = item.partition("=")
        if not sep or not label:
            raise ValueError(f"{GPU_NODE_SELECTOR_ENV_VAR}: {item!r} is not 'label=value'")
        selector[label.strip()] = value.strip()
    return selector


def k8s_executor_defaults(gpus: int, node_selector: Mapping[str, str] | None = None,
                          max_concurrent: int = 16) -> dict[str, Any]:
    """k8s_job_executor config: GPU requests for the device assets when gpus > 0, and a per-run cap."""
    per_step = {name: device_step_k8s_config(gpus, node_selector) for name in device_assets()} if gpus else {}
    return {"max_concurrent": max_concurrent, "per_step_k8s_config": per_step}


def k8s_executor(defaults: Mapping[str, Any]) -> dg.ExecutorDefinition:
    """dagster-k8s's k8s_job_executor with `defaults` that run config may override key by key
    (`execution: config: {...}`); per_step_k8s_config entries merge by step name."""
    from dagster_k8s import k8s_job_executor  # only a Kubernetes deployment installs dagster-k8s

    def with_defaults(overrides: Mapping[str, Any]) -> dict[str, Any]:
        merged = {**defaults, **overrides}
        merged["per_step_k8s_config"] = {**defaults.get("per_step_k8s_config", {}),
                                         **overrides.get("per_step_k8s_config", {})}
        return merged

    return k8s_job_executor.configured(
        with_defaults, name="k8s",
        config_schema=dg.Field(dg.Permissive(), is_required=False, default_value={}),
    )


class _OneProcessPerStep(dg.Executor):
    """Runs a one-step plan in the calling process (the run worker), a longer plan through the
    multiprocess executor."""

    def __init__(self, single_step: dg.Executor, several_steps: dg.Executor):
        self._single_step, self._several_steps = single_step, several_steps

    @property
    def retries(self):
        return self._several_steps.retries

    @property
    def step_dependency_config(self):
        return self._several_steps.step_dependency_config

    def execute(self, plan_context, execution_plan):
        steps = execution_plan.step_keys_to_execute
        chosen = self._single_step if len(steps) == 1 else self._several_steps
        return chosen.execute(plan_context, execution_plan)


_MULTIPROCESS_CONFIG = dg.multiprocess_executor.config_schema.as_field().config_type
_IN_PROCESS_CONFIG = dg.in_process_executor.config_schema.as_field().config_type


@dg.executor(name="one_process_per_step", requirements=dg.multiple_process_executor_requirements(), config_schema={
    "multiprocess": dg.Field(_MULTIPROCESS_CONFIG, is_required=False,
                             description="Every step in its own process (Dagster's multiprocess executor)."),
    "in_process": dg.Field(_IN_PROCESS_CONFIG, is_required=False, description="Every step in the run worker."),
})
def one_process_per_step_executor(init_context: dg.InitExecutorContext) -> dg.Executor:
    """One process per step. Without config, a run of one step executes it in the run worker, and
    a run of several forks their processes from a forkserver with the code location preloaded.
    `multiprocess: {...}` or `in_process: {...}` (the run config Dagster's default executor takes)
    pick that executor for every step of the run."""
    config = init_context.executor_config

    def make(definition: dg.ExecutorDefinition, executor_config) -> dg.Executor:
        return definition.executor_creation_fn(dg.InitExecutorContext(
            job=init_context.job, executor_def=definition, executor_config=executor_config,
            instance=init_context.instance))

    if "in_process" in config:
        return make(dg.in_process_executor, config["in_process"])
    if "multiprocess" in config:
        return make(dg.multiprocess_executor, config["multiprocess"])
    defaults = {"retries": {"enabled": {}}}
    return _OneProcessPerStep(
        make(dg.in_process_executor, defaults),
        # forkserver preloads the job's module (sae_assets.definitions) once per run.
        make(dg.multiprocess_executor, {**defaults, "start_method": {"forkserver": {}}}))


def executor_from_env(environ: Mapping[str, str] | None = None) -> dg.ExecutorDefinition:
    """The executor named by SAE_ASSETS_EXECUTOR (default one_process_per_step)."""
    env = os.environ if environ is None else environ
    kind = env.get(EXECUTOR_ENV_VAR, "").strip().lower()
    if kind in ("", "default", "one_process_per_step"):
        return one_process_per_step_executor
    if kind == "multiprocess":
        return dg.multiprocess_executor
    if kind == "in_process":
        return dg.in_process_executor
    if kind == "k8s":
        try:
            gpus = int(env.get(GPUS_ENV_VAR, "0") or 0)
            max_concurrent = int(env.get(MAX_CONCURRENT_ENV_VAR, "16") or 16)
        except ValueError as exc:
            raise ValueError(f"{GPUS_ENV_VAR} and {MAX_CONCURRENT_ENV_VAR} must be integers: {exc}") from exc
        if gpus < 0 or max_concurrent < 1:
            raise ValueError(f"{GPUS_ENV_VAR} must be >= 0 and {MAX_CONCURRENT_ENV_VAR} >= 1")
        selector = parse_node_selector(env.get(GPU_NODE_SELECTOR_ENV_VAR, ""))
        return k8s_executor(k8s_executor_defaults(gpus, selector, max_concurrent))
    raise ValueError(f"{EXECUTOR_ENV_VAR}={kind!r} is not one of '', 'one_process_per_step', 'multiprocess', "
                     "'in_process', 'k8s'")
