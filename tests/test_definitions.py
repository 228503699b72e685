"""The code location loads: in process, and through workspace.yaml as `dagster dev` loads it."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from sae_assets.core.config import load_config
from sae_assets.definitions import ALL_CHECKS, defs, graph_assets

ROOT = Path(__file__).resolve().parent.parent
GROUPS = {"corpus", "model", "activations", "dictionary", "features"}


def test_definitions_hold_every_asset_with_group_description_and_code_version():
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert {"corpus_shards", "tokenizer", "token_shards", "language_model", "cached_activations",
            "shuffle_plan", "shuffle_scatter", "shuffled_shards", "sae_dictionary", "sae_metrics"} <= keys
    for asset in graph_assets(load_config()):
        for key in asset.keys:
            group = asset.group_names_by_key[key]  # a further served dictionary's: features__<slug>
            assert group in GROUPS or group == "features__topk_w1024_k32", group
            assert asset.descriptions_by_key.get(key), f"{key} has no description"
            assert asset.code_versions_by_key.get(key), f"{key} has no code_version"
            base, _, digest = asset.code_versions_by_key[key].partition("+cfg.")
            assert base.isdigit() and len(digest) == 10, f"{key}: code_version {asset.code_versions_by_key[key]!r}"
    assert ALL_CHECKS and set(defs.resources) >= {"settings", "storage"}


def test_lineage_follows_the_design():
    graph = defs.resolve_asset_graph()
    parents = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys}
               for k in graph.get_all_asset_keys()}
    assert parents["token_shards"] == {"corpus_shards", "tokenizer"}
    assert parents["cached_activations"] == {"token_shards", "language_model"}
    # The count table depends on every shard: one plan that each scatter and gather reads.
    assert parents["shuffle_plan"] == {"cached_activations"}
    assert parents["shuffle_scatter"] == {"shuffle_plan", "cached_activations"}
    assert parents["shuffled_shards"] == {"shuffle_plan", "shuffle_scatter"}
    # Every asset that reads the tokenizer's special tokens declares it (special_tokens.exclude)
    assert parents["sae_dictionary"] == {"shuffled_shards", "tokenizer"}
    assert parents["sae_metrics"] == {"sae_dictionary", "language_model", "token_shards", "tokenizer"}
    # Probing reads the documents' labels (corpus_shards) beside what sae_metrics reads
    assert parents["sae_probing"] == {"corpus_shards", "tokenizer", "token_shards", "language_model", "sae_dictionary"}
    assert parents["feature_samples"] == {"cached_activations", "tokenizer", "sae_dictionary", "sae_metrics"}
    assert parents["feature_examples"] == {"feature_samples"}
    assert parents["context_gather"] == {"cached_activations", "token_shards", "tokenizer", "feature_examples",
                                         "sae_dictionary", "sae_metrics"}
    assert parents["context_windows"] == {"feature_examples", "context_gather", "sae_dictionary", "sae_metrics"}
    # The overview page: this dictionary's training curve, every sweep point's metrics (the frontier);
    # the feature map: a layout of each dictionary's decoder alone, read by the site, not recomputed
    assert parents["feature_map"] == {"sae_dictionary"}
    # Matches read the other sweep point's dictionary (cell B) and this one's through its scoring
    assert parents["feature_matches"] == {"sae_dictionary", "sae_metrics"}
    assert parents["feature_site"] == {"site_json", "site_json__topk_w1024_k32", "feature_matches",
                                       "feature_matches__topk_w1024_k32", "sae_dictionary", "sae_metrics", "feature_map"}
    # The second sweep point's feature assets are wired as the first's, each to its own copies
    for name, wanted in parents.items():
        if name.endswith("__topk_w1024_k32"):
            base = {p if p in ("cached_activations", "token_shards", "tokenizer", "sae_dictionary", "sae_metrics",
                               "language_model") else f"{p}__topk_w1024_k32"
                    for p in parents[name.split("__")[0]]}
            assert wanted == base, name


def code_versions(overrides: dict) -> dict[str, str]:
    return {a.key.to_user_string(): a.code_versions_by_key[a.key] for a in graph_assets(load_config(overrides=overrides))}


def test_a_config_value_changes_the_code_version_of_exactly_the_assets_that_read_it():
    base = code_versions({})
    changed = {"features": {"top_k": 7}}
    after = code_versions(changed)
    differ = {name for name in base if base[name] != after[name]}
    # (each served dictionary's copies alike); the rest follow by their inputs' data versions
    assert differ == {"feature_samples", "feature_examples", "feature_samples__topk_w1024_k32",
                      "feature_examples__topk_w1024_k32"}
    after = code_versions({"features": {"window_before": 3}})
    assert {name for name in base if base[name] != after[name]} == {
        "context_gather", "context_windows", "context_gather__topk_w1024_k32", "context_windows__topk_w1024_k32"}
    after = code_versions({"shuffle": {"seed": 3}})
    assert {name for name in base if base[name] != after[name]} == {"shuffle_plan", "shuffle_scatter", "shuffled_shards"}
    # A new sweep point is a new partition (and, served, new assets), not a change to the existing ones.
    sweep = [{"architecture": "relu", "width": 1024, "sparsity": 5}, {"architecture": "topk", "width": 1024, "sparsity": 32},
             {"architecture": "topk", "width": 2048, "sparsity": 64}]
    grown = code_versions({"sae": {"sweep": sweep}})
    assert {name: grown[name] for name in base} == base
    assert set(grown) - set(base) == {f"{name}__topk_w2048_k64" for name in (
        "feature_samples", "feature_examples", "context_gather", "context_windows", "site_json", "feature_matches")}


def test_local_instance_config_limits_the_model_pool(tmp_path):
    (tmp_path / "dagster.yaml").write_text((ROOT / "deploy" / "dagster-local.yaml").read_text())
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        concurrency = instance.get_concurrency_config()
        assert concurrency.pool_config.default_pool_limit == 1
        assert concurrency.run_queue_config.max_concurrent_runs == 4
    pools = {a.key.to_user_string(): a.op.pool for a in graph_assets(load_config()) if a.op.pool}
    assert {"cached_activations", "sae_dictionary", "sae_metrics", "site_json"} <= {k for k, v in pools.items()
                                                                                    if v == "model"}


def test_workspace_yaml_loads_the_code_location(tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    out = subprocess.run([str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w",
                          "workspace.yaml"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "All code locations passed validation" in out.stderr + out.stdout


def test_a_bad_config_named_by_the_environment_fails_at_load(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("shuffle:\n  buckets: 3\n")
    code = "import sae_assets.definitions"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "SAE_ASSETS_CONFIG": str(bad)})
    assert out.returncode != 0
    assert "unknown config key 'shuffle.buckets'" in out.stderr


def test_the_code_location_offers_garbage_collection_as_a_job_and_a_stopped_schedule():
    job = defs.resolve_job_def("garbage_collection_job")
    assert [node.name for node in job.nodes] == ["collect_garbage"]
    [schedule] = [s for s in defs.schedules if s.job_name == "garbage_collection_job"]
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED


def test_partitions_exist_without_a_command_through_the_config_partitions_sensor(tmp_path):
    """On by default; its first tick adds every partition the config implies, the next finds
    nothing to do, and a narrower sweep removes the partition of the point taken out."""
    from support import TINY, overlay, write_run_config

    from resources import RunSettings
    from sae_assets.defs import sensors
    from sae_assets.defs.partitions import config_partitions

    assert sensors.config_partitions_sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert "config_partitions" in {s.name for s in defs.sensors}
    config_path = write_run_config(tmp_path, TINY, {"root": str(tmp_path / "artifacts")})

    def tick(instance, path):
        context = dg.build_sensor_context(instance=instance, resources={"settings": RunSettings(config_path=path)})
        outcome = sensors.config_partitions_sensor(context)
        if isinstance(outcome, dg.SkipReason):
            return outcome
        for request in outcome.dynamic_partitions_requests:  # what the sensor daemon does with them
            if isinstance(request, dg.AddDynamicPartitionsRequest):
                instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
            else:
                for key in request.partition_keys:
                    instance.delete_dynamic_partition(request.partitions_def_name, key)
        return outcome

    with dg.instance_for_test() as instance:
        assert instance.get_dynamic_partitions("shards") == []
        tick(instance, config_path)
        wanted = config_partitions(load_config(config_path))
        assert wanted["shards"] == ["shard-0000", "shard-0001"] and len(wanted["dictionaries"]) == 2
        for kind, keys in wanted.items():
            assert sorted(instance.get_dynamic_partitions(kind)) == sorted(keys), kind
        assert isinstance(tick(instance, config_path), dg.SkipReason)
        narrower = write_run_config(tmp_path, overlay(TINY, sae={"sweep": TINY["sae"]["sweep"][:1]}),
                                    {"root": str(tmp_path / "artifacts")})
        tick(instance, narrower)
        assert instance.get_dynamic_partitions("dictionaries") == config_partitions(load_config(narrower))["dictionaries"]
