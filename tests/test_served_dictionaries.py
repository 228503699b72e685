"""Every dictionary of the sweep in one site (features.dictionaries): each served dictionary has
feature assets of its own (`<asset>__<slug>`, feature-range partitions of its own), the site has
one page per dictionary behind a picker, and each feature page names the closest feature of
every other served dictionary (feature_matches: the highest decoder cosine, checked here against
the full cosine matrix). Adding a sweep point runs that point's cells, the new matches and the
site, and nothing already built for the other points (the demo's keep_fresh evaluation, which
requests exactly what Dagster sees as missing or stale)."""

import json

import dagster as dg
import numpy as np
import pytest
from support import FEATURES, SWEEP, TINY, stale_cells, write_run_config

from resources.manifest import CorruptArtifactError
from sae_assets.core.config import ConfigError, dictionary_slug, load_config
from sae_assets.defs.dictionary_assets import load_dictionary
from sae_assets.defs.feature_assets import FeatureInputError, matches_for_pages, pages_dictionary_version, read_matches
from sae_assets.defs.map_assets import read_feature_map
from sae_assets.defs.partitions import feature_partitions, feature_range_keys, sync_partitions
from sae_assets.defs.site_files import feature_script_arguments
from sae_assets.definitions import build_resources, graph_assets
from sae_assets.demo import materialize_stale

FIRST, SECOND = "relu-w64-l1_0.3", "topk-w64-k4"
ADDED = {"architecture": "relu", "width": 32, "sparsity": 0.3}
ADDED_KEY = "relu-w32-l1_0.3"
PER_DICTIONARY = ("feature_samples", "feature_examples", "context_gather", "context_windows", "site_json",
                  "feature_matches")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    directory = tmp_path_factory.mktemp("served")
    storage = {"root": str(directory / "artifacts")}
    config_path = write_run_config(directory, TINY, storage, features={**FEATURES, "dictionaries": "all"})
    instance = dg.DagsterInstance.ephemeral()
    materialize_stale(instance, config_path, cursor_path=directory / "cursor", log=lambda *_: None)
    return directory, storage, config_path, instance, build_resources(config_path)["storage"].store()


def site_files(store):
    manifest = store.require("feature_site", None)
    return manifest, store.fetch(manifest, "index.html").parent


def script_value(text: str, prefix: str):
    assert text.startswith(prefix) and text.rstrip().endswith(";")
    return json.loads(text[len(prefix):].rstrip().rstrip(";"))


def brute_closest(W_A: np.ndarray, W_B: np.ndarray, same: bool) -> tuple[np.ndarray, np.ndarray]:
    unit_A = W_A / np.linalg.norm(W_A, axis=1, keepdims=True)
    unit_B = W_B / np.linalg.norm(W_B, axis=1, keepdims=True)
    cos_AB = unit_A.astype(np.float64) @ unit_B.astype(np.float64).T
    if same:
        np.fill_diagonal(cos_AB, -np.inf)
    return cos_AB.argmax(axis=1), cos_AB.max(axis=1)


def test_each_served_dictionary_has_its_own_assets_and_partitions(served):
    _, _, config_path, instance, store = served
    names = {a.key.to_user_string(): a for a in graph_assets(load_config(config_path))}
    slug = dictionary_slug(SECOND)
    assert slug == "topk_w64_k4"
    for name in PER_DICTIONARY:
        assert name in names and f"{name}__{slug}" in names
    ranges, cells = feature_partitions(slug)
    assert names[f"feature_examples__{slug}"].partitions_def == ranges
    assert names[f"feature_samples__{slug}"].partitions_def == cells
    assert feature_range_keys(instance, ranges) == feature_range_keys(instance)  # equal widths, own definitions
    # Each dictionary's cells read that dictionary alone.
    cell = str(dg.MultiPartitionKey({"shard": "shard-0000", "features": "features-00000-00023"}))
    first, second = store.require("feature_samples", cell), store.require(f"feature_samples__{slug}", cell)
    assert first.upstream[f"sae_dictionary[{FIRST}]"] and second.upstream[f"sae_dictionary[{SECOND}]"]
    assert f"sae_dictionary[{SECOND}]" not in first.upstream and f"sae_dictionary[{FIRST}]" not in second.upstream


