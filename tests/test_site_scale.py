"""The feature browser at 100,000 features: each view loads only its own chunks.

A synthetic site (`site_synthetic.synthetic_ranges`, written by `write_site_files`, the code the
feature_site asset runs) is served from 127.0.0.1 by a handler that counts the bytes of every
file it sends and forbids caching. Headless Chromium then opens the list, searches a token,
pages through a frequent token's matches, sorts by density and opens a feature page; each step
must load at most 2 MB, and show what the rows say (the oracle is the rows themselves, not the
inverted index the page reads). The feature map of the 100,000 features (a seeded random layout:
what is measured is the page, not UMAP) loads its one file, 8 bytes a feature, only when opened,
and every point is drawn and reachable. Writing the 100,000 feature files takes most of the run
(~25 s on 2 busy cores); Chromium as in tests/browser.py.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from browser import headless_chromium, require_chromium, serve_counting, take_sent

from sae_assets.core.features.feature_map import FeatureLayout
from sae_assets.core.features.site_index import search_key
from sae_assets.core.features.site_synthetic import synthetic_ranges
from sae_assets.core.features.overview import dictionary_overview
from sae_assets.defs.site_files import write_site_files

N_FEATURES = 100_000
BUDGET = 2_000_000  # bytes one view may load
LAYOUT = FeatureLayout(np.random.default_rng(0).integers(0, 65536, (N_FEATURES, 2)).astype(np.uint16), "umap")

require_chromium()

from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def site():
    """(site directory, every index row in feature order).

    In /dev/shm where there is one: creating and deleting 100,000 files on a busy shared disk
    takes minutes (pytest's basetemp would delete them in a later session), on tmpfs seconds."""
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    directory = Path(tempfile.mkdtemp(prefix="site-100k-", dir=parent))
    rows = []

    def ranges():
        for part in synthetic_ranges(N_FEATURES):
            rows.extend(part.rows)
            yield part

    try:
        curve = [{"step": i, "loss": 1.0 / (i + 1), "mse": 0.5 / (i + 1), "l0": 30.0, "dead_fraction": 0.0}
                 for i in range(25_000)]  # a long run's curve: the page gets a thinned copy

        def make_overview(density_F, n_tokens):
            return dictionary_overview(density_F, dictionary="synthetic", n_tokens=n_tokens, metrics=None, curve=curve,
                                       metrics_by_point={"synthetic": None})

        assert write_site_files(lambda name: directory / name, ranges(), dictionary="synthetic",
                                overview=make_overview, feature_map=LAYOUT) == N_FEATURES
        yield directory, rows
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def served(site):
    server = serve_counting(site[0])
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    chrome = headless_chromium(tmp_path_factory.mktemp("chromium-profile"), "1200,1600")
    yield chrome
    chrome.quit()


def wait_for(driver, loaded: str, query: str | None = None) -> None:
    def ready(d):
        body = d.find_element(By.TAG_NAME, "body")
        return (body.get_attribute("data-loaded") == loaded
                and (query is None or body.get_attribute("data-query") == query))
    try:
        WebDriverWait(driver, 30).until(ready)
    except TimeoutException:
        state = driver.execute_script("var b = document.body; return [b.getAttribute('data-loaded'), "
                                      "b.getAttribute('data-query'), document.getElementById('count').textContent]")
        raise AssertionError(f"waiting for {loaded!r} {query!r}, the page shows {state}") from None


def shown_features(driver) -> list[int]:
    return [int(f) for f in driver.execute_script(
        "return Array.from(document.querySelectorAll('#features tbody tr')).map(r => r.getAttribute('data-feature'))")]


def within_budget(sent, what: str) -> int:
    total = sum(n for _, n in sent)
    assert total <= BUDGET, f"{what} loaded {total} bytes: {sorted(sent, key=lambda s: -s[1])[:8]}"
    return total


def search(driver, text: str) -> None:
    box = driver.find_element(By.ID, "search")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)  # clear() fires no input event
    box.send_keys(text)
    wait_for(driver, "search" if search_key(text) else "list", search_key(text))


