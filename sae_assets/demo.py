"""`make demo`: bring every asset of the graph up to date on the configured run, running only
what is missing or stale.

Runs against the persistent Dagster instance at $DAGSTER_HOME (so `make ui` shows the
history) and adds the partitions the config implies. Then it evaluates the graph's automation
condition (`identity.keep_fresh`, the one the daemon's `keep_fresh` sensor evaluates): a
partition is requested when it is newly missing, when its code version changed (its identity's
version or a config key it declares) or when the data version of a partition it reads changed.
The demo materializes what is requested, in the graph's order, evaluates again, and stops when
nothing is requested; it prints what ran and what it skipped. The evaluation cursor is kept
in DAGSTER_HOME (`demo-automation-cursor`), so the next `make demo` compares with this one;
without a cursor (the first demo on an instance) everything is materialized once.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from sae_assets.core.config import load_config
from sae_assets.defs.identity import identity_of
from sae_assets.defs.partitions import partition_keys, sync_partitions, training_shard_keys
from sae_assets.definitions import ALL_CHECKS, CONFIG_ENV_VAR, build_resources, graph_assets

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
RANGE_START_TAG, RANGE_END_TAG = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
"""The run tags of a ranged run, as a UI backfill of a single-run asset sets them."""
CURSOR_FILE = "demo-automation-cursor"


def runs_for(asset: dg.AssetsDefinition, keys: list[str | None]) -> list[tuple[str | None, dict[str, str]]]:
    """(partition_key, tags) of each run that materializes `keys`: one run per key, or one run of
    the whole range for an asset whose backfill policy is a single run (as a UI backfill does)."""
    policy = asset.backfill_policy
    if len(keys) > 1 and policy is not None and policy.max_partitions_per_run is None:
        return [(None, {RANGE_START_TAG: keys[0], RANGE_END_TAG: keys[-1]})]
    return [(key, {}) for key in keys]


def _selection(asset: dg.AssetsDefinition) -> dg.AssetSelection:
    return dg.AssetSelection.assets(asset) - dg.AssetSelection.checks(*ALL_CHECKS)


@dataclass
class DemoReport:
    """What a demo pass ran and skipped, by asset name."""
    ran: dict[str, int] = field(default_factory=dict)
    """Partitions materialized (1 for an unpartitioned asset)."""
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    """Partitions left alone because they were fresh."""
    evaluations: int = 0


class _Graph:
    """The config's assets, checks and resources, and how to materialize some of their partitions."""

    def __init__(self, instance: dg.DagsterInstance, config_path: str | None, log: Callable[[str], None]):
        self.instance, self.log = instance, log
        self.config = load_config(config_path)
        sync_partitions(instance, self.config)
        self.resources = build_resources(config_path)
        self.assets = graph_assets(self.config)
        self.definitions = [*self.assets, *ALL_CHECKS]

    def keys_of(self, asset: dg.AssetsDefinition) -> list[str | None]:
        if identity_of(asset).training_shards_only:
            return list(training_shard_keys(self.instance, self.config))
        return partition_keys(asset.partitions_def, self.instance)

    def materialize(self, asset: dg.AssetsDefinition, keys: list[str | None], bar=None) -> None:
        """Materialize `keys` of `asset` (in ranged runs where its backfill policy says so). A failed
        blocking check is reported and the graph goes on; any other failure raises."""
        name = asset.key.to_user_string()
        for key, tags in runs_for(asset, keys):
            outcome = dg.materialize(self.definitions, selection=_selection(asset), partition_key=key, tags=tags,
                                     instance=self.instance, resources=self.resources, run_config=QUIET,
                                     raise_on_error=False)
            if not outcome.success:
                failed_checks = [e for e in outcome.get_asset_check_evaluations() if not e.passed]
                materialized = outcome.get_asset_materialization_events()
                if not (failed_checks and materialized):
                    failure = next((e for e in outcome.all_events if e.is_step_failure), None)
                    raise RuntimeError(f"{name}[{key or '...'}] failed: "
                                       f"{failure.step_failure_data.error.message.strip() if failure else outcome}")
                # The partition is materialized; its failed check is recorded and shown in the UI,
                # and stops what is built from it. The rest of the graph goes on.
                self.log(f"  {name}[{key or keys[0] + '...' + keys[-1]}]: check "
                         f"{', '.join(e.check_name for e in failed_checks)} failed")
            if bar is not None:
                bar.update(1)

    def run_checks(self, names: set[str]) -> None:
        """Run each asset check of ALL_CHECKS whose asset is among `names`; raise if one fails."""
        for check in ALL_CHECKS:
            if not any(spec.asset_key.to_user_string() in names for spec in check.check_specs):
                continue
            outcome = dg.materialize(self.definitions, selection=dg.AssetSelection.checks(check),
                                     instance=self.instance, resources=self.resources, run_config=QUIET)
            for evaluation in outcome.get_asset_check_evaluations():
                self.log(f"  check {evaluation.check_name}: {'passed' if evaluation.passed else 'FAILED'}")
                if not evaluation.passed:
                    raise RuntimeError(f"asset check {evaluation.check_name} failed: {evaluation.metadata}")


