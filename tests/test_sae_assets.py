"""sae_dictionary and sae_metrics on a tiny graph: sweep partitions, SAELens layout, metrics,
checks that fail visibly, and refusal of bad input."""

import itertools
import json
import re

import dagster as dg
import numpy as np
import pytest
import torch
from dagster._core.errors import DagsterAssetCheckFailedError
from support import SWEEP, TINY, write_run_config

from sae_assets.core.sae import data as sae_data
from sae_assets.core.config import load_config, resolve_resample_steps
from sae_assets.core.sae import io as sae_io
from sae_assets.defs.dictionary_assets import SAE_DICTIONARY, load_dictionary, set_up_dictionary, training_stream
from sae_assets.defs.partitions import dictionary_keys, sync_partitions
from sae_assets.definitions import ALL_ASSETS, ALL_CHECKS, build_resources
from sae_assets.demo import materialize_all

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

    expected = {}
    for key in dictionary_keys(instance):
        manifest = store.require("sae_dictionary", key)
        frame = pl.read_parquet(store.fetch(manifest, "training_curve.parquet"))
        assert set(frame.columns) >= {"step", "loss", "mse", "l0", "dead_fraction", "lr"}
        assert frame["step"][-1] == manifest.extra["steps"] == 12800 // 128
        assert frame["lr"][-1] < 0.1 * frame["lr"].max(), "the LR decays to ~0 at the end"
        # A resample happens at each sae.resample_steps point (TINY's [0.5]: half-way through the
        # 100 steps) where features are dead. The curve row of step s holds the dead fraction
        # after s batches, which is what the resample at step s sees.
        dead_at = dict(zip(frame["step"].to_list(), frame["dead_fraction"].to_list()))
        due = list(resolve_resample_steps(tuple(TINY["sae"]["resample_steps"]), manifest.extra["steps"]))
        assert due == [50] and all(s in dead_at for s in due), "the curve must log each resample step"
        expected[key] = sum(dead_at[s] > 0 for s in due)
        assert manifest.extra["resamples"] == expected[key], (key, dead_at)
    assert max(expected.values()) >= 1, f"no point had dead features to resample: {expected}"


def test_long_steps_log_progress_lines_to_the_run_log(trained):
    """Each long step's core loop reports through context.log, so its lines are in the run's
    event log (the run's log view in the UI): step/total, tokens/s, loss where there is one, ETA."""
    instance = trained[0]
    lines = [entry.user_message for run in instance.get_runs() for entry in instance.all_logs(run.run_id)
             if entry.dagster_event is None and re.search(r": step \d+/\d+ \(", entry.user_message or "")]
    by_asset = {}
    for line in lines:
        by_asset.setdefault(re.match(r"[a-z_]+", line).group(), []).append(line)
    assert set(by_asset) >= {"language_model", "cached_activations", "sae_dictionary", "feature_samples",
                             "context_gather", "context_windows", "attribution_tables"}, sorted(by_asset)
    for key in dictionary_keys(instance):
        mine = [line for line in by_asset["sae_dictionary"] if line.startswith(f"sae_dictionary[{key}]: ")]
        assert re.search(r"step 1/100 \(1\.0%\), [\d,]+ tokens/s, loss [\d.e+-]+, ETA \d", mine[0]), mine
        assert re.search(r"step 100/100 \(100\.0%\), [\d,]+ tokens/s, loss [\d.e+-]+, done in \d", mine[-1]), mine
    assert all("loss" in line for line in by_asset["language_model"])
    assert not any("loss" in line for line in by_asset["cached_activations"])


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


