"""The feature map: a seeded 2-D layout of the decoder directions and the #map page that draws it.

The layout against its contracts: two runs (and a torch tensor against its numpy copy) give
the same bytes; every feature gets a point on the grid; directions drawn from a few well-separated
clusters come out as those clusters (each point's nearest neighbour on the map is of its own
cluster); the projection on the top singular vectors equals numpy's SVD; a dictionary with too
few features for UMAP gets its first two principal components, and says so; non-finite rows are
refused. The density codes against the densities (round trip within half a code, never-fired
features coded 0), and the packed points back from their base64. A synthetic site in headless
Chromium (file://, a payload for the dictionary's name): the map draws every point, each
isolated point in the colour its density gives on the palette, a hover shows the feature's id and
density as text, and a click opens the feature's page; the screenshot goes to test-artifacts/.
The asset on the tiny graph is checked in tests/test_feature_assets.py, the map of the XSS
corpus's site in tests/test_feature_browser.py, the map of 100,000 features in tests/test_site_scale.py.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_assets.core.features import feature_map
from sae_assets.core.features.site_synthetic import synthetic_ranges
from sae_assets.defs import site_files

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PAYLOAD = '<img src=x onerror="window.__pwned=\'map\'">'


def clustered_directions(n_clusters: int, per_cluster: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(F, d) float32 rows around `n_clusters` random unit centres (cosine ~0.97 within, ~0 across), and each row's cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_clusters), per_cluster)
    rows = centres[labels] + 0.25 / math.sqrt(d) * rng.standard_normal((len(labels), d))
    scale = rng.uniform(0.1, 3.0, (len(labels), 1))  # decoder norms vary; the map is of directions
    order = rng.permutation(len(labels))
    return (rows * scale)[order].astype(np.float32), labels[order]


@pytest.fixture(scope="module")
def clusters():
    W, labels = clustered_directions(5, 40, 96)  # wider than PCA_DIMS: the projection runs too
    return W, labels, feature_map.decoder_layout(W, seed=0)


def test_the_layout_is_seeded_covers_every_feature_and_keeps_clusters_apart(clusters):
    W, labels, layout = clusters
    assert layout.method == "umap"
    xy = layout.xy_F2
    assert xy.dtype == np.uint16 and xy.shape == (len(W), 2)
    assert (xy.min(axis=0) == 0).all() and xy.max() == feature_map.GRID  # the longer side spans the grid
    again = feature_map.decoder_layout(torch.from_numpy(W.copy()), seed=0)
    assert again.xy_F2.tobytes() == xy.tobytes(), "the same dictionary gives byte-identical layouts"
    points = xy.astype(np.float64)
    distances = np.linalg.norm(points[:, None] - points[None], axis=2)
    np.fill_diagonal(distances, np.inf)
    same = labels[distances.argmin(axis=1)] == labels
    assert same.mean() > 0.95, f"only {same.mean():.0%} of points sit beside their own cluster"


def test_top_directions_match_numpy_svd():
    rng = np.random.default_rng(1)
    spectrum = np.r_[np.linspace(10, 5, 8), np.full(40, 0.1)]  # a clear gap after the 8th
    U = np.linalg.qr(rng.standard_normal((600, 48)))[0]
    V = np.linalg.qr(rng.standard_normal((48, 48)))[0]
    W = (U * spectrum) @ V.T
    unit = W / np.linalg.norm(W, axis=1, keepdims=True)
    want = np.linalg.svd(unit, full_matrices=False)[2][:8].T
    got = feature_map.top_directions(W, 8, seed=3)
    np.testing.assert_allclose(got.T @ got, np.eye(8), atol=1e-10)
    np.testing.assert_allclose(np.abs(got.T @ want), np.eye(8), atol=1e-6)  # the same vectors, up to sign
    assert (got[np.abs(got).argmax(axis=0), np.arange(8)] > 0).all(), "signs are fixed"


def test_a_dictionary_too_small_for_umap_gets_its_principal_components():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((feature_map.N_NEIGHBORS, 10))
    layout = feature_map.decoder_layout(W, seed=0)
    assert layout.method == "pca" and layout.xy_F2.shape == (feature_map.N_NEIGHBORS, 2)
    unit = W / np.linalg.norm(W, axis=1, keepdims=True)
    vt = np.linalg.svd(unit, full_matrices=False)[2][:2].T
    vt *= np.where(vt[np.abs(vt).argmax(axis=0), [0, 1]] < 0, -1, 1)
    want = feature_map.quantise(unit @ vt)
    assert np.abs(layout.xy_F2.astype(int) - want.astype(int)).max() <= 1
    assert feature_map.decoder_layout(W[:1]).xy_F2.tolist() == [[feature_map.GRID // 2] * 2]
    assert feature_map.decoder_layout(W[:0]).xy_F2.shape == (0, 2)
    assert feature_map.decoder_layout(rng.standard_normal((feature_map.N_NEIGHBORS + 1, 10))).method == "umap"
    bad = W.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="decoder rows .* non-finite"):
        feature_map.decoder_layout(bad)


def test_umap_runs_without_a_warning_in_a_fresh_process():
    """Importing umap-learn and laying out a small dictionary print nothing a user would learn to ignore."""
    code = ("import numpy as np; from sae_assets.core.features.feature_map import decoder_layout; "
            "print(decoder_layout(np.random.default_rng(0).standard_normal((40, 8))).method)")
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "umap", out.stderr[-2000:]
    assert out.stderr == ""


def test_density_codes_round_trip_and_pack():
    density = np.array([0.0, 3e-7, 1e-4, 2.5e-3, 0.05, 0.0, 0.5])
    scale = feature_map.density_codes(density)
    assert (scale.log10_low, scale.log10_high) == (-7, 0)
    assert scale.codes_F[0] == scale.codes_F[5] == 0 and (scale.codes_F[[1, 2, 3, 4, 6]] > 0).all()
    live = density > 0
    half_code = (scale.log10_high - scale.log10_low) / (2 * (feature_map.CODES - 1))
    back = feature_map.code_log10(scale.codes_F[live], scale.log10_low, scale.log10_high)
    assert np.abs(back - np.log10(density[live])).max() <= half_code + 1e-12
    assert feature_map.density_codes(np.array([0.02, 0.03])).log10_low == -2  # one decade at least
    assert feature_map.density_codes(np.zeros(3)).codes_F.tolist() == [0, 0, 0]
    for bad in (np.array([np.nan]), np.array([-0.1]), np.array([1.5])):
        with pytest.raises(ValueError, match="finite values in \\[0, 1\\]"):
            feature_map.density_codes(bad)
    layout = feature_map.FeatureLayout(np.array([[0, 7], [65535, 300], [12, 40000], [1, 1], [2, 2], [3, 3], [4, 4]],
                                                dtype=np.uint16), "umap")
    document = feature_map.map_document(layout, density, dictionary="d", n_tokens=10)
    xy, codes = feature_map.read_points(document)
    assert xy.tolist() == layout.xy_F2.tolist() and codes.tolist() == scale.codes_F.tolist()
    assert len(document["points"]) == 8 * len(density)  # 6 bytes a feature, base64
    with pytest.raises(ValueError, match="rematerialize feature_map"):
        feature_map.map_document(layout, density[:3], dictionary="d", n_tokens=10)


def palette_colour(document: dict, density: float) -> list[int]:
    """The colour the page must draw a feature of `density` in: the palette's stops interpolated
    at the density's place on the document's log10 scale, at 256 steps."""
    if density == 0:
        return [int(document["dead_colour"][k:k + 2], 16) for k in (1, 3, 5)]
    low, high = document["log10_low"], document["log10_high"]
    t = round((math.log10(density) - low) / (high - low) * 255) / 255
    stops = [[int(s[k:k + 2], 16) for k in (1, 3, 5)] for s in document["palette"]]
    at = t * (len(stops) - 1)
    j = min(len(stops) - 2, int(at))
    return [round(stops[j][c] + (at - j) * (stops[j + 1][c] - stops[j][c])) for c in range(3)]


def isolated(points, apart: float) -> list[int]:
    """The features whose nearest neighbour is more than `apart` away, most isolated first."""
    points = np.asarray(points, dtype=np.float64)
    distances = np.linalg.norm(points[:, None] - points[None], axis=2)
    np.fill_diagonal(distances, np.inf)
    nearest = distances.min(axis=1)
    return [int(i) for i in np.argsort(-nearest, kind="stable") if nearest[i] > apart]


def test_map_page_in_headless_chromium(tmp_path):
    from browser import headless_chromium, require_chromium

    require_chromium()
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    n = 300
    W = np.random.default_rng(4).standard_normal((n, 32))  # no clusters: points spread out, many stand alone
    layout = feature_map.decoder_layout(W, seed=0)
    rows = []

    def ranges():
        for part in synthetic_ranges(n, range_width=128):
            rows.extend(part.rows)
            yield part

    site = tmp_path / "site"
    site.mkdir()
    site_files.write_site_files(lambda name: site / name, ranges(), dictionary=PAYLOAD, feature_map=layout)
    text = (site / site_files.MAP_FILE).read_text()
    document = json.loads(text[len("SAE_MAP.data("):-len(");\n")])
    density = np.array([r[1] for r in rows])
    assert (density == 0).any() and (density > 0).any()
    driver = headless_chromium(tmp_path / "profile", "1300,1000")
    try:
        driver.get((site / "index.html").as_uri() + "#map")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-map") == "ready")
        assert driver.find_element(By.ID, "list-view").get_attribute("hidden")
        canvas = driver.find_element(By.ID, "map-canvas")
        assert canvas.get_attribute("data-drawn") == str(n), "every feature is drawn"
        assert driver.find_element(By.CSS_SELECTOR, "#map-view h2").text == "Feature map of " + PAYLOAD
        ticks = [t.text for t in driver.find_elements(By.CSS_SELECTOR, ".map-ticks span")]
        assert ticks == [f"1e{e}" for e in range(document["log10_low"], document["log10_high"] + 1)]
        # Points more than 10 CSS px from any other (points are 6 px wide): nothing covers their centre.
        picks = isolated(driver.execute_script(f"return Array.from({{length: {n}}}, (_, i) => SAE_MAP.locate(i))"), 10)
        live, dead = [f for f in picks if density[f] > 0], [f for f in picks if density[f] == 0]
        assert len(live) >= 6 and dead
        for feature in [*live[:6], dead[0]]:  # each isolated point in its density's colour
            pixel = driver.execute_script(
                "var p = SAE_MAP.locate(arguments[0]), c = document.getElementById('map-canvas'), r = devicePixelRatio;"
                "return Array.from(c.getContext('2d').getImageData(Math.round(p[0] * r), Math.round(p[1] * r), 1, 1)"
                ".data).slice(0, 3);", feature)
            want = palette_colour(document, density[feature])
            assert max(abs(a - b) for a, b in zip(pixel, want)) <= 4, (feature, density[feature], pixel, want)
        feature = live[0]
        x, y = driver.execute_script("return SAE_MAP.locate(arguments[0])", feature)
        size = canvas.size
        ActionChains(driver).move_to_element_with_offset(canvas, round(x - size["width"] / 2),
                                                         round(y - size["height"] / 2)).perform()
        tip = driver.find_element(By.ID, "map-tooltip")
        WebDriverWait(driver, 10).until(lambda d: tip.is_displayed())
        label, shown = tip.text.split(" \u00b7 density ")
        assert label == f"feature {feature}" and float(shown) == pytest.approx(density[feature], rel=5e-3)
        assert driver.execute_script("return arguments[0].children.length", tip) == 0, "the tooltip is text"
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "feature_map.png"))
        assert driver.execute_script("return window.__pwned") is None
        assert driver.find_elements(By.CSS_SELECTOR, "#map-view img, #map-view script") == []
        ActionChains(driver).click().perform()
        WebDriverWait(driver, 20).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == str(feature))
        assert driver.execute_script("return location.hash") == f"#feature={feature}"
        assert driver.find_element(By.ID, "map-view").get_attribute("hidden")
        assert driver.find_element(By.CSS_SELECTOR, "#feature-view h2").text == f"Feature {feature}"
    finally:
        driver.quit()
