"""Features group: the example tables, context windows and static browser of one dictionary.

    feature_samples [shard x feature range]  top-K, uniform sample, counts/histograms of one cell
    feature_examples [feature range]         exact merge over shards + the examples pages show
    context_gather [shard]                   pass 1: each range's windows in the shard, encoded there
    context_windows [feature range]          pass 2: every shard's windows of the range, checked
    site_json [feature range]                one JSON document per feature + index rows
    feature_site                             the static browser (HTML/CSS/JS) with all the data, the
                                             dictionary's overview page and its feature map (the
                                             feature_map asset, sae_assets/defs/map_assets.py)
    neuronpedia_export                       (features.neuronpedia_export) Neuronpedia bulk-import files

The dictionary is `features.dictionary` (a sae.sweep key). `build_feature_assets(key)` makes
the assets for it, wiring their dependency on exactly that sae_dictionary/sae_metrics
partition, so retraining another sweep point leaves the browser fresh. A dictionary whose
metric checks failed is refused (features.require_passing_checks).
"""

import json
import time

import dagster as dg

from resources import ArtifactStorage, RunSettings
from sae_assets.core.config import RunConfig
from sae_assets.defs.activation_assets import ACTIVATIONS_FILE, cached_activations
from sae_assets.defs.common import (
    SINGLE_RUN,
    each_partition,
    progress_log,
    read_upstream,
    result,
)
from sae_assets.defs.corpus_assets import (
    excluded_token_ids,
    load_tokenizer,
    special_token_ids,
    token_shards,
    tokenizer,
)
from sae_assets.defs.dictionary_assets import load_dictionary, sae_dictionary
from sae_assets.defs.identity import AssetIdentity
from sae_assets.defs.map_assets import feature_map, read_feature_map
from sae_assets.defs.model_assets import language_model, load_language_model
from sae_assets.defs.partitions import (
    FEATURE_RANGES,
    SHARD_FEATURES,
    SHARDS,
    feature_range_bounds,
    feature_range_keys,
    shard_index,
    shard_keys,
)
from sae_assets.defs.site_files import INDEX_ROWS_FILE, write_neuronpedia_export, write_site
from sae_assets.defs.plots import bar_chart_markdown

SAMPLE_TABLES = ("top", "sample", "stats")
SHOWN_FILE = "shown.parquet"
WINDOWS_FILE = "windows.parquet"
COFIRING_FILE = "cofiring.parquet"


class FeatureInputError(ValueError):
    """The feature pipeline cannot run on what it was given; the message names the partition or key."""


# --- shared by the assets ---------------------------------------------------------------------

def browsed_dictionary(store, cfg: RunConfig, device: str):
    """(SAE, manifest, upstream versions) of features.dictionary, refusing one that failed its checks."""
    key = cfg.feature_dictionary.key
    metrics = store.require("sae_metrics", key)
    failed = sorted(name for name, ok in metrics.extra.get("checks", {}).items() if not ok)
    if failed and cfg.features.require_passing_checks:
        raise FeatureInputError(
            f"sae_dictionary[{key}] failed its sae_metrics check(s) {failed}: the browser refuses it. Pick "
            "another features.dictionary, or set features.require_passing_checks: false to browse it anyway")
    sae, manifest = load_dictionary(store, key, device=device)
    return sae, manifest, {f"sae_dictionary[{key}]": manifest.data_version, f"sae_metrics[{key}]": metrics.data_version}


def range_of(partition: str, sae, dictionary: str) -> tuple[int, int]:
    lo, hi = feature_range_bounds(partition)
    if hi > sae.width:
        raise FeatureInputError(f"feature range partition {partition!r} lies outside dictionary {dictionary!r}, "
                                f"which has {sae.width} features (features.range_width changed? resync partitions)")
    return lo, hi


