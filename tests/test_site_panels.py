"""The feature page's weight panels, the dictionary overview page and the Neuronpedia bulk-import export.

Each panel number against a brute force on a tiny dictionary: the logit histogram against
numpy's histogram of the dense (W, V) product, nearest features against a dense cosine matrix
(several ranges, blocks smaller than a range), neuron alignment against an argsort, co-firing
features against a dense encode of every token of two shards. The export's
files are checked for their schema (field names and types, gzip, one line per feature or
activation). A synthetic site in headless Chromium shows every panel, with payload tokens and
a payload in a panel's cell rendered as text; screenshots go to test-artifacts/. The overview
page's numbers against numpy on the densities, and the page in Chromium against its document.
"""

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from support import HOOK, SHARD_WIDTH, shard_table

from sae_assets.core.features import cofiring as feature_cofiring
from sae_assets.core.features import neuronpedia, overview, panels, site_data
from sae_assets.core.features import windows as feature_windows
from sae_assets.core.features.merge import merge_feature_samples
from sae_assets.core.features.sampling import sample_activation_table
from sae_assets.core.features.site_index import SiteRange
from sae_assets.core.sae.relu import ReluSae
from sae_assets.core.sae.topk import TopKSae
from sae_assets.defs import site_files

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PAYLOADS = ['<script>window.__pwned = "script";</script>', '<img src=x onerror="window.__pwned=\'img\'">']
F, D, V = 37, 8, 53
SHARES = [0.4, 0.25, 0.15, 0.1, 0.05, 0.025, 0.0125, 0.0075, 0.004, 0.001]
"""A document's shares of its 10 activation intervals, lowest first; those of intervals 8-10 exact."""


@pytest.fixture(scope="module")
def weights():
    gen = torch.Generator().manual_seed(0)
    W_dec = torch.randn(F, D, generator=gen)
    W_dec[5] = 0  # a dead decoder row: cosine 0 with everything
    return W_dec, torch.randn(D, V, generator=gen)


def test_logit_histogram_matches_numpy(weights):
    W_dec, W_U = weights
    effects = panels.logit_effects(W_dec[3:20], W_U, 4, bins=40)
    dense = (W_dec[3:20] @ W_U).numpy()
    assert effects.hist_counts.shape == (17, 40) and effects.hist_edges.shape == (17, 41)
    assert (effects.hist_counts.sum(axis=1) == V).all()
    for w in range(17):
        if w + 3 == 5:  # the dead row: every effect 0, all in the first bin of 0..1
            assert effects.hist_counts[w, 0] == V and list(effects.hist_edges[w, [0, -1]]) == [0, 1]
            continue
        assert effects.hist_edges[w, 0] == pytest.approx(dense[w].min()) and effects.hist_edges[w, -1] == pytest.approx(
            dense[w].max())
        expected, _ = np.histogram(dense[w], bins=effects.hist_edges[w].astype(np.float64))
        assert np.abs(effects.hist_counts[w] - expected).sum() <= 2  # a value on an edge may fall either side
        assert list(effects.top_ids[w]) == list(np.argsort(-dense[w])[:4])
    counts, edges = panels.row_histograms(torch.zeros(2, 9), 4)  # a constant row: all in the first bin
    assert counts.tolist() == [[9, 0, 0, 0]] * 2 and edges[0, 0] == 0


@pytest.mark.parametrize(("lo", "hi", "block"), [(0, 12, 5), (12, 30, 7), (30, 37, 100), (0, 37, 1)])
def test_nearest_features_match_a_dense_cosine_matrix(weights, lo, hi, block):
    W_dec, _ = weights
    unit = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (unit @ unit.T).numpy()
    np.fill_diagonal(cos, -np.inf)
    ids, values = panels.nearest_features(W_dec, lo, hi, k=10, block=block)
    assert ids.shape == values.shape == (hi - lo, 10)
    for w, f in enumerate(range(lo, hi)):
        expected = np.argsort(-cos[f], kind="stable")[:10]
        assert f not in ids[w]
        np.testing.assert_allclose(values[w], cos[f][expected], atol=1e-5)
        if f != 5:  # the dead row ties every cosine at 0: any order is right
            assert list(ids[w]) == list(expected)


