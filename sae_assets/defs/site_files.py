"""Writing the feature browser's files: the static site and the Neuronpedia bulk-import export.

The site is flat (every file in one directory; the store's file names have no folders) so that
it opens from file:// and from any static host or bucket prefix as it is: index.html, app.js,
style.css (packaged in sae_assets/site/), `site-dictionaries.js` (the served dictionaries, for
the picker), `site-meta.js`, the chunked index of
`sae_assets.core.features.site_index` (`index-<n>.js`, `by-density-<n>.js`, `by-max-<n>.js`,
`search-<b>.js`, `tokens-<n>.js`), one `feature-<id>.js` per feature, the overview page's
`dictionary-overview.js` and the feature map's `dictionary-map.js`, so that no page loads
more than its own files. Data are scripts rather than JSON because browsers refuse fetch() on
file:// pages; JSON inside a script has `<`, `>`, `&` and U+2028/2029 escaped, so no corpus
text can close a tag or break the statement. Each further served dictionary (features.dictionaries)
has the same files under the prefix `<slug>__` and its own page `<slug>__index.html`, which loads
its `<slug>__site-meta.js`; a feature script's third argument lists the feature's closest
feature in each other served dictionary. `write_site_files` takes plain iterators, so the
scale test and bench (tests/test_site_scale.py, bench/site_scale.py) write synthetic sites
with the code the `feature_site` asset runs, one feature range in memory at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from importlib import resources as package_files
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

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
DICTIONARIES_FILE = "site-dictionaries.js"
"""`window.SAE_SITE_DICTIONARIES = [{key, page, features, hook, target_hook}, ...]`: the picker's entries."""


class ServedDictionary(NamedTuple):
    """What the site shows of one served dictionary."""

    key: str
    """Its sweep point key."""
    slug: str | None
    """How its files are named apart (RunConfig.served_slug): None for the one index.html opens."""
    site_json: str
    """The name of its site_json asset."""
    parts: list
    """Its site_json manifests, in feature order."""
    overview: Callable[[np.ndarray, int], dict] | None = None
    feature_map: FeatureLayout | None = None
    matches: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
    """{other served key: (ids_F, cosines_F), or None where the two decode into different hooks}."""
    hook: str = ""
    target_hook: str = ""
    failed_checks: list[str] = []
    """Its failed sae_metrics checks (a further served dictionary is served anyway; the picker says so)."""


def site_prefix(slug: str | None) -> str:
    """The file-name prefix of a served dictionary: none for the one index.html opens (slug
    None), `<slug>__` for the others."""
    return "" if slug is None else f"{slug}__"


def script_json(value) -> str:
    """JSON text safe to embed in a JavaScript file or <script> element (see site_index.script_json)."""
    from sae_assets.core.features.site_index import script_json as encode

    return encode(value)


def feature_files(manifest) -> list[str]:
    """The per-feature JSON file names of a site_json partition, in feature order."""
    return sorted(name for name in manifest.files if name.startswith("feature-") and name.endswith(".json"))


def feature_script_name(feature: int) -> str:
    return f"feature-{feature:06d}.js"


def feature_script_arguments(text: str) -> list:
    """The arguments of a `feature-<id>.js` script, `SAE_SITE.feature(doc[, lineage[, matches]]);`."""
    decoder, end = json.JSONDecoder(), len("SAE_SITE.feature(") - 2
    arguments = []
    while not arguments or text.startswith(", ", end):
        value, end = decoder.raw_decode(text, end + 2)
        arguments.append(value)
    return arguments


def read_feature_script(text: str) -> tuple[dict, dict | None]:
    """(document, lineage or None) of a `feature-<id>.js` script."""
    arguments = feature_script_arguments(text)
    return arguments[0], (arguments[1] if len(arguments) > 1 else None)