def test_each_view_loads_only_its_own_chunks(site, served, driver):
    site_dir, rows = site
    take_sent()
    driver.get(served + "/index.html")
    wait_for(driver, "list")
    sent = take_sent()
    within_budget(sent, "first paint")
    assert not [name for name, _ in sent if name.startswith(("index-1", "tokens-", "search-", "feature-", "dictionary-"))]
    assert shown_features(driver) == [r[0] for r in rows[:1024] if r[1] > 0], "page 1: live features 0..1023"

    # A rare token: one search bucket and one posting chunk, and exactly the features whose rows have it.
    by_key: dict[str, list[int]] = {}
    for row in rows:
        for key in dict.fromkeys(search_key(t) for t in row[3]):
            by_key.setdefault(key, []).append(row[0])
    rare = next(k for k, features in sorted(by_key.items()) if 5 <= len(features) <= 50)
    search(driver, f"  {rare.upper()} ")
    sent = take_sent()
    within_budget(sent, "a token search")
    assert shown_features(driver) == by_key[rare]
    assert {name.split("-")[0] for name, _ in sent} <= {"search", "tokens"}

    # A frequent token: thousands of matches, paged a chunk at a time.
    frequent = max(by_key, key=lambda k: len(by_key[k]))
    assert len(by_key[frequent]) > 3 * 1024
    search(driver, frequent)
    within_budget(take_sent(), "a frequent token's search")
    assert shown_features(driver) == by_key[frequent][:1024]
    driver.find_element(By.CSS_SELECTOR, '#pager button[data-page="1"]').click()
    wait_for(driver, "search", frequent)
    WebDriverWait(driver, 30).until(lambda d: shown_features(d) == by_key[frequent][1024:2048])
    within_budget(take_sent(), "a search's second page")

    # Sorting by density over all features loads one page of the precomputed order.
    search(driver, "")  # an empty box is the browse list again
    take_sent()
    Select(driver.find_element(By.ID, "sort")).select_by_value("density")
    WebDriverWait(driver, 30).until(lambda d: shown_features(d) and shown_features(d)[0] != 0)
    within_budget(take_sent(), "sorting by density")
    densest = sorted(rows, key=lambda r: (-r[1], r[0]))[:1024]
    assert shown_features(driver) == [r[0] for r in densest]

    # A feature page: its own script and nothing else.
    feature = by_key[rare][0]
    driver.execute_script(f"location.hash = 'feature={feature}'")
    wait_for(driver, str(feature))
    sent = take_sent()
    within_budget(sent, "a feature page")
    assert [name for name, _ in sent] == [f"feature-{feature:06d}.js"]
    text = (site_dir / f"feature-{feature:06d}.js").read_text()
    doc = json.loads(text[len("SAE_SITE.feature("):-len(");\n")])
    assert driver.find_element(By.CSS_SELECTOR, "#feature-view h2").text == f"Feature {feature}"
    centres = driver.find_elements(By.CSS_SELECTOR, "#top-examples .tok.center")
    assert [c.text for c in centres] == [e["tokens"][e["center"]].strip() for e in doc["top"]]
    assert rare in [search_key(c.text) for c in centres]


def test_opening_a_feature_page_directly_skips_the_index(site, served, driver):
    driver.get("about:blank")  # else only the hash changes and nothing reloads
    take_sent()
    driver.get(served + "/index.html#feature=99999")
    wait_for(driver, "99999")
    names = {name for name, _ in take_sent()}
    assert names == {*PAGE_FILES, "feature-099999.js"}
    assert Path(site[0] / "site-meta.js").stat().st_size < 4096, "site-meta.js does not grow with features"


PAGE_FILES = ("index.html", "app.js", "site-views.js", "site-map.js", "style.css", "site-dictionaries.js",
              "site-meta.js")
"""What every view of the site loads before its own data file."""


def open_view(driver, served: str, view: str, *, timeout: int) -> dict:
    """Open `#<view>` from a blank page and wait for body[data-<view>] = 'ready'; {file: bytes sent}."""
    driver.get("about:blank")
    take_sent()
    driver.get(served + f"/index.html#{view}")
    WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute(f"data-{view}") == "ready")
    return dict(take_sent())


def test_overview_page_loads_one_small_file(site, served, driver):
    """The overview of 100,000 features: one data file, its size independent of the width (bins,
    a thinned curve, the sweep's points), and a density histogram that counts every live row."""
    site_dir, rows = site
    sent = open_view(driver, served, "overview", timeout=30)
    assert set(sent) == {*PAGE_FILES, "dictionary-overview.js"}
    assert sent["dictionary-overview.js"] < 64_000, "the overview grows with neither features nor curve length"
    heights = driver.execute_script(
        "return Array.from(document.querySelectorAll('svg.density rect')).map(r => r.querySelector('title').textContent)")
    assert sum(int(t.split()[0]) for t in heights) == sum(1 for r in rows if r[1] > 0)
    assert f"dead {sum(1 for r in rows if r[1] == 0)}" in driver.find_element(By.CSS_SELECTOR, "#overview-view .stats").text


def test_feature_map_loads_one_file_draws_every_point_and_finds_each(site, served, driver):
    """The map of 100,000 features: its one data file (8 bytes a feature, within the view budget),
    every point drawn, and the point under the pointer found by the grid: a random feature's."""
    from selenium.webdriver.common.action_chains import ActionChains

    site_dir, rows = site
    sent = open_view(driver, served, "map", timeout=60)
    assert set(sent) == {*PAGE_FILES, "dictionary-map.js"}
    within_budget(list(sent.items()), "the feature map")
    assert sent["dictionary-map.js"] < 8 * N_FEATURES + 2_000, "8 bytes a feature and a small header"
    canvas = driver.find_element(By.ID, "map-canvas")
    assert canvas.get_attribute("data-drawn") == str(N_FEATURES)
    positions = np.array(driver.execute_script(
        f"return Array.from({{length: {N_FEATURES}}}, (_, i) => SAE_MAP.locate(i))"))
    rng = np.random.default_rng(1)
    for feature in rng.choice(N_FEATURES, 40, replace=False):  # the first one alone under the pointer
        distances = np.linalg.norm(positions - positions[feature], axis=1)
        distances[feature] = np.inf
        if distances.min() > 1.5:
            break
    x, y = positions[feature]
    size = canvas.size
    ActionChains(driver).move_to_element_with_offset(canvas, round(x - size["width"] / 2),
                                                     round(y - size["height"] / 2)).perform()
    tip = driver.find_element(By.ID, "map-tooltip")
    WebDriverWait(driver, 10).until(lambda d: tip.is_displayed())
    near = np.linalg.norm(positions - [round(x), round(y)], axis=1)
    assert int(tip.get_attribute("data-feature")) == int(np.argmin(near)), "the nearest point to the pointer"
    row = rows[int(tip.get_attribute("data-feature"))]
    assert tip.text.startswith(f"feature {row[0]} \u00b7 ")
    assert ("never fired" in tip.text) == (row[1] == 0)
