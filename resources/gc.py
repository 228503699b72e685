"""Garbage collection of superseded artifact versions: the only code that deletes data files.

`ArtifactStore.commit` never deletes: every partition keeps its older version folders
(`v-<hash>/`) and its manifest history (`manifests/<data version>.json`) until
`collect_garbage` removes what retention no longer protects. In each partition that has a
current manifest it keeps
- the files of the current manifest and its history entry (live);
- the newest `keep_versions` history manifests (by modification time) and their files;
- any history manifest superseded less than `grace_seconds` ago (the next newer one was put
  then) and its files, so a manifest that was current at any moment of the grace period keeps
  its files: a reader that opened it, or `ArtifactStore.manifest_at` with its version, finds them;
- any object put less than `grace_seconds` ago (a write in flight puts its files before its
  manifests);
and removes every other object under `v-<hash>/` and `manifests/`, plus a local backend's
hidden temp files older than the grace period (left by killed puts). `manifest.json`,
`checkpoints/`, keys of unknown form, partitions without a readable manifest, and the staging
and cache directories are never touched.

Run it with `make gc` (`python -m resources.gc [--dry-run] [--asset NAME]`), which reads
`storage.gc_grace_hours` and `storage.gc_keep_versions` from the run config named by
$SAE_ASSETS_CONFIG, or as the Dagster job in sae_assets/defs/maintenance.py. Tests:
tests/test_storage.py, on both backends.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from resources import keys
from resources.manifest import CorruptArtifactError, Manifest
from resources.storage import ArtifactStore, StoredObject


@dataclass
class PartitionCounts:
    kept_versions: int = 0
    """History manifests kept (the current one's included)."""
    removed_versions: int = 0
    kept_files: int = 0
    """Objects under `v-<hash>/` kept, and temp files not yet past the grace period."""
    removed_files: int = 0
    bytes_freed: int = 0


@dataclass
class GcReport:
    """What one collection kept and removed (with `dry_run`, what it would remove)."""

    dry_run: bool
    kept: list[str] = field(default_factory=list)
    """Collectable keys kept: live, retained by history, or within the grace period."""
    removed: list[str] = field(default_factory=list)
    revived: list[str] = field(default_factory=list)
    """Keys left in place because they (or their version's folder) were put again while being
    collected; they count as kept in `partitions`."""
    skipped: list[str] = field(default_factory=list)
    """Partitions left alone, with the reason (an unreadable manifest)."""
    bytes_freed: int = 0
    partitions: dict[str, PartitionCounts] = field(default_factory=dict)
    """Counts per partition, keyed 'asset[partition]'."""

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"{len(self.partitions)} partitions: {verb} {len(self.removed)} objects "
                 f"({self.bytes_freed} bytes), kept {len(self.kept)}, revived {len(self.revived)}"]
        for name, c in sorted(self.partitions.items()):
            if c.removed_versions or c.removed_files:
                lines.append(f"  {name}: versions kept {c.kept_versions}, {verb} {c.removed_versions}; "
                             f"files kept {c.kept_files}, {verb} {c.removed_files} ({c.bytes_freed} bytes)")
        lines += [f"  skipped {reason}" for reason in self.skipped]
        return "\n".join(lines)


def collect_garbage(store: ArtifactStore, *, grace_seconds: float, keep_versions: int, now: float | None = None,
                    dry_run: bool = False, assets: Iterable[str] | None = None) -> GcReport:
    """Remove the versions of every partition (of `assets`, or all) that retention no longer
    protects (see the module docstring); returns what was kept and removed.

    `now` (POSIX seconds, default the clock) moves the cutoff `now - grace_seconds`. Objects are
    aged by their backend modification time (S3's LastModified is the server's clock, so the
    grace period must exceed any clock skew, and the longest commit's uploads).

    Races: a writer re-committing the content of a version being collected puts its files (and
    its history entry) again, which gives them a new mtime. So before deleting from a folder it
    lists the folder again: a version folder `v-<hash>/` with any object whose mtime changed
    since the first listing, or that is young, is skipped whole; in `manifests/` each such entry
    is skipped. What remains is the window between that second listing and the delete request
    (microseconds locally, one round trip on S3): a put of the same content landing inside it
    is deleted, and that writer's manifest then lists a missing file (reads fail with "listed
    but missing") until the partition is rematerialized. Two collectors at once are safe (each
    deletes only what the rule allows) but the second may skip a partition whose history vanished.
    """
    if grace_seconds <= 0 or keep_versions < 1:
        raise ValueError(f"grace_seconds must be > 0 and keep_versions >= 1 (got {grace_seconds}, {keep_versions})")
    cutoff = (time.time() if now is None else now) - grace_seconds
    report = GcReport(dry_run=dry_run)
    listing = [obj for a in assets for obj in store.backend.list_objects(f"{keys.asset_component(a)}/")] \
        if assets is not None else store.backend.list_objects("")
    for prefix, objects in sorted(_by_partition(listing).items()):
        _collect_partition(store, prefix, objects, cutoff, keep_versions, report)
    return report


def _by_partition(listing: list[StoredObject]) -> dict[str, dict[str, StoredObject]]:
    """{'<asset>/<partition>/': {relative key: object}} for partitions with a manifest.json."""
    found: dict[str, dict[str, StoredObject]] = defaultdict(dict)
    for obj in listing:
        parts = obj.key.split("/", 2)
        if len(parts) == 3:
            found[f"{parts[0]}/{parts[1]}/"][parts[2]] = obj
    return {prefix: objects for prefix, objects in found.items() if keys.MANIFEST_NAME in objects}


