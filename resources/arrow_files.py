"""Arrow IPC files on local disk: atomic writes, zero-copy memory-mapped reads, shuffle spills.

Activation shards and shuffle buckets are uncompressed Arrow IPC files so that a reader can
memory-map them and see the columns without copying. `write_ipc_file` writes a temp file in
the same directory, fsyncs it and renames it into place, so a killed write never leaves a
file under the final name. `open_ipc_table` maps one; a truncated or corrupt file raises
`CorruptArrowFileError` naming the path. `LocalSpill` gives `core.shuffle.gather_bucket`
its spill callables over a scratch directory. `to_numpy_matrix` (the (n, d) zero-copy view
of a fixed_size_list column) lives in core, which may not import this package, and is
re-exported here. Tests: tests/test_shuffle.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc

from resources.storage import fsync_path, staging_prefix
from sae_assets.core.activations.reader import to_numpy_matrix

__all__ = ["CorruptArrowFileError", "LocalSpill", "open_ipc_table", "to_numpy_matrix", "write_ipc_file",
           "write_ipc_files"]

_UNCOMPRESSED = pa.ipc.IpcWriteOptions(compression=None)  # compressed buffers cannot be mapped


class CorruptArrowFileError(ValueError):
    """An Arrow IPC file is truncated, corrupt or not an Arrow file; `path` says which."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"Arrow file {path} is unreadable (truncated or corrupt?): {reason}")
        self.path = Path(path)


def write_ipc_file(path: Path | str, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> tuple[int, int]:
    """Write `batches` to `path` atomically as an uncompressed IPC file; return (rows, bytes)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    rows = 0
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema, options=_UNCOMPRESSED) as writer:
            for batch in batches:
                writer.write_batch(batch)
                rows += batch.num_rows
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rows, path.stat().st_size


def write_ipc_files(
    paths: dict[int, Path], schema: pa.Schema, keyed_batches: Iterable[tuple[int, pa.RecordBatch]]
) -> dict[int, int]:
    """Route (key, batch) pairs into one IPC file per key, all written; return rows per key.

    Every file in `paths` is created, empty ones included, so a reader can rely on each.
    """
    sinks = {key: pa.OSFile(str(path), "wb") for key, path in paths.items()}
    writers = {key: pa.ipc.new_file(sinks[key], schema, options=_UNCOMPRESSED) for key in paths}
    rows = dict.fromkeys(paths, 0)
    try:
        for key, batch in keyed_batches:
            writers[key].write_batch(batch)
            rows[key] += batch.num_rows
    finally:
        for key in paths:
            writers[key].close()
            sinks[key].close()
    return rows


def open_ipc_table(path: Path | str) -> pa.Table:
    """Memory-map an IPC file as a table (zero-copy: pages are read when touched)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Arrow file {path} does not exist")
    try:
        source = pa.memory_map(str(path), "r")
        table = pa.ipc.open_file(source).read_all()
        table.validate()  # checks buffer sizes against the metadata (cheap, no data scan)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise CorruptArrowFileError(path, str(exc)) from exc
    return table


class LocalSpill:
    """Spill files for gather_bucket: `write(name, batch)` appends, `read(name)` maps the file.

    One IPC writer per name stays open until its first read. Use as a context manager, or
    call `close()`: it removes the scratch directory (made under `parent` if given).
    """

    def __init__(self, schema: pa.Schema, parent: Path | str | None = None):
        self.schema = schema
        self.directory = Path(tempfile.mkdtemp(prefix=staging_prefix("shuffle-spill"), dir=parent))
        self._writers: dict[str, tuple[pa.NativeFile, pa.ipc.RecordBatchFileWriter]] = {}

    def _path(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad spill name {name!r}")
        return self.directory / f"{name}.arrow"

    def write(self, name: str, batch: pa.RecordBatch) -> None:
        if name not in self._writers:
            sink = pa.OSFile(str(self._path(name)), "wb")
            self._writers[name] = (sink, pa.ipc.new_file(sink, self.schema, options=_UNCOMPRESSED))
        self._writers[name][1].write_batch(batch)

    def read(self, name: str) -> pa.Table:
        if name in self._writers:
            sink, writer = self._writers.pop(name)
            writer.close()
            sink.close()
        return open_ipc_table(self._path(name))

    def close(self) -> None:
        for sink, writer in self._writers.values():
            writer.close()
            sink.close()
        self._writers.clear()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> LocalSpill:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
