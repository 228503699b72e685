"""Writing the feature browser's files: the static site and the Neuronpedia export.

The site is flat (every file in one directory; the store's file names have no folders) so that
it opens from file:// and from any static host or bucket prefix as it is: index.html, app.js,
style.css (packaged in sae_assets/site/), `site-meta.js`, the chunked index of
`sae_assets.core.features.site_index` (`index-<n>.js`, `by-density-<n>.js`, `by-max-<n>.js`,
`search-<b>.js`, `tokens-<n>.js`) and one `feature-<id>.js` per feature, so that no page loads
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
    from sae_assets.core.features.site_index import SiteRange

STATIC_FILES = ("index.html", "app.js", "style.css")
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


def write_site_files(path: Callable[[str], Path], ranges: Iterable[SiteRange], *, dictionary: str) -> int:
    """Write the whole site through `path(name)` (a partition writer's `out.path`); return the feature count."""
    from sae_assets.core.features.site_index import SiteIndex, escape_script_text

    static = package_files.files("sae_assets") / "site"
    for name in STATIC_FILES:
        path(name).write_bytes((static / name).read_bytes())
    index, n_tokens, edges = SiteIndex(), 0, []
    for part in ranges:
        n_tokens, edges = part.n_tokens, part.hist_edges
        for feature, text in part.documents:
            # The stored document is JSON already: escaping it is enough, no parse and re-dump.
            path(feature_script_name(feature)).write_text(f"SAE_SITE.feature({escape_script_text(text)});\n")
        for row in part.rows:
            for name, text in index.add(row):
                path(name).write_text(text)
    for name, text in index.finish(dictionary=dictionary, n_tokens=n_tokens, hist_edges=edges):
        path(name).write_text(text)
    return len(index)


def write_site(out, store, parts, *, dictionary: str) -> int:
    """Write the browser into the partition writer `out` from the site_json manifests `parts`."""
    from sae_assets.core.features.site_index import SiteRange

    def ranges():
        for manifest in parts:  # one range's rows in memory at a time; documents read one by one
            documents = ((int(name[len("feature-"):-len(".json")]), store.read_bytes(manifest, name).decode())
                         for name in feature_files(manifest))
            yield SiteRange(json.loads(store.read_bytes(manifest, INDEX_ROWS_FILE)), documents,
                            manifest.extra["n_tokens"], manifest.extra["hist_edges"])

    n_features = write_site_files(out.path, ranges(), dictionary=dictionary)
    out.extra.update(features=n_features, dictionary=dictionary)
    return n_features


def write_neuronpedia_batches(out, store, parts, cfg) -> int:
    """`batch-<n>.json` per feature range plus `run_settings.json`, as Neuronpedia's uploader reads them."""
    from sae_assets.core.features import site_data

    n_features = 0
    for n, manifest in enumerate(parts):
        edges = manifest.extra["hist_edges"]
        features = [site_data.neuronpedia_feature(json.loads(store.read_bytes(manifest, name)), edges)
                    for name in feature_files(manifest)]
        batch = {"model_id": cfg.model.name or "sae-assets-embedded", "layer": cfg.sae_hook,
                 "sae_set": cfg.feature_dictionary.key, "features": features}
        out.path(f"batch-{n}.json").write_text(json.dumps(batch, ensure_ascii=False))
        n_features += len(features)
    settings = {"sae_id": cfg.feature_dictionary.key, "hook_point": cfg.sae_hook, "n_features": n_features,
                "n_examples_top": cfg.features.top_k, "n_examples_random": cfg.features.random_examples,
                "window": [cfg.features.window_before, cfg.features.window_after]}
    out.path("run_settings.json").write_text(json.dumps(settings, indent=2))
    return n_features
