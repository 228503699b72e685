"""The code location loads: in process, and through workspace.yaml as `dagster dev` loads it."""

import os
import subprocess
import sys
from pathlib import Path

from sae_assets.definitions import ALL_ASSETS, ALL_CHECKS, defs

ROOT = Path(__file__).resolve().parent.parent
GROUPS = {"corpus", "model", "activations", "dictionary"}


def test_definitions_hold_every_asset_with_group_description_and_code_version():
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert {"corpus_shards", "tokenizer", "token_shards", "language_model", "cached_activations",
            "shuffle_scatter", "shuffled_shards", "sae_dictionary", "sae_metrics"} <= keys
    for asset in ALL_ASSETS:
        for key in asset.keys:
            assert asset.group_names_by_key[key] in GROUPS
            assert asset.descriptions_by_key.get(key), f"{key} has no description"
            assert asset.code_versions_by_key.get(key), f"{key} has no code_version"
    assert ALL_CHECKS and set(defs.resources) >= {"settings", "storage"}


def test_lineage_follows_the_design():
    graph = defs.resolve_asset_graph()
    parents = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys}
               for k in graph.get_all_asset_keys()}
    assert parents["token_shards"] == {"corpus_shards", "tokenizer"}
    assert parents["cached_activations"] == {"token_shards", "language_model"}
    assert parents["shuffled_shards"] == {"shuffle_scatter"}
    assert parents["sae_dictionary"] == {"shuffled_shards"}
    assert "sae_dictionary" in parents["sae_metrics"]


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
