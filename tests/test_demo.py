"""`make demo` runs only what is missing or stale: `sae_assets.demo.materialize_stale`.

One instance and artifact root for the module, on the tiny config with the feature browser:
the first pass materializes every partition; a second pass with nothing changed materializes
nothing; after a one-key config edit, exactly the assets that declare the key and what reads
their new data run, and afterwards Dagster's own stale-status resolver finds every partition
fresh. The pass evaluates the assets' automation condition (identity.keep_fresh), the one the
daemon's keep_fresh sensor evaluates.
"""

from __future__ import annotations

import gc
import warnings

import dagster as dg
import pytest
from support import FEATURES, TINY, overlay, stale_cells, write_run_config

from sae_assets.core.config import load_config
from sae_assets.defs.identity import DECLARED
from sae_assets.defs.partitions import partition_keys
from sae_assets.definitions import build_resources, graph_assets
from sae_assets.demo import materialize_stale

pytestmark = pytest.mark.slow
EDITED_KEY, EDITED_VALUE = "features.logit_effects", 3


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    directory = tmp_path_factory.mktemp("demo")
    config = overlay(TINY, features=FEATURES)
    storage = {"root": str(directory / "artifacts")}
    config_path = write_run_config(directory, config, storage)
    home = directory / "dagster_home"
    home.mkdir()
    gc.collect()  # what earlier test modules left (their ephemeral instances' temporary directories) is not the demo's
    with dg.DagsterInstance.local_temp(str(home)) as instance, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = materialize_stale(instance, config_path, cursor_path=directory / "cursor", log=lambda *_: None)
        first.warnings = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
        yield instance, directory, config, storage, config_path, first


def test_first_pass_materializes_every_partition(demo):
    instance, _, _, _, config_path, first = demo
    assets = graph_assets(load_config(config_path))
    expected = {a.key.to_user_string(): len(partition_keys(a.partitions_def, instance)) for a in assets}
    assert first.ran == expected and not first.skipped
    assert first.warnings == [], "the demo printed warnings a user would have to learn to ignore"
    assert stale_cells(instance, config_path) == {}


def test_a_rerun_with_nothing_changed_materializes_nothing(demo):
    instance, directory, _, _, config_path, first = demo
    runs_before = len(instance.get_run_records())
    again = materialize_stale(instance, config_path, cursor_path=directory / "cursor", log=lambda *_: None)
    assert again.ran == {} and again.skipped == first.ran and again.evaluations == 1
    assert len(instance.get_run_records()) == runs_before, "not one run launched"


def test_a_one_key_edit_reruns_exactly_what_reads_the_key_and_what_reads_their_new_data(demo):
    instance, directory, config, storage, _, _ = demo
    edited = overlay(config, features={**FEATURES, EDITED_KEY.split(".")[1]: EDITED_VALUE})
    config_path = write_run_config(directory, edited, storage)
    declaring = {name for name, ident in DECLARED.items() if EDITED_KEY in ident.keys}
    assert declaring == {"site_json"}
    # Before the pass, Dagster calls exactly the declaring asset's partitions stale (code version).
    assert {cell.split("[")[0] for cell in stale_cells(instance, config_path)} == declaring
    assets = graph_assets(load_config(config_path))
    downstream = {key.to_user_string() for key in dg.AssetSelection.assets(*declaring).downstream().resolve(assets)}
    assert downstream == {"site_json", "feature_site", "neuronpedia_export"}

    edit = materialize_stale(instance, config_path, cursor_path=directory / "cursor", log=lambda *_: None)
    n = {a.key.to_user_string(): len(partition_keys(a.partitions_def, instance)) for a in assets}
    assert edit.ran == {name: n[name] for name in downstream}
    assert set(edit.skipped) == set(n) - downstream
    assert stale_cells(instance, config_path) == {}, "everything Dagster calls stale was rematerialized"
    again = materialize_stale(instance, config_path, cursor_path=directory / "cursor", log=lambda *_: None)
    assert again.ran == {}


def test_materialize_upstream_of_runs_one_corner_of_the_graph(tmp_path):
    """What the experiments use: the target and what it is built from, every partition, nothing else."""
    from sae_assets.demo import materialize_upstream_of

    config_path = write_run_config(tmp_path, TINY, {"root": str(tmp_path / "artifacts")})
    with dg.DagsterInstance.ephemeral() as instance:
        ran = materialize_upstream_of(instance, config_path, "token_shards", log=lambda *_: None)
        assert list(ran) == ["corpus_shards", "tokenizer", "token_shards"]
        materialized = {key.to_user_string() for key in instance.get_asset_keys()}
        assert materialized == {"corpus_shards", "tokenizer", "token_shards"}
        shards = instance.get_dynamic_partitions("shards")
        assert instance.get_materialized_partitions(dg.AssetKey("token_shards")) == set(shards) and shards