def test_probing_scores_sparse_probes_against_the_raw_probe_beside_the_metrics(trained):
    """sae_probing, per sweep point: a raw-activation probe and one k-sparse probe per k for each task,
    on balanced test documents whose labels are modules the corpus holds; its summary and UI
    metadata are the means of that table."""
    import polars as pl

    from sae_assets.core.corpus.labels import document_label
    from sae_assets.defs.partitions import shard_keys

    instance, config_path, store, _ = trained
    cfg = load_config(config_path)
    corpus_labels = {document_label(doc_id, "embedded") for shard in shard_keys(instance) for doc_id in
                     pl.read_parquet(store.fetch(store.require("corpus_shards", shard), "documents.parquet"))["doc_id"]}
    for key in dictionary_keys(instance):
        manifest = store.require("sae_probing", key)
        table = pl.read_parquet(store.fetch(manifest, "probing.parquet"))
        tasks = table["label"].unique(maintain_order=True).to_list()
        assert len(tasks) >= 1 and set(tasks) <= corpus_labels, tasks
        for label in tasks:
            rows = table.filter(pl.col("label") == label)
            assert rows["k"].to_list() == [0, *cfg.probing.k_values] and rows["probe"][0] == "raw"
            assert rows["test_documents"][0] % 2 == 0 and rows["train_documents"][0] % 2 == 0, "balanced classes"
            for k, latents in zip(rows["k"][1:], rows["latents"][1:]):
                assert len(set(latents)) == len(latents) == min(k, 64) and all(0 <= f < 64 for f in latents)
        summary = manifest.extra["summary"]
        raw = table.filter(pl.col("probe") == "raw")["accuracy"].mean()
        assert summary["raw_accuracy"] == pytest.approx(raw) and summary["tasks"] == len(tasks)
        for k in cfg.probing.k_values:
            sparse = table.filter((pl.col("probe") == "sae") & (pl.col("k") == k))["accuracy"].mean()
            assert summary[f"sae_top_{k}_accuracy"] == pytest.approx(sparse)
            assert summary[f"gap_top_{k}"] == pytest.approx(raw - sparse)
        # Mean-pooled activations of a trained model tell a module's docstrings from the rest.
        assert summary["raw_accuracy"] > 0.55, summary
        shown = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey("sae_probing"), asset_partitions=[key]), limit=1).records[0]
        metadata = shown.event_log_entry.asset_materialization.metadata
        assert metadata["gap_top_1"].value == pytest.approx(summary["gap_top_1"])
        assert all(f"| {label} |" in metadata["tasks_table"].value for label in tasks)