_SAMPLING = ("feature_dictionary", "features.top_k", "features.sample_k", "features.seed", "special_token_exclusion")
_SHOWN = ("features.random_examples", "features.activation_levels", "features.examples_per_level")
_WINDOW = ("feature_dictionary", "features.window_before", "features.window_after")
FEATURE_SAMPLES = AssetIdentity("feature_samples", version="3", device="features.device", keys=_SAMPLING)
FEATURE_EXAMPLES = AssetIdentity("feature_examples", version="4", keys=(*_SAMPLING, *_SHOWN))  # 4: + top-K in intervals
CONTEXT_GATHER = AssetIdentity("context_gather", version="5", device="features.device", keys=_WINDOW)
CONTEXT_WINDOWS = AssetIdentity("context_windows", version="3", device="features.device", keys=_WINDOW)
SITE_JSON = AssetIdentity("site_json", version="4", pool="model", device="features.device", keys=(  # 4: interval shares
    "feature_dictionary", "features.logit_effects", "features.activation_levels", "special_tokens.token_ids"))
FEATURE_SITE = AssetIdentity("feature_site", version="8", keys=("feature_dictionary",))  # 8: hooks on #overview; 7: #map
NEURONPEDIA_EXPORT = AssetIdentity("neuronpedia_export", version="3", keys=(  # 3: binContains
    "model.name", "sae_hook", "feature_dictionary", "corpus.source", "corpus.hf_name", "tokenizer.context_length"))


def write_samples(out, samples: "FeatureSamples") -> None:
    import pyarrow.parquet as pq

    for name, table in zip(SAMPLE_TABLES, samples.stored()):  # stats: only the features that fired
        pq.write_table(table, out.path(f"{name}.parquet"))
        out.describe_table(f"{name}.parquet", rows=table.num_rows)


def read_samples(store, manifest) -> "FeatureSamples":
    import pyarrow.parquet as pq

    from sae_assets.core.features.merge import FeatureSamples

    return FeatureSamples.from_tables(*(pq.read_table(store.fetch(manifest, f"{n}.parquet")) for n in SAMPLE_TABLES))


def _cell(shard: str, feature_range: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"shard": shard, "features": feature_range})


def _dictionary_deps(key: str) -> list[dg.AssetDep]:
    only = dg.SpecificPartitionsPartitionMapping([key])
    return [dg.AssetDep(sae_dictionary, partition_mapping=only), dg.AssetDep("sae_metrics", partition_mapping=only)]


# --- the assets -------------------------------------------------------------------------------