def test_neuron_alignment_matches_argsort(weights):
    W_dec, _ = weights
    idx, vals, l1 = panels.neuron_alignment(W_dec[:9], k=5)
    w = W_dec[:9].numpy()
    assert (vals[5] == 0).all() and (l1[5] == 0).all()  # the dead row: no dimension holds any weight
    for r in [r for r in range(9) if r != 5]:
        expected = np.argsort(-np.abs(w[r]), kind="stable")[:5]
        assert list(idx[r]) == list(expected)
        np.testing.assert_allclose(vals[r], w[r][expected], rtol=1e-6)
        np.testing.assert_allclose(l1[r], np.abs(w[r][expected]) / np.abs(w[r]).sum(), rtol=1e-5)
        assert list(l1[r]) == sorted(l1[r], reverse=True)


@pytest.mark.parametrize("kind", ["relu", "topk"])
def test_cofiring_matches_a_dense_encode(kind):
    torch.manual_seed(0)
    n_features, lo, hi = 14, 3, 10
    sae = ReluSae(SHARD_WIDTH, n_features, l1_coefficient=1.0) if kind == "relu" else TopKSae(SHARD_WIDTH, n_features, k=4)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    tables = [shard_table(0, 5, 1), shard_table(1, 4, 2)]
    merged = merge_feature_samples([sample_activation_table(
        t, hook=HOOK, encode_range=lambda x: sae.encode_range(x, lo, hi), lo=lo, hi=hi, top_k=4, sample_k=8, seed=3,
        batch_size=7) for t in tables])
    shown = feature_windows.select_shown_examples(merged, random_examples=2, activation_levels=2, examples_per_level=1)
    parts = [feature_cofiring.gather_cofiring(shown, t, lambda x: sae.encode_range(x, lo, hi), shard=s, hook=HOOK,
                                              batch_size=5, lo=lo, where=f"shard {s}")
             for s, t in enumerate(tables)]
    table = feature_cofiring.assemble_cofiring(shown, parts, where="test")
    got = feature_cofiring.cofiring_features(shown, table, lo, hi, k=5)
    dense = {}  # brute force: every token of every shard through the whole dictionary, read within the range
    for t in tables:
        x = torch.from_numpy(np.asarray(t.column(HOOK).combine_chunks().flatten()).reshape(-1, SHARD_WIDTH).copy())
        dense.update(zip(t.column("token_index").to_pylist(), sae.encode(x).detach().numpy()))
    top = [r for r in shown.to_pylist() if r["role"] == "top"]
    assert any(got)
    for w, f in enumerate(range(lo, hi)):
        tokens = [r["token_index"] for r in top if r["feature"] == f]
        share = {g: np.mean([dense[t][g] > 0 for t in tokens]) for g in range(lo, hi) if g != f} if tokens else {}
        expected = sorted(((g, v) for g, v in share.items() if v > 0), key=lambda gv: (-gv[1], gv[0]))[:5]
        assert [g for g, _ in got[w]] == [g for g, _ in expected]
        assert [v for _, v in got[w]] == pytest.approx([v for _, v in expected])
    with pytest.raises(feature_cofiring.CofiringError, match="rematerialize context_gather"):
        feature_cofiring.assemble_cofiring(shown, parts[:1], where="test")


