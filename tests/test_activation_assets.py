"""cached_activations and the shuffle assets, materialized on a tiny graph (local and S3).

Checks that cached rows are exactly the model's activations at the hook points with the right
global token indices, that the shuffle output is a permutation (the asset check) reached
through the extra pass a tiny memory budget forces, that reruns are byte-identical, and
that a wrong hook name or a mixture of activation formats is refused with a clear error.
"""

import uuid

import dagster as dg
import numpy as np
import pytest
import torch
from run_configs import write_run_config
from resources.arrow_files import open_ipc_table
from sae_assets.core import schemas
from sae_assets.core.activations import caching as activations
from sae_assets.core.corpus import tokenization
from sae_assets.core.activations.reader import ShuffledActivationReader, bf16_bits_to_float32, to_numpy_matrix
from sae_assets.defs.model_assets import load_language_model
from sae_assets.defs.partitions import bucket_keys, shard_keys
from sae_assets.definitions import ALL_ASSETS, ALL_CHECKS, build_resources
from sae_assets.demo import materialize_all, runs_for

HOOKS = ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"]
TINY = {
    "corpus": {"source": "embedded", "num_shards": 2, "max_documents": 150},
    "tokenizer": {"vocab_size": 300, "context_length": 16},
    "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "d_mlp": 64, "train_tokens": 4000,
              "batch_size": 8, "warmup_steps": 2, "val_fraction": 0.1},
    "activations": {"hook_points": HOOKS, "dtype": "bfloat16", "batch_size": 7},
    # A budget below one bucket's bytes forces gather_bucket through its extra pass.
    "shuffle": {"num_buckets": 3, "memory_budget_mb": 0.05, "block_rows": 64},
    "sae": {"sweep": [{"architecture": "topk", "width": 32, "sparsity": 4}], "train_tokens": 2048,
            "batch_size": 128, "resample_steps": [], "eval_sequences": 4, "min_loss_recovered": -100.0,
            "max_dead_fraction": 1.0},
}


def config_file(directory, storage, **sections):
    return write_run_config(directory, TINY, storage, **sections)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    directory = tmp_path_factory.mktemp("graph")
    config_path = config_file(directory, {"root": str(directory / "artifacts")})
    instance = dg.DagsterInstance.ephemeral()
    materialize_all(instance, config_path, log=lambda *_: None)
    return instance, config_path, build_resources(config_path)["storage"].store(), directory


def test_cached_rows_are_the_models_activations(graph):
    instance, _, store, _ = graph
    model, _ = load_language_model(store)
    for shard in shard_keys(instance):
        tokens_ST, first_S = tokenization.sequences_from_table(
            open_ipc_table(store.fetch(store.require("token_shards", shard), "sequences.arrow")))
        manifest = store.require("cached_activations", shard)
        table = open_ipc_table(store.fetch(manifest, "activations.arrow"))
        assert table.num_rows == tokens_ST.size == manifest.total_rows
        expected_index = (first_S[:, None] + np.arange(tokens_ST.shape[1])[None, :]).ravel()
        assert np.array_equal(table.column(schemas.TOKEN_INDEX).to_numpy(), expected_index)
        assert np.array_equal(table.column(schemas.TOKEN_ID).to_numpy(), tokens_ST.ravel())
        assert table.schema.metadata[b"dtype"] == b"bfloat16"
        with torch.inference_mode():
            _, cache = model.run_with_cache(torch.from_numpy(tokens_ST[:5].astype(np.int64)), names_filter=HOOKS)
        for hook in HOOKS:
            stored = bf16_bits_to_float32(to_numpy_matrix(table.column(hook))[: 5 * tokens_ST.shape[1]])
            reference = cache[hook].reshape(-1, cache[hook].shape[-1]).to(torch.bfloat16).float().numpy()
            assert np.array_equal(stored, reference), hook
        assert manifest.extra["format"] == {"dtype": "bfloat16", "hook_widths": {h: 32 for h in HOOKS}}


