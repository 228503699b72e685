"""The feature assets on a tiny graph: exact tables against a brute force over every shard, the
same tables from 1 and 7 shards, context windows centred on their examples, the site's files,
the feature map of every dictionary (all its features, the site's points coloured by the
pages' densities), byte-identical reruns, refusal of bad input (a range outside the dictionary, a dictionary
that failed its checks, a missing context shard), and special tokens kept out of training,
evaluation and the feature statistics but marked in context (and sampled again with
special_tokens.exclude off)."""

import gzip
import itertools
import json
import shutil

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.errors import DagsterAssetCheckFailedError
from dagster._core.loader import LoadingContextForTest
from support import FEATURES, HOOK, TINY, brute_force, materialize, shard_table, write_run_config

from resources.arrow_files import open_ipc_table, write_ipc_file
from sae_assets.core.activations.reader import to_numpy_matrix
from sae_assets.core.config import load_config
from sae_assets.core.corpus import tokenization
from sae_assets.core.features import feature_map as map_core
from sae_assets.core.sae import io as sae_io
from sae_assets.core.sae.relu import ReluSae
from sae_assets.defs.feature_assets import FeatureInputError, read_samples
from sae_assets.defs.identity import identity_of
from sae_assets.defs.partitions import (
    FEATURE_RANGES,
    dictionary_keys,
    feature_range_bounds,
    feature_range_keys,
    partition_keys,
    shard_keys,
    sync_partitions,
)
from sae_assets.definitions import ALL_CHECKS, build_resources, graph_assets
from sae_assets.demo import materialize_all


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    directory = tmp_path_factory.mktemp("features")
    config_path = write_run_config(directory, TINY, {"root": str(directory / "artifacts")}, features=FEATURES)
    instance = dg.DagsterInstance.ephemeral()
    materialize_all(instance, config_path, log=lambda *_: None)
    return instance, config_path, build_resources(config_path)["storage"].store(), directory


def all_activations(store, instance, excluded=()):
    """(N, D) activations and (N,) global token indices of every shard, less the `excluded` token ids."""
    xs, toks = [], []
    for shard in shard_keys(instance):
        table = open_ipc_table(store.fetch(store.require("cached_activations", shard), "activations.arrow"))
        keep = ~np.isin(table.column("token_id").to_numpy(), excluded)
        xs.append(to_numpy_matrix(table.column(HOOK)).astype(np.float32)[keep])
        toks.append(table.column("token_index").to_numpy()[keep])
    return np.concatenate(xs), np.concatenate(toks)


def token_ids_of(store, instance):
    """A function from global token indices to their token ids (over every shard)."""
    index, ids = [], []
    for shard in shard_keys(instance):
        table = open_ipc_table(store.fetch(store.require("cached_activations", shard), "activations.arrow"))
        index.append(table.column("token_index").to_numpy())
        ids.append(table.column("token_id").to_numpy())
    index, ids = np.concatenate(index), np.concatenate(ids)
    order = np.argsort(index)

    def lookup(token_index):
        at = np.searchsorted(index[order], np.asarray(token_index, dtype=np.int64))
        return ids[order][at]

    return lookup


def special_ids(store, config_path) -> tuple[int, ...]:
    from sae_assets.defs.corpus_assets import special_token_ids

    return special_token_ids(store, load_config(config_path))[0]


def test_feature_examples_equal_a_brute_force_over_all_shards(graph):
    instance, config_path, store, _ = graph
    cfg = load_config(config_path)
    from sae_assets.defs.dictionary_assets import load_dictionary

    sae, _ = load_dictionary(store, cfg.feature_dictionary.key)
    x, tok = all_activations(store, instance, special_ids(store, config_path))  # special tokens are not offered
    f = sae.encode(torch.from_numpy(x)).detach().numpy()
    assert feature_range_keys(instance) == ["features-00000-00023", "features-00024-00047", "features-00048-00063"]
    for frange in feature_range_keys(instance):
        merged = read_samples(store, store.require("feature_examples", frange))
        want = brute_force(f, tok, merged.lo, merged.hi, top_k=4, sample_k=40, seed=cfg.features.seed)
        top = merged.top
        assert top.column("feature").to_pylist() == want["top"][0].tolist()
        assert top.column("token_index").to_pylist() == want["top"][2].tolist()
        np.testing.assert_allclose(top.column("activation").to_numpy(), want["top"][3], rtol=1e-5)
        assert merged.sample.column("token_index").to_pylist() == want["sample"][3].tolist()
        assert merged.stats.column("count").to_pylist() == [s[1] for s in want["stats"]]
        assert merged.n_tokens == len(tok)


