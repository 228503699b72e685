"""The static feature browser in headless Chromium, from file:// and from a static HTTP host.

The corpus carries `<script>` and `<img onerror=...>` payloads, so they turn up in tokens and
context windows: the page must show them as text and never run them. The test opens a feature
page from the list, checks the highlighted tokens and the 10 activation intervals (range,
share, examples) against the feature's data and saves screenshots under test-artifacts/.
Chromium comes from Debian's chromium + chromium-driver (`make test` installs them); without
them the test fails under CI and is skipped elsewhere.
"""

import functools
import http.server
import json
import threading
from pathlib import Path

import dagster as dg
import pytest
from browser import headless_chromium, require_chromium
from support import TINY, write_run_config

from sae_assets.core.features.site_index import search_key
from sae_assets.defs.site_files import feature_script_arguments, read_feature_script
from sae_assets.definitions import build_resources
from sae_assets.demo import materialize_all

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PAYLOADS = ['<script>window.__pwned = "script";</script>', '<img src=x onerror="window.__pwned=\'img\'">',
            '"><svg onload=window.__pwned=1>']

require_chromium()

from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


def corpus_files(directory: Path) -> list[str]:
    """Forty short documents of prose and code, each quoting the payloads."""
    import sae_assets.core.corpus.documents as corpus

    prose = (corpus.__doc__ or "") + (json.__doc__ or "") + (http.server.__doc__ or "")
    paths = []
    for i in range(40):
        path = directory / f"doc-{i:02d}.txt"
        start = (i * 97) % max(1, len(prose) - 400)
        path.write_text(f"{prose[start:start + 400]}\n{PAYLOADS[i % 3]} and then {PAYLOADS[(i + 1) % 3]}\n"
                        f"def f{i}(x):\n    return x < {i} and x > -{i}\n")
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    directory = tmp_path_factory.mktemp("browser")
    (directory / "corpus").mkdir()
    config_path = write_run_config(
        directory, TINY, {"root": str(directory / "artifacts")},
        corpus={"source": "local", "paths": corpus_files(directory / "corpus"), "num_shards": 2, "max_documents": 0,
                "min_document_chars": 10},
        features={"range_width": 32, "top_k": 5, "random_examples": 3, "activation_levels": 10,
                  "examples_per_level": 1, "dictionaries": "all"})
    materialize_all(dg.DagsterInstance.ephemeral(), config_path, log=lambda *_: None)
    store = build_resources(config_path)["storage"].store()
    manifest = store.require("feature_site", None)
    return store.fetch(manifest, "index.html").parent, store


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    chrome = headless_chromium(tmp_path_factory.mktemp("chromium-profile"), "1200,1600")
    yield chrome
    chrome.quit()


def wait_loaded(driver, what: str) -> None:
    WebDriverWait(driver, 20).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == what)


def feature_doc(site_dir: Path, feature: int) -> dict:
    return read_feature_script((site_dir / f"feature-{feature:06d}.js").read_text())[0]


def payload_feature(site_dir: Path) -> int:
    """A live feature whose top examples' windows contain a '<' token."""
    for path in sorted(site_dir.glob("feature-*.js")):
        doc = feature_doc(site_dir, int(path.stem.split("-")[1]))
        if any("<" in "".join(e["tokens"]) for e in doc["top"]):
            return doc["feature"]
    raise AssertionError("no feature shows the payload text; the corpus should make that certain")


def index_rows(site_dir: Path) -> list:
    """Every index row, from the feature-order chunks `index-<n>.js`."""
    rows = []
    for n in range(len(list(site_dir.glob("index-*.js")))):
        text = (site_dir / f"index-{n}.js").read_text()
        rows += json.loads(text[len(f'SAE_SITE.chunk("index-{n}",'):-len(");\n")])
    return rows