def test_shuffle_is_a_permutation_and_the_check_passes(graph):
    instance, config_path, store, _ = graph
    inputs = np.concatenate([
        open_ipc_table(store.fetch(store.require("cached_activations", k), "activations.arrow"))
        .column(schemas.TOKEN_INDEX).to_numpy() for k in shard_keys(instance)])
    tables = [open_ipc_table(store.fetch(store.require("shuffled_shards", k), "shuffled.arrow"))
              for k in bucket_keys(instance)]
    outputs = np.concatenate([t.column(schemas.TOKEN_INDEX).to_numpy() for t in tables])
    assert np.array_equal(np.sort(inputs), np.sort(outputs))
    assert not np.array_equal(inputs, outputs), "the shuffle moved nothing"
    # Output position is not tied to source order.
    ranks = np.argsort(np.argsort(outputs))
    assert abs(np.corrcoef(ranks, np.arange(len(outputs)))[0, 1]) < 0.1
    # Bytes of a bucket exceed the 0.05 MB budget, so the gather took another pass.
    assert store.require("shuffled_shards", "bucket-0000").total_bytes > 0.05 * 2**20
    check = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], selection=dg.AssetSelection.checks(*ALL_CHECKS),
                           instance=instance, resources=build_resources(config_path))
    [evaluation] = check.get_asset_check_evaluations()
    assert evaluation.passed and evaluation.metadata["permutation"].value == "verified"


def test_reader_serves_every_row_once_per_epoch(graph):
    instance, _, store, _ = graph
    buckets = [open_ipc_table(store.fetch(store.require("shuffled_shards", k), "shuffled.arrow"))
               for k in bucket_keys(instance)]
    reader = ShuffledActivationReader(buckets, hook=HOOKS[0], batch_size=50, seed=3, with_token_index=True)
    seen = [np.concatenate([i.numpy() for _, i in reader.epoch(e)]) for e in (0, 1)]
    total = sum(b.num_rows for b in buckets)
    for epoch in seen:
        assert len(epoch) == total and len(np.unique(epoch)) == total
    assert not np.array_equal(seen[0], seen[1])
    first_batch, _ = next(iter(reader.epoch(0)))
    assert first_batch.dtype == torch.float32 and first_batch.shape == (50, 32)


def test_rerun_of_the_shuffle_is_byte_identical(graph):
    instance, config_path, store, _ = graph
    before = {k: store.require("shuffled_shards", k).to_json() for k in bucket_keys(instance)}
    scatter_before = store.require("shuffle_scatter", "shard-0001").to_json()
    resources = build_resources(config_path)
    dg.materialize(ALL_ASSETS, selection=["shuffle_scatter"], partition_key="shard-0001", instance=instance,
                   resources=resources)
    dg.materialize(ALL_ASSETS, selection=["shuffled_shards"], partition_key="bucket-0002", instance=instance,
                   resources=resources)
    assert store.require("shuffle_scatter", "shard-0001").to_json() == scatter_before
    assert {k: store.require("shuffled_shards", k).to_json() for k in bucket_keys(instance)} == before


def latest_materialization(instance, asset: str, partition: str) -> tuple[str, str]:
    """(run id, data version) of the partition's latest materialization."""
    [record] = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1).records
    return record.run_id, record.asset_materialization.tags["dagster/data_version"]


def test_single_run_backfill_of_the_scatter_equals_runs_per_shard(graph):
    instance, config_path, store, _ = graph
    shards = shard_keys(instance)
    resources = build_resources(config_path)
    [(key, tags)] = runs_for(next(a for a in ALL_ASSETS if a.key.path == ["shuffle_scatter"]), shards)
    assert key is None and set(tags.values()) == {shards[0], shards[-1]}, "one run for the whole range"

    def ranged_run():
        dg.materialize(ALL_ASSETS, selection=["shuffle_scatter"], tags=tags, instance=instance, resources=resources)
        return {k: latest_materialization(instance, "shuffle_scatter", k) for k in shards}

    ranged = ranged_run()
    ranged_manifests = {k: store.require("shuffle_scatter", k).to_json() for k in shards}
    assert len({run for run, _ in ranged.values()}) == 1, "every shard materialized by the one run"
    assert len({version for _, version in ranged.values()}) == 1, "Dagster gives a ranged step one version"
    again = ranged_run()  # a new run on the same inputs: the same version, so nothing turns stale
    assert {r for r, _ in again.values()} != {r for r, _ in ranged.values()}
    assert {v for _, v in again.values()} == {v for _, v in ranged.values()}
    for k in shards:  # one run per shard writes byte-identical partitions, each with its own version
        dg.materialize(ALL_ASSETS, selection=["shuffle_scatter"], partition_key=k, instance=instance,
                       resources=resources)
        assert store.require("shuffle_scatter", k).to_json() == ranged_manifests[k]
        assert latest_materialization(instance, "shuffle_scatter", k)[1] == store.require("shuffle_scatter", k).data_version


