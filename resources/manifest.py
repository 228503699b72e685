"""Partition manifests: the record a reader trusts, written after every data file it lists.

A manifest lists each file's key, size, sha256, row count and schema, plus the config hash,
code version and upstream data versions that produced it. It holds no timestamps or run
ids, so rerunning the same inputs yields the same bytes; its hash is the asset's Dagster
DataVersion.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class FileEntry:
    key: str
    """Storage key relative to the backend root."""
    size: int
    sha256: str
    rows: int | None = None
    schema: str | None = None
    """A readable schema string (Arrow's), for tables."""


@dataclass(frozen=True)
class Manifest:
    asset: str
    partition: str | None
    files: dict[str, FileEntry]
    config_hash: str = ""
    code_version: str = ""
    upstream: dict[str, str] = field(default_factory=dict)
    """Data versions of the inputs: {'token_shards[shard-0001]': '<hash>'}."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Small JSON-able facts a reader needs (e.g. d_model, dtype); not metrics with timings."""
    format: int = MANIFEST_FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @property
    def data_version(self) -> str:
        return hashlib.sha256(self.to_json()).hexdigest()[:24]

    @property
    def content_version(self) -> str:
        """A hash of what the partition holds (files, config, code, facts), not of its inputs.

        For merges over many partitions: Dagster stops tracking staleness past 100 upstream
        partitions, and an input that changed without changing the merge must not make
        anything downstream stale.
        """
        content = {"files": {name: entry.sha256 for name, entry in self.files.items()}, "config_hash": self.config_hash,
                   "code_version": self.code_version, "extra": self.extra, "format": self.format}
        return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:24]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    @property
    def total_rows(self) -> int:
        return sum(f.rows or 0 for f in self.files.values())

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> Manifest:
        try:
            raw = json.loads(data)
            files = {name: FileEntry(**entry) for name, entry in raw.pop("files").items()}
            return cls(files=files, **raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptArtifactError(f"manifest {where} is unreadable: {exc}") from exc


class CorruptArtifactError(RuntimeError):
    """A stored file or manifest does not match what its manifest promises."""


class ArtifactMissingError(FileNotFoundError):
    """A partition or file that a reader needs has not been materialized."""