def test_one_and_seven_shards_give_identical_tables(tmp_path):
    """The same tokens cached as 1 shard or as 7 uneven shards merge to the same tables."""
    rng = np.random.default_rng(3)
    table = shard_table(0, 60, seed=9)  # 600 tokens of width 6
    sae = ReluSae(6, 12, l1_coefficient=1.0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    point = {"architecture": "relu", "width": 12, "sparsity": 1.0}
    results = []
    for n_shards in (1, 7):
        root = tmp_path / f"shards-{n_shards}"
        config_path = write_run_config(tmp_path, TINY, {"root": str(root)}, corpus={"num_shards": n_shards},
                                       sae={"sweep": [point]}, features={"range_width": 5, "top_k": 3, "batch_size": 13})
        store = build_resources(config_path)["storage"].store()
        with store.writer("sae_dictionary", "relu-w12-l1_1") as out:
            sae_io.save_sae(sae, out.scratch, hook_name=HOOK)
            out.extra.update(hook=HOOK)
        with store.writer("sae_metrics", "relu-w12-l1_1") as out:
            out.path("metrics.json").write_text("{}")
            out.extra.update(checks={"dead_fraction_below_threshold": True})
        with store.writer("tokenizer", None) as out:  # its end-of-text id 0 is special: rows of token 0 are not offered
            out.path("tokenizer.json").write_text(tokenization.train_bpe(["a tiny corpus"] * 4, 300).to_str())
            out.extra.update(vocab_size=300, eos_id=0)
        cuts = np.sort(rng.choice(np.arange(1, 600), n_shards - 1, replace=False))
        for i, rows in enumerate(np.split(rng.permutation(600), cuts)):
            with store.writer("cached_activations", f"shard-{i:04d}") as out:
                part = table.take(pa.array(np.sort(rows)))
                write_ipc_file(out.path("activations.arrow"), part.schema, part.to_batches())
        instance = dg.DagsterInstance.ephemeral()
        sync_partitions(instance, load_config(config_path))
        for key in FEATURE_RANGES.get_partition_keys(dynamic_partitions_store=instance):
            for shard in shard_keys(instance):
                materialize(instance, config_path, {"feature_samples"}, dg.MultiPartitionKey({"shard": shard, "features": key}))
            materialize(instance, config_path, {"feature_examples"}, key)
        results.append({k: read_samples(store, store.require("feature_examples", k))
                        for k in feature_range_keys(instance)})
    one, seven = results
    assert list(one) == list(seven) == ["features-00000-00004", "features-00005-00009", "features-00010-00011"]
    assert one["features-00000-00004"].n_tokens == int((table.column("token_id").to_numpy() != 0).sum()) < 600
    for key in one:
        assert one[key].top.equals(seven[key].top) and one[key].top.num_rows > 0
        assert one[key].sample.equals(seven[key].sample)
        for column in ("feature", "count", "max", "hist"):
            assert one[key].stats.column(column).equals(seven[key].stats.column(column))
        np.testing.assert_allclose(one[key].stats.column("sum").to_numpy(), seven[key].stats.column("sum").to_numpy(),
                                   rtol=1e-12)


def test_context_windows_are_centred_on_their_examples(graph):
    instance, _, store, _ = graph
    for frange in feature_range_keys(instance):
        shown = pq.read_table(store.fetch(store.require("feature_examples", frange), "shown.parquet")).to_pylist()
        windows = pq.read_table(store.fetch(store.require("context_windows", frange), "windows.parquet")).to_pylist()
        by_key = {(w["feature"], w["token_index"]): w for w in windows}
        assert len(by_key) == len({(s["feature"], s["token_index"]) for s in shown}) > 0
        for s in shown:
            w = by_key[(s["feature"], s["token_index"])]
            centre = s["token_index"] - w["first_token_index"]
            assert 0 <= centre <= 5 and len(w["token_ids"]) - 1 - centre <= 2
            assert w["activations"][centre] == pytest.approx(s["activation"], abs=1e-5)


def test_site_files_and_neuronpedia_export(graph):
    instance, _, store, _ = graph
    site = store.require("feature_site", None)
    assert {"index.html", "app.js", "style.css", "site-meta.js", "index-0.js", "search-0.js"} <= set(site.files)
    assert len([n for n in site.files if n.startswith("feature-")]) == 64
    meta = store.read_bytes(site, "site-meta.js").decode()
    assert meta.startswith("window.SAE_SITE_META = ") and json.loads(meta.split("=", 1)[1].rstrip(";\n"))["features"] == 64
    index = store.read_bytes(site, "index-0.js").decode()
    assert index.startswith('SAE_SITE.chunk("index-0",') and "<" not in index[len('SAE_SITE.chunk("index-0",'):]
    # The overview page: this dictionary's metrics and curve, every scored sweep point on the frontier
    text = store.read_bytes(site, "dictionary-overview.js").decode()
    overview = json.loads(text[len("SAE_OVERVIEW.data("):-len(");\n")])
    key = overview["dictionary"]
    scored = {p: store.manifest("sae_metrics", p) for p in store.partitions("sae_metrics")}
    assert overview["metrics"]["l0"] == pytest.approx(scored[key].extra["metrics"]["l0"])
    assert [p["point"] for p in overview["frontier"] if p["current"]] == [key]
    assert {p["point"] for p in overview["frontier"]} == {p for p, m in scored.items() if m is not None}
    assert overview["curve"] and overview["curve"][-1]["step"] > 0
    assert overview["density"]["features"] == 64 == overview["density"]["live"] + overview["density"]["dead"]
    assert site.upstream[f"sae_metrics[{key}]"] == scored[key].data_version  # lineage of the page
    listed = json.loads(store.read_bytes(site, "site-changes.js").decode()[len("SAE_CHANGES.data("):-len(");\n")])
    if listed["previous_build"] is None:  # the first build of this store: nothing to compare with
        assert listed["ranges"] == []
    from sae_assets.defs.site_files import read_feature_script

    page_doc, lineage = read_feature_script(store.read_bytes(site, "feature-000001.js").decode())
    assert page_doc["feature"] == 1
    assert lineage["dictionary"] == key and lineage["shard_count"] == len(store.partitions("cached_activations"))
    assert lineage["dictionary_version"] == store.manifest("sae_dictionary", key).data_version
    doc = json.loads(store.read_bytes(store.require("site_json", "features-00000-00023"), "feature-000001.json"))
    assert doc["feature"] == 1 and len(doc["logits"]["top"]) == 10
    assert sum(doc["logit_histogram"]["counts"]) == TINY["tokenizer"]["vocab_size"]
    assert len(doc["neighbours"]) == 10 and 1 not in [n[0] for n in doc["neighbours"]]
    assert len(doc["neuron_alignment"]) == 5
    assert all(0 < share <= 1 and g != 1 for g, share in doc["cofiring"])
    assert store.require("context_windows", "features-00000-00023").files["cofiring.parquet"].rows > 0
    export = store.require("neuronpedia_export", None)
    features = [json.loads(line) for i in range(3)
                for line in gzip.decompress(store.read_bytes(export, f"features.batch-{i}.jsonl.gz")).splitlines()]
    assert [f["index"] for f in features] == [str(i) for i in range(64)]
    assert features[1]["topkCosSimIndices"] == [n[0] for n in doc["neighbours"]]
    assert export.extra["layout"]["features.batch-0.jsonl.gz"] == "features/batch-0.jsonl.gz"
    assert {"release.jsonl", "model.jsonl", "sourceset.jsonl", "source.jsonl"} <= set(export.files)


def test_feature_map_of_every_dictionary_and_its_page_in_the_site(graph):
    instance, config_path, store, _ = graph
    from sae_assets.defs.dictionary_assets import load_dictionary
    from sae_assets.defs.map_assets import LAYOUT_FILE, MAP_SEED

    key = load_config(config_path).feature_dictionary.key
    layouts = {}
    for point in dictionary_keys(instance):  # every sweep point has its map, from its own decoder alone
        manifest = store.require("feature_map", point)
        table = pq.read_table(store.fetch(manifest, LAYOUT_FILE))
        assert table.column("feature").to_pylist() == list(range(64)) and manifest.extra["method"] == "umap"
        assert manifest.upstream == {f"sae_dictionary[{point}]": store.require("sae_dictionary", point).data_version}
        layouts[point] = np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], axis=1)
    sae, _ = load_dictionary(store, key)
    again = map_core.decoder_layout(sae.W_dec.detach(), seed=MAP_SEED)
    assert again.xy_F2.tobytes() == layouts[key].astype(np.uint16).tobytes(), "the same dictionary, the same bytes"
    site = store.require("feature_site", None)
    assert site.upstream[f"feature_map[{key}]"] == store.require("feature_map", key).data_version
    text = store.read_bytes(site, "dictionary-map.js").decode()
    document = json.loads(text[len("SAE_MAP.data("):-len(");\n")])
    xy, codes = map_core.read_points(document)
    assert document["dictionary"] == key and document["features"] == 64
    assert (xy == layouts[key]).all()
    density = np.array([json.loads(store.read_bytes(store.require("site_json", frange), f"feature-{f:06d}.json"))["density"]
                        for frange in feature_range_keys(instance) for f in range(*feature_range_bounds(frange))])
    live = density > 0
    assert ((codes == 0) == ~live).all(), "never-fired features, and only they, are grey"
    back = map_core.code_log10(codes[live], document["log10_low"], document["log10_high"])
    half_code = (document["log10_high"] - document["log10_low"]) / (2 * (map_core.CODES - 1))
    assert np.abs(back - np.log10(density[live])).max() <= half_code + 1e-12


