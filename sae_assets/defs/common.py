"""Helpers every asset shares: reading upstream manifests and returning MaterializeResults.

An asset records the data versions of the partitions it read in its own manifest, and
returns the manifest's hash as its Dagster DataVersion, so identical inputs and config give
an identical version and nothing downstream turns stale.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import dagster as dg

from resources import keys
from resources.manifest import Manifest
from resources.storage import ArtifactStore


def read_upstream(
    store: ArtifactStore, asset: str, partitions: list[str | None]
) -> tuple[list[Manifest], dict[str, str]]:
    """Manifests of the given upstream partitions and their {'asset[partition]': version} map."""
    manifests = [store.require(asset, p) for p in partitions]
    versions = {keys.describe(asset, m.partition): m.data_version for m in manifests}
    return manifests, versions


def result(manifest: Manifest, store: ArtifactStore, metadata: dict[str, Any] | None = None, *,
           content_version: bool = False) -> dg.MaterializeResult:
    """The MaterializeResult of a committed partition: its data version plus facts to show.

    The version is the manifest's hash (inputs included), or with `content_version` a hash of
    the content alone (`Manifest.content_version`, for merges of many partitions).
    """
    version = manifest.content_version if content_version else manifest.data_version
    shown: dict[str, Any] = {
        "data_version": version,
        "bytes": dg.MetadataValue.int(manifest.total_bytes),
        "files": dg.MetadataValue.json({n: {"size": f.size, "rows": f.rows} for n, f in manifest.files.items()}),
        "location": f"{store.describe()}/{keys.partition_prefix(manifest.asset, manifest.partition)}",
    }
    if manifest.total_rows:
        shown["rows"] = dg.MetadataValue.int(manifest.total_rows)
    shown.update(metadata or {})
    return dg.MaterializeResult(data_version=dg.DataVersion(version), metadata=shown)


SINGLE_RUN = dg.BackfillPolicy.single_run()
"""Backfill policy of the partitioned assets whose every consumer reads all their partitions
(shuffle_scatter, context_gather): a backfill
materializes the whole range in one run, which loads the code location and the shared inputs
(a model, the plan) once instead of once per partition. Dagster 1.13
stamps every partition of a ranged step with one data version (see `each_partition`); as
each consumer reads every partition anyway, that loses no precision in what turns stale."""


def each_partition(context, store: ArtifactStore, materialize_one: Callable[[str], tuple[Manifest, dict[str, Any]]],
                   *, content_version: bool = False) -> dg.MaterializeResult:
    """Materialize each partition key of the run (one, or a range under SINGLE_RUN) in order.

    `materialize_one(key)` commits one partition and returns its manifest and metadata. A run of
    one partition returns that partition's own result. A ranged run's data version is the hash of
    its partitions' (key, manifest version) pairs, so rerunning the same range on the same inputs
    gives the same version, and a change in any of them gives every partition a new one.
    With `content_version`, each partition's version is its content version (see `result`).
    """
    keys_in_run = list(context.partition_keys)
    done = [(key, *materialize_one(key)) for key in keys_in_run]
    if len(done) == 1:
        _, manifest, metadata = done[0]
        return result(manifest, store, metadata, content_version=content_version)
    versions = {key: manifest.content_version if content_version else manifest.data_version
                for key, manifest, _ in done}
    version = hashlib.sha256("\n".join(f"{k}\t{v}" for k, v in versions.items()).encode()).hexdigest()[:24]
    return dg.MaterializeResult(data_version=dg.DataVersion(version), metadata={
        "data_version": version,
        "partitions_in_run": len(done),
        "partition_versions": dg.MetadataValue.json(versions),
        "bytes": dg.MetadataValue.int(sum(m.total_bytes for _, m, _ in done)),
        "rows": dg.MetadataValue.int(sum(m.total_rows or 0 for _, m, _ in done)),
        "location": f"{store.describe()}/{keys.asset_component(done[0][1].asset)}/",
    })


def progress_log(context, partition: str | None = None, *, every_seconds: float = 10.0) -> "ProgressLog":
    """The ProgressLog an asset hands its core loop: a line on `context.log.info` (the run's log
    view in the UI) every `every_seconds`, named like 'sae_dictionary[relu-w1024-l1_5]'. The
    run's own partition by default; `partition` names one key of a ranged run."""
    from sae_assets.core.progress import ProgressLog

    if partition is None and context.has_partition_key:
        partition = str(context.partition_key)
    return ProgressLog(keys.describe(context.asset_key.to_user_string(), partition), emit=context.log.info,
                       every_seconds=every_seconds)