def test_site_pages_picker_and_exact_closest_features(served):
    _, _, _, _, store = served
    manifest, site = site_files(store)
    entries = script_value((site / "site-dictionaries.js").read_text(), "window.SAE_SITE_DICTIONARIES = ")
    assert [(e["key"], e["page"], e["features"]) for e in entries] == [
        (FIRST, "index.html", 64), (SECOND, "topk_w64_k4__index.html", 64)]
    assert manifest.extra["dictionaries"] == [FIRST, SECOND] and manifest.extra["left_out"] == {}
    assert [e["failed_checks"] for e in entries] == [[], []]
    assert 'src="topk_w64_k4__site-meta.js"' in (site / "topk_w64_k4__index.html").read_text()
    meta = script_value((site / "topk_w64_k4__site-meta.js").read_text(), "window.SAE_SITE_META = ")
    assert (meta["dictionary"], meta["prefix"], meta["features"]) == (SECOND, "topk_w64_k4__", 64)
    decoders = {key: load_dictionary(store, key)[0].W_dec.detach().numpy() for key in (FIRST, SECOND)}
    for position, (key, prefix) in enumerate(((FIRST, ""), (SECOND, "topk_w64_k4__"))):
        other_position = 1 - position
        other = (FIRST, SECOND)[other_position]
        ids, cosines = brute_closest(decoders[key], decoders[other], same=False)
        # The overview: how much of this dictionary the other found.
        text = (site / f"{prefix}dictionary-overview.js").read_text()
        assert text.startswith("SAE_OVERVIEW.data(") and text.endswith(");\n")
        [agreement] = json.loads(text[len("SAE_OVERVIEW.data("):-len(");\n")])["agreement"]
        assert agreement["position"] == other_position
        assert agreement["mean"] == pytest.approx(cosines.mean(), abs=1e-4)
        assert agreement["share_at_least"] == {f"{c:g}": pytest.approx((cosines >= c).mean(), abs=1e-4)
                                               for c in (0.9, 0.7, 0.5)}
        for feature in range(64):
            doc, lineage, closest = feature_script_arguments((site / f"{prefix}feature-{feature:06d}.js").read_text())
            assert doc["feature"] == feature and lineage["dictionary"] == key
            [[shown_position, match, cosine]] = closest
            assert shown_position == other_position
            assert cosine == pytest.approx(cosines[feature], abs=1e-4)
            # The id is the argmax, or one whose cosine ties it within float32 rounding.
            assert match == ids[feature] or brute_closest(decoders[key][[feature]], decoders[other][[match]],
                                                          False)[1][0] == pytest.approx(cosines[feature], abs=1e-5)


