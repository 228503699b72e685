"""sae_dictionary and sae_metrics on a tiny graph: sweep partitions, SAELens layout, metrics,
checks that fail visibly, and refusal of bad input."""

import json

import dagster as dg
import numpy as np
import pytest
import torch
from dagster._core.errors import DagsterAssetCheckFailedError
from run_configs import write_run_config

from sae_assets.core.sae import data as sae_data
from sae_assets.core.config import load_config
from sae_assets.core.sae import io as sae_io
from sae_assets.core.sae.training import config_fingerprint
from sae_assets.defs.dictionary_assets import load_dictionary
from sae_assets.defs.partitions import dictionary_keys, sync_partitions
from sae_assets.definitions import ALL_ASSETS, ALL_CHECKS, build_resources
from sae_assets.demo import materialize_all

SWEEP = [{"architecture": "relu", "width": 64, "sparsity": 0.3}, {"architecture": "topk", "width": 64, "sparsity": 4}]
TINY = {
    "corpus": {"source": "embedded", "num_shards": 2, "max_documents": 150},
    "tokenizer": {"vocab_size": 300, "context_length": 16},
    "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "d_mlp": 64, "train_tokens": 6000,
              "batch_size": 8, "warmup_steps": 2, "val_fraction": 0.1},
    "activations": {"hook_points": ["blocks.0.hook_resid_post"], "batch_size": 16},
    "shuffle": {"num_buckets": 2},
    "sae": {"sweep": SWEEP, "train_tokens": 12800, "batch_size": 128, "resample_steps": [40],
            "rewarm_steps": 5, "lr_warmup_steps": 5, "checkpoint_every": 25, "eval_sequences": 8,
            "dead_after_tokens": 3000, "max_dead_fraction": 1.0, "min_loss_recovered": -100.0},
}


def config_file(directory, root, **sections):
    return write_run_config(directory, TINY, {"root": str(root)}, **sections)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sae")
    config_path = config_file(directory, directory / "artifacts")
    instance = dg.DagsterInstance.ephemeral()
    materialize_all(instance, config_path, log=lambda *_: None)
    return instance, config_path, build_resources(config_path)["storage"].store(), directory


def test_one_partition_per_sweep_point_in_saelens_layout(trained):
    instance, _, store, _ = trained
    assert dictionary_keys(instance) == ["relu-w64-l1_0.3", "topk-w64-k4"]
    for key in dictionary_keys(instance):
        manifest = store.require("sae_dictionary", key)
        weights, cfg_file = store.fetch(manifest, sae_io.WEIGHTS_FILE), store.fetch(manifest, sae_io.CFG_FILE)
        assert weights.parent == cfg_file.parent, "SAELens loads cfg.json and weights from one directory"
        cfg = json.loads(cfg_file.read_text())
        assert cfg["d_in"] == 32 and cfg["d_sae"] == 64
        assert cfg["architecture"] == {"relu": "standard", "topk": "topk"}[key.split("-")[0]]
        assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
        from_directory = sae_io.load_sae(cfg_file.parent)
        from_store, _ = load_dictionary(store, key)
        x = torch.randn(20, 32) * 3
        assert torch.allclose(from_directory(x)[0], from_store(x)[0], atol=1e-5)


def test_training_curve_covers_the_run_and_the_lr_decays(trained):
    instance, _, store, _ = trained
    import polars as pl

    for key in dictionary_keys(instance):
        manifest = store.require("sae_dictionary", key)
        frame = pl.read_parquet(store.fetch(manifest, "training_curve.parquet"))
        assert set(frame.columns) >= {"step", "loss", "mse", "l0", "dead_fraction", "lr"}
        assert frame["step"][-1] == manifest.extra["steps"] == 12800 // 128
        assert frame["lr"][-1] < 0.1 * frame["lr"].max(), "the LR decays to ~0 at the end"
        assert manifest.extra["resamples"] >= 0


def test_metrics_are_recorded_with_their_checks(trained):
    instance, _, store, _ = trained
    for key in dictionary_keys(instance):
        manifest = store.require("sae_metrics", key)
        metrics = manifest.extra["metrics"]
        assert metrics["zero_ablation_loss"] > metrics["clean_loss"]
        assert metrics["loss_recovered"] > 0.0
        assert 0.0 <= metrics["fvu"] < 1.0
        assert 0.0 <= metrics["dead_fraction"] <= 1.0
        assert manifest.extra["checks"] == {"dead_fraction_below_threshold": True,
                                            "loss_recovered_above_threshold": True}
        if key.startswith("topk"):
            assert metrics["l0"] == pytest.approx(4.0)
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("sae_metrics"), asset_partitions=["relu-w64-l1_0.3"]), limit=1).records
    shown = records[0].event_log_entry.asset_materialization.metadata
    assert "data:image/png;base64" in shown["density_histogram"].value


