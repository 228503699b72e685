"""The run config: defaults load, overrides merge, and every bad value names its key."""

import pytest

from sae_assets.core.config import ConfigError, RunConfig, config_from_dict, config_hash, config_keys, load_config


def test_packaged_default_loads_and_matches_dataclass_defaults():
    config = load_config()
    assert config.corpus.source == "embedded"
    assert config.model.kind == "embedded"
    assert config.storage.backend == "local"
    # The YAML restates the dataclass defaults; a drift between the two would surprise users.
    assert config == RunConfig()


def test_yaml_file_overrides_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("corpus:\n  num_shards: 7\nactivations:\n  dtype: bfloat16\n")
    config = load_config(path)
    assert config.corpus.num_shards == 7
    assert config.activations.dtype == "bfloat16"
    assert config.tokenizer.vocab_size == RunConfig().tokenizer.vocab_size


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"corpus": {"num_shard": 3}}, "unknown config key 'corpus.num_shard'"),
        ({"modle": {}}, "unknown config key 'modle'"),
        ({"activations": {"dtype": "float64"}}, "'activations.dtype' is 'float64'; allowed values: 'float32', 'float16', 'bfloat16'"),
        ({"storage": {"backend": "gcs"}}, "allowed values: 'local', 's3'"),
        ({"corpus": {"num_shards": "four"}}, "'corpus.num_shards' must be an integer"),
        ({"corpus": {"num_shards": 0}}, "'corpus.num_shards' must be >= 1"),
        ({"storage": {"backend": "s3"}}, "'storage.bucket' must be set"),
        ({"corpus": {"source": "local"}}, "'corpus.paths' must list files"),
        ({"model": {"kind": "named", "name": "gpt2"}}, "'tokenizer.kind' must be 'pretrained'"),
        ({"model": {"d_model": 130}}, "'model.d_model' must be divisible"),
        ({"activations": {"hook_points": []}}, "'activations.hook_points' must name at least one hook"),
        ({"corpus": "embedded"}, "'corpus' must be a mapping"),
    ],
)
def test_bad_values_name_the_key(data, needle):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert needle in str(info.value)


def test_bad_yaml_file_is_named(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("corpus: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_config_hash_covers_exactly_the_values_given():
    base = RunConfig()
    other = config_from_dict({"model": {"learning_rate": 0.001}})
    assert config_hash({"corpus.source": base.value_at("corpus.source")}) == \
        config_hash({"corpus.source": other.value_at("corpus.source")})
    assert config_hash({"model.learning_rate": base.value_at("model.learning_rate")}) != \
        config_hash({"model.learning_rate": other.value_at("model.learning_rate")})
    assert base.value_at("sae_hook") == "blocks.1.hook_resid_post"  # derived values resolve too
    assert base.value_at("feature_dictionary")["architecture"] == "relu"
    with pytest.raises(ConfigError, match="config key 'model.nope' does not exist"):
        base.value_at("model.nope")
    assert "sae.checkpoint_every" in config_keys() and "storage.root" in config_keys()

def _wide(shards: int, width: int = 1 << 20, range_width: int = 256, **corpus) -> dict:
    return {"corpus": {"num_shards": shards, **corpus}, "features": {"range_width": range_width},
            "sae": {"sweep": [{"architecture": "topk", "width": width, "sparsity": 32}]}}


def test_partition_budget_names_the_range_width_and_shard_count_that_fit():
    from sae_assets.core.partition_budget import MAX_PARTITIONS_PER_ASSET, plan_partitions

    # 2,000 shards x 4,096 ranges of a million-feature dictionary: 8.2M shard x range cells.
    with pytest.raises(ConfigError) as info:
        config_from_dict(_wide(2000))
    message = str(info.value)
    assert "config key 'features.range_width'" in message and "8,192,000 shard x range partitions" in message
    assert "features.range_width >= 20,972" in message and "corpus.num_shards <= 24" in message
    # The suggestions are the extremes that fit: one feature narrower or one shard more does not.
    assert plan_partitions(shards=2000, dictionary_width=1 << 20, range_width=20972).cells <= MAX_PARTITIONS_PER_ASSET
    assert plan_partitions(shards=2000, dictionary_width=1 << 20, range_width=20971).cells > MAX_PARTITIONS_PER_ASSET
    assert plan_partitions(shards=25, dictionary_width=1 << 20, range_width=256).cells > MAX_PARTITIONS_PER_ASSET
    config_from_dict(_wide(2000, range_width=20972))  # what the message suggests is accepted
    config_from_dict(_wide(24))
    # Ranges alone over the limit: only a wider range helps, and the message says nothing of shards.
    with pytest.raises(ConfigError) as info:
        config_from_dict(_wide(1, range_width=8))
    assert "features.range_width >= 11" in str(info.value) and "corpus.num_shards" not in str(info.value).split(":")[-1]


def test_partition_budget_of_a_growing_corpus_is_checked_when_its_shards_are_counted():
    from sae_assets.defs.partitions import config_partitions

    config = config_from_dict(_wide(1, documents_per_shard=50))  # the shard count is unknown until listed
    assert len(config_partitions(config, num_shards=20)["shards"]) == 20
    with pytest.raises(ConfigError) as info:
        config_partitions(config, num_shards=3000)
    message = str(info.value)
    assert "12,288,000 shard x range partitions" in message and "(corpus.documents_per_shard)" in message
    assert "corpus.documents_per_shard >= 6,250 (at most 24 shards)" in message