def test_matches_cells_and_files_are_checked(served):
    _, _, _, _, store = served
    decoders = {key: load_dictionary(store, key)[0].W_dec.detach().numpy() for key in (FIRST, SECOND)}
    (ids, cosines), versions = read_matches(store, "feature_matches__topk_w64_k4", FIRST)
    want_ids, want_cosines = brute_closest(decoders[SECOND], decoders[FIRST], same=False)
    np.testing.assert_allclose(cosines, want_cosines, atol=1e-5)
    assert (ids == want_ids).mean() > 0.95
    assert list(versions) == [f"feature_matches__topk_w64_k4[{FIRST}]"]
    # The dictionary itself is not compared again: its nearest features are site_json's.
    itself = store.require("feature_matches", FIRST)
    assert "itself" in itself.extra["not_compared"] and itself.files["matches.parquet"].rows == 0
    assert read_matches(store, "feature_matches", FIRST)[0] is None
    # A truncated or overwritten file: the error names the partition.
    manifest = store.require("feature_matches", SECOND)
    path = store.fetch(manifest, "matches.parquet")
    good = path.read_bytes()
    path.chmod(0o644)
    try:
        for bad in (good[: len(good) // 2], good[:8] + bytes(len(good) - 16) + good[-8:]):
            path.write_bytes(bad)
            with pytest.raises((ValueError, CorruptArtifactError), match=r"feature_matches\[topk-w64-k4\]"):
                read_matches(store, "feature_matches", SECOND)
    finally:
        path.write_bytes(good)


class EditedStore:
    """The store, with one manifest replaced by an edited copy."""

    def __init__(self, store, asset: str, partition: str, edit):
        self.store, self.which = store, (asset, partition)
        original = store.require(asset, partition)
        self.edited = type(original).from_json(original.to_json(), where="test")
        edit(self.edited)

    def require(self, asset, partition):
        return self.edited if (asset, partition) == self.which else self.store.require(asset, partition)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_matches_of_another_dictionary_version_are_left_out_of_the_pages(served):
    _, _, _, _, store = served
    shown = {key: store.require("sae_dictionary", key).data_version for key in (FIRST, SECOND)}
    found, versions, why = matches_for_pages(store, "feature_matches", FIRST, SECOND, shown)
    assert why is None and found[0].shape == (64,) and versions
    # SECOND retrained and its pages redone, the matches not yet: left out, saying why.
    retrained = {**shown, SECOND: "f" * 24}
    assert matches_for_pages(store, "feature_matches", FIRST, SECOND, retrained) == (
        None, {}, f"built from another version of sae_dictionary[{SECOND}]")
    # So is a feature map of another version.
    assert read_feature_map(store, SECOND, shown_version=retrained[SECOND]) == (None, {})
    layout, map_versions = read_feature_map(store, SECOND, shown_version=shown[SECOND])
    assert layout is not None and list(map_versions) == [f"feature_map[{SECOND}]"]
    # Pages of one dictionary built from two versions of it are refused, by partition.
    parts = [store.require("site_json", r) for r in ("features-00000-00023", "features-00024-00047")]
    edited = type(parts[1]).from_json(parts[1].to_json(), where="test")
    edited.upstream[f"sae_dictionary[{FIRST}]"] = "0" * 24
    assert pages_dictionary_version(parts, "site_json", FIRST) == shown[FIRST]
    with pytest.raises(FeatureInputError, match=r"site_json partitions were built from different versions.*features-00024"):
        pages_dictionary_version([parts[0], edited], "site_json", FIRST)


def test_served_dictionaries_config_errors():
    with pytest.raises(ConfigError, match=r"features.dictionaries\[1\]"):
        load_config(overrides={"sae": {"sweep": SWEEP}, "features": {"dictionaries": [SECOND, "relu-w99-l1_1"]}})
    config = load_config(overrides={"sae": {"sweep": SWEEP}, "features": {"dictionary": SECOND, "dictionaries": "all"}})
    assert [p.key for p in config.browsed_dictionaries] == [SECOND, FIRST]  # the opened one first
    assert config.browsing(FIRST).feature_dictionary.key == FIRST
    long_a, long_b = ("relu-w1024-l1_5-in-blocks.1.ln2.hook_normalized-out-blocks.1.hook_mlp_out",
                      "relu-w1024-l1_5-in-blocks.1.ln2.hook_normalized-out-blocks.2.hook_mlp_out")
    assert len(dictionary_slug(long_a)) <= 40 and dictionary_slug(long_a) != dictionary_slug(long_b)


def test_a_retrained_dictionary_waits_for_its_metrics_and_only_the_opened_one_needs_passing_checks(served):
    from sae_assets.defs.feature_assets import browsed_dictionary

    _, _, config_path, _, store = served
    config = load_config(config_path)

    def rescored_elsewhere(manifest):
        manifest.upstream[f"sae_dictionary[{SECOND}]"] = "0" * 24

    with pytest.raises(FeatureInputError, match=r"sae_metrics\[topk-w64-k4\] scored sae_dictionary\[topk-w64-k4\]"):
        browsed_dictionary(EditedStore(store, "sae_metrics", SECOND, rescored_elsewhere), config.browsing(SECOND), "cpu")
    assert browsed_dictionary(store, config.browsing(SECOND), "cpu")[0].width == 64

    def failed(manifest):
        manifest.extra["checks"] = {**manifest.extra["checks"], "dead_fraction_below_threshold": False}

    failing = EditedStore(store, "sae_metrics", SECOND, failed)
    with pytest.raises(FeatureInputError, match=r"failed its sae_metrics check\(s\) \['dead_fraction_below_threshold'\]"):
        browsed_dictionary(failing, config.browsing(SECOND), "cpu")  # the site would open on it
    assert browsed_dictionary(failing, config.browsing(SECOND), "cpu", opened=False)[0].width == 64  # served


def test_adding_a_sweep_point_runs_only_its_cells(served):
    """Runs last in the module: it grows the shared graph by a third sweep point."""
    directory, storage, _, instance, store = served
    _, site = site_files(store)
    before = {name: store.require(name, "features-00000-00023").data_version
              for name in ("site_json", "site_json__topk_w64_k4")}
    grown = write_run_config(directory, TINY, storage, features={**FEATURES, "dictionaries": "all"},
                             sae={**TINY["sae"], "sweep": [*SWEEP, ADDED]})
    added = dictionary_slug(ADDED_KEY)
    # Dagster's own staleness once the new point's partitions exist: every cell built for the two
    # served dictionaries is fresh; missing are the new point's partitions and cells, stale the site.
    sync_partitions(instance, load_config(grown))
    not_fresh = stale_cells(instance, grown)
    assert not_fresh.pop("feature_site") == "STALE"
    new_cells = {cell for cell in not_fresh if f"[{ADDED_KEY}]" in cell or cell.split("[")[0].endswith(f"__{added}")}
    assert set(not_fresh) == new_cells and set(not_fresh.values()) == {"MISSING"}, not_fresh
    assert {"feature_matches[relu-w32-l1_0.3]", "feature_matches__topk_w64_k4[relu-w32-l1_0.3]",
            f"feature_matches__{added}[{FIRST}]", f"sae_dictionary[{ADDED_KEY}]"} <= new_cells
    report = materialize_stale(instance, grown, cursor_path=directory / "cursor", log=lambda *_: None)
    old_cells = [*PER_DICTIONARY[:-1], *(f"{name}__topk_w64_k4" for name in PER_DICTIONARY[:-1]), "neuronpedia_export"]
    assert not set(report.ran) & set(old_cells), f"cells of the served dictionaries ran again: {report.ran}"
    for name in old_cells:
        assert report.skipped.get(name), name
    # One new partition of each sweep-point asset and of each served dictionary's matches; the
    # new point's own feature assets, every partition; the site.
    assert {report.ran[name] for name in ("sae_dictionary", "sae_metrics", "feature_map", "feature_matches",
                                          "feature_matches__topk_w64_k4")} == {1}
    assert report.ran[f"feature_matches__{added}"] == 3 and report.ran["feature_site"] == 1
    assert report.ran[f"feature_samples__{added}"] == 4  # 2 shards x 2 ranges of its 32 features
    assert before == {name: store.require(name, "features-00000-00023").data_version for name in before}
    entries = script_value((site_files(store)[1] / "site-dictionaries.js").read_text(), "window.SAE_SITE_DICTIONARIES = ")
    assert [e["key"] for e in entries] == [FIRST, SECOND, ADDED_KEY]
    _, site = site_files(store)
    _, _, closest = feature_script_arguments((site / "feature-000005.js").read_text())
    assert [c[0] for c in closest] == [1, 2]
    assert max(c[1] for c in closest if c[0] == 2) < 32
