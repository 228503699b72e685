"""Partition definitions and the one mapping between partition keys and their numbers.

Shards (`shard-0000`, ...), shuffle buckets (`bucket-0000`, ...), dictionaries (one per sweep
point, `relu-w1024-l1_5`) and feature ranges of each served dictionary (`features-00000-00255`,
inclusive bounds) are dynamic partitions: `sync_partitions` makes them match the config, so
growing the corpus adds partitions without touching the old ones. SHARD_FEATURES crosses
shards with feature ranges (keys like `features-00000-00255|shard-0000`). The dictionary the
browser opens on has FEATURE_RANGES / SHARD_FEATURES; each further one (features.dictionaries)
its own pair, `feature_ranges__<slug>` (`feature_partitions`), so that serving another sweep
point adds its own partitions and leaves every other dictionary's as they are. Training step ranges
(`steps-000001-000100`, inclusive, 1-based) partition parameter_shifts when attribution.capture is on.
"""

import dagster as dg

from sae_assets.core.config import ConfigError, RunConfig
from sae_assets.core.partition_budget import FEATURE_RANGE_PREFIX, MAX_PARTITIONS_PER_ASSET, budget_problem

SHARDS = dg.DynamicPartitionsDefinition(name="shards")
BUCKETS = dg.DynamicPartitionsDefinition(name="buckets")
DICTIONARIES = dg.DynamicPartitionsDefinition(name="dictionaries")
"""One partition per sae.sweep point, keyed by DictionaryPoint.key (e.g. relu-w1024-l1_5)."""
FEATURE_RANGES = dg.DynamicPartitionsDefinition(name="feature_ranges")
"""Consecutive ranges of features.range_width features of the dictionary the site opens on."""
SHARD_FEATURES = dg.MultiPartitionsDefinition({"shard": SHARDS, "features": FEATURE_RANGES})
_FURTHER_RANGES: dict[str, tuple[dg.DynamicPartitionsDefinition, dg.MultiPartitionsDefinition]] = {}


def feature_partitions(slug: str | None) -> tuple[dg.DynamicPartitionsDefinition, dg.MultiPartitionsDefinition]:
    """(feature ranges, shard x feature ranges) of a served dictionary: FEATURE_RANGES and
    SHARD_FEATURES for the one the browser opens on (slug None), else `feature_ranges__<slug>`
    (`config.dictionary_slug`) and its product with SHARDS, made once per slug."""
    if slug is None:
        return FEATURE_RANGES, SHARD_FEATURES
    if slug not in _FURTHER_RANGES:
        ranges = dg.DynamicPartitionsDefinition(name=f"{FEATURE_RANGES.name}__{slug}")
        _FURTHER_RANGES[slug] = ranges, dg.MultiPartitionsDefinition({"shard": SHARDS, "features": ranges})
    return _FURTHER_RANGES[slug]


def served_feature_partitions(config: RunConfig) -> dict[str, dg.DynamicPartitionsDefinition]:
    """{served sweep point key: its feature-range partitions definition}, the opened one first."""
    return {p.key: feature_partitions(config.served_slug(p.key))[0] for p in config.browsed_dictionaries}


_SIZE_KEYS = {"shards": "corpus.num_shards / corpus.documents_per_shard", "buckets": "shuffle.num_buckets",
              "dictionaries": "sae.sweep", "feature_ranges": "features.range_width",
              "step_ranges": "attribution.steps_per_range"}
"""The config keys that set each dynamic partitions definition's size, for errors."""
_PREFIX = {SHARDS.name: "shard-", BUCKETS.name: "bucket-"}
_RANGE_PREFIX = FEATURE_RANGE_PREFIX


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


def feature_range_key(lo: int, hi: int) -> str:
    """The partition key of features [lo, hi): `features-<lo>-<hi - 1>` (inclusive bounds)."""
    return f"{_RANGE_PREFIX}{lo:05d}-{hi - 1:05d}"


