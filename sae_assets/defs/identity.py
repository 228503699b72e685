"""Each asset's identity, declared once beside it: the config keys that shape its bytes, its
pool and the config key of its torch device.

    CORPUS_SHARDS = AssetIdentity("corpus_shards", version="1", keys=("corpus.source", ...))

    @CORPUS_SHARDS.asset(group_name="corpus", partitions_def=SHARDS, description=...)
    def corpus_shards(context, settings, storage):
        with CORPUS_SHARDS.writer(store, cfg, context.partition_key, upstream=...) as out: ...

Everything else derives from the declaration: the Dagster code version (`<version>+cfg.<hash
of the keys' values>`, so editing a key marks exactly the assets that declare it stale), the
manifest's config hash (the same keys, plus the part of the config a partition carries, such
as its sweep point), the pools, and the device steps that ask Kubernetes for a GPU
(deploy_settings). Keys are dotted paths on RunConfig, including derived values
(`sae_hook`, `feature_dictionary`). Keys that shape no asset's bytes (devices, batch sizes of
batch-invariant inference, checkpoint cadence, storage location) are listed in
NOT_SHAPING_KEYS with the reason; a test checks that every config key is in one place or the
other. Tests: tests/test_identity.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dagster as dg

from resources.storage import ArtifactStore, PartitionWriter
from sae_assets.core.config import RunConfig, config_hash

DECLARED: dict[str, AssetIdentity] = {}
"""Every declared identity by asset name, in declaration order (filled as asset modules load)."""
SERVED: dict[str, AssetIdentity] = {}
"""The identities of further served dictionaries' feature assets (`for_dictionary`), by asset
name: made as a config's graph is built, kept apart from DECLARED, which every config shares."""

_DEFAULTS = RunConfig()
"""The packaged defaults, against which declared keys are checked to exist."""

NOT_SHAPING_KEYS: dict[str, str] = {
    "model.device": "where the model trains, not what",
    "activations.batch_size": "sequences per forward pass; the cached rows do not depend on it",
    "activations.device": "where activations are computed",
    "sae.sweep": "each sae_dictionary / sae_metrics partition carries its own sweep point",
    "sae.hook_point": "selects the hook; its resolved value `sae_hook` is hashed",
    "sae.checkpoint_every": "checkpoint cadence; a resumed run is bit-identical",
    "sae.device": "where the SAE trains and is scored",
    "features.dictionary": "selects the browsed dictionary; its resolved point `feature_dictionary` is hashed",
    "special_tokens.exclude": "switches the exclusion; its resolved value `special_token_exclusion` is hashed",
    "features.range_width": "partitioning: each feature-range key names its own bounds",
    "features.batch_size": "tokens encoded per step; samples, top-K and windows do not depend on it",
    "features.device": "where features are encoded",
    "features.neuronpedia_export": "adds the export asset; shapes no other asset's bytes",
    "features.require_passing_checks": "a gate on the input, not a change to the output",
    "storage.backend": "where bytes live, not what they are",
    "storage.root": "where bytes live", "storage.endpoint_url": "where bytes live", "storage.bucket": "where bytes live",
    "storage.prefix": "where bytes live", "storage.region": "where bytes live", "storage.cache_dir": "local cache",
    "storage.gc_grace_hours": "garbage collection retention", "storage.gc_keep_versions": "garbage collection retention",
}


def dictionary_point(cfg: RunConfig, partition: str | None) -> dict[str, Any]:
    """What a sweep-point partition carries of the config: its DictionaryPoint, and its
    architecture's `training_revision` where that is > 0 (in the manifest's hash and the
    checkpoint tag; Dagster's staleness comes from sae_dictionary's version, bumped with it)."""
    if partition is None:
        raise ValueError("a sweep-point asset needs its partition key (a sae.sweep point)")
    from sae_assets.core.sae.build import ARCHITECTURES  # torch: only where a partition is hashed, not at load

    point = cfg.sae.point(partition)
    revision = ARCHITECTURES[point.architecture].training_revision
    return {**point.as_dict(), **({"training_revision": revision} if revision else {})}