def test_rerun_is_byte_identical_and_keeps_the_version(graph):
    instance, config_path, store, _ = graph
    frange = "features-00024-00047"
    before = {a: store.require(a, frange).to_json() for a in ("feature_examples", "context_windows", "site_json")}
    cell = dg.MultiPartitionKey({"shard": "shard-0001", "features": frange})
    cell_before = store.require("feature_samples", str(cell)).to_json()
    materialize(instance, config_path, {"feature_samples"}, cell)
    for name in ("feature_examples", "context_windows", "site_json"):
        materialize(instance, config_path, {name}, frange)
    assert store.require("feature_samples", str(cell)).to_json() == cell_before
    assert {a: store.require(a, frange).to_json() for a in before} == before


def test_every_manifest_is_written_under_its_assets_identity(graph):
    instance, config_path, store, _ = graph
    cfg = load_config(config_path)
    for asset in graph_assets(cfg):
        ident = identity_of(asset)
        assert asset.code_versions_by_key[asset.key] == ident.code_version(cfg)
        written = store.partitions(ident.name)
        assert written, f"{ident.name} was not materialized"
        for partition in written:
            manifest = store.require(ident.name, partition)
            assert manifest.code_version == ident.version, (ident.name, partition)
            assert manifest.config_hash == ident.config_hash(cfg, partition), (ident.name, partition)