def write_site_files(path: Callable[[str], Path], ranges: Iterable[SiteRange], *, dictionary: str,
                     overview: Callable[[np.ndarray, int], dict] | None = None, changes: dict | None = None,
                     feature_map: FeatureLayout | None = None, prefix: str = "",
                     matches: list[tuple[int, np.ndarray, np.ndarray]] = ()) -> int:
    """Write the whole site through `path(name)` (a partition writer's `out.path`); return the feature count.

    `overview(density_F, n_tokens)` gives the overview page's document from every feature's
    density (`sae_assets.core.features.overview.dictionary_overview`); without it the page says
    that the site has none. `changes`: what changed since the previous build, for #changes.
    A range's `lineage` goes into each of its feature scripts as the callback's second argument.
    `feature_map`: the dictionary's layout (the feature_map asset), one point per feature of the
    site in feature order, drawn on #map coloured by the densities of the index.
    `prefix`: a further served dictionary's (`site_prefix`): its data files and its page
    `<prefix>index.html`, the static files left to the first. `matches`: (position of another
    served dictionary, ids_F, cosines_F) for each, the third argument of every feature script."""
    from sae_assets.core.features.matches import agreement, feature_closest
    from sae_assets.core.features.site_index import SiteIndex, escape_script_text

    static = package_files.files("sae_assets") / "site"
    if prefix:  # the same page, reading this dictionary's meta (and through its prefix, its data)
        page = (static / "index.html").read_text()
        if page.count('src="site-meta.js"') != 1:
            raise ValueError("sae_assets/site/index.html must load site-meta.js once (a served dictionary's page "
                             "loads its own in its place)")
        path(f"{prefix}index.html").write_text(page.replace('src="site-meta.js"', f'src="{prefix}site-meta.js"'))
    else:
        for name in STATIC_FILES:
            path(name).write_bytes((static / name).read_bytes())
    index, n_tokens, edges = SiteIndex(), 0, []
    for part in ranges:
        n_tokens, edges = part.n_tokens, part.hist_edges
        lineage = "" if part.lineage is None else ", " + script_json(part.lineage)
        if matches:
            lineage = lineage or ", null"
        for feature, text in part.documents:
            # The stored document is JSON already: escaping it is enough, no parse and re-dump.
            closest = f", {script_json(feature_closest(matches, feature))}" if matches else ""
            path(prefix + feature_script_name(feature)).write_text(
                f"SAE_SITE.feature({escape_script_text(text)}{lineage}{closest});\n")
        for row in part.rows:
            for name, text in index.add(row):
                path(prefix + name).write_text(text)
    for name, text in index.finish(dictionary=dictionary, n_tokens=n_tokens, hist_edges=edges, prefix=prefix):
        path(prefix + name).write_text(text)
    if overview is not None:
        document = overview(index.densities(), n_tokens)
        if matches:
            document["agreement"] = agreement(matches)
        path(prefix + OVERVIEW_FILE).write_text(f"SAE_OVERVIEW.data({script_json(document)});\n")
    if changes is not None:
        path(prefix + CHANGES_FILE).write_text(f"SAE_CHANGES.data({script_json(changes)});\n")
    if feature_map is not None:
        from sae_assets.core.features.feature_map import map_document

        document = map_document(feature_map, index.densities(), dictionary=dictionary, n_tokens=n_tokens)
        path(prefix + MAP_FILE).write_text(f"SAE_MAP.data({script_json(document)});\n")
    if not prefix:  # a site of one dictionary (a further one's are listed by write_site)
        write_dictionaries(path, [{"key": dictionary, "page": "index.html", "features": len(index)}])
    return len(index)


def write_dictionaries(path: Callable[[str], Path], entries: list[dict]) -> None:
    """The picker's list, `site-dictionaries.js`."""
    path(DICTIONARIES_FILE).write_text(f"window.SAE_SITE_DICTIONARIES = {script_json(entries)};\n")


def changes_basis(previous, parts) -> dict[str, str] | None:
    """The site_json versions a build lists its changes against: those of the `previous`
    feature_site build, or, when that build used the very versions of `parts` (every served
    dictionary's site_json manifests; a rebuild with nothing changed), the basis it used itself,
    so that the same inputs give the same bytes."""
    from resources import keys
    from sae_assets.core.features.changes import base_asset, split_key

    if previous is None:
        return None
    used = {k: v for k, v in previous.upstream.items() if base_asset(split_key(k)[0]) == "site_json"}
    if used == {keys.describe(m.asset, m.partition): m.data_version for m in parts}:
        return previous.extra.get("changes_basis")
    return used


def write_site(out, store, dictionaries: list[ServedDictionary], *, previous=None) -> int:
    """Write the browser of every served dictionary (the first opens from index.html) into the
    partition writer `out`; `previous`: the last build's feature_site manifest, to list what
    changed since. Returns the feature count over all dictionaries."""
    from sae_assets.core.features.site_index import SiteRange

    basis = changes_basis(previous, [m for d in dictionaries for m in d.parts])
    out.extra["changes_basis"] = basis
    positions = {d.key: position for position, d in enumerate(dictionaries)}
    entries, n_features = [], 0
    for served in dictionaries:
        prefix = site_prefix(served.slug)
        lineage_file = prefix + LINEAGE_FILE
        earlier = (json.loads(store.read_bytes(previous, lineage_file))
                   if previous is not None and lineage_file in previous.files else None)
        lineages, changes = site_lineage(store, served.parts, basis, earlier, site_json=served.site_json)
        out.path(lineage_file).write_text(json.dumps(lineages, sort_keys=True))

        def ranges(served=served, lineages=lineages):
            for manifest in served.parts:  # one range's rows in memory at a time; documents read one by one
                documents = ((int(name[len("feature-"):-len(".json")]), store.read_bytes(manifest, name).decode())
                             for name in feature_files(manifest))
                yield SiteRange(json.loads(store.read_bytes(manifest, INDEX_ROWS_FILE)), documents,
                                manifest.extra["n_tokens"], manifest.extra["hist_edges"], lineages[manifest.partition])

        matches = [(positions[other], *found) for other, found in served.matches.items() if found is not None]
        count = write_site_files(out.path, ranges(), dictionary=served.key, overview=served.overview, changes=changes,
                                 feature_map=served.feature_map, prefix=prefix, matches=sorted(matches, key=lambda m: m[0]))
        entries.append({"key": served.key, "page": f"{prefix}index.html", "features": count,
                        "hook": served.hook, "target_hook": served.target_hook, "failed_checks": served.failed_checks})
        n_features += count
    write_dictionaries(out.path, entries)
    out.extra.update(features=n_features, dictionary=dictionaries[0].key, dictionaries=[d.key for d in dictionaries])
    return n_features


def site_lineage(store, parts, basis: dict[str, str] | None,
                 earlier: dict[str, dict] | None = None, *, site_json: str = "site_json") -> tuple[dict[str, dict], dict]:
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
            if site_changes.base_asset(asset) == "feature_examples":
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
        used = basis.get(keys.describe(site_json, frange)) if basis is not None else None
        if basis is None or used == manifest.data_version:
            continue
        if used is None:  # a range the previous build did not have
            ranges.append(site_changes.range_changes(frange, None, manifest.files, ["a new feature range"]))
            continue
        try:
            old = store.manifest_at(site_json, frange, used)
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
