"""A real `dagster dev` (webserver + daemon) driven through its GraphQL API.

The fixture starts `dagster dev -h 127.0.0.1 -p <free port> -w workspace.yaml` in its own
process group, with DAGSTER_HOME in a temporary directory (queued run coordinator, two runs at
a time, pools limited to one step at a time) and a tiny run config over local text files. The
first test materializes the corpus group, language_model, cached_activations, shuffle_plan and
shuffle_scatter — through partition backfills launched by GraphQL for the shard assets
(cached_activations one run per shard, each step in its run worker, the steps serialized by the
"model" pool; shuffle_scatter under its single-run backfill policy, both shards in one run), and
single runs for the rest — then edits the text of shard 1 only, rematerializes corpus_shards[shard-0001], asserts which
partitions Dagster reports stale, backfills exactly those and asserts from the materialization
records which partitions rematerialized and that nothing else did. The second test saves a
headless-Chromium screenshot of the asset graph to test-artifacts/asset_graph.png. The process
and its GraphQL client, `DagsterDev`, are in tests/dev_server.py.

Dagster 1.13 marks a partition stale when one of its direct inputs has a new data version
since it was materialized (or its code version changed); staleness is not propagated further
until that input is rematerialized. The tokenizer and the embedded language model read every
shard, so a change to one shard reaches them, and from the retrained tokenizer every token shard.
"""

from __future__ import annotations

import shutil

import pytest
from browser import headless_chromium, require_chromium
from dev_server import CELLS, MULTIPROCESS, REPO, S0, S1, SHARDS, Cell, DagsterDev, log, write_corpus
from support import TINY, write_run_config

ARTIFACTS = REPO / "test-artifacts"

DAGSTER_YAML = """\
telemetry:
  enabled: false
# The tests launch every run themselves: the keep_fresh automation sensor (on by default) would
# launch its own for whatever is missing.
auto_materialize:
  enabled: false
  use_sensors: false
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
concurrency:
  runs:
    max_concurrent_runs: 2
  pools:
    default_limit: 1            # pool "model" (language_model, cached_activations, sae_dictionary, sae_metrics, site_json)
    op_granularity_run_buffer: 1
"""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dagster(tmp_path_factory):
    """A running `dagster dev` over a tiny local corpus; yields (DagsterDev, corpus files)."""
    directory = tmp_path_factory.mktemp("dagster_dev")
    home = directory / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    documents = write_corpus(directory / "corpus")
    config_path = write_run_config(
        directory, TINY, {"root": str(directory / "artifacts")},
        corpus={"source": "local", "paths": [str(p) for p in documents], "num_shards": 2, "max_documents": 0,
                "min_document_chars": 10})
    dev = DagsterDev(home, config_path, directory / "dagster_dev.log")
    try:
        dev.wait_ready()
        log(f"dagster dev ready on {dev.url}")
        yield dev, documents
    finally:
        dev.stop()
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copyfile(dev.log_path, ARTIFACTS / "dagster_dev.log")


def statuses(state: dict[str, Cell]) -> dict[str, str]:
    return {c: s.status for c, s in state.items()}