def stale_statuses(instance, config_path) -> dict:
    """The Dagster stale status of every materialized partition under the given config."""
    assets = graph_assets(load_config(config_path))
    asset_graph = dg.Definitions(assets=assets, asset_checks=ALL_CHECKS,
                                 resources=build_resources(config_path)).resolve_asset_graph()
    resolver = CachingStaleStatusResolver(instance, asset_graph, LoadingContextForTest(instance))
    return {(a.key.to_user_string(), str(key)): resolver.get_status(a.key, key)
            for a in assets for key in partition_keys(a.partitions_def, instance)}


def test_editing_an_execution_only_key_marks_nothing_stale(graph):
    instance, config_path, store, directory = graph
    root = {"root": str(load_config(config_path).storage.root)}
    before = stale_statuses(instance, config_path)
    assert set(before.values()) == {StaleStatus.FRESH}, {k: v for k, v in before.items() if v != StaleStatus.FRESH}
    execution = write_run_config(directory, TINY, root, features={**FEATURES, "batch_size": 37, "device": "cpu"},
                                 activations={**TINY["activations"], "batch_size": 5},
                                 sae={**TINY["sae"], "checkpoint_every": 7})
    assert stale_statuses(instance, execution) == before
    cell = str(dg.MultiPartitionKey({"shard": "shard-0000", "features": "features-00024-00047"}))
    manifest = store.require("feature_samples", cell).to_json()
    materialize(instance, execution, {"feature_samples"}, dg.MultiPartitionKey(
        {"shard": "shard-0000", "features": "features-00024-00047"}))
    assert store.require("feature_samples", cell).to_json() == manifest
    # The positive control: a key that shapes the samples does mark them stale.
    shaping = write_run_config(directory, TINY, root, features={**FEATURES, "top_k": 3})
    assert stale_statuses(instance, shaping)[("feature_samples", cell)] == StaleStatus.STALE


