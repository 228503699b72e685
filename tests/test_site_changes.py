"""What changed since the last site build, and each feature page's lineage.

The core (`sae_assets.core.features.changes`) on hand-made manifests: changed, added and
removed feature documents by their hashes, and every kind of reason. Then `site_lineage` on a
real artifact store: two commits of a range's site_json (a retrained dictionary and a new data
shard between them), the previous build naming the first; the change list names exactly the
features whose documents differ and both reasons, and a feature page's lineage names the
dictionary version, the shards and when. In Chromium, the #changes page and the lineage line
render it as text.
"""

import json

import pytest

from resources.storage import ArtifactStore, LocalBackend
from sae_assets.core.features import changes
from sae_assets.core.features.site_index import SiteRange
from sae_assets.defs import site_files

RANGE = "features-00000-00003"


def test_changed_added_and_removed_documents_by_hash():
    old = {"feature-000000.json": "a", "feature-000001.json": "b", "feature-000002.json": "c", "index-rows.json": "x"}
    new = {"feature-000000.json": "a", "feature-000001.json": "B", "feature-000003.json": "d", "index-rows.json": "y"}
    entry = changes.range_changes(RANGE, old, new, ["why"])
    assert (entry["changed"], entry["added"], entry["removed"]) == ([1], [3], [2])
    assert entry["counts"] == {"changed": 1, "added": 1, "removed": 1} and entry["reasons"] == ["why"]
    capped = changes.range_changes(RANGE, {f"feature-{i:06d}.json": "a" for i in range(50)},
                                   {f"feature-{i:06d}.json": "b" for i in range(50)}, [], max_listed=10)
    assert capped["changed"] == list(range(10)) and capped["counts"]["changed"] == 50
    fresh = changes.range_changes(RANGE, None, new, ["a new feature range"])
    assert fresh["added"] == [0, 1, 3] and fresh["changed"] == []


def test_reasons_name_what_changed():
    base = {"upstream": {"sae_dictionary[relu-w8]": "d1", "feature_examples[r]": "e1", "language_model": "m1",
                         "context_windows[r]": "w1"}, "config_hash": "c1", "code_version": "3"}
    same = changes.change_reasons(base, base)
    assert same == ["unchanged inputs (a rebuild)"]
    retrained = {**base, "upstream": {**base["upstream"], "sae_dictionary[relu-w8]": "d2"}}
    assert changes.change_reasons(base, retrained) == ["the dictionary was retrained"]
    code = {**base, "code_version": "4", "config_hash": "c2"}
    assert changes.change_reasons(base, code) == ["new site_json code (version 3 \u2192 4)",
                                                  "a config change (a key that shapes the feature pages)"]
    more_data = {**base, "upstream": {**base["upstream"], "feature_examples[r]": "e2"}}
    old_cells = {"feature_samples[features-0-7|shard-00000]": "s0", "feature_samples[features-0-7|shard-00001]": "s1"}
    new_cells = {**old_cells, "feature_samples[features-0-7|shard-00001]": "s1b",
                 "feature_samples[features-0-7|shard-00002]": "s2"}
    assert changes.change_reasons(base, more_data, examples_upstream=(old_cells, new_cells)) == [
        "new data: shard-00002 (1 shard)", "recomputed: shard-00001 (1 shard)"]
    assert changes.change_reasons(base, more_data) == ["the examples changed"]
    ten = {"feature_samples[features-0-7|shard-00010]": "t"}  # shard-00010 is not shard-0001 recomputed
    assert changes.change_reasons(base, more_data, examples_upstream=({**old_cells, **ten}, {**old_cells, **ten,
                                  "feature_samples[features-0-7|shard-00010]": "t2"})) == [
        "recomputed: shard-00010 (1 shard)"]
    assert changes.describe_shards([f"shard-{i:05d}" for i in range(16)]) == "shard-00000 \u2026 shard-00015 (16 shards)"


def _commit(store, asset, partition, files: dict[str, str], upstream, code="3"):
    with store.writer(asset, partition, config_hash="c", code_version=code, upstream=upstream) as out:
        for name, text in files.items():
            out.path(name).write_text(text)
    return out.manifest