def test_feature_page_from_file_url(site, driver):
    site_dir, _ = site
    driver.get((site_dir / "index.html").as_uri())
    wait_loaded(driver, "list")
    live = [row for row in index_rows(site_dir) if row[1] > 0]
    rows = driver.find_elements(By.CSS_SELECTOR, "#features tbody tr")
    assert len(rows) == len(live) > 0, "the list shows every feature that fired"
    # Search by token narrows the list to features with that top token (trimmed, any case).
    key = next(k for row in live for k in map(search_key, row[3]) if k and k.upper().lower() == k and k.isprintable())
    box = driver.find_element(By.ID, "search")
    box.send_keys(key.upper())
    WebDriverWait(driver, 20).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-query") == key)
    wait_loaded(driver, "search")
    matching = [row[0] for row in live if key in {search_key(t) for t in row[3]}]
    shown = [int(r.get_attribute("data-feature")) for r in driver.find_elements(By.CSS_SELECTOR, "#features tbody tr")]
    assert shown == matching and shown
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    wait_loaded(driver, "list")

    feature = payload_feature(site_dir)
    driver.find_element(By.CSS_SELECTOR, f'a[href="#feature={feature}"]').click()
    wait_loaded(driver, str(feature))
    doc = feature_doc(site_dir, feature)
    spans = driver.find_elements(By.CSS_SELECTOR, "#top-examples .tok")
    assert len(spans) == sum(len(e["tokens"]) for e in doc["top"])
    centres = driver.find_elements(By.CSS_SELECTOR, "#top-examples .tok.center")
    assert [float(c.get_attribute("data-act")) for c in centres] == pytest.approx([e["activation"] for e in doc["top"]],
                                                                                   rel=2e-3)
    acts = [a for e in doc["top"] for a in e["acts"]]
    for span, act in zip(spans, acts):  # coloured exactly where the feature fires
        coloured = bool(driver.execute_script("return arguments[0].style.backgroundColor", span))
        assert coloured == (act > 0)
    ActionChains(driver).move_to_element(centres[0]).perform()
    assert driver.find_element(By.ID, "tooltip").text.startswith("activation ")
    assert len(driver.find_elements(By.CSS_SELECTOR, "svg.hist rect")) > 0

    # The payloads are text: visible as typed, never run, never turned into elements.
    text = driver.find_element(By.ID, "feature-view").text
    assert "<" in text
    assert driver.execute_script("return window.__pwned") is None
    assert driver.find_elements(By.CSS_SELECTOR, "#feature-view img, #feature-view script, #features img") == []
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "feature_page.png"))

    # SAEDashboard's 10 interval groups, highest first: range, share (marked where estimated), examples.
    groups = driver.find_elements(By.CSS_SELECTOR, "#level-examples .interval")
    assert len(groups) == len(doc["levels"]) == 10
    for group, level in zip(groups, doc["levels"]):
        title = group.find_element(By.CSS_SELECTOR, ".level-title").text
        assert title.startswith("Interval ") and title.endswith(
            " contains " + ("" if level["exact"] else "\u2248") + f"{100 * level['share']:.3f}%"), (title, level)
        assert len(group.find_elements(By.CSS_SELECTOR, ".example")) == len(level["examples"])
    notes = driver.find_elements(By.CSS_SELECTOR, "#level-examples .share-note")
    assert len(notes) == (not all(level["exact"] for level in doc["levels"]))
    driver.execute_script("document.getElementById('level-examples').scrollIntoView()")
    driver.save_screenshot(str(ARTIFACTS / "feature_intervals.png"))


def test_site_from_a_static_http_host(site, driver):
    site_dir, _ = site
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/index.html#feature={payload_feature(site_dir)}")
        wait_loaded(driver, str(payload_feature(site_dir)))
        assert driver.find_elements(By.CSS_SELECTOR, "#top-examples .tok.center")
        assert driver.execute_script("return window.__pwned") is None
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/index.html")
        wait_loaded(driver, "list")
        driver.save_screenshot(str(ARTIFACTS / "feature_list.png"))
    finally:
        server.shutdown()
        server.server_close()


def test_special_tokens_are_marked_in_context_and_never_an_examples_token(site, driver):
    """special_tokens.exclude (on): documents end in <|endoftext|>, which windows show as a chip of
    class `special` at the positions the feature's document lists, and which no example centres on."""
    site_dir, _ = site
    docs = [feature_doc(site_dir, int(p.stem.split("-")[1])) for p in sorted(site_dir.glob("feature-*.js"))]

    def shown(doc):  # the examples in page order: top, each level's, random
        return [*doc["top"], *(e for level in doc["levels"] for e in level["examples"]), *doc["random"]]

    examples = [e for d in docs for e in shown(d)]
    assert all(e["tokens"][e["center"]] != "<|endoftext|>" for e in examples)
    assert all(e["tokens"][p] == "<|endoftext|>" for e in examples for p in e.get("special", []))
    doc = next(d for d in docs if any(e.get("special") for e in shown(d)))
    driver.get((site_dir / "index.html").as_uri() + f"#feature={doc['feature']}")
    wait_loaded(driver, str(doc["feature"]))
    rows = driver.find_elements(By.CSS_SELECTOR, "#feature-view .example")
    assert len(rows) == len(shown(doc))
    for row, example in zip(rows, shown(doc)):
        spans = row.find_elements(By.CSS_SELECTOR, ".tok")
        marked = [i for i, span in enumerate(spans) if "special" in span.get_attribute("class").split()]
        assert marked == example.get("special", [])
        assert all(spans[i].text == "<|endoftext|>" for i in marked)
    assert driver.find_elements(By.CSS_SELECTOR, "#feature-view .tok.special")
    assert not driver.find_elements(By.CSS_SELECTOR, "#feature-view .tok.center.special")
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "feature_special_tokens.png"))


