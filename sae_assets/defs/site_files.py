"""Writing the feature browser's files: the static site and the Neuronpedia bulk-import export.

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


def neuronpedia_names(cfg):
    """The model, source set, layer and hook an export of `cfg`'s browsed dictionary names."""
    from sae_assets.core.features.neuronpedia import ExportNames, layer_of, slug

    return ExportNames(model_id=slug(cfg.model.name or "sae-assets-embedded"), source_set=slug(cfg.feature_dictionary.key),
                       layer=layer_of(cfg.sae_hook), hook=cfg.sae_hook)


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
    headers = neuronpedia.header_rows(
        names, description=f"sae_assets dictionary {cfg.feature_dictionary.key} at {cfg.sae_hook}", dataset=dataset,
        prompts=n_tokens // cfg.tokenizer.context_length, tokens_per_prompt=cfg.tokenizer.context_length)
    for name, row in headers.items():
        out.path(name).write_bytes(neuronpedia.jsonl([row]))
        layout[name] = name
    out.extra.update(layout=layout, directory=f"{names.model_id}/{neuronpedia.source_id(names)}", features=n_features)
    return n_features