def build_feature_assets(dictionary_key: str, *, neuronpedia: bool = False) -> list[dg.AssetsDefinition]:
    """The feature assets for the dictionary `dictionary_key` (features.dictionary)."""
    dictionary = _dictionary_deps(dictionary_key)

    def range_inputs(store, cfg: RunConfig, frange: str):
        """(SAE, lo, hi, feature_examples manifest, upstream versions) of a feature-range partition."""
        sae, _, upstream = browsed_dictionary(store, cfg, cfg.features.device)
        lo, hi = range_of(frange, sae, dictionary_key)
        [examples], versions = read_upstream(store, "feature_examples", [frange])
        return sae, lo, hi, examples, {**upstream, **versions}

    @FEATURE_SAMPLES.asset(
        group_name="features", partitions_def=SHARD_FEATURES,
        # Each cell reads its shard's activations: Dagster infers the mapping from the shared
        # `shard` dimension (MultiToSingleDimensionPartitionMapping).
        deps=[cached_activations, tokenizer, *dictionary],  # tokenizer: special tokens are left out
        description="For each feature of the range over the shard's tokens: exact top-K activations (ties by "
        "global token index), a uniform bottom-k-by-hash sample of activating tokens, count/sum/max and a "
        "log-spaced histogram. Special tokens (special_tokens.exclude) are not offered: n_tokens counts the rest.",
    )
    def feature_samples(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
        import pyarrow.compute as pc

        from resources.arrow_files import open_ipc_table
        from sae_assets.core.features import sampling as features

        cfg, store = settings.load(), storage.store()
        shard, frange = (context.partition_key.keys_by_dimension[d] for d in ("shard", "features"))
        sae, sae_manifest, upstream = browsed_dictionary(store, cfg, cfg.features.device)
        lo, hi = range_of(frange, sae, dictionary_key)
        [acts], versions = read_upstream(store, "cached_activations", [shard])
        excluded, tokenizer_version = excluded_token_ids(store, cfg)
        versions.update(tokenizer_version)
        table = open_ipc_table(store.fetch(acts, ACTIVATIONS_FILE))  # memory-mapped; special rows dropped per batch
        started = time.perf_counter()
        samples = features.sample_activation_table(
            table, hook=sae_manifest.extra["hook"], encode_range=lambda x: sae.encode_range(x, lo, hi, rectify=False), lo=lo,
            hi=hi, top_k=cfg.features.top_k, sample_k=cfg.features.samples_kept, seed=cfg.features.seed,
            batch_size=cfg.features.batch_size, device=cfg.features.device, progress_log=progress_log(context),
            exclude_token_ids=excluded)
        seconds = time.perf_counter() - started
        with FEATURE_SAMPLES.writer(store, cfg, context.partition_key, upstream={**upstream, **versions}) as out:
            write_samples(out, samples)
            out.extra.update(lo=lo, hi=hi, n_tokens=samples.n_tokens)
        fired = pc.sum(pc.greater(samples.stats.column("count"), 0)).as_py()
        return result(out.manifest, store, {
            "tokens": samples.n_tokens, "features_fired": fired,
            "token_features_per_second": dg.MetadataValue.float(samples.n_tokens * (hi - lo) / max(seconds, 1e-9)),
        })

    @FEATURE_EXAMPLES.asset(
        group_name="features", partitions_def=FEATURE_RANGES,
        deps=[feature_samples],  # every cell of the range (the `features` dimension, inferred)
        description="The exact merge of every shard's feature_samples for the range (independent of sharding), "
        "and the examples each feature page shows. Its data version is the merged content's hash.",
    )
    def feature_examples(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
        import pyarrow.parquet as pq

        from sae_assets.core.features import windows as feature_windows
        from sae_assets.core.features.merge import merge_feature_samples

        cfg, store = settings.load(), storage.store()
        frange = context.partition_key
        cells = [str(_cell(s, frange)) for s in shard_keys(context.instance)]
        manifests, upstream = read_upstream(store, "feature_samples", cells)
        merged = merge_feature_samples([read_samples(store, m) for m in manifests])
        f = cfg.features
        shown = feature_windows.select_shown_examples(merged, random_examples=f.random_examples,
                                                      activation_levels=f.activation_levels,
                                                      examples_per_level=f.examples_per_level)
        # The manifest records the inputs, but only the merged content enters the data version
        # (Manifest.content_version): Dagster ignores staleness past 100 upstream partitions.
        with FEATURE_EXAMPLES.writer(store, cfg, frange, upstream=upstream) as out:
            write_samples(out, merged)
            pq.write_table(shown, out.path(SHOWN_FILE))
            out.describe_table(SHOWN_FILE, rows=shown.num_rows)
            out.extra.update(lo=merged.lo, hi=merged.hi, n_tokens=merged.n_tokens, shards=len(cells))
        counts = merged.stats.column("count").to_numpy()
        return result(out.manifest, store, content_version=True, metadata={
            "tokens": merged.n_tokens, "shards_merged": len(cells), "features_fired": int((counts > 0).sum()),
            "examples_shown": shown.num_rows,
            "density_histogram": dg.MetadataValue.md(_density_markdown(counts, merged.n_tokens)),
        })

    @CONTEXT_GATHER.asset(
        group_name="features", partitions_def=SHARDS,
        backfill_policy=SINGLE_RUN,
        deps=[cached_activations, token_shards, tokenizer,
              dg.AssetDep(feature_examples, partition_mapping=dg.AllPartitionMapping()), *dictionary],
        description="Pass 1 of the context windows, sharded over the dataset: for every feature range, the "
        "windows around that range's examples in this shard, encoded with the range's encoder slice; only "
        "each example's own feature activation on its window is kept (no raw activations); windows stop at "
        "document boundaries (the tokenizer's end-of-text token). Beside them, the ids of every feature of the "
        "dictionary active at each top example's token (co-firing). "
        "A backfill runs every shard in one run.",
    )
    def context_gather(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
        import pyarrow.parquet as pq

        from resources.arrow_files import open_ipc_table
        from sae_assets.core.features import cofiring as feature_cofiring
        from sae_assets.core.features import windows as feature_windows

        cfg, store = settings.load(), storage.store()
        ranges = feature_range_keys(context.instance)
        sae, sae_manifest, dictionary_versions = browsed_dictionary(store, cfg, cfg.features.device)
        bounds = {frange: range_of(frange, sae, dictionary_key) for frange in ranges}
        examples, upstream = read_upstream(store, "feature_examples", ranges)
        upstream.update(dictionary_versions)
        tok_manifest = store.require("tokenizer", None)  # its end-of-text id separates packed documents
        upstream["tokenizer"] = tok_manifest.data_version
        shown_by_range = {frange: pq.read_table(store.fetch(m, SHOWN_FILE)) for frange, m in zip(ranges, examples)}
        hook = sae_manifest.extra["hook"]

        def gather_one(shard: str):
            [acts], versions = read_upstream(store, "cached_activations", [shard])
            [tokens_manifest], token_versions = read_upstream(store, "token_shards", [shard])
            table = open_ipc_table(store.fetch(acts, ACTIVATIONS_FILE))
            with CONTEXT_GATHER.writer(store, cfg, shard, upstream={**upstream, **versions, **token_versions}) as out:
                total, report = 0, progress_log(context, shard)  # one step per feature range
                report.start(len(shown_by_range))
                for step, (frange, shown) in enumerate(shown_by_range.items(), start=1):
                    lo, hi = bounds[frange]
                    windows = feature_windows.gather_context_windows(
                        shown, table, lambda x, lo=lo, hi=hi: sae.encode_range(x, lo, hi), shard=shard_index(shard),
                        hook=hook, context_length=tokens_manifest.extra["context_length"],
                        before=cfg.features.window_before, after=cfg.features.window_after, lo=lo,
                        batch_size=cfg.features.batch_size, boundary_ids=(tok_manifest.extra["eos_id"],),
                        device=cfg.features.device, where=f"context_gather[{shard}] for {frange}")
                    pq.write_table(windows, out.path(gathered_windows_file(frange)))
                    out.describe_table(gathered_windows_file(frange), rows=windows.num_rows)
                    cofiring = feature_cofiring.gather_cofiring(  # within the range: linear in the features
                        shown, table, lambda x, lo=lo, hi=hi: sae.encode_range(x, lo, hi), shard=shard_index(shard),
                        hook=hook, batch_size=cfg.features.batch_size, lo=lo, device=cfg.features.device,
                        where=f"context_gather[{shard}] for {frange}")
                    pq.write_table(cofiring, out.path(gathered_cofiring_file(frange)))
                    out.describe_table(gathered_cofiring_file(frange), rows=cofiring.num_rows)
                    total += windows.num_rows
                    report.update(step, tokens=total)
                report.close()
            return out.manifest, {"ranges": len(ranges), "windows": total}

        return each_partition(context, store, gather_one)

    @CONTEXT_WINDOWS.asset(
        group_name="features", partitions_def=FEATURE_RANGES,
        deps=[feature_examples, dg.AssetDep(context_gather, partition_mapping=dg.AllPartitionMapping()), *dictionary],
        description="Pass 2, per feature range: every shard's pass-1 windows assembled and checked, each shown "
        "example's feature activation on every token of its window (features.window_before / window_after "
        "around it), and the features active at each top example's token.",
    )
    def context_windows(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
        import pyarrow.parquet as pq

        from sae_assets.core.features import cofiring as feature_cofiring
        from sae_assets.core.features import windows as feature_windows

        cfg, store = settings.load(), storage.store()
        frange = context.partition_key
        _, _, _, examples, upstream = range_inputs(store, cfg, frange)
        gathers, gather_versions = read_upstream(store, "context_gather", shard_keys(context.instance))
        _check_gathers_current(gathers, frange, examples)
        shown = pq.read_table(store.fetch(examples, SHOWN_FILE))
        parts, report = [], progress_log(context)  # one step per shard's pass-1 file
        report.start(len(gathers))
        for step, gather in enumerate(gathers, start=1):
            parts.append(pq.read_table(store.fetch(gather, gathered_windows_file(frange))))
            report.update(step, tokens=sum(part.num_rows for part in parts))
        report.close()
        windows = feature_windows.assemble_context_windows(
            shown, parts, where=f"context_windows[{frange}]", shard_names=[g.partition for g in gathers])
        cofiring = feature_cofiring.assemble_cofiring(
            shown, [pq.read_table(store.fetch(g, gathered_cofiring_file(frange))) for g in gathers],
            where=f"context_windows[{frange}]")
        with CONTEXT_WINDOWS.writer(store, cfg, frange, upstream={**upstream, **gather_versions}) as out:
            pq.write_table(windows, out.path(WINDOWS_FILE))
            out.describe_table(WINDOWS_FILE, rows=windows.num_rows)
            pq.write_table(cofiring, out.path(COFIRING_FILE))
            out.describe_table(COFIRING_FILE, rows=cofiring.num_rows)
        return result(out.manifest, store, {"windows": windows.num_rows})

    @SITE_JSON.asset(
        group_name="features", partitions_def=FEATURE_RANGES,
        deps=[feature_examples, context_windows, language_model, tokenizer, *dictionary],
        description="One JSON document per feature (density, max, histogram, top and random examples and the "
        "activation intervals' examples with context, each interval's share of the activations, logit effects "
        "of the decoder direction and their histogram over the vocabulary, the 10 "
        "nearest features by decoder cosine, the model dimensions the decoder weighs most, the features co-firing "
        "on its top examples) and the range's index rows.",
    )
    def site_json(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
        import pyarrow.parquet as pq

        from sae_assets.core.features import cofiring as feature_cofiring
        from sae_assets.core.features import panels, site_data

        cfg, store = settings.load(), storage.store()
        model, model_manifest = load_language_model(store, device=cfg.features.device)
        tok, tok_manifest = load_tokenizer(store)
        token_strings = site_data.token_strings(tok)
        special_ids, _ = special_token_ids(store, cfg)  # marked in the windows, whether or not excluded

        def documents_of(frange: str):
            sae, lo, hi, examples, upstream = range_inputs(store, cfg, frange)
            [windows], window_versions = read_upstream(store, "context_windows", [frange])
            samples = read_samples(store, examples)
            directions = sae.decoder_directions(lo, hi)
            shown = pq.read_table(store.fetch(examples, SHOWN_FILE))
            cofiring = feature_cofiring.cofiring_features(
                shown, pq.read_table(store.fetch(windows, COFIRING_FILE)), lo, hi)
            docs = site_data.feature_documents(
                samples, shown, pq.read_table(store.fetch(windows, WINDOWS_FILE)), token_strings,
                logits=panels.logit_effects(directions, model.W_U.detach(), cfg.features.logit_effects),
                neighbours=panels.nearest_features(sae.decoder_directions(), lo, hi),
                alignment=panels.neuron_alignment(directions), cofiring=cofiring,
                activation_levels=cfg.features.activation_levels, dictionary=dictionary_key,
                special_ids=special_ids)
            upstream.update(window_versions, language_model=model_manifest.data_version,
                            tokenizer=tok_manifest.data_version)
            with SITE_JSON.writer(store, cfg, frange, upstream=upstream) as out:
                rows = []
                for doc in docs:
                    out.path(site_data_file(doc["feature"])).write_text(json.dumps(doc, ensure_ascii=False))
                    rows.append(site_data.index_row(doc))
                out.path(INDEX_ROWS_FILE).write_text(json.dumps(rows, ensure_ascii=False))
                out.extra.update(lo=lo, hi=hi, n_tokens=samples.n_tokens, hist_edges=list(samples.hist_edges))
            return out.manifest, {"features": len(rows)}

        return each_partition(context, store, documents_of)

    @FEATURE_SITE.asset(
        group_name="features",
        deps=[dg.AssetDep(site_json, partition_mapping=dg.AllPartitionMapping()), dictionary[0],
              dg.AssetDep("sae_metrics", partition_mapping=dg.AllPartitionMapping()),  # the frontier: every point
              dg.AssetDep(feature_map, partition_mapping=dg.SpecificPartitionsPartitionMapping([dictionary_key]))],
        description="The static feature browser: index.html, app.js, style.css, a chunked index (list pages, "
        "sorted orders, token search), one script per feature with its lineage, the dictionary's overview page "
        "(density histogram, dead and dense counts, L0, loss recovered, training curves, the sweep's frontier), "
        "the feature map (feature_map's layout coloured by density) "
        "and what changed since the previous build, and why; open index.html from disk or serve the directory "
        "from any static host.",
    )
    def feature_site(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
        store, cfg = storage.store(), settings.load()
        parts, upstream = read_upstream(store, "site_json", feature_range_keys(context.instance))
        overview, overview_upstream = overview_builder(store, cfg, dictionary_key)
        upstream.update(overview_upstream)
        layout, map_upstream = read_feature_map(store, dictionary_key)
        upstream.update(map_upstream)
        previous = store.manifest("feature_site", None)  # the last build: what changed since
        with FEATURE_SITE.writer(store, cfg, None, upstream=upstream) as out:
            n_features = write_site(out, store, parts, dictionary=dictionary_key, overview=overview, previous=previous,
                                    feature_map=layout)
        index = out.manifest.files["index.html"]
        return result(out.manifest, store, {"features": n_features, "open": dg.MetadataValue.path(
            store.describe() + "/" + index.key)}, content_version=True)

    assets = [feature_samples, feature_examples, context_gather, context_windows, site_json, feature_site]
    if neuronpedia:
        @NEURONPEDIA_EXPORT.asset(
            group_name="features",
            deps=[dg.AssetDep(site_json, partition_mapping=dg.AllPartitionMapping())],
            description="The features in Neuronpedia's bulk-import layout (as SAEDashboard's exporter writes "
            "it): release/model/sourceset/source .jsonl and, per feature range, gzipped JSONL of features and "
            "activations; the store's names are flat, manifest extra `layout` maps each to its import path.",
        )
        def neuronpedia_export(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
            store = storage.store()
            parts, upstream = read_upstream(store, "site_json", feature_range_keys(context.instance))
            with NEURONPEDIA_EXPORT.writer(store, settings.load(), None, upstream=upstream) as out:
                n_features = write_neuronpedia_export(out, store, parts, settings.load())
            return result(out.manifest, store, {"features": n_features})

        assets.append(neuronpedia_export)
    return assets


def overview_builder(store, cfg: RunConfig, dictionary: str):
    """(overview(density_F, n_tokens) -> the overview document, upstream versions): this
    dictionary's metrics and training curve and every sweep point's metrics that exist (the
    frontier shows the points measured so far; each one's version is part of the site's lineage)."""
    import polars as pl

    from sae_assets.core.features.overview import dictionary_overview

    upstream, metrics_by_point = {}, {}
    for point in cfg.sae.sweep:
        manifest = store.manifest("sae_metrics", point.key)
        metrics_by_point[point.key] = manifest.extra.get("metrics") if manifest is not None else None
        if manifest is not None:
            upstream[f"sae_metrics[{point.key}]"] = manifest.data_version
    curve, hooks = [], {}
    trained = store.manifest("sae_dictionary", dictionary)
    if trained is not None:
        hooks = {"hook": trained.extra.get("hook", ""), "target_hook": trained.extra.get("target_hook", "")}
        upstream[f"sae_dictionary[{dictionary}]"] = trained.data_version
        if "training_curve.parquet" in trained.files:
            curve = pl.read_parquet(store.fetch(trained, "training_curve.parquet")).to_dicts()

    def overview(density_F, n_tokens: int) -> dict:
        return dictionary_overview(density_F, dictionary=dictionary, n_tokens=n_tokens,
                                   metrics=metrics_by_point.get(dictionary), curve=curve,
                                   metrics_by_point=metrics_by_point, **hooks)

    return overview, upstream


def gathered_windows_file(feature_range: str) -> str:
    """context_gather's file of one feature range's windows in the shard."""
    return f"windows-{feature_range}.parquet"


def gathered_cofiring_file(feature_range: str) -> str:
    """context_gather's file of the features active at one range's top-example tokens in the shard."""
    return f"cofiring-{feature_range}.parquet"


def site_data_file(feature: int) -> str:
    return f"feature-{feature:06d}.json"


def _check_gathers_current(gathers, frange: str, examples) -> None:
    """Each shard's pass 1 must have used this very feature_examples partition."""
    want = examples.data_version
    for gather in gathers:
        used = gather.upstream.get(f"feature_examples[{frange}]")
        if used != want:
            raise FeatureInputError(
                f"context_gather[{gather.partition}] was built from feature_examples[{frange}] version {used}, "
                f"but that partition is now {want}: rematerialize context_gather[{gather.partition}]")


def _density_markdown(counts, n_tokens: int) -> str:
    import numpy as np

    from sae_assets.core.sae import metrics as sae_metrics

    histogram = sae_metrics.density_histogram(np.asarray(counts), n_tokens)
    return bar_chart_markdown(histogram.edges[:-1], histogram.counts, xlabel="log10 feature density",
                              note=f"{histogram.never_fired} features never fired")
