"""Features group: feature_map [dictionary], a seeded 2-D layout of each dictionary's decoder directions.

One partition per sae.sweep point, built from that sae_dictionary partition alone
(`sae_assets.core.features.feature_map.decoder_layout`: UMAP of the unit decoder rows, after a
projection on their top singular vectors when the rows are wide), so that a rebuild of the site
reads it instead of recomputing it and browsing another sweep point finds its map made.
`layout.parquet` holds each feature's quantised place (`schemas.feature_map_schema`; about 5
bytes a feature: ids delta-coded, x and y zstd-compressed); feature_site joins it with the densities of its index into the #map page
(`dictionary-map.js`). Its bytes are a function of the dictionary's: the seed is fixed.
Tests: tests/test_feature_map.py (the layout), tests/test_feature_assets.py (the asset).
"""

import time

import dagster as dg

from resources import ArtifactStorage, RunSettings
from sae_assets.defs.common import result
from sae_assets.defs.dictionary_assets import load_dictionary, sae_dictionary
from sae_assets.defs.identity import AssetIdentity
from sae_assets.defs.partitions import DICTIONARIES

LAYOUT_FILE = "layout.parquet"
MAP_SEED = 0
"""UMAP's and the projection's seed: another seed gives another, equally good picture, so none is offered."""

FEATURE_MAP = AssetIdentity("feature_map", version="1", keys=())


@FEATURE_MAP.asset(
    group_name="features",
    partitions_def=DICTIONARIES,
    deps=[sae_dictionary],
    description="A seeded 2-D map of the dictionary's features: UMAP (umap-learn) of the unit decoder "
    "directions (projected on their top 64 singular vectors when wider), quantised to a 65536 x 65536 grid; "
    "features whose decoders point alike sit together. The feature browser's #map draws it coloured by density. "
    "A dictionary of at most 15 features gets its first two principal components instead (method 'pca').",
)
def feature_map(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
    from sae_assets.core.features.feature_map import decoder_layout, layout_table, write_layout

    cfg, store = settings.load(), storage.store()
    key = context.partition_key
    sae, manifest = load_dictionary(store, key)
    started = time.perf_counter()
    try:
        layout = decoder_layout(sae.W_dec.detach(), seed=MAP_SEED)  # the weight itself: no (F, D) copy
    except ValueError as exc:
        raise ValueError(f"feature_map[{key}]: {exc}") from exc
    seconds = time.perf_counter() - started
    table = layout_table(layout)
    with FEATURE_MAP.writer(store, cfg, key, upstream={f"sae_dictionary[{key}]": manifest.data_version}) as out:
        write_layout(table, out.path(LAYOUT_FILE))
        out.describe_table(LAYOUT_FILE, rows=table.num_rows)
        out.extra.update(method=layout.method, features=table.num_rows, seed=MAP_SEED)
    return result(out.manifest, store, {"features": table.num_rows, "method": layout.method,
                                        "layout_seconds": dg.MetadataValue.float(seconds)})


def read_feature_map(store, dictionary: str, *, shown_version: str | None = None):
    """(the FeatureLayout of feature_map[dictionary], {'feature_map[<dictionary>]': its version});
    with `shown_version` (the sae_dictionary version the site's pages show), a map built from
    another version gives (None, {}): after a retrain the map is redone apart from the pages."""
    from sae_assets.core.features.feature_map import read_layout

    manifest = store.require("feature_map", dictionary)
    if shown_version is not None and manifest.upstream.get(f"sae_dictionary[{dictionary}]") != shown_version:
        return None, {}
    layout = read_layout(store.fetch(manifest, LAYOUT_FILE), manifest.extra["method"], where=f"feature_map[{dictionary}]")
    return layout, {f"feature_map[{dictionary}]": manifest.data_version}