def _collect_partition(store: ArtifactStore, prefix: str, objects: dict[str, StoredObject], cutoff: float,
                       keep_versions: int, report: GcReport) -> None:
    asset, component = prefix.split("/")[:2]
    name = keys.describe(asset, keys.decode_partition(component))
    try:
        retained = _retained_keys(store, prefix, objects, cutoff, keep_versions)
    except CorruptArtifactError as exc:
        report.skipped.append(f"{name}: {exc}")
        return
    counts = report.partitions.setdefault(name, PartitionCounts())

    def tally(obj: StoredObject, *, kept: bool) -> None:
        history = keys.is_history_component(obj.key[len(prefix):])
        if kept:
            counts.kept_versions, counts.kept_files = counts.kept_versions + history, counts.kept_files + (not history)
        else:
            counts.removed_versions += history
            counts.removed_files += not history
            counts.bytes_freed += obj.size
            report.bytes_freed += obj.size
            report.removed.append(obj.key)

    doomed: dict[str, list[StoredObject]] = defaultdict(list)  # folder -> objects to remove
    for relative, obj in sorted(objects.items()):
        if not keys.collectable_component(relative):
            continue
        if obj.key in retained or obj.mtime > cutoff:
            report.kept.append(obj.key)
            tally(obj, kept=True)
        else:
            doomed[relative.rpartition("/")[0]].append(obj)
    # History before files: a crash in between leaves unlisted files, never a listed missing one.
    for folder in sorted(doomed, key=lambda f: (f != keys.HISTORY_DIR, f)):
        removable, revived = _still_unchanged(store, prefix + folder + "/" if folder else prefix, doomed[folder],
                                              cutoff, whole_folder=folder != keys.HISTORY_DIR and folder != "")
        if removable and not report.dry_run:
            store.backend.delete([obj.key for obj in removable])
        report.revived += [obj.key for obj in revived]
        for obj in revived:
            tally(obj, kept=True)
        for obj in removable:
            tally(obj, kept=False)


def _retained_keys(store: ArtifactStore, prefix: str, objects: dict[str, StoredObject], cutoff: float,
                   keep_versions: int) -> set[str]:
    """Keys that retention protects: the current manifest's, and those of the history
    manifests among the newest `keep_versions` or superseded after `cutoff`."""
    current = _read_manifest(store, prefix + keys.MANIFEST_NAME)
    retained = _listed(current)
    history = sorted((obj for rel, obj in objects.items() if keys.is_history_component(rel)), key=lambda o: -o.mtime)
    newer, superseded_at = 0, math.inf  # the newest entries are superseded by nothing yet
    # Entries put within one tick of the clock (S3 counts whole seconds) cannot be ordered: they
    # are ranked and superseded as a group, which keeps more, never less.
    for mtime, group in itertools.groupby(history, key=lambda obj: obj.mtime):
        group = list(group)
        if newer < keep_versions or superseded_at > cutoff:
            for obj in group:
                retained |= {obj.key} | _listed(_read_manifest(store, obj.key))
        newer, superseded_at = newer + len(group), mtime
    return retained


def _read_manifest(store: ArtifactStore, key: str) -> Manifest:
    data = store.backend.get_bytes(key)
    if data is None:  # removed since the listing (by another collector running at the same time?)
        raise CorruptArtifactError(f"manifest {store.describe()}/{key} vanished during collection")
    return Manifest.from_json(data, where=f"{store.describe()}/{key}")


def _listed(manifest: Manifest) -> set[str]:
    """The keys a manifest keeps alive: its files and its own history entry."""
    return {entry.key for entry in manifest.files.values()} | {
        keys.history_key(manifest.asset, manifest.partition, manifest.data_version)}


def _still_unchanged(store: ArtifactStore, folder_prefix: str, doomed: list[StoredObject], cutoff: float, *,
                     whole_folder: bool) -> tuple[list[StoredObject], list[StoredObject]]:
    """(removable, revived): `doomed` split by a fresh listing of its folder. An object put again
    since the first listing (another mtime) or young is revived; with `whole_folder` (a version's
    files, which a writer puts one by one) any such object in the folder revives all of `doomed`.
    Objects gone meanwhile are neither."""
    first = {obj.key: obj.mtime for obj in doomed}
    depth = folder_prefix.count("/")
    again = {obj.key: obj for obj in store.backend.list_objects(folder_prefix) if obj.key.count("/") == depth}

    def changed(obj: StoredObject) -> bool:
        return obj.mtime > cutoff or first.get(obj.key, obj.mtime) != obj.mtime

    if whole_folder and any(changed(obj) for obj in again.values()):
        return [], [obj for obj in doomed if obj.key in again]
    removable = [obj for obj in doomed if obj.key in again and not changed(again[obj.key])]
    return removable, [obj for obj in doomed if obj.key in again and changed(again[obj.key])]


def main(argv: list[str] | None = None) -> int:
    from resources import ArtifactStorage
    from sae_assets.core.config import load_config

    parser = argparse.ArgumentParser(prog="python -m resources.gc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="report what would be removed; delete nothing")
    parser.add_argument("--asset", action="append", help="collect only this asset (repeatable)")
    args = parser.parse_args(argv)
    cfg = load_config(os.environ.get("SAE_ASSETS_CONFIG"))
    store = ArtifactStorage.from_config(cfg.storage).store()
    report = collect_garbage(store, grace_seconds=cfg.storage.gc_grace_hours * 3600,
                             keep_versions=cfg.storage.gc_keep_versions, dry_run=args.dry_run, assets=args.asset)
    print(f"garbage collection of {store.describe()} (grace {cfg.storage.gc_grace_hours} h, "
          f"keep {cfg.storage.gc_keep_versions} versions{', dry run' if args.dry_run else ''}):")
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
