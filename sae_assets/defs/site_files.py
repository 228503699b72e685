"""Writing the feature browser's files: the static site and the Neuronpedia bulk-import export.

The site is flat (every file in one directory; the store's file names have no folders) so that
it opens from file:// and from any static host or bucket prefix as it is: index.html, app.js,
style.css (packaged in sae_assets/site/), `site-meta.js`, the chunked index of
`sae_assets.core.features.site_index` (`index-<n>.js`, `by-density-<n>.js`, `by-max-<n>.js`,
`search-<b>.js`, `tokens-<n>.js`), one `feature-<id>.js` per feature, the overview page's
`dictionary-overview.js` and the feature map's `dictionary-map.js`, so that no page loads
more than its own files. Data are scripts rather than JSON because browsers refuse fetch() on
file:// pages; JSON inside a script has `<`, `>`, `&` and U+2028/2029 escaped, so no corpus
text can close a tag or break the statement. `write_site_files` takes plain iterators, so the
scale test and bench (tests/test_site_scale.py, bench/site_scale.py) write synthetic sites
with the code the `feature_site` asset runs, one feature range in memory at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from importlib import resources as package_files
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # core (and numpy) load when a site is written, not with the code location
    import numpy as np

    from sae_assets.core.features.feature_map import FeatureLayout
    from sae_assets.core.features.site_index import SiteRange

STATIC_FILES = ("index.html", "app.js", "site-views.js", "site-map.js", "style.css")
OVERVIEW_FILE = "dictionary-overview.js"
"""The overview page's data (`sae_assets.core.features.overview`), loaded when the page opens."""
MAP_FILE = "dictionary-map.js"
"""The feature map's points and densities (`sae_assets.core.features.feature_map`), loaded when #map opens."""
LINEAGE_FILE = "site-lineage.json"
"""Each range's lineage as the build showed it, so that the next build keeps a range's time."""
CHANGES_FILE = "site-changes.js"
"""What changed since the previous build (`sae_assets.core.features.changes`), for #changes."""
INDEX_ROWS_FILE = "index-rows.json"


def script_json(value) -> str:
    """JSON text safe to embed in a JavaScript file or <script> element (see site_index.script_json)."""
    from sae_assets.core.features.site_index import script_json as encode

    return encode(value)


def feature_files(manifest) -> list[str]:
    """The per-feature JSON file names of a site_json partition, in feature order."""
    return sorted(name for name in manifest.files if name.startswith("feature-") and name.endswith(".json"))


def feature_script_name(feature: int) -> str:
    return f"feature-{feature:06d}.js"


def read_feature_script(text: str) -> tuple[dict, dict | None]:
    """(document, lineage or None) of a `feature-<id>.js` script: `SAE_SITE.feature(doc[, lineage]);`."""
    decoder, start = json.JSONDecoder(), len("SAE_SITE.feature(")
    doc, end = decoder.raw_decode(text, start)
    lineage = decoder.raw_decode(text, end + 2)[0] if text.startswith(", ", end) else None
    return doc, lineage


def write_site_files(path: Callable[[str], Path], ranges: Iterable[SiteRange], *, dictionary: str,
                     overview: Callable[[np.ndarray, int], dict] | None = None, changes: dict | None = None,
                     feature_map: FeatureLayout | None = None) -> int:
    """Write the whole site through `path(name)` (a partition writer's `out.path`); return the feature count.

    `overview(density_F, n_tokens)` gives the overview page's document from every feature's
    density (`sae_assets.core.features.overview.dictionary_overview`); without it the page says
    that the site has none. `changes`: what changed since the previous build, for #changes.
    A range's `lineage` goes into each of its feature scripts as the callback's second argument.
    `feature_map`: the dictionary's layout (the feature_map asset), one point per feature of the
    site in feature order, drawn on #map coloured by the densities of the index."""
    from sae_assets.core.features.site_index import SiteIndex, escape_script_text

    static = package_files.files("sae_assets") / "site"
    for name in STATIC_FILES:
        path(name).write_bytes((static / name).read_bytes())
    index, n_tokens, edges = SiteIndex(), 0, []
    for part in ranges:
        n_tokens, edges = part.n_tokens, part.hist_edges
        lineage = "" if part.lineage is None else ", " + script_json(part.lineage)
        for feature, text in part.documents:
            # The stored document is JSON already: escaping it is enough, no parse and re-dump.
            path(feature_script_name(feature)).write_text(f"SAE_SITE.feature({escape_script_text(text)}{lineage});\n")
        for row in part.rows:
            for name, text in index.add(row):
                path(name).write_text(text)
    for name, text in index.finish(dictionary=dictionary, n_tokens=n_tokens, hist_edges=edges):
        path(name).write_text(text)
    if overview is not None:
        path(OVERVIEW_FILE).write_text(f"SAE_OVERVIEW.data({script_json(overview(index.densities(), n_tokens))});\n")
    if changes is not None:
        path(CHANGES_FILE).write_text(f"SAE_CHANGES.data({script_json(changes)});\n")
    if feature_map is not None:
        from sae_assets.core.features.feature_map import map_document

        document = map_document(feature_map, index.densities(), dictionary=dictionary, n_tokens=n_tokens)
        path(MAP_FILE).write_text(f"SAE_MAP.data({script_json(document)});\n")
    return len(index)