def _progress_bar(total: int, description: str):
    """A terminal progress bar over runs (tqdm); none when stderr is not a terminal (CI logs)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="run", disable=None, leave=False)


def materialize_all(instance: dg.DagsterInstance, config_path: str | None, *, log=print) -> dict[str, float]:
    """Materialize every partition of every asset, in order, whatever is fresh; then the asset
    checks. Returns seconds per asset. Raises on the first failed step or failed check."""
    return {name: seconds for name, (seconds, _) in _materialize_every(_Graph(instance, config_path, log)).items()}


def _materialize_every(graph: _Graph) -> dict[str, tuple[float, int]]:
    """Every partition of every asset of `graph`, then the checks: {asset: (seconds, partitions)}."""
    done: dict[str, tuple[float, int]] = {}
    for asset in graph.assets:
        name, started = asset.key.to_user_string(), time.perf_counter()
        keys = graph.keys_of(asset)
        graph.materialize(asset, keys)
        done[name] = (time.perf_counter() - started, len(keys))
        graph.log(f"  {name:<22} {len(keys)} partition(s) in {done[name][0]:6.1f} s")
    graph.run_checks({a.key.to_user_string() for a in graph.assets})
    return done


def materialize_upstream_of(instance: dg.DagsterInstance, config_path: str | None, target: str, *,
                            log=print) -> dict[str, float]:
    """Materialize `target` and everything it is built from (every partition, in graph order),
    and nothing else: for experiments that need one corner of the graph. Seconds per asset."""
    graph = _Graph(instance, config_path, log)
    wanted = dg.AssetSelection.assets(target).upstream().resolve(graph.assets)
    seconds = {}
    for asset in graph.assets:
        if asset.key in wanted:
            started = time.perf_counter()
            graph.materialize(asset, graph.keys_of(asset))
            seconds[asset.key.to_user_string()] = time.perf_counter() - started
            log(f"  {asset.key.to_user_string():<22} {seconds[asset.key.to_user_string()]:6.1f} s")
    return seconds


def _requested(result, graph: _Graph) -> list[tuple[dg.AssetsDefinition, list[str | None]]]:
    """The partitions the evaluation requested, asset by asset in the graph's order."""
    wanted = []
    for asset in graph.assets:
        if not result.get_num_requested(asset.key):
            continue
        requested = result.get_requested_partitions(asset.key)
        wanted.append((asset, [key for key in graph.keys_of(asset) if key in requested]))
    return [(asset, keys) for asset, keys in wanted if keys]