def test_feature_map_from_file_url(site, driver):
    """#map of the corpus's dictionary: every feature drawn; hovering the live feature farthest from
    any other names it and its density as text; a click opens its page; the payloads stay inert."""
    site_dir, _ = site
    density = {row[0]: row[1] for row in index_rows(site_dir)}
    driver.get((site_dir / "index.html").as_uri() + "#map")
    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-map") == "ready")
    canvas = driver.find_element(By.ID, "map-canvas")
    assert canvas.get_attribute("data-drawn") == str(len(density)) == "64"
    at = driver.execute_script("return Array.from({length: 64}, (_, i) => SAE_MAP.locate(i))")
    apart = {f: min(((x - u) ** 2 + (y - v) ** 2) ** 0.5 for g, (u, v) in enumerate(at) if g != f)
             for f, (x, y) in enumerate(at) if density[f] > 0}
    feature = max(apart, key=apart.get)
    assert apart[feature] > 3, "a live feature stands alone on the map"
    size = canvas.size
    ActionChains(driver).move_to_element_with_offset(canvas, round(at[feature][0] - size["width"] / 2),
                                                     round(at[feature][1] - size["height"] / 2)).perform()
    tip = driver.find_element(By.ID, "map-tooltip")
    WebDriverWait(driver, 10).until(lambda d: tip.is_displayed())
    label, shown = tip.text.split(" \u00b7 density ")
    assert label == f"feature {feature}" and float(shown) == pytest.approx(density[feature], rel=5e-3)
    assert driver.execute_script("return arguments[0].children.length", tip) == 0
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "feature_map_corpus.png"))
    ActionChains(driver).click().perform()
    wait_loaded(driver, str(feature))
    assert driver.find_element(By.CSS_SELECTOR, "#feature-view h2").text == f"Feature {feature}"
    assert driver.execute_script("return window.__pwned") is None
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text


def test_dictionary_picker_and_closest_feature_links(site, driver):
    """Both sweep points in one site: the picker lists them as text and opens the other's page,
    whose feature pages link to the closest feature of the first (the one feature_matches found)."""
    site_dir, _ = site
    text = (site_dir / "site-dictionaries.js").read_text()
    entries = json.loads(text[len("window.SAE_SITE_DICTIONARIES = "):].rstrip().rstrip(";"))
    assert len(entries) == 2 and entries[0]["page"] == "index.html"
    driver.get((site_dir / "index.html").as_uri() + "#overview")
    picker = Select(driver.find_element(By.ID, "dictionary-picker"))
    assert driver.find_element(By.ID, "picker").is_displayed()
    assert [o.text for o in picker.options] == [f"{e['key']} \u00b7 {e['features']} features" for e in entries]
    assert picker.first_selected_option.text.startswith(entries[0]["key"])
    picker.select_by_index(1)  # the same view, on the other dictionary's page
    WebDriverWait(driver, 20).until(lambda d: d.current_url.endswith(entries[1]["page"] + "#overview"))
    WebDriverWait(driver, 20).until(lambda d: entries[1]["key"] in d.find_element(By.ID, "subtitle").text)
    WebDriverWait(driver, 20).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-overview") == "ready")
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "dictionary_picker.png"))
    # The frontier names every point; a served one links to its own overview. So does the table
    # of how much of this dictionary the other one found.
    [link] = driver.find_elements(By.CSS_SELECTOR, ".frontier-table a")
    assert link.text == entries[0]["key"] and link.get_attribute("href").endswith("/index.html#overview")
    [row] = driver.find_elements(By.CSS_SELECTOR, "#agreement tr")[1:]
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    assert cells[0] == entries[0]["key"] and len(cells) == 5 and all(c.endswith("%") for c in cells[2:])

    prefix = entries[1]["page"][: -len("index.html")]
    feature = next(f for f in range(64)
                   if feature_script_arguments((site_dir / f"{prefix}feature-{f:06d}.js").read_text())[0]["count"])
    doc, _, closest = feature_script_arguments((site_dir / f"{prefix}feature-{feature:06d}.js").read_text())
    [[position, match, cosine]] = closest
    assert position == 0
    driver.get((site_dir / entries[1]["page"]).as_uri() + f"#feature={feature}")
    wait_loaded(driver, str(feature))
    rows = driver.find_elements(By.CSS_SELECTOR, "#closest tr")[1:]
    assert len(rows) == 1
    cells = rows[0].find_elements(By.TAG_NAME, "td")
    assert cells[0].text == entries[0]["key"] and cells[1].text == str(match)
    assert float(cells[2].text) == pytest.approx(cosine, abs=2e-3)
    driver.execute_script("document.getElementById('closest').scrollIntoView()")
    driver.save_screenshot(str(ARTIFACTS / "closest_features.png"))
    cells[1].find_element(By.TAG_NAME, "a").click()  # opens the first dictionary's page of that feature
    wait_loaded(driver, str(match))
    assert driver.current_url.endswith(f"/index.html#feature={match}")
    assert driver.find_element(By.CSS_SELECTOR, "#feature-view h2").text == f"Feature {match}"
    assert entries[0]["key"] in driver.find_element(By.ID, "subtitle").text
    assert driver.execute_script("return window.__pwned") is None
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text
