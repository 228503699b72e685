"""Helpers every asset shares: reading upstream manifests and returning MaterializeResults.

An asset records the data versions of the partitions it read in its own manifest, and
returns the manifest's hash as its Dagster DataVersion, so identical inputs and config give
an identical version and nothing downstream turns stale.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import dagster as dg

from resources import keys
from resources.manifest import Manifest
from resources.storage import ArtifactStore


def config_digest(values: dict[str, Any]) -> str:
    """A short stable hash of the config values that decide an asset's output."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def asset_code_version(context) -> str:
    """The running asset's code version, recorded in its manifests (without the `+cfg.<hash>`
    that definitions.graph_assets appends: the manifest keeps its config hash separately)."""
    return (context.assets_def.code_versions_by_key[context.asset_key] or "").split("+cfg.")[0]