def test_wrong_hook_name_lists_the_valid_ones(graph):
    instance, _, store, directory = graph
    before = store.require("cached_activations", "shard-0000").to_json()
    bad = config_file(directory, {"root": str(directory / "artifacts")},
                      activations={"hook_points": ["blocks.0.hook_resid_pots"]})
    with pytest.raises(Exception, match=r"blocks\.0\.hook_resid_pots.*blocks\.0\.hook_resid_post"):
        dg.materialize(ALL_ASSETS, selection=["cached_activations"], partition_key="shard-0000",
                       instance=instance, resources=build_resources(bad))
    assert store.require("cached_activations", "shard-0000").to_json() == before


def test_mixed_activation_formats_are_refused(tmp_path):
    config_path = config_file(tmp_path, {"root": str(tmp_path / "artifacts")})
    instance = dg.DagsterInstance.ephemeral()
    materialize_all(instance, config_path, log=lambda *_: None)
    float16 = config_file(tmp_path, {"root": str(tmp_path / "artifacts")}, activations={"dtype": "float16"})
    dg.materialize(ALL_ASSETS, selection=["cached_activations"], partition_key="shard-0001",
                   instance=instance, resources=build_resources(float16))
    store = build_resources(config_path)["storage"].store()
    scatter_before = store.require("shuffle_scatter", "shard-0000").to_json()
    with pytest.raises(Exception, match=r"cached_activations\[shard-0001\].*float16.*refusing to mix"):
        dg.materialize(ALL_ASSETS, selection=["shuffle_scatter"], partition_key="shard-0000",
                       instance=instance, resources=build_resources(float16))
    assert store.require("shuffle_scatter", "shard-0000").to_json() == scatter_before


def test_nan_activations_name_the_hook_and_shard():
    stats = activations.ActivationStats()
    acts = torch.ones(4, 3)
    acts[2, 1] = float("nan")
    with pytest.raises(activations.ActivationError, match=r"cached_activations\[shard-0004\]: 1 .*blocks.0.hook_x"):
        stats.update("blocks.0.hook_x", acts, "cached_activations[shard-0004]")


def test_capture_stops_after_the_last_requested_hook(graph):
    _, _, store, _ = graph
    model, _ = load_language_model(store)
    tokens = torch.zeros((2, 8), dtype=torch.int64)
    unembed_calls = []
    handle = model.unembed.register_forward_hook(lambda *args: unembed_calls.append(1))
    try:
        captured = activations.capture_hooks(model, tokens, HOOKS)
        assert not unembed_calls, "caching ran the unembedding it does not need"
        model(tokens)
        assert unembed_calls, "the probe would not notice an unembedding call"
    finally:
        handle.remove()
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=HOOKS)
    for hook in HOOKS:
        assert torch.equal(captured[hook], cache[hook])


@pytest.mark.s3
def test_graph_on_s3(s3_server, tmp_path, monkeypatch):
    # Credentials reach boto3 through its default chain, as in production.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_access_key)
    storage = {"backend": "s3", "endpoint_url": s3_server.endpoint_url, "bucket": s3_server.bucket,
               "prefix": f"graph-{uuid.uuid4().hex[:8]}", "cache_dir": str(tmp_path / "cache")}
    config_path = config_file(tmp_path, storage)
    instance = dg.DagsterInstance.ephemeral()
    materialize_all(instance, config_path, log=lambda *_: None)
    store = build_resources(config_path)["storage"].store()
    assert store.describe().startswith(f"s3://{s3_server.bucket}/graph-")
    assert sorted(store.partitions("shuffled_shards")) == ["bucket-0000", "bucket-0001", "bucket-0002"]
    rows = sum(store.require("shuffled_shards", k).total_rows for k in bucket_keys(instance))
    assert rows == sum(store.require("cached_activations", k).total_rows for k in shard_keys(instance))