def test_sae_training_never_sees_heldout_tokens(trained):
    instance, config_path, store, _ = trained
    cfg = load_config(config_path)
    from resources.arrow_files import open_ipc_table

    from sae_assets.defs.corpus_assets import excluded_token_ids

    manifests = [store.require("shuffled_shards", k) for k in ("bucket-0000", "bucket-0001")]
    special, _ = excluded_token_ids(store, cfg)  # special_tokens.exclude: training skips them too
    stream = training_stream(store, manifests, cfg, special)  # the batches sae_dictionary trains on
    tables = [open_ipc_table(store.fetch(m, "shuffled.arrow")) for m in manifests]
    every = np.concatenate([t.column("token_index").to_numpy() for t in tables])
    is_special = np.isin(np.concatenate([t.column("token_id").to_numpy() for t in tables]), special)
    held = sae_data.heldout_tokens(every, 16, cfg.model.val_fraction, cfg.model.seed)
    assert 0 < held.sum() < len(held) == stream.reader.num_rows and is_special.any()
    training_rows = np.sort(every[~held & ~is_special])  # rows of the shuffled shards minus held-out and special rows
    rows, batch = len(training_rows), cfg.sae.batch_size
    steps = {store.require("sae_dictionary", key).extra["steps"] for key in dictionary_keys(instance)}
    assert steps == {12800 // batch}
    import polars as pl

    for key in dictionary_keys(instance):  # every step trained on one full batch
        curve = pl.read_parquet(store.fetch(store.require("sae_dictionary", key), "training_curve.parquet"))
        assert curve["tokens"][-1] == 12800
    # decode the rows of the batches the run used, and of the same stream on to two whole epochs
    covered = max(12800 // batch, -(-2 * rows // batch))
    used = np.concatenate([index.numpy() for _, index in itertools.islice(stream.indexed(0), covered)])
    assert len(used) == covered * batch
    assert not sae_data.heldout_tokens(used, 16, cfg.model.val_fraction, cfg.model.seed).any()
    for epoch in range(2):  # each epoch trains on every training row exactly once
        assert np.array_equal(np.sort(used[epoch * rows:(epoch + 1) * rows]), training_rows), f"epoch {epoch}"
    later, again = stream.batches(3), stream.batches(0)
    for _ in range(3):
        next(again)
    assert torch.equal(next(later), next(again)), "batch s must not depend on where the stream started"


def shuffled_table(hook, first_index, rows, width, nan_rows=(), scale=1.0):
    """A shuffled-bucket-like table: token_index and one hook column (rows, width) float32."""
    import pyarrow as pa

    acts = (np.random.default_rng(first_index).normal(size=(rows, width)) * scale).astype(np.float32)
    acts[list(nan_rows)] = np.nan
    return pa.table({"token_index": pa.array(np.arange(first_index, first_index + rows, dtype=np.int64)),
                     hook: pa.FixedSizeListArray.from_arrays(pa.array(acts.ravel()), width)})


def test_sae_set_up_on_nan_inputs_names_the_partition_bucket_and_token():
    cfg = load_config(overrides=TINY)
    key, shard_1 = "relu-w64-l1_0.3", 1 << 40  # bucket 1 holds tokens of token shard 1
    held = sae_data.heldout_tokens(shard_1 + np.arange(200), 16, cfg.model.val_fraction, cfg.model.seed)
    bad = int(np.flatnonzero(~held)[7])  # a row training uses
    tables = [shuffled_table(cfg.sae_hook, 0, 200, 32), shuffled_table(cfg.sae_hook, shard_1, 200, 32, [bad])]
    stream = sae_data.TrainingStream.for_run(tables, cfg, bucket_names=["shuffled_shards[bucket-0000]",
                                                                       "shuffled_shards[bucket-0001]"])
    with pytest.raises(ValueError) as err:
        set_up_dictionary(key, 32, cfg, stream)
    assert re.fullmatch(
        rf"sae_dictionary\[{re.escape(key)}\]: cannot set up the SAE: \d+ of the 1024 rows of the initialisation "
        rf"sample \(the first 8 training batches\) hold NaN or inf; the first is global token index {shard_1 + bad} "
        rf"\(shard 1, offset {bad}\) in shuffled bucket shuffled_shards\[bucket-0001\]", str(err.value)), str(err.value)
    zeros = [shuffled_table(cfg.sae_hook, 0, 200, 32, scale=0.0)]
    with pytest.raises(ValueError, match=rf"sae_dictionary\[{re.escape(key)}\]: cannot set up the SAE: "
                                         r"cannot scale inputs: their mean norm is 0\.0"):
        set_up_dictionary(key, 32, cfg, sae_data.TrainingStream.for_run(zeros, cfg))
    sae = set_up_dictionary(key, 32, cfg, sae_data.TrainingStream.for_run(tables[:1], cfg))
    assert torch.isfinite(sae.W_dec).all() and sae.width == 64


def test_adding_a_sweep_point_adds_one_partition_and_retrains_nothing(trained):
    instance, config_path, store, directory = trained
    before = {k: store.require("sae_dictionary", k).to_json() for k in dictionary_keys(instance)}
    grown = config_file(directory, load_config(config_path).storage.root,
                        sae={"sweep": [*SWEEP, {"architecture": "topk", "width": 32, "sparsity": 2}]})
    added = sync_partitions(instance, load_config(grown))
    assert added["dictionaries"] == ["topk-w32-k2"]
    old, new = load_config(config_path), load_config(grown)
    for point in old.sae.sweep:  # the config hash that keys each dictionary ignores the rest of the sweep
        assert SAE_DICTIONARY.config_hash(old, point.key) == SAE_DICTIONARY.config_hash(new, point.key)
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
    with pytest.raises(Exception, match=r"sae.hook_point: hook 'blocks.0.hook_mlp_out' is not among the hooks the current shuffled_shards hold"):
        dg.materialize([*ALL_ASSETS, *ALL_CHECKS], selection=dg.AssetSelection.assets("sae_dictionary"),
                       partition_key="relu-w64-l1_0.3", instance=instance, resources=build_resources(bad))
    assert store.require("sae_dictionary", "relu-w64-l1_0.3").to_json() == before