def _doc(feature: int, weights) -> dict:
    """A feature document as site_json writes it, with payload tokens in examples and logits."""
    W_dec, W_U = weights
    lo, hi = feature, feature + 1
    effects = panels.logit_effects(W_dec[lo:hi], W_U, 3)
    ids, cos = panels.nearest_features(W_dec, lo, hi)
    idx, vals, l1 = panels.neuron_alignment(W_dec[lo:hi])
    tokens = ["a", PAYLOADS[0], " b", PAYLOADS[1], "\n"]
    example = {"token_index": 7, "activation": 2.0, "center": 1, "tokens": tokens, "acts": [0, 2.0, 0.5, 0, 0]}
    return {
        "feature": feature, "dictionary": "tiny", "count": 5, "density": 0.1, "max": 2.0, "mean": 1.0,
        "histogram": [0, 1, 3, 1], "top": [example], "random": [example],
        "levels": [{"level": i, "low": 0.2 * (i - 1), "high": 0.2 * i, "share": SHARES[i - 1], "exact": i > 7,
                    "examples": [{**example, "level": i}] if i == 10 else []} for i in range(10, 0, -1)],
        "logits": {"top": [[PAYLOADS[0], 1.5]], "bottom": [[PAYLOADS[1], -1.5]]},
        "logit_histogram": {"counts": effects.hist_counts[0].tolist(), "edges": effects.hist_edges[0].tolist()},
        "neighbours": [[int(i), float(c)] for i, c in zip(ids[0], cos[0])],
        "neuron_alignment": [[int(i), float(v), float(s)] for i, v, s in zip(idx[0], vals[0], l1[0])],
        "cofiring": [[int(i), 1.0 / (n + 1)] for n, i in enumerate(ids[0][:4])],
    }


def test_neuronpedia_feature_fills_the_panel_fields(weights):
    doc = _doc(2, weights)
    exported = neuronpedia.neuronpedia_feature(doc, [0.1, 0.5, 1.0, 2.0, 4.0])
    assert exported["logits_hist_data_bar_heights"] == doc["logit_histogram"]["counts"]
    assert len(exported["logits_hist_data_bar_values"]) == 40 and sum(exported["logits_hist_data_bar_heights"]) == V
    edges = doc["logit_histogram"]["edges"]
    assert edges[0] < exported["logits_hist_data_bar_values"][0] < edges[1]
    assert exported["neuron_alignment_indices"] == [a[0] for a in doc["neuron_alignment"]]
    assert exported["topk_cos_sim_indices"] == [n[0] for n in doc["neighbours"]]


FEATURE_FIELDS = {
    "modelId": str, "layer": str, "index": str, "creatorId": str, "maxActApprox": float, "hasVector": bool,
    "vector": list, "topkCosSimIndices": list, "topkCosSimValues": list, "neuron_alignment_indices": list,
    "neuron_alignment_values": list, "neuron_alignment_l1": list, "correlated_neurons_indices": list,
    "correlated_neurons_pearson": list, "correlated_neurons_l1": list, "correlated_features_indices": list,
    "correlated_features_pearson": list, "correlated_features_l1": list, "neg_str": list, "neg_values": list,
    "pos_str": list, "pos_values": list, "frac_nonzero": float, "freq_hist_data_bar_heights": list,
    "freq_hist_data_bar_values": list, "logits_hist_data_bar_heights": list, "logits_hist_data_bar_values": list,
    "decoder_weights_dist": list, "sourceSetName": str}
ACTIVATION_FIELDS = {
    "id": str, "tokens": list, "index": str, "layer": str, "modelId": str, "maxValue": (int, float),
    "maxValueTokenIndex": int, "minValue": (int, float), "values": list, "creatorId": str,
    "binMin": (int, float), "binMax": (int, float), "binContains": (int, float), "qualifyingTokenIndex": int}
HEADER_FIELDS = {
    "release.jsonl": {"name": str, "description": str, "creatorName": str, "creatorId": str, "visibility": str},
    "model.jsonl": {"id": str, "instruct": bool, "creatorId": str, "displayName": str, "visibility": str},
    "sourceset.jsonl": {"modelId": str, "name": str, "creatorId": str, "hasDashboards": bool, "releaseName": str},
    "source.jsonl": {"id": str, "modelId": str, "setName": str, "creatorId": str, "hasDashboards": bool,
                     "num_prompts": int, "num_tokens_in_prompt": int, "dataset": str}}


def _types_match(row: dict, fields: dict) -> None:
    for name, kind in fields.items():
        assert name in row, name
        assert isinstance(row[name], kind) and not (kind is int and isinstance(row[name], bool)), (name, row[name])


