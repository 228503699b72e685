"""The storage contract, run on both backends (LocalBackend and S3Backend on SeaweedFS).

Each contract test takes the `store` fixture (tests/conftest.py), so it runs once per backend:
round trips, byte-identical reruns, failed and killed writes that readers never see,
corruption caught by checksums, missing partitions, escaping keys and partition listing;
then that no commit deletes (a reader of an older manifest, two writers racing), older versions
resolved by `manifest_at`, and the garbage collector's retention rule, with its Dagster job
and command line. The S3-only tests at the end check the startup errors and that credentials
stay hidden.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from resources import keys
from resources.gc import PartitionCounts, collect_garbage
from resources.manifest import ArtifactMissingError, CorruptArtifactError, Manifest
from resources.s3 import S3Backend
from resources.storage import ArtifactStore, LocalBackend, StorageError, staging_prefix
from sae_assets.core.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
ASSET, PART = "acts", "shard-0001|f0000-0255"
WHERE = keys.describe(ASSET, PART)


def write_partition(
    store: ArtifactStore, files: dict[str, bytes], *, partition: str | None = PART, asset: str = ASSET
) -> Manifest:
    with store.writer(asset, partition, config_hash="cfg1", code_version="v1", upstream={"tokens": "abc"}) as w:
        for name, data in files.items():
            w.path(name).write_bytes(data)
            w.describe_table(name, rows=len(data) // 4, schema="x: fixed_size_list<float>[4]")
        w.extra["d_in"] = 4
    assert w.manifest is not None
    return w.manifest


FILES = {"acts.arrow": bytes(range(256)) * 64, "index.parquet": b"PAR1" + b"\x01" * 1000, "meta.json": b"{}"}


def stored_keys(store: ArtifactStore, partition: str | None = PART) -> list[str]:
    return store.backend.list_keys(keys.partition_prefix(ASSET, partition))


def history_key(manifest: Manifest) -> str:
    return keys.history_key(manifest.asset, manifest.partition, manifest.data_version)


# ---- contract, on both backends ---------------------------------------------------------------


def test_write_and_read_back(store: ArtifactStore) -> None:
    written = write_partition(store, FILES)
    read = store.require(ASSET, PART)
    assert read == written
    assert sorted(read.files) == sorted(FILES)
    for name, data in FILES.items():
        assert store.read_bytes(read, name) == data
        assert read.files[name].size == len(data)
        assert read.files[name].rows == len(data) // 4
        assert read.files[name].schema == "x: fixed_size_list<float>[4]"
    assert read.extra == {"d_in": 4} and read.upstream == {"tokens": "abc"} and read.config_hash == "cfg1"
    assert read.total_bytes == sum(map(len, FILES.values()))
    assert sorted(stored_keys(store)) == sorted([keys.manifest_key(ASSET, PART), history_key(read)]
                                                + [e.key for e in read.files.values()])
    assert store.backend.get_bytes(history_key(read)) == read.to_json()


def test_identical_rerun_is_byte_identical(store: ArtifactStore) -> None:
    first = write_partition(store, FILES)
    first_bytes = store.backend.get_bytes(keys.manifest_key(ASSET, PART))
    second = write_partition(store, FILES)
    assert second.data_version == first.data_version
    assert store.backend.get_bytes(keys.manifest_key(ASSET, PART)) == first_bytes == first.to_json()
    assert store.backend.get_bytes(history_key(first)) == first_bytes  # one history entry, rewritten in place
    assert len(stored_keys(store)) == len(FILES) + 2  # files, manifest, history entry: no duplicates


def test_changed_file_changes_data_version(store: ArtifactStore) -> None:
    first = write_partition(store, FILES)
    second = write_partition(store, {**FILES, "meta.json": b'{"changed": true}'})
    assert second.data_version != first.data_version
    assert second.files["meta.json"].key != first.files["meta.json"].key
    # Files of one write share a version directory, so the unchanged file moves with it.
    assert second.files["acts.arrow"].sha256 == first.files["acts.arrow"].sha256
    assert second.files["acts.arrow"].key.rsplit("/", 2)[-2] == second.files["meta.json"].key.rsplit("/", 2)[-2]
    assert store.read_bytes(store.require(ASSET, PART), "meta.json") == b'{"changed": true}'
    # Nothing reclaimed: the superseded version stays whole (and in the history) for the collector.
    assert sorted(stored_keys(store)) == sorted(
        {keys.manifest_key(ASSET, PART), history_key(first), history_key(second)}
        | {e.key for m in (first, second) for e in m.files.values()})
    assert store.read_bytes(first, "meta.json") == FILES["meta.json"]


def test_failed_writer_block_leaves_previous_partition(store: ArtifactStore) -> None:
    first = write_partition(store, FILES)
    before = stored_keys(store)
    with pytest.raises(RuntimeError, match="boom"):
        with store.writer(ASSET, PART) as w:
            w.path("acts.arrow").write_bytes(b"half-written")
            raise RuntimeError("boom")
    assert store.require(ASSET, PART) == first
    assert stored_keys(store) == before
    assert store.read_bytes(first, "acts.arrow") == FILES["acts.arrow"]


_KILLED_WRITER = textwrap.dedent(
    """
    import json, os, signal, sys
    from resources.s3 import S3Backend
    from resources.storage import ArtifactStore, LocalBackend
    spec = json.loads(os.environ["BACKEND_SPEC"])
    backend = (LocalBackend if spec["kind"] == "local" else S3Backend)(**spec["kwargs"])
    put_bytes = backend.put_bytes
    def put_bytes_then_die(data, key):
        if key.endswith("/manifest.json"):  # killed after the data files, before the manifest
            os.kill(os.getpid(), signal.SIGKILL)
        put_bytes(data, key)
    backend.put_bytes = put_bytes_then_die
    with ArtifactStore(backend).writer("acts", sys.argv[1]) as w:
        w.path("acts.arrow").write_bytes(b"new bytes from a killed run")
    """
)


def test_killed_write_is_invisible(store: ArtifactStore, backend_spec: dict) -> None:
    first = write_partition(store, FILES)
    before = stored_keys(store)
    env = {**os.environ, "BACKEND_SPEC": json.dumps(backend_spec), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, PART], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    orphans = sorted(set(stored_keys(store)) - set(before))
    # Uploaded, never current: the data file and the history entry written before the manifest.
    assert len(orphans) == 2 and orphans[1].endswith("/acts.arrow"), orphans
    assert orphans[0].startswith(keys.history_prefix(ASSET, PART))
    assert store.require(ASSET, PART) == first
    assert store.partitions(ASSET) == [PART]
    assert store.read_bytes(first, "acts.arrow") == FILES["acts.arrow"]
    # A later successful write still works, and deletes nothing.
    assert write_partition(store, FILES) == first
    assert set(before) | set(orphans) == set(stored_keys(store))


def test_a_writer_reclaims_the_staging_of_dead_processes_only(store: ArtifactStore) -> None:
    scratch = store.backend.scratch_dir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # exited: its pid names no live process (barring reuse within ms)
    ours = staging_prefix("cached_activations")
    dead_prefix = ours.replace(f"@{os.getpid()}@", f"@{dead_pid}@")
    leftovers = {
        "dead": scratch / f"{dead_prefix}x1",
        "live": scratch / f"{ours}x2",  # this process, e.g. another thread's writer
        "other_host": scratch / (dead_prefix.replace("@", "@elsewhere-", 1) + "x3"),
        "unknown": scratch / "cached_activations-abc",
    }
    for path in leftovers.values():
        path.mkdir()
        (path / "part.arrow").write_bytes(b"partial" * 1000)
    write_partition(store, FILES)
    assert {name for name, path in leftovers.items() if path.exists()} == {"live", "other_host", "unknown"}


def test_data_without_manifest_is_no_partition(store: ArtifactStore, tmp_path: Path) -> None:
    staged = tmp_path / "orphan.arrow"
    staged.write_bytes(b"data whose manifest never came")
    key = keys.data_file_key(ASSET, "shard-0002", keys.version_hash({"orphan.arrow": "0" * 64}), "orphan.arrow")
    store.backend.put_file(staged, key)
    assert store.backend.exists(key)
    assert store.partitions(ASSET) == []
    assert store.manifest(ASSET, "shard-0002") is None
    with pytest.raises(ArtifactMissingError, match=r"acts\[shard-0002\]"):
        store.require(ASSET, "shard-0002")


def test_corrupted_file_is_caught(store: ArtifactStore) -> None:
    manifest = write_partition(store, FILES)
    key = manifest.files["acts.arrow"].key
    data = bytearray(store.backend.get_bytes(key))
    data[100] ^= 0x01
    store.backend.put_bytes(bytes(data), key)  # same size, one bit off
    with pytest.raises(CorruptArtifactError, match="checksum") as err:
        store.fetch(manifest, "acts.arrow")
    assert WHERE in str(err.value) and "'acts.arrow'" in str(err.value)
    assert store.read_bytes(manifest, "meta.json") == FILES["meta.json"]  # the others still read


def test_missing_stored_file_is_caught(store: ArtifactStore) -> None:
    manifest = write_partition(store, FILES)
    store.backend.delete([manifest.files["index.parquet"].key])
    with pytest.raises(CorruptArtifactError, match="missing") as err:
        store.fetch(manifest, "index.parquet")
    assert WHERE in str(err.value) and "'index.parquet'" in str(err.value)


def test_missing_partition_and_file(store: ArtifactStore) -> None:
    with pytest.raises(ArtifactMissingError, match=r"acts\[shard-0404\] has not been materialized"):
        store.require(ASSET, "shard-0404")
    manifest = write_partition(store, FILES)
    with pytest.raises(ArtifactMissingError, match="'nope.bin' is not in its manifest"):
        store.fetch(manifest, "nope.bin")


def test_corrupt_manifest_is_reported_and_repairable(store: ArtifactStore) -> None:
    write_partition(store, FILES)
    store.backend.put_bytes(b'{"asset": "acts", "fil', keys.manifest_key(ASSET, PART))
    with pytest.raises(CorruptArtifactError, match="manifest .* is unreadable"):
        store.require(ASSET, PART)
    assert write_partition(store, FILES) == store.require(ASSET, PART)  # a rerun repairs it


@pytest.mark.parametrize(
    "asset, partition, name",
    [("../x", None, "a"), ("acts", "..", "a"), ("acts", "../x", "a"), ("acts", ".hidden", "a"),
     ("acts", "_all", "a"), ("acts", "", "a"), ("acts", None, "../x"), ("acts", None, "a/b"),
     ("acts", None, ".."), ("acts", None, "/etc/passwd")],
)
def test_escaping_names_are_refused(store: ArtifactStore, asset: str, partition: str | None, name: str) -> None:
    with pytest.raises(keys.InvalidKeyError):
        with store.writer(asset, partition) as w:
            w.path(name).write_bytes(b"x")
    assert store.backend.list_keys("") == []


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/abs"])
def test_backend_refuses_escaping_keys(store: ArtifactStore, key: str) -> None:
    with pytest.raises(keys.InvalidKeyError):
        store.backend.put_bytes(b"x", key)
    with pytest.raises(keys.InvalidKeyError):
        store.backend.get_bytes(key)


def test_partitions_lists_what_exists(store: ArtifactStore) -> None:
    parts = ["shard-0001|f0000-0255", "shard-0001|f0256-0511", "shard-0002|f0000-0255", "a/b c", "manifests"]
    for part in parts:
        write_partition(store, {"meta.json": b"older"}, partition=part)  # history entries: not partitions
        write_partition(store, {"meta.json": part.encode()}, partition=part)
    write_partition(store, {"vocab.json": b"{}"}, asset="tokenizer", partition=None)
    assert sorted(store.partitions(ASSET)) == sorted(parts)
    assert store.partitions("tokenizer") == [None]
    assert store.partitions("nothing") == []
    assert store.read_bytes(store.require(ASSET, "a/b c"), "meta.json") == b"a/b c"


def test_many_keys_list_and_delete(store: ArtifactStore) -> None:
    count = 1001 if isinstance(store.backend, S3Backend) else 50  # S3: one past a list page and a delete batch
    names = [f"{ASSET}/bulk/files/{i:05d}.bin" for i in range(count)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: store.backend.put_bytes(b"x", key), names))
    assert store.backend.list_keys(f"{ASSET}/") == names
    store.backend.delete(names + [f"{ASSET}/bulk/never-there"])
    assert store.backend.list_keys(f"{ASSET}/") == []


# ---- no commit deletes; the garbage collector ------------------------------------------------------

OLD_FILES = {**FILES, "meta.json": b'{"old": true}'}
NEW_FILES = {**FILES, "meta.json": b'{"new": true}'}
HOUR = 3600.0


def tick(store: ArtifactStore) -> None:
    """Wait for the backend's next modification-time tick, so that later puts look newer (an S3
    server counts LastModified in whole seconds, a local file system in kernel ticks)."""
    time.sleep(1.05 - time.time() % 1 if isinstance(store.backend, S3Backend) else 0.02)


def assert_reads(store: ArtifactStore, manifest: Manifest, files: dict[str, bytes] | None = None) -> None:
    for name in manifest.files:
        data = store.read_bytes(manifest, name)  # verifies size and sha256
        assert files is None or data == files[name], name


def version_keys(manifest: Manifest) -> set[str]:
    return {entry.key for entry in manifest.files.values()} | {history_key(manifest)}


def test_a_reader_of_the_previous_manifest_still_reads_after_a_rewrite(store: ArtifactStore) -> None:
    held = write_partition(store, OLD_FILES)
    current = write_partition(store, NEW_FILES)
    assert store.require(ASSET, PART) == current != held
    assert_reads(store, held, OLD_FILES)
    assert_reads(store, current, NEW_FILES)


def test_racing_writers_leave_a_readable_manifest(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # Writer B's content is the previous version P. A puts manifest X, B then commits P in full,
    # and only then does A's commit return: a commit that deleted its predecessor's files (P's,
    # read by A before its put) would delete the files that the final manifest lists.
    previous = write_partition(store, OLD_FILES)
    manifest_key = keys.manifest_key(ASSET, PART)
    a_put, b_committed = threading.Event(), threading.Event()
    put_bytes = store.backend.put_bytes

    def put_bytes_interleaved(data: bytes, key: str) -> None:
        put_bytes(data, key)
        if key == manifest_key and threading.current_thread().name.startswith("writer-a"):
            a_put.set()
            assert b_committed.wait(60), "writer B never committed"

    monkeypatch.setattr(store.backend, "put_bytes", put_bytes_interleaved)
    with ThreadPoolExecutor(1, thread_name_prefix="writer-a") as pool:
        a_future = pool.submit(write_partition, store, NEW_FILES)
        try:
            assert a_put.wait(60), "writer A never put its manifest"
            b = write_partition(store, OLD_FILES)
        finally:
            b_committed.set()
        a = a_future.result(timeout=60)
    final = store.require(ASSET, PART)
    assert final == b == previous != a
    assert_reads(store, final, OLD_FILES)
    assert_reads(store, store.manifest_at(ASSET, PART, a.data_version), NEW_FILES)


def test_manifest_at_resolves_older_versions_until_collected(store: ArtifactStore) -> None:
    old = write_partition(store, OLD_FILES)
    tick(store)
    new = write_partition(store, NEW_FILES)
    assert old.content_version != old.data_version
    for manifest in (old, new):
        for version in (manifest.data_version, manifest.content_version):
            assert store.manifest_at(ASSET, PART, version) == manifest
    assert_reads(store, store.manifest_at(ASSET, PART, old.content_version), OLD_FILES)
    for never in ("0" * 24, "not-a-version"):
        with pytest.raises(ArtifactMissingError, match=rf"{re.escape(WHERE)} has no version '{never}'"):
            store.manifest_at(ASSET, PART, never)

    report = collect_garbage(store, grace_seconds=HOUR, keep_versions=1, now=time.time() + 2 * HOUR)
    assert sorted(report.removed) == sorted(version_keys(old))
    for version in (old.data_version, old.content_version):
        with pytest.raises(ArtifactMissingError, match=rf"{re.escape(WHERE)} has no version '{version}'.*collected"):
            store.manifest_at(ASSET, PART, version)
    assert store.manifest_at(ASSET, PART, new.content_version) == new


def test_collector_keeps_live_newest_and_young_versions_and_removes_the_rest(store: ArtifactStore,
                                                                            tmp_path: Path) -> None:
    v1 = write_partition(store, {**FILES, "meta.json": b"1"})
    tick(store)
    v2 = write_partition(store, {**FILES, "meta.json": b"2"})
    tick(store)
    split = time.time()  # the cutoff of the first collections: older than this is past the grace period
    tick(store)
    v3 = write_partition(store, {**FILES, "meta.json": b"3"})
    staged = tmp_path / "in-flight.bin"  # a write in flight: a file put, its manifests not yet
    staged.write_bytes(b"in flight")
    in_flight = keys.data_file_key(ASSET, PART, keys.version_hash({"x.bin": "1" * 64}), "x.bin")
    store.backend.put_file(staged, in_flight)
    first_write = keys.data_file_key(ASSET, "shard-0009", keys.version_hash({"x.bin": "2" * 64}), "x.bin")
    store.backend.put_bytes(b"a partition's first write, in flight", first_write)
    checkpoint = keys.checkpoint_key(ASSET, PART, "abcd1234", "checkpoint.pt")
    store.backend.put_bytes(b"mirrored checkpoint", checkpoint)
    sizes = {obj.key: obj.size for obj in store.backend.list_objects("")}

    def stored() -> set[str]:
        return set(store.backend.list_keys(""))

    # v1 is past retention; v2 was superseded within the grace period (a reader may hold it).
    dry = collect_garbage(store, grace_seconds=HOUR, keep_versions=1, now=split + HOUR, dry_run=True)
    assert stored() == set(sizes)
    assert sorted(dry.removed) == sorted(version_keys(v1)) and dry.bytes_freed == sum(sizes[k] for k in dry.removed)
    report = collect_garbage(store, grace_seconds=HOUR, keep_versions=1, now=split + HOUR)
    assert (report.removed, report.bytes_freed, report.dry_run) == (dry.removed, dry.bytes_freed, False)
    assert report.partitions == {WHERE: PartitionCounts(kept_versions=2, removed_versions=1, kept_files=7,
                                                        removed_files=3, bytes_freed=report.bytes_freed)}
    assert stored() == set(sizes) - version_keys(v1)
    assert set(report.kept) == version_keys(v2) | version_keys(v3) | {in_flight}
    assert_reads(store, v2)
    assert_reads(store, v3)

    # Days later: keep_versions=2 retains v2; the in-flight file, never listed, goes.
    later = split + 100 * HOUR
    report = collect_garbage(store, grace_seconds=HOUR, keep_versions=2, now=later)
    assert report.removed == [in_flight] and report.bytes_freed == sizes[in_flight]
    report = collect_garbage(store, grace_seconds=HOUR, keep_versions=1, now=later)
    assert sorted(report.removed) == sorted(version_keys(v2))
    assert stored() == version_keys(v3) | {keys.manifest_key(ASSET, PART), checkpoint, first_write}
    assert store.require(ASSET, PART) == v3 and store.partitions(ASSET) == [PART]
    assert_reads(store, v3)
    assert collect_garbage(store, grace_seconds=HOUR, keep_versions=1, now=later).removed == []


def test_a_version_put_again_while_being_collected_is_left_alone(store: ArtifactStore,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    old = write_partition(store, OLD_FILES)
    tick(store)
    write_partition(store, NEW_FILES)
    tick(store)
    old_folder = old.files["meta.json"].key.rsplit("/", 1)[0] + "/"
    list_objects = store.backend.list_objects
    recommitted = []

    def list_objects_after_a_writer(prefix: str):
        if prefix == old_folder and not recommitted:  # the collector's second look at the old version
            recommitted.append(write_partition(store, OLD_FILES))  # a rerun restores the old content first
        return list_objects(prefix)

    monkeypatch.setattr(store.backend, "list_objects", list_objects_after_a_writer)
    report = collect_garbage(store, grace_seconds=HOUR, keep_versions=1, now=time.time() + 2 * HOUR)
    assert recommitted == [old]
    assert sorted(report.revived) == sorted(entry.key for entry in old.files.values())
    assert store.require(ASSET, PART) == old
    assert_reads(store, store.require(ASSET, PART), OLD_FILES)
    assert store.manifest_at(ASSET, PART, old.data_version) == old  # its history entry was put again too


def test_collector_leaves_a_partition_with_an_unreadable_history_alone(store: ArtifactStore) -> None:
    write_partition(store, OLD_FILES)
    tick(store)
    new = write_partition(store, NEW_FILES)
    store.backend.put_bytes(b'{"asset": "ac', history_key(new))
    before = store.backend.list_keys("")
    report = collect_garbage(store, grace_seconds=HOUR, keep_versions=1, now=time.time() + 2 * HOUR)
    assert report.removed == [] and store.backend.list_keys("") == before
    assert len(report.skipped) == 1 and report.skipped[0].startswith(WHERE) and "unreadable" in report.skipped[0]


def test_collector_removes_stale_temp_files_and_never_staging_or_checkpoints(tmp_path: Path) -> None:
    store = ArtifactStore(LocalBackend(tmp_path / "artifacts"))
    manifest = write_partition(store, FILES)
    root = store.backend.root
    partition_dir = root / keys.partition_prefix(ASSET, PART)
    temps = [(root / manifest.files["acts.arrow"].key).parent / keys.temp_name("acts.arrow"),
             partition_dir / keys.temp_name(keys.MANIFEST_NAME), partition_dir / "manifests" / keys.temp_name("x.json")]
    untouched = [store.backend.scratch_dir() / f"{staging_prefix(ASSET)}x" / "part.arrow",
                 root / ".checkpoints" / keys.partition_prefix(ASSET, PART) / "abcd1234" / "checkpoint.pt"]
    for path in temps + untouched:  # left by killed puts, a live writer, a training run
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    assert collect_garbage(store, grace_seconds=HOUR, keep_versions=1).removed == []  # young
    report = collect_garbage(store, grace_seconds=HOUR, keep_versions=1, now=time.time() + 2 * HOUR)
    assert sorted(report.removed) == sorted(str(path.relative_to(root)) for path in temps)
    assert not any(path.exists() for path in temps) and all(path.exists() for path in untouched)
    assert_reads(store, manifest, FILES)


def test_retention_config_is_validated() -> None:
    storage = load_config().storage
    assert (storage.gc_grace_hours, storage.gc_keep_versions) == (24.0, 2)
    for key, value, message in [("gc_grace_hours", 0, "> 0"), ("gc_keep_versions", 0, ">= 1")]:
        with pytest.raises(ConfigError, match=rf"'storage.{key}' must be {re.escape(message)}"):
            load_config(overrides={"storage": {key: value}})


def gc_run_config(tmp_path: Path) -> tuple[Path, Path]:
    """(run config, artifact root): collection with no grace to speak of and one version kept."""
    root, config = tmp_path / "artifacts", tmp_path / "run.yaml"
    config.write_text(f"storage:\n  root: {root}\n  gc_grace_hours: 1.0e-9\n  gc_keep_versions: 1\n")
    return config, root


def test_garbage_collection_job(tmp_path: Path) -> None:
    import dagster as dg

    from resources import ArtifactStorage, RunSettings
    from sae_assets.defs import maintenance

    config, root = gc_run_config(tmp_path)
    storage = ArtifactStorage(root=str(root))
    store = storage.store()
    old = write_partition(store, OLD_FILES)
    tick(store)
    new = write_partition(store, NEW_FILES)
    resources = {"settings": RunSettings(config_path=str(config)), "storage": storage}
    dry = maintenance.garbage_collection_job.execute_in_process(
        resources=resources, run_config={"ops": {"collect_garbage": {"config": {"dry_run": True}}}})
    assert dry.success and dry.output_for_node("collect_garbage")["removed"] == len(version_keys(old))
    assert store.manifest_at(ASSET, PART, old.data_version) == old

    result = maintenance.garbage_collection_job.execute_in_process(resources=resources)
    counts = result.output_for_node("collect_garbage")
    freed = sum(len(data) for data in OLD_FILES.values()) + len(old.to_json())
    assert (counts["removed"], counts["bytes_freed"], counts["partitions"]) == (len(version_keys(old)), freed, 1)
    [output] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    metadata = output.event_specific_data.metadata
    assert metadata["bytes_freed"].value == freed and metadata["dry_run"].value is False
    with pytest.raises(ArtifactMissingError):
        store.manifest_at(ASSET, PART, old.data_version)
    assert_reads(store, new, NEW_FILES)
    schedule = maintenance.garbage_collection_schedule
    assert schedule.job_name == "garbage_collection_job"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED


def test_gc_command_line(tmp_path: Path) -> None:
    config, root = gc_run_config(tmp_path)
    store = ArtifactStore(LocalBackend(root))
    old = write_partition(store, OLD_FILES)
    tick(store)
    new = write_partition(store, NEW_FILES)
    env = {**os.environ, "SAE_ASSETS_CONFIG": str(config), "PYTHONPATH": str(REPO)}

    def gc(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "resources.gc", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = gc("--dry-run")
    assert f"would remove {len(version_keys(old))} objects" in out and "dry run" in out and str(root) in out
    assert store.manifest_at(ASSET, PART, old.data_version) == old
    out = gc()
    assert f"removed {len(version_keys(old))} objects" in out and f"{WHERE}: versions kept 1, removed 1" in out
    assert set(store.backend.list_keys("")) == version_keys(new) | {keys.manifest_key(ASSET, PART)}


# ---- S3 only ------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.s3
def test_unreachable_endpoint_is_named_quickly(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(StorageError, match="unreachable") as err:
        S3Backend(bucket="b", endpoint_url=url, cache_dir=tmp_path, access_key_id="AKIDTESTKEY123",
                  secret_access_key="very-secret-value-123")
    assert time.monotonic() - started < 15
    assert url in str(err.value)
    assert "AKIDTESTKEY123" not in str(err.value) and "very-secret-value-123" not in str(err.value)


@pytest.mark.s3
def test_missing_bucket_is_named(s3_server, tmp_path: Path) -> None:
    kwargs = s3_server.backend_kwargs(prefix="", cache_dir=tmp_path)
    with pytest.raises(StorageError, match="'no-such-bucket' does not exist") as err:
        S3Backend(**{**kwargs, "bucket": "no-such-bucket"})
    assert s3_server.endpoint_url in str(err.value)


@pytest.mark.s3
def test_bad_credentials_are_denied_without_leaking(s3_server, tmp_path: Path) -> None:
    kwargs = s3_server.backend_kwargs(prefix="", cache_dir=tmp_path)
    with pytest.raises(StorageError, match="access denied") as err:
        S3Backend(**{**kwargs, "secret_access_key": "wrong-secret-value-456"})
    assert "wrong-secret-value-456" not in str(err.value)
    assert s3_server.access_key_id not in str(err.value)


@pytest.mark.s3
def test_credentials_stay_out_of_repr(s3_server, tmp_path: Path) -> None:
    backend = S3Backend(**s3_server.backend_kwargs(prefix="p/q", cache_dir=tmp_path))
    shown = " ".join([repr(backend), str(backend), backend.describe(), repr(ArtifactStore(backend).describe())])
    assert s3_server.secret_access_key not in shown and s3_server.access_key_id not in shown
    assert backend.describe() == f"s3://{s3_server.bucket}/p/q"


@pytest.mark.s3
def test_download_cache_is_reused_and_refreshed(s3_server, tmp_path: Path) -> None:
    backend = S3Backend(**s3_server.backend_kwargs(prefix=f"cache-{uuid.uuid4().hex[:8]}", cache_dir=tmp_path))
    store = ArtifactStore(backend)
    manifest = write_partition(store, FILES)
    path = store.fetch(manifest, "acts.arrow")
    assert path.is_relative_to(tmp_path) and path.name == manifest.files["acts.arrow"].sha256
    assert store.fetch(manifest, "acts.arrow") == path
    path.write_bytes(b"truncated")  # wrong size: downloaded again
    assert store.read_bytes(manifest, "acts.arrow") == FILES["acts.arrow"]


@pytest.mark.s3
@pytest.mark.slow
def test_retries_survive_a_server_restart(private_weed, tmp_path: Path) -> None:
    # More attempts than the default so that jittered backoff cannot, by bad luck, give up
    # inside the ~1 s restart window; the mechanism under test is the same.
    backend = S3Backend(**private_weed.info.backend_kwargs(prefix="restart", cache_dir=tmp_path / "cache"),
                        max_attempts=14)
    store = ArtifactStore(backend)
    first = write_partition(store, FILES)
    private_weed.kill()
    failures: list[BaseException] = []

    def restart() -> None:
        try:
            private_weed.start()
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    restarter = threading.Thread(target=restart)
    restarter.start()
    try:
        assert store.require(ASSET, PART) == first  # retried until the server answers again
        assert store.read_bytes(first, "acts.arrow") == FILES["acts.arrow"]
        assert write_partition(store, {**FILES, "meta.json": b"after restart"}) != first
    finally:
        restarter.join()
    assert not failures, failures
