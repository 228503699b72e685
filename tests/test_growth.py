"""A growing corpus: appended documents become new shard partitions (the corpus_growth sensor),
and materializing them computes only the new cells of cached_activations and feature_samples
and re-merges feature_examples; nothing built from the old shards runs again (checked on the
instance's materialization records), and the models stay as they were."""

import dagster as dg
import pytest
from sqlalchemy.exc import IntegrityError
from support import FEATURES, TINY, materialize, write_run_config

from sae_assets.core.config import ConfigError, load_config
from sae_assets.defs.feature_assets import read_samples
from sae_assets.defs.partitions import SHARDS, feature_range_keys, shard_keys, sync_partitions
from sae_assets.defs.sensors import corpus_growth
from sae_assets.definitions import build_resources
from sae_assets.demo import materialize_all

PROSE = ("The quick brown fox jumps over the lazy dog while the parser reads each token of the "
         "configuration file and reports the line number of every error it finds in the input. ")


def write_documents(directory, first: int, count: int) -> None:
    for i in range(first, first + count):
        (directory / f"doc-{i:03d}.txt").write_text(f"Document {i}. " + PROSE * (3 + i % 4))


def materializations(instance, asset: str, partition: str) -> int:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=100).records
    return len(records)


def test_new_documents_add_shards_and_only_new_cells_run(tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    write_documents(corpus_dir, 0, 12)
    config_path = write_run_config(
        tmp_path, TINY, {"root": str(tmp_path / "artifacts")}, features=FEATURES,
        corpus={"source": "local", "paths": [str(corpus_dir)], "documents_per_shard": 6, "training_shards": 2,
                "max_documents": 0, "min_document_chars": 10},
        tokenizer={"vocab_size": 280})
    instance = dg.DagsterInstance.ephemeral()
    materialize_all(instance, config_path, log=lambda *_: None)
    store = build_resources(config_path)["storage"].store()
    assert shard_keys(instance) == ["shard-0000", "shard-0001"]
    frozen = {a: store.require(a, p).to_json() for a, p in
              [("tokenizer", None), ("language_model", None), ("sae_dictionary", "relu-w64-l1_0.3")]}
    old_cells = [("cached_activations", s) for s in shard_keys(instance)] + [
        ("feature_samples", str(dg.MultiPartitionKey({"shard": s, "features": f})))
        for s in shard_keys(instance) for f in feature_range_keys(instance)]
    before = {cell: materializations(instance, *cell) for cell in old_cells}
    assert set(before.values()) == {1}
    tokens_before = read_samples(store, store.require("feature_examples", "features-00000-00023")).n_tokens

    # Nothing new yet: the sensor skips. Then 13 documents arrive: shards 2 and 3 (6 + 1 documents).
    resources = build_resources(config_path)
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        assert isinstance(corpus_growth(context), dg.SkipReason)
    write_documents(corpus_dir, 12, 7)
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        outcome = corpus_growth(context)
    [request] = outcome.dynamic_partitions_requests
    assert list(request.partition_keys) == ["shard-0002", "shard-0003"]
    assert [r.partition_key for r in outcome.run_requests] == ["shard-0002", "shard-0003"]
    instance.add_dynamic_partitions("shards", list(request.partition_keys))

    for shard in ("shard-0002", "shard-0003"):
        for asset in ("corpus_shards", "token_shards", "cached_activations"):
            materialize(instance, config_path, {asset}, shard)
        for frange in feature_range_keys(instance):
            materialize(instance, config_path, {"feature_samples"}, dg.MultiPartitionKey({"shard": shard, "features": frange}))
    for frange in feature_range_keys(instance):
        materialize(instance, config_path, {"feature_examples"}, frange)

    assert {cell: materializations(instance, *cell) for cell in old_cells} == before, "old cells ran again"
    assert {a: store.require(a, p).to_json() for a, p in
            [("tokenizer", None), ("language_model", None), ("sae_dictionary", "relu-w64-l1_0.3")]} == frozen
    merged = read_samples(store, store.require("feature_examples", "features-00000-00023"))
    from resources.arrow_files import open_ipc_table

    eos = store.require("tokenizer", None).extra["eos_id"]  # special tokens are not offered (special_tokens.exclude)
    new_rows = sum(int((open_ipc_table(store.fetch(store.require("cached_activations", s), "activations.arrow"))
                        .column("token_id").to_numpy() != eos).sum()) for s in ("shard-0002", "shard-0003"))
    assert merged.n_tokens == tokens_before + new_rows > tokens_before
    assert store.require("corpus_shards", "shard-0003").total_rows == 1

    # The shuffle feeds training: a browse-only shard is refused there, by name.
    with pytest.raises(Exception, match=r"shuffle_scatter\[shard-0002\].*training_shards=2"):
        materialize(instance, config_path, {"shuffle_scatter"}, "shard-0002")


def test_growth_config_is_validated():
    with pytest.raises(ConfigError, match="corpus.documents_per_shard"):
        load_config(overrides={"corpus": {"documents_per_shard": -1}})
    with pytest.raises(ConfigError, match="corpus.training_shards"):
        load_config(overrides={"corpus": {"training_shards": -2}})


def test_sync_partitions_survives_a_concurrent_add(tmp_path, monkeypatch):
    """Two processes syncing one instance: the other adds a key between our read and our insert."""
    (tmp_path / "home").mkdir()
    instance = dg.DagsterInstance.local_temp(str(tmp_path / "home"))
    config = load_config(write_run_config(tmp_path, TINY, {"root": str(tmp_path / "artifacts")}))
    real_add, raced = instance.add_dynamic_partitions, []

    def add_after_a_rival(kind, keys):
        if kind == SHARDS.name and not raced:
            raced.append(keys)
            real_add(kind, keys[:1])  # the rival's insert lands first
            raise IntegrityError("INSERT INTO dynamic_partitions", {}, Exception("UNIQUE constraint failed"))
        return real_add(kind, keys)

    monkeypatch.setattr(instance, "add_dynamic_partitions", add_after_a_rival)
    sync_partitions(instance, config, num_shards=3)
    assert raced == [["shard-0000", "shard-0001", "shard-0002"]]
    assert shard_keys(instance) == ["shard-0000", "shard-0001", "shard-0002"]
