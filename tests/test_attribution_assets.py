"""parameter_shifts [step range] and attribution_tables on a tiny graph: partitions from the
config, tables and schemas, byte-identical reruns, the same trained weights with capture
off, and clear errors for ranges outside training and stale capture settings."""

import dagster as dg
import polars as pl
import pyarrow.parquet as pq
import pytest
from support import TINY, overlay, write_run_config

from resources.manifest import Manifest
from sae_assets.core import schemas
from sae_assets.core.model import lm
from sae_assets.core.config import load_config
from sae_assets.defs import capture_io
from sae_assets.defs.attribution_assets import SHIFTS_FILE, STEPS_FILE, TABLE_FILES
from sae_assets.defs.model_assets import load_all_sequences
from sae_assets.defs.partitions import (
    STEP_RANGES,
    partition_keys,
    shard_keys,
    step_range,
    step_range_keys,
    sync_partitions,
)
from sae_assets.definitions import ALL_ASSETS, build_resources, defs

CONFIG = overlay(TINY, attribution={"top_k": 16, "steps_per_range": 20, "heuristic_min_count": 3,
                                     "heuristic_top_relative": 20, "heuristic_top_count": 3, "ablation_units": 2,
                                     "ablation_windows": 8})
"""support.TINY with a small attribution section: three step ranges, few units to ablate."""
UPSTREAM = ("corpus_shards", "tokenizer", "token_shards", "language_model")
ATTRIBUTION = ("parameter_shifts", "attribution_tables")


def materialize(instance, config_path, names):
    """Materialize the named assets in order, every partition, as demo.materialize_all does."""
    sync_partitions(instance, load_config(config_path))
    resources = build_resources(config_path)
    by_name = {a.key.to_user_string(): a for a in ALL_ASSETS}
    for name in names:
        for key in partition_keys(by_name[name].partitions_def, instance):
            dg.materialize(ALL_ASSETS, selection=dg.AssetSelection.assets(by_name[name]), partition_key=key,
                           instance=instance, resources=resources)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    directory = tmp_path_factory.mktemp("attribution")
    config_path = write_run_config(directory, CONFIG, {"root": str(directory / "artifacts")})
    instance = dg.DagsterInstance.ephemeral()
    materialize(instance, config_path, UPSTREAM + ATTRIBUTION)
    return instance, config_path, build_resources(config_path)["storage"].store(), directory


def read(store, asset, partition, name) -> pl.DataFrame:
    return pl.read_parquet(store.fetch(store.require(asset, partition), name))


def test_step_range_partitions_cover_training_and_hold_every_datum_step(graph):
    instance, config_path, store, _ = graph
    cfg = load_config(config_path)
    keys = step_range_keys(instance)
    assert keys == ["steps-000001-000020", "steps-000021-000040", "steps-000041-000047"]  # ceil(6000 / (8*16))
    tokens, first_index, _ = load_all_sequences(store, shard_keys(instance))
    train_ids = set(first_index[~lm.split_is_validation(first_index, 0.1, 0)].tolist())
    for key in keys:
        start, end = step_range(key)
        manifest = store.require("parameter_shifts", key)
        shifts, steps = read(store, "parameter_shifts", key, SHIFTS_FILE), read(store, "parameter_shifts", key, STEPS_FILE)
        assert pq.read_schema(store.fetch(manifest, SHIFTS_FILE)).equals(schemas.parameter_shift_schema())
        assert steps["step"].to_list() == list(range(start, end + 1))
        assert shifts.height == (end - start + 1) * cfg.model.batch_size * cfg.attribution.top_k
        assert shifts["rank"].max() == cfg.attribution.top_k - 1
        assert set(shifts["datum_id"].unique().to_list()) <= train_ids, "data are training sequences, by stable id"
        assert steps["sum_check_error"].max() < 1e-2 and (steps["clip_coefficient"] <= 1).all()
        first = shifts.filter((pl.col("step") == start)).head(cfg.attribution.top_k)
        assert (first["value"].abs().diff().drop_nulls() <= 0).all(), "each datum's top-k by descending |shift|"
    assert set(shifts["tensor"].unique().to_list()) <= {f"blocks.0.{k}.weight" for k in
                                                         ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.in", "mlp.out")}
    record = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=dg.AssetKey("parameter_shifts"), asset_partitions=[keys[0]]), limit=1).records[0]
    shown = record.event_log_entry.asset_materialization.metadata
    assert shown["bytes_per_datum"].value > 0 and shown["sum_check_error_max"].value < 1e-2
    lm_shown = instance.fetch_materializations(dg.AssetKey("language_model"), limit=1).records[0] \
        .event_log_entry.asset_materialization.metadata
    assert lm_shown["capture"].value is True and lm_shown["capture_overhead"].value >= 1.0