def test_neuronpedia_export_schema(weights, tmp_path):
    docs = {n: [_doc(f, weights) for f in features] for n, features in enumerate([(0, 1, 2), (3, 4)])}
    files = {(n, f"feature-{d['feature']:06d}.json"): json.dumps(d).encode() for n, ds in docs.items() for d in ds}
    parts = [SimpleNamespace(files={name: 0 for (m, name) in files if m == n},
                             extra={"hist_edges": [0.1, 0.5, 1.0, 2.0, 4.0], "n_tokens": 640}, key=n) for n in docs]
    store = SimpleNamespace(read_bytes=lambda manifest, name: files[(manifest.key, name)])
    out = SimpleNamespace(path=lambda name: tmp_path / name, extra={})
    cfg = SimpleNamespace(model=SimpleNamespace(name=""), feature_dictionary=SimpleNamespace(key="relu-0", target_hook=""),
                          feature_hook="blocks.1.hook_resid_post", corpus=SimpleNamespace(hf_name="", source="embedded"),
                          tokenizer=SimpleNamespace(context_length=64))
    assert site_files.write_neuronpedia_export(out, store, parts, cfg) == 5
    assert sorted(out.extra["layout"].values()) == sorted([
        "release.jsonl", "model.jsonl", "sourceset.jsonl", "source.jsonl", "features/batch-0.jsonl.gz",
        "features/batch-1.jsonl.gz", "activations/batch-0.jsonl.gz", "activations/batch-1.jsonl.gz"])
    assert out.extra["directory"] == "sae-assets-embedded/1-relu-0"
    for name, fields in HEADER_FIELDS.items():
        [line] = (tmp_path / name).read_text().splitlines()
        _types_match(json.loads(line), fields)
    assert json.loads((tmp_path / "source.jsonl").read_text())["id"] == "1-relu-0"
    for n, ds in docs.items():
        features = [json.loads(x) for x in gzip.decompress((tmp_path / f"features.batch-{n}.jsonl.gz").read_bytes())
                    .decode().splitlines()]
        activations = [json.loads(x) for x in gzip.decompress(
            (tmp_path / f"activations.batch-{n}.jsonl.gz").read_bytes()).decode().splitlines()]
        assert [r["index"] for r in features] == [str(d["feature"]) for d in ds]  # one line per feature
        assert len(activations) == 3 * len(ds)  # top, random and level examples: one line each
        for row in features:
            _types_match(row, FEATURE_FIELDS)
            assert len(row["topkCosSimIndices"]) == 10 and sum(row["logits_hist_data_bar_heights"]) == V
            assert len(row["neuron_alignment_indices"]) == 5
        for row in activations:
            _types_match(row, ACTIVATION_FIELDS)
            assert row["values"][row["maxValueTokenIndex"]] == row["maxValue"] and row["layer"] == "1-relu-0"
        # An interval example carries its interval and that interval's share (Neuronpedia's "Contains").
        assert [(r["binMin"], r["binMax"], r["binContains"]) for r in activations if r["binMin"] != -1] == \
            [(1.8, 2.0, SHARES[-1])] * len(ds)
        assert len({r["id"] for r in activations}) == len(activations)
    again = tmp_path / "again"
    again.mkdir()
    site_files.write_neuronpedia_export(SimpleNamespace(path=lambda name: again / name, extra={}), store, parts, cfg)
    assert all((again / p.name).read_bytes() == p.read_bytes() for p in tmp_path.iterdir() if p.is_file())


