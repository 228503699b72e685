"""Partition definitions and the one mapping between partition keys and their numbers.

Shards (`shard-0000`, ...), shuffle buckets (`bucket-0000`, ...) and dictionaries (one per sweep
point, `relu-w1024-l1_5`) are dynamic partitions:
`sync_partitions` makes them match the config, so growing the corpus adds partitions
without touching the old ones.
"""

import dagster as dg

from sae_assets.core.config import RunConfig

SHARDS = dg.DynamicPartitionsDefinition(name="shards")
BUCKETS = dg.DynamicPartitionsDefinition(name="buckets")
DICTIONARIES = dg.DynamicPartitionsDefinition(name="dictionaries")
"""One partition per sae.sweep point, keyed by DictionaryPoint.key (e.g. relu-w1024-l1_5)."""
_PREFIX = {SHARDS.name: "shard-", BUCKETS.name: "bucket-"}


def _key(kind: str, index: int) -> str:
    return f"{_PREFIX[kind]}{index:04d}"


def _index(kind: str, key: str) -> int:
    prefix = _PREFIX[kind]
    if not key.startswith(prefix) or not key[len(prefix):].isdigit():
        raise ValueError(f"partition key {key!r} is not a {kind} key like {_key(kind, 0)!r}")
    return int(key[len(prefix):])


def shard_key(index: int) -> str:
    return _key(SHARDS.name, index)


def shard_index(key: str) -> int:
    return _index(SHARDS.name, key)


def bucket_key(index: int) -> str:
    return _key(BUCKETS.name, index)


def bucket_index(key: str) -> int:
    return _index(BUCKETS.name, key)


def shard_keys(instance: dg.DagsterInstance) -> list[str]:
    """The shard partitions that exist, in order."""
    return sorted(instance.get_dynamic_partitions(SHARDS.name), key=shard_index)


def bucket_keys(instance: dg.DagsterInstance) -> list[str]:
    return sorted(instance.get_dynamic_partitions(BUCKETS.name), key=bucket_index)


def dictionary_keys(instance: dg.DagsterInstance) -> list[str]:
    return sorted(instance.get_dynamic_partitions(DICTIONARIES.name))


def partition_keys(partitions_def: dg.PartitionsDefinition | None, instance: dg.DagsterInstance) -> list[str | None]:
    """Every partition key of an asset's partitions definition, in order ([None] if unpartitioned)."""
    if partitions_def is None:
        return [None]
    if isinstance(partitions_def, dg.DynamicPartitionsDefinition):
        listing = {SHARDS.name: shard_keys, BUCKETS.name: bucket_keys}.get(partitions_def.name)
        return listing(instance) if listing else sorted(instance.get_dynamic_partitions(partitions_def.name))
    return list(partitions_def.get_partition_keys(dynamic_partitions_store=instance))


def _sync(instance: dg.DagsterInstance, kind: str, wanted: list[str]) -> list[str]:
    existing = set(instance.get_dynamic_partitions(kind))
    missing = [k for k in wanted if k not in existing]
    if missing:
        instance.add_dynamic_partitions(kind, missing)
    for extra in sorted(existing - set(wanted)):
        instance.delete_dynamic_partition(kind, extra)
    return missing


def sync_partitions(instance: dg.DagsterInstance, config: RunConfig) -> dict[str, list[str]]:
    """Make the shard, bucket and dictionary partitions match the config; returns the keys added."""
    return {
        SHARDS.name: _sync(instance, SHARDS.name, [shard_key(i) for i in range(config.corpus.num_shards)]),
        BUCKETS.name: _sync(instance, BUCKETS.name, [bucket_key(i) for i in range(config.shuffle.num_buckets)]),
        DICTIONARIES.name: _sync(instance, DICTIONARIES.name, [p.key for p in config.sae.sweep]),
    }