def test_attribution_tables_count_group_and_ablate(graph):
    instance, config_path, store, _ = graph
    cfg = load_config(config_path)
    manifest = store.require("attribution_tables", None)
    assert sorted(manifest.files) == sorted(TABLE_FILES)
    counts, units, notable, flips, summary = (read(store, "attribution_tables", None, n) for n in TABLE_FILES)
    shifts = pl.concat(read(store, "parameter_shifts", k, SHIFTS_FILE) for k in step_range_keys(instance))
    assert counts["count"].sum() == shifts.height
    top = counts.row(0, named=True)
    assert top["count"] == shifts.filter((pl.col("tensor") == top["tensor"]) & (pl.col("row") == top["row"])
                                         & (pl.col("column") == top["column"])).height
    neurons = counts.filter(pl.col("unit_kind") == "mlp_neuron")
    in_rows = neurons.filter(pl.col("tensor").str.ends_with("mlp.in.weight"))
    out_columns = neurons.filter(pl.col("tensor").str.ends_with("mlp.out.weight"))
    assert (in_rows["unit"] == in_rows["row"]).all() and (out_columns["unit"] == out_columns["column"]).all()
    assert units.filter(pl.col("unit_kind") == "attention_head")["unit"].max() < 2
    assert notable.height > 0 and notable.group_by(["unit_kind", "layer", "unit"]).len()["len"].max() <= 3
    assert 0 < summary.height <= cfg.attribution.ablation_units
    assert (summary["control_unit"] != summary["unit"]).all() and (summary["windows"] <= 8).all()
    assert set(flips["arm"].unique().to_list()) <= {"attributed", "control"}
    assert (flips["flips"] <= flips["instances"]).all()
    assert flips.filter(pl.col("notable"))["token_id"].is_in(notable["token_id"].to_list()).all()
    assert manifest.extra["ablated_units"] == summary.height
    # The paired test and the activation-only ranking reach the manifest (and the asset's metadata).
    assert manifest.extra["paired_test_pairs"] <= summary.height
    p_value = manifest.extra["paired_test_p_value"]
    assert p_value is None if not manifest.extra["paired_test_pairs"] else 0 < p_value <= 1
    ranked = summary.filter(pl.col("unit_kind") == "mlp_neuron")["activation_rank"].drop_nulls()
    assert ranked.len() > 0 and ranked.is_between(1, cfg.model.d_mlp).all()
    assert (summary["layer_units"] == cfg.model.d_mlp).all()


def test_rerun_is_byte_identical(graph):
    instance, config_path, store, _ = graph
    before = {("parameter_shifts", k): store.require("parameter_shifts", k).to_json() for k in step_range_keys(instance)}
    before[("attribution_tables", None)] = store.require("attribution_tables", None).to_json()
    resources = build_resources(config_path)
    key = "steps-000021-000040"
    dg.materialize(ALL_ASSETS, selection=dg.AssetSelection.assets("parameter_shifts"), partition_key=key,
                   instance=instance, resources=resources)
    dg.materialize(ALL_ASSETS, selection=dg.AssetSelection.assets("attribution_tables"), instance=instance,
                   resources=resources)
    after = {k: store.require(*k).to_json() for k in before}
    assert after == before


def test_lineage_and_partitions():
    graph = defs.resolve_asset_graph()
    parents = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys}
               for k in graph.get_all_asset_keys()}
    assert parents["parameter_shifts"] == {"language_model"}
    assert parents["attribution_tables"] == {"parameter_shifts", "language_model", "token_shards", "tokenizer"}
    assert graph.get(dg.AssetKey("parameter_shifts")).partitions_def == STEP_RANGES
    names = [a.key.to_user_string() for a in ALL_ASSETS]
    assert names.index("language_model") < names.index("parameter_shifts") < names.index("attribution_tables")
    with pytest.raises(ValueError, match="not a training step range"):
        step_range("steps-000010-000005")


def test_a_range_outside_training_is_refused(graph):
    instance, config_path, store, _ = graph
    instance.add_dynamic_partitions(STEP_RANGES.name, ["steps-000048-000060"])
    try:
        with pytest.raises(Exception, match=r"parameter_shifts\[steps-000048-000060\]: steps 48..60 are outside "
                                            r"training \(steps 1..47"):
            dg.materialize(ALL_ASSETS, selection=dg.AssetSelection.assets("parameter_shifts"),
                           partition_key="steps-000048-000060", instance=instance,
                           resources=build_resources(config_path))
    finally:
        instance.delete_dynamic_partition(STEP_RANGES.name, "steps-000048-000060")
    assert store.manifest("parameter_shifts", "steps-000048-000060") is None


def test_changed_capture_settings_are_refused_until_retraining(graph):
    instance, config_path, store, directory = graph
    before = store.require("parameter_shifts", "steps-000001-000020").to_json()
    changed = write_run_config(directory, CONFIG, {"root": str(load_config(config_path).storage.root)},
                               attribution={"top_k": 8})
    with pytest.raises(Exception, match=r"captured with attribution.top_k=16 but the config says 8; "
                                        "rematerialize language_model"):
        dg.materialize(ALL_ASSETS, selection=dg.AssetSelection.assets("parameter_shifts"),
                       partition_key="steps-000001-000020", instance=instance, resources=build_resources(changed))
    assert store.require("parameter_shifts", "steps-000001-000020").to_json() == before
    with pytest.raises(ValueError, match="materialized without capture"):
        capture_io.captured(Manifest(asset="language_model", partition=None, files={}))


def test_capture_off_trains_the_same_weights_and_writes_empty_tables(graph, tmp_path):
    _, config_path, store, _ = graph
    off = write_run_config(tmp_path, CONFIG, {"root": str(tmp_path / "artifacts")}, attribution={"capture": False})
    instance = dg.DagsterInstance.ephemeral()
    materialize(instance, off, UPSTREAM + ATTRIBUTION)
    assert step_range_keys(instance) == []
    other = build_resources(off)["storage"].store()
    with_capture, without = store.require("language_model", None), other.require("language_model", None)
    assert with_capture.files[lm.WEIGHTS_FILE].sha256 == without.files[lm.WEIGHTS_FILE].sha256
    assert not any(name.startswith("capture-") for name in without.files)
    assert "attribution" not in without.extra
    manifest = other.require("attribution_tables", None)
    assert all(manifest.files[name].rows == 0 for name in TABLE_FILES)
    assert pq.read_schema(other.fetch(manifest, "notable_tokens.parquet")).equals(schemas.notable_token_schema())