def test_adding_a_sweep_point_leaves_every_metrics_and_feature_manifest_byte_identical(graph):
    instance, config_path, store, directory = graph
    sweep = [*TINY["sae"]["sweep"], {"architecture": "topk", "width": 16, "sparsity": 2}]
    grown = write_run_config(directory, TINY, {"root": str(load_config(config_path).storage.root)},
                             features=FEATURES, sae={**TINY["sae"], "sweep": sweep})
    frange, cell = "features-00000-00023", dg.MultiPartitionKey({"shard": "shard-0001", "features": "features-00000-00023"})
    rerun = [(name, k) for name in ("sae_metrics", "feature_map") for k in dictionary_keys(instance)] + [
        ("feature_samples", cell), ("feature_examples", frange), ("context_gather", "shard-0000"),
        ("context_windows", frange), ("site_json", frange), ("feature_site", None), ("neuronpedia_export", None)]
    before = {(name, str(key)): store.require(name, key and str(key)).to_json() for name, key in rerun}
    assert sync_partitions(instance, load_config(grown))["dictionaries"] == ["topk-w16-k2"]
    try:
        for name, key in rerun:
            materialize(instance, grown, {name}, key)
        after = {(name, str(key)): store.require(name, key and str(key)).to_json() for name, key in rerun}
    finally:
        sync_partitions(instance, load_config(config_path))
    assert after == before


def test_every_data_version_dagster_shows_resolves_to_its_files_after_a_rewrite(graph):
    """Lineage after reruns: the data version of every materialization in the instance's history,
    older ones included, resolves to a manifest whose files all exist and verify."""
    instance, config_path, store, directory = graph
    cell = dg.MultiPartitionKey({"shard": "shard-0001", "features": "features-00024-00047"})
    first = store.require("feature_samples", str(cell))
    shaping = write_run_config(directory, TINY, {"root": str(load_config(config_path).storage.root)},
                               features={**FEATURES, "top_k": 3})
    materialize(instance, shaping, {"feature_samples"}, cell)  # a rewrite with other content
    rewritten = store.require("feature_samples", str(cell))
    assert rewritten.data_version != first.data_version
    checked = 0
    for asset in graph_assets(load_config(config_path)):
        name = asset.key.to_user_string()
        for record in instance.fetch_materializations(asset.key, limit=1000).records:
            event = record.asset_materialization
            ranged = event.metadata.get("partition_versions")  # a ranged run: each partition's own version
            pairs = ranged.value.items() if ranged else [(event.partition, event.tags["dagster/data_version"])]
            for partition, version in pairs:
                manifest = store.manifest_at(name, partition, version)
                for file_name in manifest.files:
                    store.fetch(manifest, file_name)  # exists, and matches its checksum
                checked += 1
    assert store.manifest_at("feature_samples", str(cell), first.data_version) == first
    assert checked > 40
    materialize(instance, config_path, {"feature_samples"}, cell)  # back to the fixture's version
    assert store.require("feature_samples", str(cell)) == first


