"""Partition definitions and the one mapping between partition keys and shard numbers.

Shards are dynamic partitions named `shard-0000`, `shard-0001`, ...: `sync_shard_partitions`
adds the keys the config asks for, so growing the corpus adds partitions without touching
the old ones.
"""

from __future__ import annotations

import dagster as dg

SHARDS = dg.DynamicPartitionsDefinition(name="shards")
_SHARD_PREFIX = "shard-"


def shard_key(index: int) -> str:
    return f"{_SHARD_PREFIX}{index:04d}"


def shard_index(key: str) -> int:
    if not key.startswith(_SHARD_PREFIX) or not key[len(_SHARD_PREFIX):].isdigit():
        raise ValueError(f"partition key {key!r} is not a shard key like {shard_key(0)!r}")
    return int(key[len(_SHARD_PREFIX):])


def shard_keys(instance: dg.DagsterInstance) -> list[str]:
    """The shard partitions that exist, in order."""
    return sorted(instance.get_dynamic_partitions(SHARDS.name), key=shard_index)


def sync_shard_partitions(instance: dg.DagsterInstance, num_shards: int) -> list[str]:
    """Add any missing `shard-i` for i < num_shards; returns the keys added."""
    existing = set(instance.get_dynamic_partitions(SHARDS.name))
    missing = [shard_key(i) for i in range(num_shards) if shard_key(i) not in existing]
    if missing:
        instance.add_dynamic_partitions(SHARDS.name, missing)
    return missing
