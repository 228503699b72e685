"""Writing the feature browser's files: the static site and the Neuronpedia export.

The site is flat (every file in one directory) so that it opens from file:// and from any
static host or bucket prefix as it is: index.html, app.js, style.css (packaged in
sae_assets/site/), `site-index.js` with the feature list and one `feature-<id>.js` per feature.
Data are scripts rather than JSON because browsers refuse fetch() on file:// pages. JSON put
inside a script has `<`, `>`, `&` and U+2028/2029 escaped, so no corpus text can close a tag or
break the statement.
"""

import json
from importlib import resources as package_files

STATIC_FILES = ("index.html", "app.js", "style.css")
INDEX_ROWS_FILE = "index-rows.json"
_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def script_json(value) -> str:
    """JSON text safe to embed in a JavaScript file or <script> element."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return "".join(_SCRIPT_ESCAPES.get(ch, ch) for ch in text)


def feature_files(manifest) -> list[str]:
    """The per-feature JSON file names of a site_json partition, in feature order."""
    return sorted(name for name in manifest.files if name.startswith("feature-") and name.endswith(".json"))


def write_site(out, store, parts, *, dictionary: str) -> int:
    """Write the browser into the partition writer `out` from the site_json manifests `parts`."""
    static = package_files.files("sae_assets") / "site"
    for name in STATIC_FILES:
        out.path(name).write_bytes((static / name).read_bytes())
    rows, n_tokens, edges = [], 0, []
    for manifest in parts:
        rows += json.loads(store.read_bytes(manifest, INDEX_ROWS_FILE))
        n_tokens, edges = manifest.extra["n_tokens"], manifest.extra["hist_edges"]
        for name in feature_files(manifest):
            doc = json.loads(store.read_bytes(manifest, name))
            out.path(name.replace(".json", ".js")).write_text(f"SAE_SITE.feature({script_json(doc)});\n")
    index = {"dictionary": dictionary, "n_tokens": n_tokens, "hist_edges": edges, "features": rows}
    out.path("site-index.js").write_text(f"window.SAE_SITE_INDEX = {script_json(index)};\n")
    out.extra.update(features=len(rows), dictionary=dictionary)
    return len(rows)


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