def test_bad_input_is_refused_by_name(graph, tmp_path):
    instance, config_path, store, directory = graph
    # A feature range beyond the dictionary's 64 features.
    instance.add_dynamic_partitions("feature_ranges", ["features-00060-00071"])
    try:
        with pytest.raises(Exception, match="features-00060-00071.*outside dictionary"):
            materialize(instance, config_path, {"feature_samples"},
                        dg.MultiPartitionKey({"shard": "shard-0000", "features": "features-00060-00071"}))
    finally:
        instance.delete_dynamic_partition("feature_ranges", "features-00060-00071")
    # A copy of the store, where things can break without harming the fixture.
    copy_root = tmp_path / "copy"
    shutil.copytree(directory / "artifacts", copy_root)
    strict = write_run_config(tmp_path, TINY, {"root": str(copy_root)}, features=FEATURES,
                              sae={"min_loss_recovered": 2.0})
    key = load_config(strict).feature_dictionary.key
    with pytest.raises(DagsterAssetCheckFailedError):
        materialize(instance, strict, {"sae_metrics"}, key)
    with pytest.raises(FeatureInputError, match=r"failed its sae_metrics check\(s\) \['loss_recovered_above_threshold'\]"):
        materialize(instance, strict, {"feature_samples"},
                    dg.MultiPartitionKey({"shard": "shard-0000", "features": "features-00000-00023"}))
    # A missing pass-1 shard: context_windows names it; the old windows stay as they were.
    # (require_passing_checks: false lets the failed dictionary through to get that far.)
    lenient = write_run_config(tmp_path, TINY, {"root": str(copy_root)},
                               features={**FEATURES, "require_passing_checks": False})
    copy_store = build_resources(lenient)["storage"].store()
    before = copy_store.require("context_windows", "features-00000-00023").to_json()
    (copy_root / "context_gather" / "shard-0001" / "manifest.json").unlink()
    with pytest.raises(Exception, match=r"context_gather\[shard-0001\]"):
        materialize(instance, lenient, {"context_windows"}, "features-00000-00023")
    assert copy_store.require("context_windows", "features-00000-00023").to_json() == before


# --- special tokens (special_tokens.exclude, on by default) ----------------------------------

