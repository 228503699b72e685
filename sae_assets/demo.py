"""`make demo`: materialize every asset of the graph on the configured run, in order.

Runs against the persistent Dagster instance at $DAGSTER_HOME (so `make ui` shows the
history), adds the shard partitions the config asks for, materializes each asset and each
of its partitions, and prints where the outputs are.
"""

from __future__ import annotations

import os
import sys
import time

import dagster as dg

from sae_assets.core.config import load_config
from sae_assets.defs.partitions import SHARDS, shard_keys, sync_shard_partitions
from sae_assets.definitions import ALL_ASSETS, CONFIG_ENV_VAR, build_resources


def materialize_all(instance: dg.DagsterInstance, config_path: str | None, *, log=print) -> dict[str, float]:
    """Materialize every asset (each partition in turn); returns seconds per asset."""
    config = load_config(config_path)
    sync_shard_partitions(instance, config.corpus.num_shards)
    resources = build_resources(config_path)
    seconds: dict[str, float] = {}
    for asset in ALL_ASSETS:
        name = asset.key.to_user_string()
        started = time.perf_counter()
        keys = shard_keys(instance) if asset.partitions_def == SHARDS else [None]
        for key in keys:
            outcome = dg.materialize(ALL_ASSETS, selection=[asset], partition_key=key, instance=instance,
                                     resources=resources, raise_on_error=True)
            assert outcome.success
        seconds[name] = time.perf_counter() - started
        log(f"  {name:<22} {len(keys)} partition(s) in {seconds[name]:6.1f} s")
    return seconds


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