def test_backfill_then_one_changed_shard_is_stale_and_rematerializes_alone(dagster):
    dev, documents = dagster
    # Nothing adds the partitions by hand: the config_partitions sensor (on by default) adds the
    # ones the config implies on its first tick.
    assert dev.wait_partitions("corpus_shards", SHARDS) == SHARDS

    # Upstream of the backfill: each corpus shard, then the tokenizer trained on all of them.
    first = {key: dev.launch_run(["corpus_shards"], key) for key in SHARDS}
    dev.wait_runs(first.values())
    dev.wait_runs([dev.launch_run(["tokenizer"])])
    before = dev.state()
    assert before["tokenizer"].status == "FRESH" and before[f"token_shards[{S0}]"].status == "MISSING"
    log("corpus_shards and tokenizer materialized by single runs")

    # (1) A partition backfill through GraphQL: corpus_shards and token_shards over every shard.
    # No run config, as the UI launches it: each run has two steps, forked from the forkserver.
    b1 = dev.launch_backfill(["corpus_shards", "token_shards"], SHARDS, "initial shards", MULTIPROCESS)
    dev.wait_backfill(b1, runs_done=2)
    language_model = dev.launch_run(["language_model"])  # while the daemon's next pass closes the backfill
    done = dev.wait_backfill(b1)
    log(f"backfill {b1} completed")
    by_shard = {next(t["value"] for t in r["tags"] if t["key"] == "dagster/partition"): r["runId"]
                for r in done["runs"]}
    assert sorted(by_shard) == SHARDS and len(done["runs"]) == 2, "one run per shard, both assets in it"
    history = dev.materializations()
    for key in SHARDS:
        assert history[f"corpus_shards[{key}]"] == [first[key], by_shard[key]]
        assert history[f"token_shards[{key}]"] == [by_shard[key]]
    after = dev.state()
    for key in SHARDS:  # a rerun on the same inputs gives the same data version (manifest hash) ...
        assert after[f"corpus_shards[{key}]"].version == before[f"corpus_shards[{key}]"].version
    assert after["tokenizer"] == before["tokenizer"]  # ... so the tokenizer built from them stays fresh

    dev.wait_runs([language_model])
    # A backfill on the multiprocess executor: cached_activations (model pool, one run per shard).
    # Then the shuffle plan they all feed, in its own run, and a backfill of shuffle_scatter
    # (single-run backfill policy: both shards in one run).
    b_model = dev.launch_backfill(["cached_activations"], SHARDS, "model shards", MULTIPROCESS)
    done = dev.wait_backfill(b_model)
    log(f"backfill {b_model} of cached_activations completed")
    plan_run = dev.launch_run(["shuffle_plan"])
    dev.wait_runs([plan_run])
    b_scatter = dev.launch_backfill(["shuffle_scatter"], SHARDS, "scatter", MULTIPROCESS)
    scattered = dev.wait_backfill(b_scatter)
    log(f"shuffle_plan run {plan_run} and backfill {b_scatter} of shuffle_scatter completed")
    history = dev.materializations()
    activations = [run for key in SHARDS for run in history[f"cached_activations[{key}]"]]
    assert history["shuffle_plan"] == [plan_run]
    [scatter_run] = {run for key in SHARDS for run in history[f"shuffle_scatter[{key}]"]}
    assert len(set(activations)) == 2 and set(activations) == {r["runId"] for r in done["runs"]}
    assert [r["runId"] for r in scattered["runs"]] == [scatter_run]
    scatter_tags = next({t["key"]: t["value"] for t in r["tags"]} for r in scattered["runs"])
    assert (scatter_tags["dagster/asset_partition_range_start"], scatter_tags["dagster/asset_partition_range_end"]) \
        == (S0, S1), "one ranged run for every shard of shuffle_scatter"
    for run in activations:  # one process per step: a one-step run executes it in the run worker
        assert "Executing steps in process" in dev.engine_messages(run)
        assert "multiprocess executor" not in dev.engine_messages(run)
    for run in by_shard.values():  # a two-step run forks each step from a preloaded forkserver
        assert "multiprocess executor" in dev.engine_messages(run)
    # Pools: cached_activations is in the "model" pool, limited to one step at a time.
    (start0, end0), (start1, end1) = (dev.step_interval(r, "cached_activations") for r in activations)
    assert end0 <= start1 or end1 <= start0, "two steps of the 'model' pool ran at once"
    pool = dev.gql('{ instance { concurrencyLimit(concurrencyKey: "model") { slotCount limit } } }')
    assert pool["instance"]["concurrencyLimit"]["slotCount"] == 1

    # (2) Everything materialized is fresh.
    fresh = dev.state()
    assert statuses(fresh) == {c: "FRESH" for c in CELLS}, {c: s.causes for c, s in fresh.items() if s.status != "FRESH"}
    assert all(s.causes == () and s.version for s in fresh.values())

    # (3) Change one upstream partition: the text of the last document, which contiguous sharding
    # always puts in the last shard (same length, so the shard boundaries do not move).
    text = documents[-1].read_text()
    documents[-1].write_text(text.upper())
    assert documents[-1].read_text() != text
    dev.wait_runs([dev.launch_run(["corpus_shards"], S1)])
    changed = dev.state()
    assert changed[f"corpus_shards[{S1}]"].version != fresh[f"corpus_shards[{S1}]"].version
    assert changed[f"corpus_shards[{S0}]"] == fresh[f"corpus_shards[{S0}]"]
    # Exactly the direct dependents of the changed partition are stale, with it as root cause;
    # shard 0's cells are fresh, and so are language_model and cached_activations[shard-0001]:
    # their own inputs have not changed yet (Dagster does not propagate staleness transitively).
    expected = {c: "FRESH" for c in CELLS} | {"tokenizer": "STALE", f"token_shards[{S1}]": "STALE"}
    assert statuses(changed) == expected
    for name in ("tokenizer", f"token_shards[{S1}]"):
        assert changed[name].causes == (f"corpus_shards[{S1}]",)
    log("shard 1 changed: tokenizer and token_shards[shard-0001] are stale")

    # (4) Backfill only the stale partitions, and check what rematerialized.
    stale = sorted(c for c, s in changed.items() if s.status == "STALE")
    stale_assets = sorted({c.split("[")[0] for c in stale})
    stale_partitions = sorted({c[c.index("[") + 1:-1] for c in stale if "[" in c})
    assert (stale_assets, stale_partitions) == (["token_shards", "tokenizer"], [S1])
    previous = dev.materializations()
    b2 = dev.launch_backfill(stale_assets, stale_partitions, "stale partitions")
    done = dev.wait_backfill(b2)
    log(f"backfill {b2} of the stale partitions completed")
    targeted = {s["assetKey"]["path"][-1]: s.get("numPartitionsTargeted", "unpartitioned")
                for s in done["assetBackfillData"]["assetBackfillStatuses"]}
    assert targeted == {"tokenizer": "unpartitioned", "token_shards": 1}
    b2_runs = {r["runId"] for r in done["runs"]}
    assert len(b2_runs) == 2, "the tokenizer, then token_shards[shard-0001] in a later run"
    history = dev.materializations()
    new = {c: history[c][len(previous[c]):] for c in CELLS}
    assert all(history[c][:len(previous[c])] == previous[c] for c in CELLS), "history only grows"
    assert {c: runs for c, runs in new.items() if runs} == {"tokenizer": new["tokenizer"],
                                                            f"token_shards[{S1}]": new[f"token_shards[{S1}]"]}
    assert len(new["tokenizer"]) == len(new[f"token_shards[{S1}]"]) == 1
    assert {*new["tokenizer"], *new[f"token_shards[{S1}]"]} == b2_runs
    assert history[f"token_shards[{S0}]"] == [by_shard[S0]], "token_shards[shard-0000] materialized exactly once"
    assert history["language_model"] == [language_model]
    assert [history[f"cached_activations[{k}]"] for k in SHARDS] == [[r] for r in activations]

    # (5) Staleness moved one step down the graph: cached_activations[shard-0001] is stale now,
    # cached_activations[shard-0000] is not. The retrained tokenizer has a new data version (its
    # manifest records its inputs), so every token shard built with the old one is stale, and the
    # language model trained on all token shards too.
    final = dev.state()
    assert final["tokenizer"].version != changed["tokenizer"].version
    assert final[f"token_shards[{S1}]"].version != changed[f"token_shards[{S1}]"].version
    expected = {c: "FRESH" for c in CELLS} | {
        f"token_shards[{S0}]": "STALE", "language_model": "STALE", f"cached_activations[{S1}]": "STALE"}
    assert statuses(final) == expected
    assert final[f"token_shards[{S0}]"].causes == ("tokenizer",)
    assert set(final["language_model"].causes) == {"tokenizer", f"token_shards[{S1}]"}
    assert final[f"cached_activations[{S1}]"].causes == (f"token_shards[{S1}]",)


