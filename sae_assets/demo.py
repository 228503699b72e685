"""`make demo`: materialize every asset of the graph on the configured run, in order.

Runs against the persistent Dagster instance at $DAGSTER_HOME (so `make ui` shows the
history), adds the shard partitions the config asks for, materializes each asset and each
of its partitions, and prints where the outputs are.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import dagster as dg
from dagster._core.errors import DagsterAssetCheckFailedError  # not re-exported at the top level
from dagster._core.storage.tags import (  # the run tags of a ranged run, as a UI backfill sets them
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from sae_assets.core.config import load_config
from sae_assets.defs.identity import identity_of
from sae_assets.defs.partitions import partition_keys, sync_partitions, training_shard_keys
from sae_assets.definitions import ALL_CHECKS, CONFIG_ENV_VAR, build_resources, graph_assets

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def runs_for(asset: dg.AssetsDefinition, keys: list[str | None]) -> list[tuple[str | None, dict[str, str]]]:
    """(partition_key, tags) of each run that materializes `keys`: one run per key, or one run of
    the whole range for an asset whose backfill policy is a single run (as a UI backfill does)."""
    policy = asset.backfill_policy
    if len(keys) > 1 and policy is not None and policy.max_partitions_per_run is None:
        return [(None, {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]})]
    return [(key, {}) for key in keys]


def materialize_all(instance: dg.DagsterInstance, config_path: str | None, *, log=print) -> dict[str, float]:
    """Materialize every asset (each partition in turn), then run the asset checks.

    Returns seconds per asset. Raises on the first failed step or failed check.
    """
    config = load_config(config_path)
    sync_partitions(instance, config)
    resources = build_resources(config_path)
    assets = graph_assets(config)
    definitions = [*assets, *ALL_CHECKS]
    seconds: dict[str, float] = {}
    for asset in assets:
        name = asset.key.to_user_string()
        started = time.perf_counter()
        keys = partition_keys(asset.partitions_def, instance)
        if identity_of(asset).training_shards_only:
            keys = training_shard_keys(instance, config)
        for key, tags in runs_for(asset, keys):
            try:
                dg.materialize(definitions, selection=dg.AssetSelection.assets(asset) - dg.AssetSelection.checks(*ALL_CHECKS),
                               partition_key=key, tags=tags, instance=instance, resources=resources, run_config=QUIET)
            except DagsterAssetCheckFailedError as exc:
                # The partition is materialized; its failed check is recorded and shown in the UI,
                # and stops what is built from it. The rest of the graph goes on.
                log(f"  {name}[{key or keys[0] + '...' + keys[-1]}]: {str(exc).splitlines()[-1].strip()} (check failed)")
        seconds[name] = time.perf_counter() - started
        log(f"  {name:<22} {len(keys)} partition(s) in {seconds[name]:6.1f} s")
    for check in ALL_CHECKS:
        outcome = dg.materialize(definitions, selection=dg.AssetSelection.checks(check), instance=instance,
                                 resources=resources, run_config=QUIET)
        for evaluation in outcome.get_asset_check_evaluations():
            log(f"  check {evaluation.check_name}: {'passed' if evaluation.passed else 'FAILED'}")
            if not evaluation.passed:
                raise RuntimeError(f"asset check {evaluation.check_name} failed: {evaluation.metadata}")
    return seconds


def site_instructions(config) -> str:
    """How to open the feature browser that feature_site wrote."""
    from resources import ArtifactStorage

    store = ArtifactStorage.from_config(config.storage).store()
    manifest = store.manifest("feature_site", None)
    if manifest is None:
        return "feature browser: not built (materialize feature_site)"
    key = manifest.files["index.html"].key
    if config.storage.backend == "local":
        index = (Path(config.storage.root) / key).resolve()
        return (f"feature browser: open file://{index}\n"
                f"  or serve it: python -m http.server -b 127.0.0.1 -d {index.parent} 8000")
    folder = key.rsplit("/", 1)[0]
    return (f"feature browser: {store.describe()}/{key}\n"
            f"  copy the folder {folder}/ to any static host (or download it) and open index.html")


def main() -> int:
    config_path = os.environ.get(CONFIG_ENV_VAR) or None
    config = load_config(config_path)
    started = time.perf_counter()
    print(f"sae_assets demo: config {config_path or 'default'}; artifacts -> {config.storage.backend} "
          f"{config.storage.root if config.storage.backend == 'local' else config.storage.bucket}")
    with dg.DagsterInstance.get() as instance:
        materialize_all(instance, config_path)
    print(f"done in {time.perf_counter() - started:.1f} s")
    if config.storage.backend == "local":
        print(f"outputs: {os.path.abspath(config.storage.root)}/<asset>/<partition>/manifest.json")
    print(f"Dagster history: {os.environ.get('DAGSTER_HOME')}  (browse it with `make ui`)")
    print(site_instructions(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
