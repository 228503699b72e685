"""Features group: the example tables, context windows and the static browser of the served dictionaries.

    feature_samples [shard x feature range]  top-K, uniform sample, counts/histograms of one cell
    feature_examples [feature range]         exact merge over shards + the examples pages show
    context_gather [shard]                   pass 1: each range's windows in the shard, encoded there
    context_windows [feature range]          pass 2: every shard's windows of the range, checked
    site_json [feature range]                one JSON document per feature + index rows
    feature_matches [dictionary]             per sweep point B, each feature's closest feature in B
                                             (the highest decoder cosine, exact)
    feature_site                             one static browser (HTML/CSS/JS) over every served
                                             dictionary: a page each with its overview and feature
                                             map (the feature_map asset, map_assets.py), a picker
    neuronpedia_export                       (features.neuronpedia_export) Neuronpedia bulk-import files
                                             of the dictionary the site opens on

The site serves `features.dictionary` (a sae.sweep key; the site opens on it) and each of
`features.dictionaries`. `build_feature_assets(key)` makes one dictionary's assets, wiring their
dependency on exactly that sae_dictionary/sae_metrics partition, so retraining another sweep
point leaves them fresh; the opened dictionary's keep the plain names, each further one's end
in `__<slug>` (`config.dictionary_slug`), with feature-range partitions of its own
(`partitions.feature_partitions`): serving another sweep point adds its assets and partitions
and touches no other dictionary's. `build_feature_site(config)` makes the one site over them
all, with a dictionary picker. The dictionary the site opens on is refused when its metric
checks failed (features.require_passing_checks); a further one is served, marked in the picker.
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
    DICTIONARIES,
    SHARDS,
    feature_partitions,
    feature_range_bounds,
    feature_range_keys,
    served_feature_partitions,
    shard_index,
    shard_keys,
)
from sae_assets.defs.site_files import INDEX_ROWS_FILE, ServedDictionary, write_neuronpedia_export, write_site
from sae_assets.defs.plots import bar_chart_markdown

SAMPLE_TABLES = ("top", "sample", "stats")
SHOWN_FILE = "shown.parquet"
MATCHES_FILE = "matches.parquet"
WINDOWS_FILE = "windows.parquet"
COFIRING_FILE = "cofiring.parquet"


class FeatureInputError(ValueError):
    """The feature pipeline cannot run on what it was given; the message names the partition or key."""


# --- shared by the assets ---------------------------------------------------------------------

def browsed_dictionary(store, cfg: RunConfig, device: str, *, opened: bool = True):
    """(SAE, manifest, upstream versions) of features.dictionary (`cfg` browsing the served
    dictionary); the one the site opens on (`opened`) is refused when it failed its checks."""
    key = cfg.feature_dictionary.key
    metrics = store.require("sae_metrics", key)
    sae, manifest = load_dictionary(store, key, device=device)
    scored = metrics.upstream.get(f"sae_dictionary[{key}]")
    if scored is not None and scored != manifest.data_version:  # a retrain whose rescoring has not run
        raise FeatureInputError(
            f"sae_metrics[{key}] scored sae_dictionary[{key}] version {scored}, but the dictionary is now "
            f"{manifest.data_version}: rematerialize sae_metrics[{key}] before its features")
    failed = sorted(name for name, ok in metrics.extra.get("checks", {}).items() if not ok)
    if failed and cfg.features.require_passing_checks and opened:
        raise FeatureInputError(
            f"sae_dictionary[{key}] failed its sae_metrics check(s) {failed}: the browser refuses it. Pick "
            "another features.dictionary, or set features.require_passing_checks: false to browse it anyway")
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
FEATURE_MATCHES = AssetIdentity("feature_matches", version="1", device="features.device", keys=("feature_dictionary",))
FEATURE_SITE = AssetIdentity("feature_site", version="8", keys=("feature_dictionary", "features.dictionaries"),
                             hashed_unless_default=("features.dictionaries",))  # 8: hooks on #overview; 7: #map
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

def served_identity(identity: AssetIdentity, dictionary_key: str, slug: str | None) -> AssetIdentity:
    """A feature asset's identity for a served dictionary: as declared for the one the site opens
    on (slug None), else `<name>__<slug>` reading its keys with the browser on `dictionary_key`."""
    return identity if slug is None else identity.for_dictionary(dictionary_key, slug)


def build_feature_assets(dictionary_key: str, *, slug: str | None = None) -> list[dg.AssetsDefinition]:
    """The feature assets of served dictionary `dictionary_key`: plain names for the one the site
    opens on (slug None), `<name>__<slug>` and partitions of their own for each further one."""
    dictionary = _dictionary_deps(dictionary_key)
    SAMPLES, EXAMPLES, GATHER, WINDOWS, JSON_DOCS, MATCHES = (served_identity(i, dictionary_key, slug) for i in (
        FEATURE_SAMPLES, FEATURE_EXAMPLES, CONTEXT_GATHER, CONTEXT_WINDOWS, SITE_JSON, FEATURE_MATCHES))
    ranges_def, cells_def = feature_partitions(slug)
    group = "features" if slug is None else f"features__{slug}"

    def load_config(settings: RunSettings) -> RunConfig:
        return settings.load().browsing(dictionary_key)

    def served_dictionary(store, cfg: RunConfig):  # a further served one is served whatever its checks say
        return browsed_dictionary(store, cfg, cfg.features.device, opened=slug is None)

    def range_inputs(store, cfg: RunConfig, frange: str):
        """(SAE, lo, hi, feature_examples manifest, upstream versions) of a feature-range partition."""
        sae, _, upstream = served_dictionary(store, cfg)
        lo, hi = range_of(frange, sae, dictionary_key)
        [examples], versions = read_upstream(store, EXAMPLES.name, [frange])
        return sae, lo, hi, examples, {**upstream, **versions}

    @SAMPLES.asset(
        group_name=group, partitions_def=cells_def,
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

        cfg, store = load_config(settings), storage.store()
        shard, frange = (context.partition_key.keys_by_dimension[d] for d in ("shard", "features"))
        sae, sae_manifest, upstream = served_dictionary(store, cfg)
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
        with SAMPLES.writer(store, cfg, context.partition_key, upstream={**upstream, **versions}) as out:
            write_samples(out, samples)
            out.extra.update(lo=lo, hi=hi, n_tokens=samples.n_tokens)
        fired = pc.sum(pc.greater(samples.stats.column("count"), 0)).as_py()
        return result(out.manifest, store, {
            "tokens": samples.n_tokens, "features_fired": fired,
            "token_features_per_second": dg.MetadataValue.float(samples.n_tokens * (hi - lo) / max(seconds, 1e-9)),
        })

    @EXAMPLES.asset(
        group_name=group, partitions_def=ranges_def,
        deps=[feature_samples],  # every cell of the range (the `features` dimension, inferred)
        description="The exact merge of every shard's feature_samples for the range (independent of sharding), "
        "and the examples each feature page shows. Its data version is the merged content's hash.",
    )
    def feature_examples(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
        import pyarrow.parquet as pq

        from sae_assets.core.features import windows as feature_windows
        from sae_assets.core.features.merge import merge_feature_samples

        cfg, store = load_config(settings), storage.store()
        frange = context.partition_key
        cells = [str(_cell(s, frange)) for s in shard_keys(context.instance)]
        manifests, upstream = read_upstream(store, SAMPLES.name, cells)
        merged = merge_feature_samples([read_samples(store, m) for m in manifests])
        f = cfg.features
        shown = feature_windows.select_shown_examples(merged, random_examples=f.random_examples,
                                                      activation_levels=f.activation_levels,
                                                      examples_per_level=f.examples_per_level)
        # The manifest records the inputs, but only the merged content enters the data version
        # (Manifest.content_version): Dagster ignores staleness past 100 upstream partitions.
        with EXAMPLES.writer(store, cfg, frange, upstream=upstream) as out:
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

    @GATHER.asset(
        group_name=group, partitions_def=SHARDS,
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

        cfg, store = load_config(settings), storage.store()
        ranges = feature_range_keys(context.instance, ranges_def)
        sae, sae_manifest, dictionary_versions = served_dictionary(store, cfg)
        bounds = {frange: range_of(frange, sae, dictionary_key) for frange in ranges}
        examples, upstream = read_upstream(store, EXAMPLES.name, ranges)
        upstream.update(dictionary_versions)
        tok_manifest = store.require("tokenizer", None)  # its end-of-text id separates packed documents
        upstream["tokenizer"] = tok_manifest.data_version
        shown_by_range = {frange: pq.read_table(store.fetch(m, SHOWN_FILE)) for frange, m in zip(ranges, examples)}
        hook = sae_manifest.extra["hook"]

        def gather_one(shard: str):
            [acts], versions = read_upstream(store, "cached_activations", [shard])
            [tokens_manifest], token_versions = read_upstream(store, "token_shards", [shard])
            table = open_ipc_table(store.fetch(acts, ACTIVATIONS_FILE))
            with GATHER.writer(store, cfg, shard, upstream={**upstream, **versions, **token_versions}) as out:
                total, report = 0, progress_log(context, shard)  # one step per feature range
                report.start(len(shown_by_range))
                for step, (frange, shown) in enumerate(shown_by_range.items(), start=1):
                    lo, hi = bounds[frange]
                    windows = feature_windows.gather_context_windows(
                        shown, table, lambda x, lo=lo, hi=hi: sae.encode_range(x, lo, hi), shard=shard_index(shard),
                        hook=hook, context_length=tokens_manifest.extra["context_length"],
                        before=cfg.features.window_before, after=cfg.features.window_after, lo=lo,
                        batch_size=cfg.features.batch_size, boundary_ids=(tok_manifest.extra["eos_id"],),
                        device=cfg.features.device, where=f"{GATHER.name}[{shard}] for {frange}")
                    pq.write_table(windows, out.path(gathered_windows_file(frange)))
                    out.describe_table(gathered_windows_file(frange), rows=windows.num_rows)
                    cofiring = feature_cofiring.gather_cofiring(  # within the range: linear in the features
                        shown, table, lambda x, lo=lo, hi=hi: sae.encode_range(x, lo, hi), shard=shard_index(shard),
                        hook=hook, batch_size=cfg.features.batch_size, lo=lo, device=cfg.features.device,
                        where=f"{GATHER.name}[{shard}] for {frange}")
                    pq.write_table(cofiring, out.path(gathered_cofiring_file(frange)))
                    out.describe_table(gathered_cofiring_file(frange), rows=cofiring.num_rows)
                    total += windows.num_rows
                    report.update(step, tokens=total)
                report.close()
            return out.manifest, {"ranges": len(ranges), "windows": total}

        return each_partition(context, store, gather_one)

    @WINDOWS.asset(
        group_name=group, partitions_def=ranges_def,
        deps=[feature_examples, dg.AssetDep(context_gather, partition_mapping=dg.AllPartitionMapping()), *dictionary],
        description="Pass 2, per feature range: every shard's pass-1 windows assembled and checked, each shown "
        "example's feature activation on every token of its window (features.window_before / window_after "
        "around it), and the features active at each top example's token.",
    )
    def context_windows(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
        import pyarrow.parquet as pq

        from sae_assets.core.features import cofiring as feature_cofiring
        from sae_assets.core.features import windows as feature_windows

        cfg, store = load_config(settings), storage.store()
        frange = context.partition_key
        _, _, _, examples, upstream = range_inputs(store, cfg, frange)
        gathers, gather_versions = read_upstream(store, GATHER.name, shard_keys(context.instance))
        _check_gathers_current(gathers, EXAMPLES.name, frange, examples)
        shown = pq.read_table(store.fetch(examples, SHOWN_FILE))
        parts, report = [], progress_log(context)  # one step per shard's pass-1 file
        report.start(len(gathers))
        for step, gather in enumerate(gathers, start=1):
            parts.append(pq.read_table(store.fetch(gather, gathered_windows_file(frange))))
            report.update(step, tokens=sum(part.num_rows for part in parts))
        report.close()
        windows = feature_windows.assemble_context_windows(
            shown, parts, where=f"{WINDOWS.name}[{frange}]", shard_names=[g.partition for g in gathers])
        cofiring = feature_cofiring.assemble_cofiring(
            shown, [pq.read_table(store.fetch(g, gathered_cofiring_file(frange))) for g in gathers],
            where=f"{WINDOWS.name}[{frange}]")
        with WINDOWS.writer(store, cfg, frange, upstream={**upstream, **gather_versions}) as out:
            pq.write_table(windows, out.path(WINDOWS_FILE))
            out.describe_table(WINDOWS_FILE, rows=windows.num_rows)
            pq.write_table(cofiring, out.path(COFIRING_FILE))
            out.describe_table(COFIRING_FILE, rows=cofiring.num_rows)
        return result(out.manifest, store, {"windows": windows.num_rows})

    @JSON_DOCS.asset(
        group_name=group, partitions_def=ranges_def,
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

        cfg, store = load_config(settings), storage.store()
        model, model_manifest = load_language_model(store, device=cfg.features.device)
        tok, tok_manifest = load_tokenizer(store)
        token_strings = site_data.token_strings(tok)
        special_ids, _ = special_token_ids(store, cfg)  # marked in the windows, whether or not excluded

        def documents_of(frange: str):
            sae, lo, hi, examples, upstream = range_inputs(store, cfg, frange)
            [windows], window_versions = read_upstream(store, WINDOWS.name, [frange])
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
            with JSON_DOCS.writer(store, cfg, frange, upstream=upstream) as out:
                rows = []
                for doc in docs:
                    out.path(site_data_file(doc["feature"])).write_text(json.dumps(doc, ensure_ascii=False))
                    rows.append(site_data.index_row(doc))
                out.path(INDEX_ROWS_FILE).write_text(json.dumps(rows, ensure_ascii=False))
                out.extra.update(lo=lo, hi=hi, n_tokens=samples.n_tokens, hist_edges=list(samples.hist_edges))
            return out.manifest, {"features": len(rows)}

        return each_partition(context, store, documents_of)

    @MATCHES.asset(
        group_name=group, partitions_def=DICTIONARIES,
        # Cell B reads sae_dictionary[B] (the same key: identity) and this dictionary through its
        # scored partition sae_metrics[<this>] (browsed_dictionary checks that it scored the
        # dictionary as it is now), so retraining B marks stale column B here (and B's own matches
        # once rescored), and adding a sweep point adds a cell and leaves the others fresh.
        deps=[sae_dictionary, dictionary[1]],
        description="For every feature of this dictionary, the closest feature of sweep point <partition> "
        "by decoder direction: the highest cosine between unit decoder rows, exact (blockwise, every pair "
        "compared), with its value. Not compared: the dictionary itself (its closest other features are "
        "site_json's nearest features) and points that decode into another hook (a transcoder's target). "
        "The site links each feature page to its match in every other served dictionary.",
    )
    def feature_matches(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
        from sae_assets.core.features import matches as feature_matching

        cfg, store = load_config(settings), storage.store()
        other = context.partition_key
        sae, _, upstream = served_dictionary(store, cfg)
        skipped = feature_matching.why_not_compared(dictionary_key, other, {
            key: cfg.point_hooks(cfg.sae.point(key))[1] for key in (dictionary_key, other)})
        other_manifest = store.require("sae_dictionary", other)
        upstream[f"sae_dictionary[{other}]"] = other_manifest.data_version
        table, shown = feature_matching.matches_table(), {"compared": False, "reason": skipped}
        if skipped is None:  # the other dictionary is loaded only to be compared
            other_sae, _ = load_dictionary(store, other, device=cfg.features.device, manifest=other_manifest)
            report = progress_log(context)  # one step per block of this dictionary's rows

            def progress(done: int, total: int) -> None:
                if done == 1:
                    report.start(total)
                report.update(done, tokens=0)

            try:
                ids_F, cosines_F = feature_matching.closest_features(
                    sae.W_dec.detach(), other_sae.W_dec.detach(), device=cfg.features.device, progress=progress)
            except ValueError as exc:
                raise FeatureInputError(f"{MATCHES.name}[{other}]: {exc}") from exc
            report.close()
            table = feature_matching.matches_table(ids_F, cosines_F)
            shown = {"compared": True, "mean_best_cosine": float(cosines_F.mean()),
                     "share_above_0_9": float((cosines_F > 0.9).mean())}
        with MATCHES.writer(store, cfg, other, upstream=upstream) as out:
            out.extra.update(dictionary=dictionary_key, other=other, features=sae.width)
            if skipped is not None:  # its table is empty: a partition holds at least one file
                out.extra["not_compared"] = skipped
            feature_matching.write_matches(table, out.path(MATCHES_FILE))
            out.describe_table(MATCHES_FILE, rows=table.num_rows)
        return result(out.manifest, store, shown)

    return [feature_samples, feature_examples, context_gather, context_windows, site_json, feature_matches]


def build_feature_site(cfg: RunConfig) -> list[dg.AssetsDefinition]:
    """The feature_site asset over every served dictionary (and neuronpedia_export of the one it
    opens on, with features.neuronpedia_export)."""
    served = served_feature_partitions(cfg)
    keys = list(served)

    def names(identity: AssetIdentity, key: str) -> str:
        return served_identity(identity, key, cfg.served_slug(key)).name

    all_of = dg.AllPartitionMapping()
    deps = [*(dg.AssetDep(names(SITE_JSON, key), partition_mapping=all_of) for key in keys),
            dg.AssetDep(sae_dictionary, partition_mapping=dg.SpecificPartitionsPartitionMapping(keys)),
            dg.AssetDep("sae_metrics", partition_mapping=all_of),  # the frontier: every point
            dg.AssetDep(feature_map, partition_mapping=dg.SpecificPartitionsPartitionMapping(keys))]
    if len(keys) > 1:  # each served dictionary's matches in every other served one
        deps += [dg.AssetDep(names(FEATURE_MATCHES, key), partition_mapping=dg.SpecificPartitionsPartitionMapping(
            [k for k in keys if k != key])) for key in keys]

    @FEATURE_SITE.asset(
        group_name="features", deps=deps,
        description="The static feature browser of every served dictionary (features.dictionary, then "
        "features.dictionaries), one page each behind a dictionary picker: index.html, app.js, style.css, a "
        "chunked index (list pages, sorted orders, token search), one script per feature with its lineage and "
        "its closest feature in each other served dictionary, the dictionary's overview page (density "
        "histogram, dead and dense counts, L0, loss recovered, training curves, the sweep's frontier), the "
        "feature map (feature_map's layout coloured by density) and what changed since the previous build, "
        "and why; open index.html from disk or serve the directory from any static host.",
    )
    def feature_site(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
        store, cfg = storage.store(), settings.load()
        upstream, pages, shown_version = {}, {}, {}
        for key, ranges_def in served.items():
            pages[key], versions = read_upstream(store, names(SITE_JSON, key), feature_range_keys(context.instance,
                                                                                                 ranges_def))
            shown_version[key] = pages_dictionary_version(pages[key], names(SITE_JSON, key), key)
            upstream.update(versions)
        dictionaries, left_out = [], {}
        scored = {point.key: store.manifest("sae_metrics", point.key) for point in cfg.sae.sweep}  # read once
        for key in keys:
            overview, overview_upstream, facts = overview_builder(store, cfg, key, scored)
            layout, map_upstream = read_feature_map(store, key, shown_version=shown_version[key])
            if layout is None:  # #map says the site has no map until both are redone
                left_out[f"feature_map[{key}]"] = f"built from another version of sae_dictionary[{key}]"
            upstream.update(overview_upstream, **map_upstream)
            matches = {}
            for other in (k for k in keys if k != key):
                found, match_versions, why = matches_for_pages(store, names(FEATURE_MATCHES, key), key, other,
                                                               shown_version)
                if why is None:
                    matches[other] = found
                    upstream.update(match_versions)
                else:
                    left_out[f"{names(FEATURE_MATCHES, key)}[{other}]"] = why
            dictionaries.append(ServedDictionary(key=key, slug=cfg.served_slug(key), site_json=names(SITE_JSON, key),
                                                 parts=pages[key], overview=overview, feature_map=layout,
                                                 matches=matches, **facts))
        for cell, why in left_out.items():
            context.log.info(f"feature_site: {cell} left out ({why}); the next build after it is redone shows it")
        previous = store.manifest("feature_site", None)  # the last build: what changed since
        with FEATURE_SITE.writer(store, cfg, None, upstream=upstream) as out:
            n_features = write_site(out, store, dictionaries, previous=previous)
            out.extra["left_out"] = left_out
        index = out.manifest.files["index.html"]
        return result(out.manifest, store, {"features": n_features, "dictionaries": len(dictionaries),
                                            "open": dg.MetadataValue.path(store.describe() + "/" + index.key)},
                      content_version=True)

    assets = [feature_site]
    if cfg.features.neuronpedia_export:
        @NEURONPEDIA_EXPORT.asset(
            group_name="features",
            deps=[dg.AssetDep(SITE_JSON.name, partition_mapping=all_of)],
            description="The features in Neuronpedia's bulk-import layout (as SAEDashboard's exporter writes "
            "it): release/model/sourceset/source .jsonl and, per feature range, gzipped JSONL of features and "
            "activations; the store's names are flat, manifest extra `layout` maps each to its import path.",
        )
        def neuronpedia_export(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
            store = storage.store()
            parts, upstream = read_upstream(store, SITE_JSON.name, feature_range_keys(context.instance))
            with NEURONPEDIA_EXPORT.writer(store, settings.load(), None, upstream=upstream) as out:
                n_features = write_neuronpedia_export(out, store, parts, settings.load())
            return result(out.manifest, store, {"features": n_features})

        assets.append(neuronpedia_export)
    return assets


def matches_for_pages(store, matches_asset: str, key: str, other: str, shown: dict[str, str | None]):
    """(matches or None, versions, None) of `key`'s feature_matches cell `other` (read_matches),
    or (None, {}, why) when the cell was built from a version of either dictionary other than
    the one its pages show (`shown`: {key: sae_dictionary version of its site_json}): after one
    side is retrained its matches and pages are redone at different times, and matches of
    another version are left out rather than shown beside the wrong pages."""
    manifest = store.require(matches_asset, other)
    built = {k: manifest.upstream.get(f"sae_dictionary[{k}]") for k in (key, other)}
    stale = [k for k in (key, other) if built[k] != shown.get(k)]
    if stale:
        return None, {}, "built from another version of " + ", ".join(f"sae_dictionary[{k}]" for k in stale)
    found, versions = read_matches(store, matches_asset, other, manifest=manifest)
    return found, versions, None


def read_matches(store, matches_asset: str, other: str, *, manifest=None):
    """((ids_F, cosines_F), or None where the cell compared nothing (`not_compared`: the
    dictionary itself, or another hook's decoder), {'<asset>[<other>]': version}) of one
    feature_matches partition (`manifest`: the one already read)."""
    from sae_assets.core.features import matches as feature_matching

    manifest = manifest or store.require(matches_asset, other)
    versions = {f"{matches_asset}[{other}]": manifest.data_version}
    if "not_compared" in manifest.extra:
        return None, versions
    return feature_matching.read_matches(store.fetch(manifest, MATCHES_FILE), where=f"{matches_asset}[{other}]"), versions


def pages_dictionary_version(parts, site_json: str, key: str) -> str | None:
    """The sae_dictionary[key] version every site_json partition of a dictionary was built from;
    refuses partitions built from different versions (a partial rerun after a retrain)."""
    by_partition = {m.partition: m.upstream.get(f"sae_dictionary[{key}]") for m in parts}
    if len(set(by_partition.values())) > 1:
        raise FeatureInputError(f"{site_json} partitions were built from different versions of sae_dictionary[{key}] "
                                f"({by_partition}): rematerialize the {site_json} partitions of the older ones")
    return next(iter(by_partition.values()), None)


def overview_builder(store, cfg: RunConfig, dictionary: str, scored: dict):
    """(overview(density_F, n_tokens) -> the overview document, upstream versions, facts for the
    picker: its hooks and failed checks): this dictionary's metrics and training curve and every
    sweep point's metrics that exist (`scored`: {point: its sae_metrics manifest or None}, read
    once per site; the frontier shows the points measured so far, each one's version part of the
    site's lineage)."""
    import polars as pl

    from sae_assets.core.features.overview import dictionary_overview

    upstream, metrics_by_point = {}, {}
    for point, manifest in scored.items():
        metrics_by_point[point] = manifest.extra.get("metrics") if manifest is not None else None
        if manifest is not None:
            upstream[f"sae_metrics[{point}]"] = manifest.data_version
    curve, hooks = [], {"hook": "", "target_hook": ""}
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

    own = scored.get(dictionary)
    failed = sorted(name for name, ok in (own.extra.get("checks", {}) if own else {}).items() if not ok)
    return overview, upstream, {**hooks, "failed_checks": failed}


def gathered_windows_file(feature_range: str) -> str:
    """context_gather's file of one feature range's windows in the shard."""
    return f"windows-{feature_range}.parquet"


def gathered_cofiring_file(feature_range: str) -> str:
    """context_gather's file of the features active at one range's top-example tokens in the shard."""
    return f"cofiring-{feature_range}.parquet"


def site_data_file(feature: int) -> str:
    return f"feature-{feature:06d}.json"


def _check_gathers_current(gathers, examples_asset: str, frange: str, examples) -> None:
    """Each shard's pass 1 must have used this very feature_examples partition."""
    want = examples.data_version
    for gather in gathers:
        used = gather.upstream.get(f"{examples_asset}[{frange}]")
        if used != want:
            raise FeatureInputError(
                f"{gather.asset}[{gather.partition}] was built from {examples_asset}[{frange}] version {used}, "
                f"but that partition is now {want}: rematerialize {gather.asset}[{gather.partition}]")


def _density_markdown(counts, n_tokens: int) -> str:
    import numpy as np

    from sae_assets.core.sae import metrics as sae_metrics

    histogram = sae_metrics.density_histogram(np.asarray(counts), n_tokens)
    return bar_chart_markdown(histogram.edges[:-1], histogram.counts, xlabel="log10 feature density",
                              note=f"{histogram.never_fired} features never fired")