def test_special_tokens_are_kept_out_of_training_statistics_and_evaluation_and_marked_in_context(graph):
    from sae_assets.core.sae import data as sae_data
    from sae_assets.defs.dictionary_assets import training_stream
    from sae_assets.defs.model_assets import load_all_sequences
    from sae_assets.defs.partitions import training_shard_keys

    instance, config_path, store, _ = graph
    cfg = load_config(config_path)
    special = special_ids(store, config_path)
    assert special == (store.require("tokenizer", None).extra["eos_id"],)  # 'auto': the embedded BPE's end-of-text
    ids_of = token_ids_of(store, instance)
    _, every = all_activations(store, instance)
    is_special = np.isin(ids_of(every), special)
    assert 0 < is_special.sum() < len(every) / 10  # documents end in <|endoftext|>
    # Feature statistics: no top example, sample token or shown example is special; n_tokens counts the rest.
    for frange in feature_range_keys(instance):
        merged = read_samples(store, store.require("feature_examples", frange))
        shown = pq.read_table(store.fetch(store.require("feature_examples", frange), "shown.parquet"))
        for table in (merged.top, merged.sample, shown):
            assert table.num_rows > 0 and not np.isin(ids_of(table.column("token_index").to_numpy()), special).any()
        assert merged.n_tokens == int((~is_special).sum())
    # Training: the stream sae_dictionary trains on holds every training row but the special ones, once an epoch.
    for key in dictionary_keys(instance):
        assert store.require("sae_dictionary", key).extra["excluded_token_ids"] == list(special)
        assert store.require("sae_metrics", key).extra["excluded_token_ids"] == list(special)
    manifests = [store.require("shuffled_shards", k) for k in ("bucket-0000", "bucket-0001")]
    shuffled = np.concatenate([open_ipc_table(store.fetch(m, "shuffled.arrow")).column("token_index").to_numpy()
                               for m in manifests])
    held = sae_data.heldout_tokens(shuffled, cfg.tokenizer.context_length, cfg.model.val_fraction, cfg.model.seed)
    wanted = np.sort(shuffled[~held & ~np.isin(ids_of(shuffled), special)])
    assert len(wanted) < (~held).sum()
    stream = training_stream(store, manifests, cfg, special)
    used = np.concatenate([i.numpy() for _, i in itertools.islice(stream.indexed(0), -(-len(wanted) // cfg.sae.batch_size))])
    assert np.array_equal(np.sort(used[:len(wanted)]), wanted)
    with_specials = training_stream(store, manifests, cfg)  # the stream with exclusion off
    used = np.concatenate([i.numpy() for _, i in itertools.islice(with_specials.indexed(0), len(used) // cfg.sae.batch_size)])
    assert np.isin(ids_of(used), special).any()
    # Evaluation: scored over exactly the non-special tokens of the evaluated sequences.
    tokens_ST, first_S, _ = load_all_sequences(store, training_shard_keys(instance, cfg))
    sample = sae_data.evaluation_sample(first_S, cfg)
    for key in dictionary_keys(instance):
        metrics = store.require("sae_metrics", key).extra["metrics"]
        assert metrics["eval_tokens"] == (~np.isin(tokens_ST[sample.eval_S], special)).sum()
        assert metrics["dead_counted_over_tokens"] == (~np.isin(tokens_ST[sample.density_S], special)).sum()
    # The browser's documents list the window positions of special tokens, never an example's centre.
    marked = 0
    for frange in feature_range_keys(instance):
        windows = pq.read_table(store.fetch(store.require("context_windows", frange), "windows.parquet")).to_pylist()
        by_key = {(w["feature"], w["token_index"]): w["token_ids"] for w in windows}
        site = store.require("site_json", frange)
        for name in (n for n in site.files if n.startswith("feature-")):
            doc = json.loads(store.read_bytes(site, name))
            for example in [*doc["top"], *doc["random"], *(e for level in doc["levels"] for e in level["examples"])]:
                window = by_key[(doc["feature"], example["token_index"])]
                assert example.get("special", []) == [p for p, i in enumerate(window) if i in special]
                assert example["center"] not in example.get("special", [])
                marked += len(example.get("special", []))
    assert marked > 0


def test_with_exclusion_off_special_tokens_are_sampled_again(graph, tmp_path):
    instance, config_path, store, directory = graph
    special = special_ids(store, config_path)
    copy_root = tmp_path / "copy"  # the fixture's store stays as it is
    shutil.copytree(directory / "artifacts", copy_root)
    off = write_run_config(tmp_path, TINY, {"root": str(copy_root)}, features=FEATURES,
                           special_tokens={"exclude": False})
    copy_store = build_resources(off)["storage"].store()
    ids_of = token_ids_of(store, instance)
    sampled = []
    for frange in feature_range_keys(instance):
        cell = dg.MultiPartitionKey({"shard": "shard-0000", "features": frange})
        materialize(instance, off, {"feature_samples"}, cell)
        samples = read_samples(copy_store, copy_store.require("feature_samples", str(cell)))
        assert samples.n_tokens == copy_store.require("cached_activations", "shard-0000").total_rows
        sampled += [samples.top.column("token_index").to_numpy(), samples.sample.column("token_index").to_numpy()]
    assert np.isin(ids_of(np.concatenate(sampled)), special).any()
