"""The Dagster code location: every asset of the graph and the resources they use.

`dagster dev` (workspace.yaml) and `dg.materialize` in tests both load `defs` from here. The
run config is the YAML at $SAE_ASSETS_CONFIG, or the packaged default; the storage resource
is built from its `storage` section.
"""

from __future__ import annotations

import os

import dagster as dg

from resources import ArtifactStorage, RunSettings
from sae_assets import deploy_settings
from sae_assets.core.config import RunConfig, load_config
from sae_assets.defs import (
    activation_assets,
    attribution_assets,
    corpus_assets,
    dictionary_assets,
    feature_assets,
    identity,
    maintenance,
    map_assets,
    metrics_assets,
    model_assets,
    probing_assets,
    sensors,
    shuffle_assets,
)

CONFIG_ENV_VAR = "SAE_ASSETS_CONFIG"

ALL_ASSETS = [
    corpus_assets.corpus_shards,
    corpus_assets.tokenizer,
    corpus_assets.token_shards,
    model_assets.language_model,
    attribution_assets.parameter_shifts,
    attribution_assets.attribution_tables,
    activation_assets.cached_activations,
    shuffle_assets.shuffle_plan,
    shuffle_assets.shuffle_scatter,
    shuffle_assets.shuffled_shards,
    dictionary_assets.sae_dictionary,
    metrics_assets.sae_metrics_asset,
    probing_assets.sae_probing,
    map_assets.feature_map,
]
"""The assets every run has, in an order that materializes each after its inputs."""
ALL_CHECKS = [shuffle_assets.shuffle_is_permutation]


def graph_assets(config: RunConfig) -> list[dg.AssetsDefinition]:
    """Every asset of a run: ALL_ASSETS, then the feature assets of each served dictionary
    (features.dictionary, then features.dictionaries) and the one site over them, each with the
    code version its identity declaration derives from the config (defs/identity.py)."""
    assets = list(ALL_ASSETS)
    for point in config.browsed_dictionaries:
        assets += feature_assets.build_feature_assets(point.key, slug=config.served_slug(point.key))
    assets += feature_assets.build_feature_site(config)
    return identity.with_config_versions(assets, config)


def build_resources(config_path: str | None) -> dict[str, dg.ConfigurableResource]:
    config = load_config(config_path)
    return {"settings": RunSettings(config_path=config_path), "storage": ArtifactStorage.from_config(config.storage)}


KEEP_FRESH = dg.AutomationConditionSensorDefinition(
    "keep_fresh", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Evaluates every asset's automation condition (identity.keep_fresh): launches runs for the "
    "partitions that are newly missing, whose code version changed or whose inputs' data versions changed.")
"""The daemon's side of `make demo`: both request what `keep_fresh` requests. Running by default;
an instance that should only run what is launched by hand sets `auto_materialize: {enabled: false,
use_sensors: false}` in dagster.yaml."""


def build_definitions(config_path: str | None = None) -> dg.Definitions:
    # The executor: one_process_per_step (deploy_settings) unless $SAE_ASSETS_EXECUTOR names another
    # (`k8s` on a cluster: one pod per step, GPUs for the device steps; deploy/README.md).
    return dg.Definitions(assets=graph_assets(load_config(config_path)), asset_checks=ALL_CHECKS,
                          sensors=[sensors.config_partitions_sensor, sensors.corpus_growth, KEEP_FRESH],
                          jobs=[maintenance.garbage_collection_job],
                          schedules=[maintenance.garbage_collection_schedule], resources=build_resources(config_path),
                          executor=deploy_settings.executor_from_env())


defs = build_definitions(os.environ.get(CONFIG_ENV_VAR) or None)
