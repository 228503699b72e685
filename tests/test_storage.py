"""The storage contract, run on both backends (LocalBackend and S3Backend on SeaweedFS).

Each contract test takes the `store` fixture (tests/conftest.py), so it runs once per backend:
round trips, byte-identical reruns, failed and killed writes that readers never see,
corruption caught by checksums, missing partitions, escaping keys and partition listing.
The S3-only tests at the end check the startup errors and that credentials stay hidden.
"""

from __future__ import annotations

import json
import os
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
from resources.manifest import ArtifactMissingError, CorruptArtifactError, Manifest
from resources.s3 import S3Backend
from resources.storage import ArtifactStore, StorageError, staging_prefix

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
    assert sorted(stored_keys(store)) == sorted([keys.manifest_key(ASSET, PART)] + [e.key for e in read.files.values()])


def test_identical_rerun_is_byte_identical(store: ArtifactStore) -> None:
    first = write_partition(store, FILES)
    first_bytes = store.backend.get_bytes(keys.manifest_key(ASSET, PART))
    second = write_partition(store, FILES)
    assert second.data_version == first.data_version
    assert store.backend.get_bytes(keys.manifest_key(ASSET, PART)) == first_bytes == first.to_json()
    assert len(stored_keys(store)) == len(FILES) + 1  # no duplicates, nothing reclaimed by mistake


def test_changed_file_changes_data_version(store: ArtifactStore) -> None:
    first = write_partition(store, FILES)
    second = write_partition(store, {**FILES, "meta.json": b'{"changed": true}'})
    assert second.data_version != first.data_version
    assert second.files["meta.json"].key != first.files["meta.json"].key
    # Files of one write share a version directory, so the unchanged file moves with it.
    assert second.files["acts.arrow"].sha256 == first.files["acts.arrow"].sha256
    assert second.files["acts.arrow"].key.rsplit("/", 2)[-2] == second.files["meta.json"].key.rsplit("/", 2)[-2]
    assert store.read_bytes(store.require(ASSET, PART), "meta.json") == b'{"changed": true}'
    assert first.files["meta.json"].key not in stored_keys(store)  # superseded file reclaimed


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
    assert len(orphans) == 1 and orphans[0].endswith("/acts.arrow")  # uploaded, never referenced
    assert store.require(ASSET, PART) == first
    assert store.read_bytes(first, "acts.arrow") == FILES["acts.arrow"]
    # A later successful write still works and reclaims only what its predecessor referenced.
    assert write_partition(store, FILES) == first


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
    parts = ["shard-0001|f0000-0255", "shard-0001|f0256-0511", "shard-0002|f0000-0255", "a/b c"]
    for part in parts:
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