def test_sae_training_never_sees_heldout_tokens(trained):
    _, config_path, store, _ = trained
    cfg = load_config(config_path)
    from resources.arrow_files import open_ipc_table
    from sae_assets.core.activations.reader import ShuffledActivationReader

    tables = [open_ipc_table(store.fetch(store.require("shuffled_shards", k), "shuffled.arrow"))
              for k in ("bucket-0000", "bucket-0001")]
    reader = ShuffledActivationReader(tables, hook=cfg.sae_hook, batch_size=64, seed=0, with_token_index=True)
    index = np.concatenate([i.numpy() for _, i in reader.epoch(0)])
    held = sae_data.heldout_tokens(index, 16, cfg.model.val_fraction, cfg.model.seed)
    assert 0 < held.sum() < len(held)
    stream = sae_data.training_batches(reader, batch_size=64, start_step=0, context_length=16,
                                       val_fraction=cfg.model.val_fraction, split_seed=cfg.model.seed)
    rows = sum(len(next(stream)) for _ in range(int((~held).sum()) // 64))
    assert rows == (int((~held).sum()) // 64) * 64
    later = sae_data.training_batches(reader, batch_size=64, start_step=3, context_length=16,
                                      val_fraction=cfg.model.val_fraction, split_seed=cfg.model.seed)
    again = sae_data.training_batches(reader, batch_size=64, start_step=0, context_length=16,
                                      val_fraction=cfg.model.val_fraction, split_seed=cfg.model.seed)
    for _ in range(3):
        next(again)
    assert torch.equal(next(later), next(again)), "batch s must not depend on where the stream started"


def test_adding_a_sweep_point_adds_one_partition_and_retrains_nothing(trained):
    instance, config_path, store, directory = trained
    before = {k: store.require("sae_dictionary", k).to_json() for k in dictionary_keys(instance)}
    grown = config_file(directory, load_config(config_path).storage.root,
                        sae={"sweep": [*SWEEP, {"architecture": "topk", "width": 32, "sparsity": 2}]})
    added = sync_partitions(instance, load_config(grown))
    assert added["dictionaries"] == ["topk-w32-k2"]
    old, new = load_config(config_path).sae, load_config(grown).sae
    for point in old.sweep:  # the fingerprint that keys each dictionary ignores the rest of the sweep
        assert config_fingerprint(old, point, 32) == config_fingerprint(new, point, 32)
    dg.materialize([*ALL_ASSETS, *ALL_CHECKS], selection=dg.AssetSelection.assets("sae_dictionary"),
                   partition_key="topk-w32-k2", instance=instance, resources=build_resources(grown))
    assert {k: store.require("sae_dictionary", k).to_json() for k in before} == before
    assert store.require("sae_dictionary", "topk-w32-k2").extra["width"] == 32


def test_failed_check_is_recorded_and_stops_the_run(trained):
    instance, config_path, store, directory = trained
    strict = config_file(directory, load_config(config_path).storage.root, sae={"min_loss_recovered": 1.5})
    with pytest.raises(DagsterAssetCheckFailedError, match="loss_recovered_above_threshold"):
        dg.materialize([*ALL_ASSETS, *ALL_CHECKS], selection=dg.AssetSelection.assets("sae_metrics"),
                       partition_key="relu-w64-l1_0.3", instance=instance, resources=build_resources(strict))
    manifest = store.require("sae_metrics", "relu-w64-l1_0.3")
    assert manifest.extra["checks"]["loss_recovered_above_threshold"] is False
    evaluation = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey("sae_metrics"), "loss_recovered_above_threshold")])
    assert list(evaluation.values())[0].status.value == "FAILED"


def test_hook_that_was_not_cached_is_refused(trained):
    instance, config_path, store, directory = trained
    before = store.require("sae_dictionary", "relu-w64-l1_0.3").to_json()
    bad = config_file(directory, load_config(config_path).storage.root,
                      activations={"hook_points": ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"]},
                      sae={"hook_point": "blocks.0.hook_mlp_out"})
    with pytest.raises(Exception, match=r"sae.hook_point 'blocks.0.hook_mlp_out' is not among the cached hooks"):
        dg.materialize([*ALL_ASSETS, *ALL_CHECKS], selection=dg.AssetSelection.assets("sae_dictionary"),
                       partition_key="relu-w64-l1_0.3", instance=instance, resources=build_resources(bad))
    assert store.require("sae_dictionary", "relu-w64-l1_0.3").to_json() == before