def changes_basis(previous, parts) -> dict[str, str] | None:
    """The site_json versions a build lists its changes against: those of the `previous`
    feature_site build, or, when that build used the very versions of `parts` (a rebuild with
    nothing changed), the basis it used itself, so that the same inputs give the same bytes."""
    from resources import keys

    if previous is None:
        return None
    used = {k: v for k, v in previous.upstream.items() if k.startswith("site_json[")}
    if used == {keys.describe("site_json", m.partition): m.data_version for m in parts}:
        return previous.extra.get("changes_basis")
    return used


def write_site(out, store, parts, *, dictionary: str, overview: Callable[[np.ndarray, int], dict] | None = None,
               previous=None, feature_map: FeatureLayout | None = None) -> int:
    """Write the browser into the partition writer `out` from the site_json manifests `parts`;
    `previous`: the last build's feature_site manifest, to list what changed since;
    `feature_map`: the dictionary's layout, for #map."""
    from sae_assets.core.features.site_index import SiteRange

    basis = changes_basis(previous, parts)
    earlier = (json.loads(store.read_bytes(previous, LINEAGE_FILE))
               if previous is not None and LINEAGE_FILE in previous.files else None)
    lineages, changes = site_lineage(store, parts, basis, earlier)
    out.extra["changes_basis"] = basis
    out.path(LINEAGE_FILE).write_text(json.dumps(lineages, sort_keys=True))

    def ranges():
        for manifest in parts:  # one range's rows in memory at a time; documents read one by one
            documents = ((int(name[len("feature-"):-len(".json")]), store.read_bytes(manifest, name).decode())
                         for name in feature_files(manifest))
            yield SiteRange(json.loads(store.read_bytes(manifest, INDEX_ROWS_FILE)), documents,
                            manifest.extra["n_tokens"], manifest.extra["hist_edges"], lineages[manifest.partition])

    n_features = write_site_files(out.path, ranges(), dictionary=dictionary, overview=overview, changes=changes,
                                  feature_map=feature_map)
    out.extra.update(features=n_features, dictionary=dictionary)
    return n_features