def feature_range_bounds(key: str) -> tuple[int, int]:
    """(lo, hi) of a feature-range partition key."""
    parts = key[len(_RANGE_PREFIX):].split("-") if key.startswith(_RANGE_PREFIX) else []
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[1]) < int(parts[0]):
        raise ValueError(f"partition key {key!r} is not a feature range like {feature_range_key(0, 256)!r}")
    return int(parts[0]), int(parts[1]) + 1


def feature_range_keys_for(width: int, range_width: int) -> list[str]:
    """The ranges covering a dictionary of `width` features, range_width at a time."""
    return [feature_range_key(lo, min(lo + range_width, width)) for lo in range(0, width, range_width)]


def feature_range_keys(instance: dg.DagsterInstance, ranges: dg.DynamicPartitionsDefinition = FEATURE_RANGES) -> list[str]:
    """The feature ranges of one served dictionary (`ranges`: its definition), in feature order."""
    return sorted(instance.get_dynamic_partitions(ranges.name), key=feature_range_bounds)


def _is_feature_ranges(name: str) -> bool:
    return name == FEATURE_RANGES.name or name.startswith(f"{FEATURE_RANGES.name}__")


def shard_keys(instance: dg.DagsterInstance) -> list[str]:
    """The shard partitions that exist, in order."""
    return sorted(instance.get_dynamic_partitions(SHARDS.name), key=shard_index)


def training_shard_keys(instance: dg.DagsterInstance, config: RunConfig) -> list[str]:
    """The shards that train the tokenizer, model and dictionaries: the first corpus.training_shards."""
    keys = shard_keys(instance)
    return keys[: config.corpus.training_shards] if config.corpus.training_shards else keys


def bucket_keys(instance: dg.DagsterInstance) -> list[str]:
    return sorted(instance.get_dynamic_partitions(BUCKETS.name), key=bucket_index)


def dictionary_keys(instance: dg.DagsterInstance) -> list[str]:
    return sorted(instance.get_dynamic_partitions(DICTIONARIES.name))


def partition_keys(partitions_def: dg.PartitionsDefinition | None, instance: dg.DagsterInstance) -> list[str | None]:
    """Every partition key of an asset's partitions definition, in order ([None] if unpartitioned)."""
    if partitions_def is None:
        return [None]
    if isinstance(partitions_def, dg.DynamicPartitionsDefinition):
        if _is_feature_ranges(partitions_def.name):
            return feature_range_keys(instance, partitions_def)
        listing = {SHARDS.name: shard_keys, BUCKETS.name: bucket_keys,
                   STEP_RANGES.name: step_range_keys}.get(partitions_def.name)
        return listing(instance) if listing else sorted(instance.get_dynamic_partitions(partitions_def.name))
    if isinstance(partitions_def, dg.MultiPartitionsDefinition) and partitions_def.partition_dimension_names == [
            "features", "shard"]:  # a shard x feature-range product: range by range, shards in order
        ranges = partitions_def.get_partitions_def_for_dimension("features")
        return [dg.MultiPartitionKey({"shard": s, "features": f})
                for f in feature_range_keys(instance, ranges) for s in shard_keys(instance)]
    return list(partitions_def.get_partition_keys(dynamic_partitions_store=instance))


def _sync(instance: dg.DagsterInstance, kind: str, wanted: list[str]) -> list[str]:
    from sqlalchemy.exc import IntegrityError  # what Dagster's SQL storages raise for a duplicate key

    existing = set(instance.get_dynamic_partitions(kind))
    missing = [k for k in wanted if k not in existing]
    if missing:
        try:
            instance.add_dynamic_partitions(kind, missing)
        except IntegrityError:
            # Another process (a concurrent run, the sensor) added some of them between our read
            # and our insert: add what is still missing.
            now = set(instance.get_dynamic_partitions(kind))
            if still := [k for k in missing if k not in now]:
                instance.add_dynamic_partitions(kind, still)
    for extra in sorted(existing - set(wanted)):
        instance.delete_dynamic_partition(kind, extra)
    return missing