def materialize_stale(instance: dg.DagsterInstance, config_path: str | None, *, cursor_path: Path | None,
                      log=print, max_evaluations: int = 50) -> DemoReport:
    """Materialize what `keep_fresh` requests, evaluate again, until nothing is requested.

    `cursor_path` keeps the evaluation cursor between calls (None: no earlier cursor and none
    kept). Without an earlier cursor every partition is materialized once, and the cursor
    taken after that is the baseline of the next call."""
    graph = _Graph(instance, config_path, log)
    report = DemoReport()
    definitions = dg.Definitions(assets=graph.assets, asset_checks=ALL_CHECKS, resources=graph.resources)
    # Our own selection: every asset and check. (Dagster's default for this call also selects
    # source assets through a beta parameter; the graph has none.)
    selection = dg.AssetSelection.all() | dg.AssetSelection.all_asset_checks()
    cursor = _read_cursor(cursor_path)
    if cursor is None:
        log("no cursor of an earlier demo on this instance: materializing every partition once")
        for name, (seconds, partitions) in _materialize_every(graph).items():
            report.seconds[name], report.ran[name] = seconds, partitions
    ran_names: set[str] = set()
    while report.evaluations < max_evaluations:
        result = dg.evaluate_automation_conditions(defs=definitions, instance=instance, asset_selection=selection,
                                                   cursor=cursor)
        report.evaluations += 1
        requested = [] if report.evaluations == 1 and cursor is None else _requested(result, graph)
        if not requested:
            _write_cursor(cursor_path, result.cursor)
            break
        bar = _progress_bar(sum(len(runs_for(a, k)) for a, k in requested), f"evaluation {report.evaluations}")
        try:
            for asset, keys in requested:
                name, started = asset.key.to_user_string(), time.perf_counter()
                if bar is not None:
                    bar.set_postfix_str(f"{name} ({len(keys)} partition(s))")
                graph.materialize(asset, keys, bar)
                report.ran[name] = report.ran.get(name, 0) + len(keys)
                report.seconds[name] = report.seconds.get(name, 0.0) + time.perf_counter() - started
                ran_names.add(name)
                log(f"  {name:<22} {len(keys)} partition(s) in {time.perf_counter() - started:6.1f} s")
        finally:
            bar.close()
        cursor = result.cursor
        _write_cursor(cursor_path, cursor)
    else:
        raise RuntimeError(f"the graph was still requesting runs after {max_evaluations} evaluations")
    graph.run_checks(ran_names)
    for asset in graph.assets:
        name = asset.key.to_user_string()
        total = len(graph.keys_of(asset))
        fresh = max(total - report.ran.get(name, 0), 0)
        if fresh:
            report.skipped[name] = fresh
    return report


def _read_cursor(path: Path | None):
    if path is None or not path.exists():
        return None
    return dg.deserialize_value(path.read_text())


def _write_cursor(path: Path | None, cursor) -> None:
    if path is None:
        return
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(dg.serialize_value(cursor))
    os.replace(staging, path)  # a reader never sees half a cursor


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


def print_report(report: DemoReport, log=print) -> None:
    if report.ran:
        log("materialized: " + ", ".join(f"{name} ({n})" for name, n in report.ran.items()))
    else:
        log("materialized: nothing (every partition is fresh)")
    if report.skipped:
        log("skipped, fresh: " + ", ".join(f"{name} ({n})" for name, n in report.skipped.items()))


def main() -> int:
    config_path = os.environ.get(CONFIG_ENV_VAR) or None
    config = load_config(config_path)
    started = time.perf_counter()
    print(f"sae_assets demo: config {config_path or 'default'}; artifacts -> {config.storage.backend} "
          f"{config.storage.root if config.storage.backend == 'local' else config.storage.bucket}")
    with dg.DagsterInstance.get() as instance:
        cursor_path = Path(instance.root_directory) / CURSOR_FILE
        report = materialize_stale(instance, config_path, cursor_path=cursor_path)
    print_report(report)
    print(f"done in {time.perf_counter() - started:.1f} s")
    if config.storage.backend == "local":
        print(f"outputs: {os.path.abspath(config.storage.root)}/<asset>/<partition>/manifest.json")
    print(f"Dagster history: {os.environ.get('DAGSTER_HOME')}  (browse it with `make ui`)")
    print(site_instructions(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
