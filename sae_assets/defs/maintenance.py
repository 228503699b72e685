"""Maintenance jobs: garbage collection of superseded artifact versions, daily when switched on.

`garbage_collection_job` runs one op, `collect_garbage`, which applies resources/gc.py's rule
with the retention in the run config (`storage.gc_grace_hours`, `storage.gc_keep_versions`)
to the `storage` resource, logs the report and returns its counts as metadata.
`garbage_collection_schedule` runs it daily at 03:00; it starts stopped (turn it on in the
UI). The same collection from a shell: `make gc`. Tests: tests/test_storage.py.
"""

import dagster as dg

from resources import ArtifactStorage, RunSettings
from resources import gc


class GarbageCollectionConfig(dg.Config):
    dry_run: bool = False
    """Report what would be removed; delete nothing."""


@dg.op(description="Removes artifact versions no current manifest lists that are past retention "
       "(storage.gc_grace_hours, storage.gc_keep_versions).")
def collect_garbage(context: dg.OpExecutionContext, config: GarbageCollectionConfig, settings: RunSettings,
                    storage: ArtifactStorage) -> dg.Output[dict]:
    retention = settings.load().storage
    store = storage.store()
    report = gc.collect_garbage(store, grace_seconds=retention.gc_grace_hours * 3600,
                                keep_versions=retention.gc_keep_versions, dry_run=config.dry_run)
    context.log.info(f"garbage collection of {store.describe()}{' (dry run)' if config.dry_run else ''}:\n"
                     f"{report.summary()}")
    for reason in report.skipped:
        context.log.warning(f"left alone: {reason}")
    counts = {"partitions": len(report.partitions), "removed": len(report.removed), "kept": len(report.kept),
              "revived": len(report.revived), "skipped": len(report.skipped), "bytes_freed": report.bytes_freed}
    metadata = {**{k: dg.MetadataValue.int(v) for k, v in counts.items()},
                "dry_run": dg.MetadataValue.bool(config.dry_run), "location": store.describe()}
    return dg.Output(counts, metadata=metadata)


@dg.job(description="Garbage collection of superseded artifact versions (resources/gc.py).")
def garbage_collection_job():
    collect_garbage()


garbage_collection_schedule = dg.ScheduleDefinition(
    name="garbage_collection_daily", job=garbage_collection_job, cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
)