@dataclass(frozen=True)
class AssetIdentity:
    name: str
    """The asset's name (its Dagster key and its storage prefix)."""
    version: str
    """The code version of what the asset writes: bump it when the code changes its bytes."""
    keys: tuple[str, ...]
    """Config keys (dotted paths on RunConfig) whose values shape the asset's bytes."""
    hashed_unless_default: tuple[str, ...] = ()
    """Those of `keys` added after the asset was first written: hashed only when their value is
    not the default (RunConfig()'s), so adding a key leaves every existing hash, and so every
    materialized partition's freshness, as it was (as DictionaryPoint.as_dict omits fields)."""
    pool: str | None = None
    """The Dagster pool its steps run in ('model': one model-holding step at a time)."""
    device: str | None = None
    """The config key of the torch device it runs on (its step asks Kubernetes for a GPU)."""
    training_shards_only: bool = False
    """Partitioned by shard, but materialized for the training shards only (corpus.training_shards)."""
    partition_config: Callable[[RunConfig, str | None], dict[str, Any]] | None = None
    """The part of the config a partition carries (a sweep point): in the manifest's hash, not
    in the code version, so adding a partition leaves the others' versions alone."""
    dictionary: str | None = None
    """For one of the feature assets of a further served dictionary (features.dictionaries): its
    sweep point. The keys are read from `cfg.browsing(dictionary)`, so `feature_dictionary` is that
    point's; None: the config as it is (the dictionary the browser opens on)."""

    def __post_init__(self) -> None:
        if self.dictionary is not None:  # made by for_dictionary from a checked declaration
            SERVED[self.name] = self
            return
        if self.name in DECLARED:
            raise ValueError(f"asset {self.name!r} declares its identity twice")
        for key in self.keys:
            _DEFAULTS.value_at(key)  # a typo fails at import, naming the key
            if key in NOT_SHAPING_KEYS:
                raise ValueError(f"asset {self.name!r} declares {key!r}, which shapes no bytes: "
                                 f"{NOT_SHAPING_KEYS[key]}")
        if not set(self.hashed_unless_default) <= set(self.keys):
            raise ValueError(f"asset {self.name!r}: hashed_unless_default names keys not in its keys: "
                             f"{sorted(set(self.hashed_unless_default) - set(self.keys))}")
        if self.device is not None:
            _DEFAULTS.value_at(self.device)
        DECLARED[self.name] = self

    def for_dictionary(self, key: str, slug: str) -> AssetIdentity:
        """This identity for the feature assets of served dictionary `key`: the same version and
        keys, named `<name>__<slug>`, its keys read with the browser on `key`. Declared once;
        asking again returns the declaration."""
        name = f"{self.name}__{slug}"
        if name in SERVED:
            made = SERVED[name]
            if made.dictionary != key:
                raise ValueError(f"asset {name!r} serves dictionary {made.dictionary!r}, not {key!r}")
            return made
        return dataclasses.replace(self, name=name, dictionary=key)

    def config_values(self, cfg: RunConfig) -> dict[str, Any]:
        if self.dictionary is not None:
            cfg = cfg.browsing(self.dictionary)
        values = {key: cfg.value_at(key) for key in self.keys}
        for key in self.hashed_unless_default:
            if values[key] == _DEFAULTS.value_at(key):
                del values[key]
        return values

    def config_hash(self, cfg: RunConfig, partition: str | None = None) -> str:
        """The manifest's config hash: the declared keys, plus what the partition carries."""
        values = self.config_values(cfg)
        if self.partition_config is not None:
            values["partition"] = self.partition_config(cfg, partition)
        return config_hash(values)

    def code_version(self, cfg: RunConfig) -> str:
        """The Dagster code version: `<version>+cfg.<hash of the declared keys' values>`."""
        return f"{self.version}+cfg.{config_hash(self.config_values(cfg))[:10]}"

    def asset(self, **kwargs: Any) -> Callable[[Callable], dg.AssetsDefinition]:
        """`@dg.asset` with this identity's name, code version, pool and the graph's automation
        condition (`keep_fresh`).

        An asset given a `backfill_policy` is declared as a one-asset `@dg.multi_asset`, where
        Dagster 1.13 takes the policy as a stable parameter (on `@dg.asset` it is beta)."""
        for taken in ("name", "code_version", "pool"):
            if taken in kwargs:
                raise TypeError(f"{self.name}: {taken!r} comes from the identity declaration")
        kwargs.setdefault("automation_condition", keep_fresh())
        policy = kwargs.pop("backfill_policy", None)

        def declare(fn: Callable) -> dg.AssetsDefinition:
            if policy is None:
                return dg.asset(name=self.name, code_version=self.version, pool=self.pool, **kwargs)(fn)
            spec = dg.AssetSpec(self.name, code_version=self.version, deps=kwargs.pop("deps", None),
                                description=kwargs.pop("description", None), group_name=kwargs.pop("group_name", None),
                                automation_condition=kwargs.pop("automation_condition"))
            return dg.multi_asset(specs=[spec], name=self.name, pool=self.pool, backfill_policy=policy, **kwargs)(fn)

        return declare

    @contextmanager
    def writer(self, store: ArtifactStore, cfg: RunConfig, partition: str | None, *,
               upstream: dict[str, str] | None = None) -> Iterator[PartitionWriter]:
        """A partition writer bound to this asset's name, code version and config hash."""
        with store.writer(self.name, partition, code_version=self.version,
                          config_hash=self.config_hash(cfg, partition), upstream=upstream) as out:
            yield out


def keep_fresh() -> dg.AutomationCondition:
    """The automation condition of every asset: a partition is requested when it is newly
    missing, when its code version changed (the identity's version or a declared config key),
    or when the data version of a partition it reads changed — Dagster's causes of staleness —
    once none of its inputs is missing or in progress. The `keep_fresh` sensor evaluates it in
    the daemon, and `make demo` evaluates the same condition to run only what it requests."""
    condition = dg.AutomationCondition
    wanted = (condition.newly_missing() | condition.code_version_changed()
              | condition.any_deps_match(condition.data_version_changed()))
    return (wanted.since_last_handled() & ~condition.any_deps_missing() & ~condition.any_deps_in_progress()
            & ~condition.in_progress()).with_label("keep_fresh")


def identity_of(asset: dg.AssetsDefinition) -> AssetIdentity:
    name = asset.key.to_user_string()
    found = DECLARED.get(name) or SERVED.get(name)
    if found is None:
        raise ValueError(f"asset {name} declares no AssetIdentity (sae_assets/defs/identity.py)")
    return found


def with_config_versions(assets: list[dg.AssetsDefinition], cfg: RunConfig) -> list[dg.AssetsDefinition]:
    """The assets with each one's code version derived from its identity and the run config."""
    return [a.map_asset_specs(lambda spec, a=a: spec.replace_attributes(code_version=identity_of(a).code_version(cfg)))
            for a in assets]


def device_assets() -> dict[str, str]:
    """{asset name: config key of its device} for every declared asset that runs torch on a
    device, and for each served dictionary's copy of one made so far (the graph built first)."""
    return {name: ident.device for name, ident in {**DECLARED, **SERVED}.items() if ident.device}