@pytest.fixture()
def two_builds(tmp_path):
    """A store with a range's site_json committed twice, the second after a retrained dictionary
    and a new shard; the first build's feature_site manifest names the first commit."""
    store = ArtifactStore(LocalBackend(tmp_path / "store"))
    cells = {f"feature_samples[{RANGE}|shard-00000]": "s0"}
    ex1 = _commit(store, "feature_examples", RANGE, {"shown.parquet": "1"}, cells)
    docs1 = {f"feature-{i:06d}.json": json.dumps({"feature": i, "v": 1}) for i in range(4)}
    sj1 = _commit(store, "site_json", RANGE, {**docs1, "index-rows.json": "[]"},
                  {"sae_dictionary[relu-w8]": "d1", f"feature_examples[{RANGE}]": ex1.data_version})
    previous = _commit(store, "feature_site", None, {"index.html": "x"}, {f"site_json[{RANGE}]": sj1.data_version})
    ex2 = _commit(store, "feature_examples", RANGE, {"shown.parquet": "2"},
                  {**cells, f"feature_samples[{RANGE}|shard-00001]": "s1"})
    docs2 = {**docs1, "feature-000002.json": json.dumps({"feature": 2, "v": 2})}
    sj2 = _commit(store, "site_json", RANGE, {**docs2, "index-rows.json": "[]"},
                  {"sae_dictionary[relu-w8]": "d2", f"feature_examples[{RANGE}]": ex2.data_version})
    return store, previous, sj2


def test_site_lineage_lists_changed_pages_and_why(two_builds):
    store, previous, current = two_builds
    basis = site_files.changes_basis(previous, [current])
    assert basis == {f"site_json[{RANGE}]": previous.upstream[f"site_json[{RANGE}]"]}
    lineages, listed = site_files.site_lineage(store, [current], basis)
    assert listed["previous_build"] is not None
    [entry] = listed["ranges"]
    assert entry["changed"] == [2] and entry["added"] == entry["removed"] == [] and listed["changed_features"] == 1
    assert entry["reasons"] == ["new data: shard-00001 (1 shard)", "the dictionary was retrained"]
    lineage = lineages[RANGE]
    assert lineage["dictionary"] == "relu-w8" and lineage["dictionary_version"] == "d2"
    assert lineage["shards"] == "shard-00000, shard-00001 (2 shards)" and lineage["shard_count"] == 2
    assert lineage["site_json_version"] == current.data_version and lineage["computed"].endswith("UTC")
    # A rebuild with nothing changed lists the same changes, against the same basis (same bytes)
    with store.writer("feature_site", None, upstream={f"site_json[{RANGE}]": current.data_version}) as out:
        out.path("index.html").write_text("y")
        out.extra["changes_basis"] = basis
    assert site_files.changes_basis(out.manifest, [current]) == basis
    assert site_files.site_lineage(store, [current], basis)[1] == listed
    # A range the last build showed keeps the time it showed, though a rerun re-put its history copy
    shown = {RANGE: {**lineage, "computed": "2020-01-01 00:00 UTC"}}
    assert site_files.site_lineage(store, [current], basis, shown)[0][RANGE]["computed"] == "2020-01-01 00:00 UTC"
    older = {RANGE: {**lineage, "site_json_version": "0" * 24, "computed": "2020-01-01 00:00 UTC"}}
    assert site_files.site_lineage(store, [current], basis, older)[0][RANGE]["computed"] == lineage["computed"]
    assert site_files.site_lineage(store, [current], None)[1] == {"previous_build": None, "ranges": [],
                                                                  "changed_features": 0}


def test_changes_page_and_lineage_in_headless_chromium(two_builds, tmp_path):
    from browser import headless_chromium, require_chromium

    require_chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    store, previous, current = two_builds
    lineages, listed = site_files.site_lineage(store, [current], site_files.changes_basis(previous, [current]))
    payload = '<img src=x onerror="window.__pwned=1">'
    listed["ranges"][0]["reasons"].append(payload)  # a reason is text, whatever it holds
    doc = {"feature": 2, "density": 0.1, "count": 5, "max": 1.0, "mean": 0.5, "histogram": [1, 0], "top": [],
           "random": [], "levels": [], "logits": {"top": [], "bottom": []}}
    part = SiteRange([[2, 0.1, 1.0, ["a"]]], [(2, json.dumps(doc))], 50, [0.1, 1.0, 2.0], lineages[RANGE])
    site = tmp_path / "site"
    site.mkdir()
    site_files.write_site_files(lambda name: site / name, [part], dictionary="relu-w8", changes=listed)
    driver = headless_chromium(tmp_path / "profile", "1200,900")
    try:
        driver.get((site / "index.html").as_uri() + "#changes")
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-changes") == "ready")
        reasons = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#changes-view .reason")]
        assert reasons == ["new data: shard-00001 (1 shard)", "the dictionary was retrained", payload]
        links = driver.find_elements(By.CSS_SELECTOR, "#changes-view .ids.changed a")
        assert [a.text for a in links] == ["2"] and links[0].get_attribute("href").endswith("#feature=2")
        assert driver.execute_script("return window.__pwned") is None
        links[0].click()
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "2")
        line = driver.find_element(By.ID, "lineage").text
        assert "relu-w8" in line and "shard-00000, shard-00001 (2 shards)" in line and "UTC" in line
    finally:
        driver.quit()