def config_partitions(config: RunConfig, *, num_shards: int | None = None) -> dict[str, list[str]]:
    """The keys of every dynamic partitions definition that the config implies, by definition
    name. Shards come from corpus.num_shards, or from `num_shards` (a listing of a growing corpus
    with corpus.documents_per_shard); without either, the shard entry is left out."""
    if num_shards is None and not config.corpus.documents_per_shard:
        num_shards = config.corpus.num_shards
    wanted = {
        BUCKETS.name: [bucket_key(i) for i in range(config.shuffle.num_buckets)],
        DICTIONARIES.name: [p.key for p in config.sae.sweep],
        STEP_RANGES.name: step_range_keys_for(config),
        **{ranges.name: feature_range_keys_for(config.sae.point(key).width, config.features.range_width)
           for key, ranges in served_feature_partitions(config).items()},
    }
    if num_shards is not None:
        wanted = {SHARDS.name: [shard_key(i) for i in range(num_shards)], **wanted}
        problem = budget_problem(config.partition_plan(num_shards), documents_per_shard=config.corpus.documents_per_shard)
        if problem:  # a growing corpus's shard count is known only now
            raise ConfigError(f"config key 'features.range_width' {problem}")
    for kind, keys in wanted.items():
        kind = "feature_ranges" if _is_feature_ranges(kind) else kind
        if len(keys) > MAX_PARTITIONS_PER_ASSET:
            raise ConfigError(f"the config implies {len(keys):,} {kind} partitions, over Dagster's recommended "
                              f"{MAX_PARTITIONS_PER_ASSET:,} per asset (see {_SIZE_KEYS.get(kind, 'the config')})")
    return wanted


def sync_partitions(instance: dg.DagsterInstance, config: RunConfig, *, num_shards: int | None = None) -> dict[str, list[str]]:
    """Make the shard, bucket, dictionary and feature-range partitions match the config; returns
    the keys added. The feature ranges of a dictionary no longer served are left (its assets
    leave the graph; serving it again finds its partitions). `num_shards` defaults to
    corpus.shard_count (which lists a growing corpus)."""
    from sae_assets.core.corpus import documents as corpus

    if num_shards is None:
        num_shards = corpus.shard_count(config.corpus)
    return {kind: _sync(instance, kind, keys) for kind, keys in config_partitions(config, num_shards=num_shards).items()}


# --- training step ranges (parameter_shifts) ----------------------------------------------------

STEP_RANGES = dg.DynamicPartitionsDefinition(name="step_ranges")
"""Consecutive ranges of attribution.steps_per_range training steps of the embedded model."""
_STEP_PREFIX = "steps-"


def step_range_key(start: int, end: int) -> str:
    """The partition key of training steps start..end (1-based, inclusive): `steps-000001-000100`."""
    return f"{_STEP_PREFIX}{start:06d}-{end:06d}"


def step_range(key: str) -> tuple[int, int]:
    """(start, end) of a step-range partition key."""
    parts = key[len(_STEP_PREFIX):].split("-") if key.startswith(_STEP_PREFIX) else []
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 1 <= int(parts[0]) <= int(parts[1]):
        raise ValueError(f"partition key {key!r} is not a training step range like {step_range_key(1, 100)!r}")
    return int(parts[0]), int(parts[1])


def step_range_keys(instance: dg.DagsterInstance) -> list[str]:
    return sorted(instance.get_dynamic_partitions(STEP_RANGES.name), key=step_range)


def step_range_keys_for(config: RunConfig) -> list[str]:
    """The ranges of the configured training run; none unless an embedded model is captured."""
    if not config.attribution.capture or config.model.kind != "embedded":
        return []
    from sae_assets.core.attribution.records import step_ranges
    from sae_assets.core.model.training import training_steps

    steps = training_steps(config.model, config.tokenizer.context_length)
    return [step_range_key(a, b) for a, b in step_ranges(steps, config.attribution.steps_per_range)]