def test_panels_in_headless_chromium(weights, tmp_path):
    from browser import headless_chromium, require_chromium

    require_chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    docs = [_doc(f, weights) for f in range(3)]
    docs[1]["neighbours"][0][0] = PAYLOADS[1]  # a corrupted panel cell is text too
    for key in ("logit_histogram", "neighbours", "cofiring", "neuron_alignment"):
        del docs[2][key]
    site = tmp_path / "site"
    site.mkdir()
    part = SiteRange([site_data.index_row(d) for d in docs], [(d["feature"], json.dumps(d)) for d in docs], 50,
                     [0.1, 0.5, 1.0, 2.0, 4.0])
    site_files.write_site_files(lambda name: site / name, [part], dictionary="tiny")
    driver = headless_chromium(tmp_path / "profile", "1200,1600")
    try:
        for feature in (0, 1):
            driver.get((site / "index.html").as_uri() + f"#feature={feature}")
            WebDriverWait(driver, 20).until(
                lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == str(feature))
            bars = driver.find_elements(By.CSS_SELECTOR, "#logit-histogram svg rect")
            assert 0 < len(bars) <= 40
            rows = driver.find_elements(By.CSS_SELECTOR, "#neighbours tr")[1:]
            assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows] == [str(n[0]) for n in docs[feature]
                                                                                   ["neighbours"]]
            cofiring = driver.find_elements(By.CSS_SELECTOR, "#cofiring tr")[1:]
            assert [r.text.split() for r in cofiring] == [[str(c[0]), f"{100 * c[1]:.0f}%"] for c in docs[feature]
                                                          ["cofiring"]]
            aligned = driver.find_elements(By.CSS_SELECTOR, "#neuron-alignment tr")[1:]
            assert [int(r.find_elements(By.TAG_NAME, "td")[0].text) for r in aligned] == [
                a[0] for a in docs[feature]["neuron_alignment"]]
            assert driver.find_elements(By.CSS_SELECTOR, "#level-examples .example")
            groups = driver.find_elements(By.CSS_SELECTOR, "#level-examples .interval")
            shares = [("" if level["exact"] else "\u2248") + f"{100 * level['share']:.3f}%"
                      for level in docs[feature]["levels"]]
            assert [g.find_element(By.CSS_SELECTOR, ".level-title").text.split(" contains ")[1] for g in groups] == shares
            assert "estimated from the activation histogram" in driver.find_element(By.CSS_SELECTOR, ".share-note").text
            assert PAYLOADS[0] in driver.find_element(By.ID, "feature-view").text
            assert driver.execute_script("return window.__pwned") is None
            assert driver.find_elements(By.CSS_SELECTOR, "#feature-view img, #feature-view script") == []
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "feature_panels.png"))
        driver.get((site / "index.html").as_uri() + "#feature=2")  # a document from before the panels
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "2")
        for panel in ("logit-histogram", "neighbours", "cofiring", "neuron-alignment"):
            assert driver.find_element(By.ID, panel).text.endswith("none")
    finally:
        driver.quit()


def test_overview_density_histogram_curve_and_frontier():
    rng = np.random.default_rng(0)
    density = np.concatenate([10 ** rng.uniform(-6, 0, 500), np.zeros(40), [0.3, 0.5]])
    h = overview.density_histogram(density, bins_per_decade=4, dense_threshold=0.1)
    want, _ = np.histogram(np.log10(density[density > 0]), bins=np.asarray(h["log10_edges"]))
    assert h["counts"] == want.tolist() and sum(h["counts"]) == h["live"] == 502
    assert h["dead"] == 40 and h["dense"] == int((density >= 0.1).sum()) and h["log10_edges"][-1] == 0
    assert h["log10_edges"][0] == np.floor(np.log10(density[density > 0].min()))
    for bad in (np.array([0.1, np.nan]), np.array([-0.1]), np.array([1.5]), np.zeros((2, 2))):
        with pytest.raises(ValueError, match="finite values in \\[0, 1\\]"):
            overview.density_histogram(bad)
    curve = [{"step": i, "loss": 1.0 / (i + 1), "l0": float("nan") if i == 7 else 10.0, "lr": 1e-3} for i in range(1000)]
    thin = overview.thin_curve(curve, 50)
    assert len(thin) <= 50 and thin[0]["step"] == 0 and thin[-1]["step"] == 999 and "lr" not in thin[0]
    assert overview.thin_curve(curve[:10], 50)[7]["l0"] is None  # NaN is not JSON
    points = overview.frontier_points({"a": {"l0": 5.0, "loss_recovered": 0.9, "loss_recovered_vs_mean": 0.7},
                                       "b": None, "c": {"l0": 50.0, "loss_recovered_vs_mean": float("inf")}}, "c")
    assert [(p["point"], p["current"]) for p in points] == [("a", False), ("c", True)]
    assert points[1]["loss_recovered_vs_mean"] is None and points[1]["loss_recovered"] is None