@pytest.fixture(scope="module")
def chrome(tmp_path_factory):
    """Headless Chromium; requested before `dagster` so a missing browser fails (CI) or skips first."""
    require_chromium()
    driver = headless_chromium(tmp_path_factory.mktemp("chromium-profile"), "1600,1000")
    yield driver
    driver.quit()


def test_asset_graph_screenshot(chrome, dagster):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    dev, _ = dagster
    chrome.get(f"{dev.url}/locations/{dev.location}/asset-groups/corpus")
    names = ["corpus_shards", "tokenizer", "token_shards"]
    script = "return Array.from(document.querySelectorAll('svg foreignObject')).map(e => e.textContent).join('\\n')"

    def rendered(driver) -> bool:  # every node of the group drawn, with its live data loaded
        text = driver.execute_script(script)
        return all(n in text for n in names) and "Loading" not in text

    try:
        WebDriverWait(chrome, 90, poll_frequency=0.5).until(rendered)
    except Exception:
        ARTIFACTS.mkdir(exist_ok=True)
        chrome.save_screenshot(str(ARTIFACTS / "asset_graph.png"))
        dev.fail(f"the asset graph did not render: {chrome.execute_script(script)!r}")
    for button in chrome.find_elements(By.XPATH, "//button[normalize-space()='Skip']"):  # the community pop-up
        button.click()
    WebDriverWait(chrome, 10).until(lambda d: not d.find_elements(By.XPATH, "//button[normalize-space()='Skip']"))
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "asset_graph.png"
    assert chrome.save_screenshot(str(path))
    assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = chrome.find_element(By.TAG_NAME, "body").text
    assert all(n in text for n in names), text[:2000]
    # Downstream assets of other groups are drawn as links out of the group.
    assert "cached_activations" in chrome.execute_script(script)
