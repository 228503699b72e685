"""Artifact storage: one interface, a local-filesystem and an S3 backend, manifest-last writes.

`ArtifactStore` owns the protocol every asset uses: stage files in a scratch directory, then
`commit` uploads each under a content-addressed key, keeps the manifest in the partition's
history and writes `manifest.json` last, so a killed write leaves only unreferenced files
that readers never see, and a rerun that fails part-way leaves the previous manifest and its
files untouched. `commit` deletes nothing: superseded versions stay, readable through
`manifest_at`, until resources/gc.py collects them past retention, so a reader holding an
older manifest and two writers racing on one partition always find their files. Reads go
through the manifest and verify sizes and sha256 checksums. A `Backend` moves bytes:
`LocalBackend` here, `S3Backend` in resources/s3.py. Contract tests for both:
tests/test_storage.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
import threading
import urllib.parse
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from resources import keys
from resources.manifest import ArtifactMissingError, CorruptArtifactError, FileEntry, Manifest

_HASH_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path | str) -> None:
    """Flush one file's bytes to disk (before a manifest or rename may point at it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
_STAGING_RE = re.compile(r"^(?P<label>[a-z0-9_-]+)@(?P<host>[A-Za-z0-9._-]+)@(?P<pid>\d+)@")


def staging_prefix(label: str) -> str:
    """`<label>@<host>@<pid>@`: the start of a staging directory's name, naming its owner so that
    a later writer on the same host can tell the staging of a killed process from a live one's."""
    return f"{label}@{_HOST}@{os.getpid()}@"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def reclaim_dead_staging(scratch_root: Path) -> list[Path]:
    """Delete the staging directories under `scratch_root` whose owner, a process on this host,
    has died (a run killed mid-write leaves partial files of any size behind). Directories of
    live processes, of other hosts sharing the disk, and of unknown form are left alone; a
    reused pid only postpones a reclaim. Returns what was deleted."""
    reclaimed = []
    for entry in scratch_root.iterdir() if scratch_root.is_dir() else ():
        match = _STAGING_RE.match(entry.name)
        if (match and entry.is_dir() and match["host"] == _HOST and int(match["pid"]) != os.getpid()
                and not _process_alive(int(match["pid"]))):
            shutil.rmtree(entry, ignore_errors=True)
            reclaimed.append(entry)
    return reclaimed


class StorageError(RuntimeError):
    """The storage backend cannot be reached or refused an operation; the message says where."""


class StoredObject(NamedTuple):
    """One stored object as `Backend.list_objects` reports it."""

    key: str
    size: int
    mtime: float
    """When it was last put (POSIX seconds): the file's st_mtime, or S3's LastModified."""


class Backend(ABC):
    """Moves bytes under keys relative to a root. Implementations must make each put atomic."""

    durable_scratch = False

    @abstractmethod
    def describe(self) -> str:
        """Where keys live, for messages: '/abs/root' or 's3://bucket/prefix'."""

    @abstractmethod
    def scratch_dir(self) -> Path:
        """A local directory for staging; on the same filesystem as the root where possible."""

    @abstractmethod
    def put_file(self, local_path: Path, key: str) -> None:
        """Store a local file under key; may consume (move) it."""

    @abstractmethod
    def put_bytes(self, data: bytes, key: str) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""

    @abstractmethod
    def local_copy(self, key: str, sha256: str) -> Path:
        """A local path holding the object (the file itself, or a cached download)."""

    def evict(self, key: str, sha256: str) -> bool:
        """Drop a local cached copy so the next local_copy fetches again; False if none."""
        return False

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def list_objects(self, prefix: str) -> list[StoredObject]:
        """Objects under prefix with sizes and modification times, sorted by key. A local
        backend also lists its hidden temp files (`keys.is_temp_name`) beside them."""

    @abstractmethod
    def delete(self, keys_to_delete: list[str]) -> None: ...


