"""The corpus and model assets materialized end to end with dg.materialize on a tiny config.

Runs the same `materialize_all` that `make demo` uses, into a temporary artifact root and an
ephemeral Dagster instance, then checks what was written, what Dagster recorded, that a
rerun is byte-identical, and that bad input fails clearly without touching what exists.
"""

import json

import dagster as dg
import numpy as np
import pytest
import torch
import yaml
from support import TINY, overlay

from resources import ArtifactStorage
from resources.arrow_files import open_ipc_table
from sae_assets.core import schemas
from sae_assets.core.model import lm
from sae_assets.core.corpus import tokenization
from sae_assets.defs.model_assets import load_all_sequences, load_language_model
from sae_assets.defs.partitions import shard_keys
from sae_assets.definitions import ALL_ASSETS, build_resources
from sae_assets.demo import materialize_all

CONFIG = overlay(
    TINY,
    corpus={"max_documents": 400},
    tokenizer={"vocab_size": 512, "context_length": 32},
    model={"d_model": 64, "d_mlp": 128, "train_tokens": 60000, "batch_size": 16, "learning_rate": 0.01,
           "warmup_steps": 5},
    activations={"batch_size": 32},
    shuffle={"num_buckets": 4},
    sae={"sweep": [{"architecture": "topk", "width": 64, "sparsity": 4}], "train_tokens": 4096, "batch_size": 256,
         "resample_steps": [], "eval_sequences": 4, "lr_warmup_steps": 50, "rewarm_steps": 50,
         "checkpoint_every": 200, "dead_after_tokens": 200000},
)
"""support.TINY with a bigger model on longer sequences, which must beat the unigram entropy by a
nat, and one small SAE; activations.batch_size, shuffle.num_buckets and the last four sae keys
at their defaults."""


def write_config(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One materialization of the four assets, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("artifacts")
    config_path = write_config(root.parent / "tiny.yaml", {**CONFIG, "storage": {"root": str(root)}})
    instance = dg.DagsterInstance.ephemeral()
    materialize_all(instance, config_path, log=lambda *_: None)
    store = build_resources(config_path)["storage"].store()
    return instance, config_path, store


def test_every_partition_has_a_manifest(built):
    instance, _, store = built
    assert shard_keys(instance) == ["shard-0000", "shard-0001"]
    assert sorted(store.partitions("corpus_shards")) == ["shard-0000", "shard-0001"]
    assert sorted(store.partitions("token_shards")) == ["shard-0000", "shard-0001"]
    assert store.partitions("tokenizer") == [None]
    assert store.partitions("language_model") == [None]
    docs = sum(store.require("corpus_shards", k).total_rows for k in shard_keys(instance))
    assert docs == 400


def test_dagster_data_version_is_the_manifest_hash(built):
    instance, _, store = built
    for asset, partition in [("token_shards", "shard-0001"), ("language_model", None)]:
        record = instance.get_latest_materialization_event(dg.AssetKey(asset)) if partition is None else None
        if partition is not None:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
            ).records
            record = records[0].event_log_entry
        materialization = record.asset_materialization
        assert materialization.tags["dagster/data_version"] == store.require(asset, partition).data_version


def test_token_shards_have_stable_disjoint_global_indices(built):
    instance, _, store = built
    tokens, first, upstream = load_all_sequences(store, shard_keys(instance))
    assert tokens.shape[1] == 32 and tokens.dtype == np.int32
    assert len(np.unique(first)) == len(first)
    shards = schemas.shard_of_token(first)
    assert set(shards) == {0, 1}
    offsets = first - (shards << schemas.SHARD_BITS)
    assert np.all(offsets % 32 == 0)
    assert set(upstream) == {"token_shards[shard-0000]", "token_shards[shard-0001]"}
    tok_manifest = store.require("tokenizer", None)
    assert tokens.max() < tok_manifest.extra["vocab_size"]


def test_language_model_beats_unigram_entropy_and_reloads(built):
    instance, _, store = built
    model, manifest = load_language_model(store)
    assert manifest.extra["val_loss"] < manifest.extra["unigram_entropy"] - 1.0
    tokens, first, _ = load_all_sequences(store, shard_keys(instance))
    is_val = lm.split_is_validation(first, 0.1, 0)
    val = torch.from_numpy(tokens[is_val].astype(np.int64))
    assert lm.evaluate_loss(model, val, batch_size=32) == pytest.approx(manifest.extra["val_loss"], rel=1e-4)
    curve = store.fetch(manifest, "training_curve.parquet")
    assert curve.stat().st_size > 0
    event = instance.get_latest_materialization_event(dg.AssetKey("language_model")).asset_materialization
    assert event.metadata["tokens_per_second"].value > 0
    assert "data:image/png;base64" in event.metadata["training_curve"].value


def test_rerun_is_byte_identical(built):
    instance, config_path, store = built
    before = {k: store.require("token_shards", k).to_json() for k in shard_keys(instance)}
    tokenizer_before = store.require("tokenizer", None).to_json()
    resources = build_resources(config_path)
    for asset in ("corpus_shards", "token_shards"):
        for key in shard_keys(instance):
            dg.materialize(ALL_ASSETS, selection=[asset], partition_key=key, instance=instance, resources=resources)
    dg.materialize(ALL_ASSETS, selection=["tokenizer"], instance=instance, resources=resources)
    assert {k: store.require("token_shards", k).to_json() for k in shard_keys(instance)} == before
    assert store.require("tokenizer", None).to_json() == tokenizer_before


def test_empty_corpus_fails_clearly_and_keeps_the_old_partition(built, tmp_path):
    instance, config_path, store = built
    before = store.require("corpus_shards", "shard-0000").to_json()
    (tmp_path / "tiny.txt").write_text("too short")
    root = yaml.safe_load(open(config_path))["storage"]["root"]
    bad = write_config(tmp_path / "bad.yaml", {**CONFIG, "storage": {"root": root},
                                               "corpus": {"source": "local", "paths": [str(tmp_path / "tiny.txt")],
                                                          "num_shards": 2}})
    with pytest.raises(Exception, match="the corpus is empty"):
        dg.materialize(ALL_ASSETS, selection=["corpus_shards"], partition_key="shard-0000", instance=instance,
                       resources=build_resources(bad))
    assert store.require("corpus_shards", "shard-0000").to_json() == before
    table = open_ipc_table(store.fetch(store.require("token_shards", "shard-0000"), "sequences.arrow"))
    assert tokenization.sequences_from_table(table)[0].shape[0] > 0


def test_unknown_config_key_fails_at_load(tmp_path):
    bad = write_config(tmp_path / "typo.yaml", {"tokenizer": {"vocab": 100}})
    with pytest.raises(ValueError, match="unknown config key 'tokenizer.vocab'"):
        build_resources(bad)


def test_storage_resource_reports_its_location(tmp_path):
    store = ArtifactStorage(root=str(tmp_path / "r")).store()
    assert store.describe() == str((tmp_path / "r").resolve())
    assert json.loads(json.dumps({"ok": store.describe()}))