def site_lineage(store, parts, basis: dict[str, str] | None,
                 earlier: dict[str, dict] | None = None) -> tuple[dict[str, dict], dict]:
    """({range: its feature pages' lineage}, what changed since the build whose site_json
    versions are `basis` ({'site_json[<range>]': version}; None: no earlier build)) from the
    site_json manifests `parts` and the manifests they and the basis name. `earlier`: the last
    build's lineages; a range whose version it showed keeps the time it showed (a rerun that
    rewrites the same version re-puts its history copy, whose mtime the time is read from)."""
    import datetime
    import hashlib

    from resources import keys
    from resources.manifest import ArtifactMissingError
    from sae_assets.core.features import changes as site_changes

    def examples_upstream(manifest) -> dict:
        for key, version in manifest.upstream.items():
            asset, partition = site_changes.split_key(key)
            if asset == "feature_examples":
                try:
                    return store.manifest_at(asset, partition, version).upstream
                except ArtifactMissingError:  # collected past retention: the shards are unknown
                    return {}
        return {}

    lineages, ranges = {}, []
    for manifest in parts:
        frange, upstream = manifest.partition, examples_upstream(manifest)
        lineage = site_changes.lineage_of(manifest.upstream, upstream, feature_range=frange,
                                          site_json_version=manifest.data_version)
        shown = (earlier or {}).get(frange, {})
        if shown.get("site_json_version") == manifest.data_version and shown.get("computed"):
            lineage["computed"] = shown["computed"]
        else:
            when = store.committed_at(manifest)
            lineage["computed"] = (datetime.datetime.fromtimestamp(when, datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M UTC") if when is not None else None)
        lineages[frange] = lineage
        used = basis.get(keys.describe("site_json", frange)) if basis is not None else None
        if basis is None or used == manifest.data_version:
            continue
        if used is None:  # a range the previous build did not have
            ranges.append(site_changes.range_changes(frange, None, manifest.files, ["a new feature range"]))
            continue
        try:
            old = store.manifest_at("site_json", frange, used)
        except ArtifactMissingError:
            ranges.append({**site_changes.range_changes(frange, None, manifest.files, []), "added": [],
                           "reasons": ["unknown: the previous build's pages were collected (storage.gc_keep_versions)"]})
            continue
        reasons = site_changes.change_reasons(
            {"upstream": old.upstream, "config_hash": old.config_hash, "code_version": old.code_version},
            {"upstream": manifest.upstream, "config_hash": manifest.config_hash, "code_version": manifest.code_version},
            examples_upstream=(examples_upstream(old), upstream))
        ranges.append(site_changes.range_changes(frange, old.files, manifest.files, reasons))
    built = None if basis is None else hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:12]
    changes = {"previous_build": built, "ranges": ranges,
               "changed_features": sum(sum(r["counts"].values()) for r in ranges)}
    return lineages, changes


def neuronpedia_names(cfg):
    """The model, source set, layer and hook an export of `cfg`'s browsed dictionary names."""
    from sae_assets.core.features.neuronpedia import ExportNames, layer_of, slug

    return ExportNames(model_id=slug(cfg.model.name or "sae-assets-embedded"), source_set=slug(cfg.feature_dictionary.key),
                       layer=layer_of(cfg.feature_hook), hook=cfg.feature_hook)


def write_neuronpedia_export(out, store, parts, cfg) -> int:
    """Neuronpedia's bulk-import files from the site_json manifests `parts`; return the feature count.

    `release.jsonl`, `model.jsonl`, `sourceset.jsonl`, `source.jsonl`, and per feature range
    `features.batch-<n>.jsonl.gz` / `activations.batch-<n>.jsonl.gz`: the store's names have no
    folders, so the manifest's extra `layout` maps each file to its path in the import directory
    (`features/batch-<n>.jsonl.gz`, ...), under `<model id>/<source id>/`.
    """
    from sae_assets.core.features import neuronpedia

    names = neuronpedia_names(cfg)
    layout, n_features, n_tokens = {}, 0, 0
    for n, manifest in enumerate(parts):
        edges, n_tokens = manifest.extra["hist_edges"], manifest.extra["n_tokens"]
        features = [neuronpedia.neuronpedia_feature(json.loads(store.read_bytes(manifest, name)), edges)
                    for name in feature_files(manifest)]
        for kind, rows in (("features", (neuronpedia.feature_row(f, names) for f in features)),
                           ("activations", (r for f in features for r in neuronpedia.activation_rows(f, names)))):
            out.path(f"{kind}.batch-{n}.jsonl.gz").write_bytes(neuronpedia.jsonl_gz(rows))
            layout[f"{kind}.batch-{n}.jsonl.gz"] = f"{kind}/batch-{n}.jsonl.gz"
        n_features += len(features)
    dataset = cfg.corpus.hf_name or cfg.corpus.source
    point = cfg.feature_dictionary
    where = (f"transcoder from {cfg.feature_hook} to {point.target_hook}" if point.target_hook
             else f"at {cfg.feature_hook}")
    headers = neuronpedia.header_rows(
        names, description=f"sae_assets dictionary {point.key} {where}", dataset=dataset,
        prompts=n_tokens // cfg.tokenizer.context_length, tokens_per_prompt=cfg.tokenizer.context_length)
    for name, row in headers.items():
        out.path(name).write_bytes(neuronpedia.jsonl([row]))
        layout[name] = name
    out.extra.update(layout=layout, directory=f"{names.model_id}/{neuronpedia.source_id(names)}", features=n_features)
    return n_features