class LocalBackend(Backend):
    durable_scratch = True
    """Files under scratch_dir() survive the process: checkpoints need no mirror."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise keys.InvalidKeyError(f"key {key!r} escapes the artifact root {self.root}")
        return path

    def scratch_dir(self) -> Path:
        scratch = self.root / ".staging"
        scratch.mkdir(parents=True, exist_ok=True)
        return scratch

    def put_file(self, local_path: Path, key: str) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(keys.temp_name(target.name))
        fsync_path(local_path)  # the manifest written next must never point at unflushed bytes
        os.utime(local_path)  # mtime = put time, as S3's LastModified: resources/gc.py's grace counts from it
        try:
            os.rename(local_path, tmp)  # same filesystem: no copy
        except OSError:
            shutil.copyfile(local_path, tmp)
        os.replace(tmp, target)

    def put_bytes(self, data: bytes, key: str) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(keys.temp_name(target.name))
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)

    def get_bytes(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.exists() else None

    def local_copy(self, key: str, sha256: str) -> Path:
        return self._path(key)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list_keys(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.exists():
            return []
        found = (p.relative_to(self.root) for p in base.rglob("*") if p.is_file())
        # Skip staging and temp files: any component starting with '.' (".staging/", ".x.tmp").
        return sorted(str(rel) for rel in found if not any(part.startswith(".") for part in rel.parts))

    def list_objects(self, prefix: str) -> list[StoredObject]:
        base = self._path(prefix) if prefix else self.root
        found = []
        for path in base.rglob("*") if base.exists() else ():
            rel = path.relative_to(self.root)
            if any(part.startswith(".") for part in rel.parts[:-1]) or (
                    rel.name.startswith(".") and not keys.is_temp_name(rel.name)):
                continue  # staging, caches, checkpoints
            try:
                stat = path.stat()
            except FileNotFoundError:  # renamed or deleted since the listing
                continue
            if path.is_file():
                found.append(StoredObject(str(rel), stat.st_size, stat.st_mtime))
        return sorted(found)

    def delete(self, keys_to_delete: list[str]) -> None:
        for key in keys_to_delete:
            self._path(key).unlink(missing_ok=True)


@dataclass
class PartitionWriter:
    """Collects the files of one partition in a scratch directory until `commit`."""

    asset: str
    partition: str | None
    scratch: Path
    rows: dict[str, int] = field(default_factory=dict)
    schemas: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    """Small JSON-able facts stored in the manifest (e.g. {'d_in': 128})."""
    manifest: Manifest | None = None
    """Set once the partition is committed."""

    def path(self, name: str) -> Path:
        """Where to write the file `name`; it becomes part of the partition on commit."""
        return self.scratch / keys.file_component(name)

    def describe_table(self, name: str, *, rows: int, schema: str | None = None) -> None:
        self.rows[name] = rows
        if schema is not None:
            self.schemas[name] = schema


class ArtifactStore:
    """Manifest-last, checksum-verified partitions on any Backend."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self._verified: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def describe(self) -> str:
        return self.backend.describe()

    # ---- writing ---------------------------------------------------------------------------

    @contextmanager
    def writer(
        self,
        asset: str,
        partition: str | None,
        *,
        config_hash: str = "",
        code_version: str = "",
        upstream: dict[str, str] | None = None,
    ) -> Iterator[PartitionWriter]:
        """Stage files; on a clean exit commit them and the manifest. Yields the writer.

        After the block, `writer.manifest` holds the committed Manifest.
        """
        keys.partition_prefix(asset, partition)  # validate before any work is done
        reclaim_dead_staging(self.backend.scratch_dir())
        scratch = Path(tempfile.mkdtemp(prefix=staging_prefix(asset), dir=self.backend.scratch_dir()))
        writer = PartitionWriter(asset=asset, partition=partition, scratch=scratch)
        try:
            yield writer
            writer.manifest = self.commit(writer, config_hash, code_version, upstream or {})
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def commit(
        self, writer: PartitionWriter, config_hash: str, code_version: str, upstream: dict[str, str]
    ) -> Manifest:
        names = sorted(p.name for p in writer.scratch.iterdir() if p.is_file())
        where = keys.describe(writer.asset, writer.partition)
        if not names:
            raise StorageError(f"{where}: nothing was written; refusing to commit an empty partition")
        checksums = {name: sha256_file(writer.scratch / name) for name in names}
        version = keys.version_hash(checksums)
        files: dict[str, FileEntry] = {}
        for name in names:
            local = writer.scratch / name
            key = keys.data_file_key(writer.asset, writer.partition, version, name)
            size = local.stat().st_size
            # Always put, even when the key exists: identical bytes replace themselves atomically,
            # and a stored copy damaged in place is repaired by the rerun.
            self.backend.put_file(local, key)
            files[name] = FileEntry(key, size, checksums[name], writer.rows.get(name), writer.schemas.get(name))
        manifest = Manifest(
            asset=writer.asset, partition=writer.partition, files=files, config_hash=config_hash,
            code_version=code_version, upstream=dict(sorted(upstream.items())), extra=writer.extra,
        )
        # History first, so every manifest that ever became current can be found by its version.
        # Nothing is deleted: a reader of the previous manifest, or a racing writer whose content
        # is the previous version, still finds its files (resources/gc.py reclaims space later).
        data = manifest.to_json()
        self.backend.put_bytes(data, keys.history_key(writer.asset, writer.partition, manifest.data_version))
        self.backend.put_bytes(data, keys.manifest_key(writer.asset, writer.partition))
        return manifest

    # ---- checkpoints ---------------------------------------------------------------------------

    def checkpoint_dir(self, asset: str, partition: str | None, tag: str) -> Path:
        """A local directory for a training run's checkpoints, restored from the backend if a
        previous run (on any machine) mirrored one there."""
        local = self._local_checkpoints(asset, partition, tag)
        local.mkdir(parents=True, exist_ok=True)
        if not self.backend.durable_scratch:
            for key in self.backend.list_keys(keys.partition_prefix(asset, partition) + f"checkpoints/{tag}/"):
                target = local / key.rsplit("/", 1)[-1]
                if not target.exists():
                    data = self.backend.get_bytes(key)
                    if data is not None:
                        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
                        tmp.write_bytes(data)
                        os.replace(tmp, target)
        return local

    def _local_checkpoints(self, asset: str, partition: str | None, tag: str) -> Path:
        return self.backend.scratch_dir().parent / ".checkpoints" / keys.partition_prefix(asset, partition) / tag

    def mirror_checkpoint(self, asset: str, partition: str | None, tag: str, path: Path) -> None:
        """Copy a checkpoint file to the backend so a run on another machine can resume it."""
        if not self.backend.durable_scratch:
            self.backend.put_bytes(Path(path).read_bytes(), keys.checkpoint_key(asset, partition, tag, Path(path).name))

    def drop_checkpoints(self, asset: str, partition: str | None, tag: str) -> None:
        """Remove a finished run's checkpoints, locally and mirrored.

        Hidden (temp) files stay: one may be another run of the same partition writing its next
        checkpoint right now, whose rename would fail if it vanished. That run drops its own
        checkpoints when it finishes (tests/test_faults.py runs the two at once).
        """
        local = self._local_checkpoints(asset, partition, tag)
        if local.is_dir():
            for path in local.iterdir():
                if path.is_file() and not path.name.startswith("."):
                    path.unlink(missing_ok=True)
            try:
                local.rmdir()
            except OSError:  # not empty: a temp file of a run still writing
                pass
        self.backend.delete(self.backend.list_keys(keys.partition_prefix(asset, partition) + f"checkpoints/{tag}/"))

    # ---- reading ---------------------------------------------------------------------------

    def manifest(self, asset: str, partition: str | None) -> Manifest | None:
        key = keys.manifest_key(asset, partition)
        data = self.backend.get_bytes(key)
        if data is None:
            return None
        return Manifest.from_json(data, where=f"{self.describe()}/{key}")

    def manifest_at(self, asset: str, partition: str | None, version: str) -> Manifest:
        """The manifest whose `data_version` or `content_version` is `version`: the current one or
        one kept in the partition's history (the newest such if several share a content version).

        This is how a data version shown in the Dagster UI resolves to its files while the
        garbage collector retains it; past retention it raises ArtifactMissingError.
        """
        where = keys.describe(asset, partition)
        current = self.manifest(asset, partition)
        if current is not None and version in (current.data_version, current.content_version):
            return current
        if keys.is_manifest_hash(version):
            key = keys.history_key(asset, partition, version)
            data = self.backend.get_bytes(key)
            if data is not None:
                found = Manifest.from_json(data, where=f"{self.describe()}/{key}")
                if found.data_version == version:
                    return found
            history = sorted(self.backend.list_objects(keys.history_prefix(asset, partition)),
                             key=lambda obj: obj.mtime, reverse=True)
            for obj in history:
                data = None if keys.is_temp_name(obj.key.rsplit("/", 1)[-1]) else self.backend.get_bytes(obj.key)
                if data is not None:
                    found = Manifest.from_json(data, where=f"{self.describe()}/{obj.key}")
                    if found.content_version == version:
                        return found
        raise ArtifactMissingError(
            f"{where} has no version {version!r}: it is neither the current manifest's data or content "
            f"version nor in its history under {self.describe()}/{keys.history_prefix(asset, partition)} "
            "(collected by the garbage collector past retention, or never committed)"
        )

    def committed_at(self, manifest: Manifest) -> float | None:
        """When `manifest` was committed (its history copy's modification time, seconds since
        the epoch; manifests hold no clock of their own), or None when that copy is gone."""
        key = keys.history_key(manifest.asset, manifest.partition, manifest.data_version)
        prefix = keys.history_prefix(manifest.asset, manifest.partition)  # (kept short by the collector)
        found = [obj for obj in self.backend.list_objects(prefix) if obj.key == key]
        return found[0].mtime if found else None

    def require(self, asset: str, partition: str | None) -> Manifest:
        manifest = self.manifest(asset, partition)
        if manifest is None:
            raise ArtifactMissingError(
                f"{keys.describe(asset, partition)} has not been materialized "
                f"(no {keys.manifest_key(asset, partition)} under {self.describe()})"
            )
        return manifest

    def fetch(self, manifest: Manifest, name: str) -> Path:
        """A verified local path to one file of a partition."""
        where = f"{keys.describe(manifest.asset, manifest.partition)} file {name!r}"
        if name not in manifest.files:
            raise ArtifactMissingError(f"{where} is not in its manifest (has: {sorted(manifest.files)})")
        entry = manifest.files[name]
        try:
            path = self.backend.local_copy(entry.key, entry.sha256)
            try:
                self._verify(path, entry, where)
            except CorruptArtifactError:
                if not self.backend.evict(entry.key, entry.sha256):
                    raise
                path = self.backend.local_copy(entry.key, entry.sha256)  # a damaged cache: fetch once more
                self._verify(path, entry, where)
        except FileNotFoundError as exc:
            raise CorruptArtifactError(f"{where} is listed but missing at {entry.key}") from exc
        return path

    def read_bytes(self, manifest: Manifest, name: str) -> bytes:
        return self.fetch(manifest, name).read_bytes()

    def _verify(self, path: Path, entry: FileEntry, where: str) -> None:
        if not path.exists():
            raise CorruptArtifactError(f"{where} is listed but missing at {path}")
        stat = path.stat()
        if stat.st_size != entry.size:
            raise CorruptArtifactError(f"{where} at {path} has {stat.st_size} bytes, manifest says {entry.size}")
        memo = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if self._verified.get(memo) == entry.sha256:
                return
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise CorruptArtifactError(f"{where} at {path} fails its checksum: {actual[:16]} != {entry.sha256[:16]}")
        with self._lock:
            self._verified[memo] = actual

    def partitions(self, asset: str) -> list[str | None]:
        """Partitions of `asset` that have a manifest (decoded keys)."""
        found = []
        for key in self.backend.list_keys(keys.asset_component(asset) + "/"):
            parts = key.split("/")
            if len(parts) == 3 and parts[2] == keys.MANIFEST_NAME:
                found.append(None if parts[1] == keys.UNPARTITIONED else urllib.parse.unquote(parts[1]))
        return found
