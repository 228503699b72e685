"""Sensors: `config_partitions` keeps the dynamic partitions equal to what the config implies;
`corpus_growth` turns documents appended to the corpus into new shard partitions.

`config_partitions` is on by default, so a fresh `make ui` shows every shard, bucket,
dictionary, feature range and step range of the config within one sensor tick, with nothing
to run first. It adds what is missing and removes what the config no longer implies (a
removed sweep point, a narrower dictionary); shards of a growing corpus
(`corpus.documents_per_shard`) are left to `corpus_growth`, which lists the corpus.

With `corpus.documents_per_shard` set, shard boundaries never move: appended documents fill the
last shard and then open new ones. The sensor lists the corpus, adds the missing shard
partitions and requests a run per new shard (plus the formerly last shard when it has grown)
for corpus_shards, token_shards and cached_activations; feature_samples cells of the new shards
and the feature_examples re-merge follow by backfill or auto-materialization. Nothing built
from the old shards is recomputed: their inputs did not change. Tests: tests/test_growth.py.
"""

import dagster as dg

from resources import ArtifactStorage, RunSettings
from sae_assets.defs.partitions import SHARDS, config_partitions, shard_key, shard_keys


@dg.sensor(name="config_partitions", minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Adds the shard, bucket, dictionary, feature-range and step-range partitions the run config "
           "implies, and removes those it no longer does.")
def config_partitions_sensor(context: dg.SensorEvaluationContext, settings: RunSettings):
    requests, changes = [], []
    for kind, wanted in config_partitions(settings.load()).items():
        existing = set(context.instance.get_dynamic_partitions(kind))
        if added := [key for key in wanted if key not in existing]:
            requests.append(dg.AddDynamicPartitionsRequest(kind, added))
            changes.append(f"{kind}: +{len(added)}")
        if removed := sorted(existing - set(wanted)):
            requests.append(dg.DeleteDynamicPartitionsRequest(kind, removed))
            changes.append(f"{kind}: -{len(removed)}")
    if not requests:
        return dg.SkipReason("the partitions match the config")
    context.log.info("partitions synced to the config: " + ", ".join(changes))
    return dg.SensorResult(dynamic_partitions_requests=requests)

SHARD_ASSETS = [dg.AssetKey("corpus_shards"), dg.AssetKey("token_shards"), dg.AssetKey("cached_activations")]


@dg.sensor(name="corpus_growth", minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.STOPPED,
           asset_selection=dg.AssetSelection.assets(*SHARD_ASSETS),
           description="Lists the corpus; adds a shard partition per new corpus.documents_per_shard documents "
           "and requests their corpus, token and activation runs.")
def corpus_growth(context: dg.SensorEvaluationContext, settings: RunSettings, storage: ArtifactStorage):
    from sae_assets.core.corpus import documents as corpus

    cfg = settings.load()
    if not cfg.corpus.documents_per_shard:
        return dg.SkipReason("corpus.documents_per_shard is 0: shards are fixed by corpus.num_shards")
    wanted = [shard_key(i) for i in range(corpus.shard_count(cfg.corpus))]
    config_partitions(cfg, num_shards=len(wanted))  # refuses, naming the key, a corpus grown past the partition budget
    existing = shard_keys(context.instance)
    new = [k for k in wanted if k not in existing]
    grown = []
    if existing and new:  # the formerly last shard may have been filled up by the appended documents
        last = storage.store().manifest("corpus_shards", existing[-1])
        if last is not None and last.total_rows < cfg.corpus.documents_per_shard:
            grown = [existing[-1]]
    if not new:
        return dg.SkipReason(f"no new shards: the corpus has {len(wanted)}")
    return dg.SensorResult(
        dynamic_partitions_requests=[SHARDS.build_add_request(new)],
        run_requests=[dg.RunRequest(run_key=f"{key}-{len(wanted)}", partition_key=key, asset_selection=SHARD_ASSETS)
                      for key in grown + new])