def test_overview_page_in_headless_chromium(weights, tmp_path):
    from browser import headless_chromium, require_chromium

    require_chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    docs = [_doc(f, weights) for f in range(3)]
    rows = [site_data.index_row(d) for d in docs]
    rows[2][1] = 0.0  # a dead feature
    part = SiteRange(rows, [(d["feature"], json.dumps(d)) for d in docs], 50, [0.1, 0.5, 1.0, 2.0, 4.0])
    curve = [{"step": 50 * i, "loss": 3.0 / (i + 1), "mse": 2.0 / (i + 1), "l0": 40.0 - i, "dead_fraction": 0.01 * i}
             for i in range(30)]
    metrics = {"tiny": {"l0": 12.5, "loss_recovered": 0.93, "loss_recovered_vs_mean": 0.81, "fvu": 0.2},
               PAYLOADS[0]: {"l0": 40.0, "loss_recovered": 0.97, "loss_recovered_vs_mean": 0.9},
               "unscored": None}
    seen = {}

    def make_overview(density_F, n_tokens):
        seen["density"] = density_F
        return overview.dictionary_overview(density_F, dictionary="tiny", n_tokens=n_tokens, metrics=metrics["tiny"],
                                            curve=curve, metrics_by_point=metrics)

    site = tmp_path / "site"
    site.mkdir()
    site_files.write_site_files(lambda name: site / name, [part], dictionary="tiny", overview=make_overview)
    assert list(seen["density"]) == [r[1] for r in rows]  # every feature's density, in order
    doc = json.loads((site / site_files.OVERVIEW_FILE).read_text()[len("SAE_OVERVIEW.data("):-len(");\n")])
    driver = headless_chromium(tmp_path / "profile", "1200,1600")
    try:
        driver.get((site / "index.html").as_uri() + "#overview")
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-overview") == "ready")
        assert not driver.find_element(By.ID, "overview-view").get_attribute("hidden")
        assert driver.find_element(By.ID, "list-view").get_attribute("hidden")
        bars = driver.find_elements(By.CSS_SELECTOR, "#overview-view svg.density rect")
        assert len(bars) == sum(1 for c in doc["density"]["counts"] if c) > 0
        stats = driver.find_element(By.CSS_SELECTOR, "#overview-view .stats").text
        assert "dead 1" in stats and "L0 12.5" in stats and "vs mean ablation 0.810" in stats
        for cls in ("loss", "l0", "dead"):
            points = driver.find_element(By.CSS_SELECTOR, f"svg.curve.{cls} polyline").get_attribute("points").split()
            assert len(points) == len(curve)
        dots = driver.find_elements(By.CSS_SELECTOR, "svg.frontier circle")
        assert len(dots) == 2 and len(driver.find_elements(By.CSS_SELECTOR, "svg.frontier circle.current")) == 1
        table = [r.find_elements(By.TAG_NAME, "td")[0].text for r in driver.find_elements(By.CSS_SELECTOR, ".frontier-table tbody tr")]
        assert table == ["tiny", PAYLOADS[0]]  # the payload key is text; the unscored point is left out
        assert driver.execute_script("return window.__pwned") is None
        assert driver.find_elements(By.CSS_SELECTOR, "#overview-view img, #overview-view script") == []
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "dictionary_overview.png"))
        driver.execute_script("location.hash = 'feature=0'")  # and back to a feature page
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "0")
        assert driver.find_element(By.ID, "overview-view").get_attribute("hidden")
    finally:
        driver.quit()
