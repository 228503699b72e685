"""Storage keys: the one module that decides where every artifact lives.

An artifact partition is the prefix `<asset>/<partition>/`; it holds `manifest.json` and its
data files under `v-<content hash>/<name>`, where the hash covers the names and checksums of
all the files of one write. Files written together stay together in one directory (so an
SAE's cfg.json and sae_weights.safetensors load as SAELens expects), a version's key changes
whenever any byte changes, and a half-written rerun can never clobber what the current
manifest points at.
Keys are relative: the backend adds its root directory or S3 prefix. Every component is
checked so that no asset, partition or file name can climb out of the root.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse

UNPARTITIONED = "_all"
MANIFEST_NAME = "manifest.json"

_ASSET_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Characters kept as-is in a partition component; everything else is percent-encoded, so a
# multi-partition key like "shard-0003|f0000-0255" maps to one safe path component.
_PARTITION_SAFE = "-_.=+"


class InvalidKeyError(ValueError):
    """An asset, partition or file name that cannot be used as part of a storage key."""


def asset_component(asset: str) -> str:
    if not _ASSET_RE.match(asset):
        raise InvalidKeyError(f"asset name {asset!r} must match {_ASSET_RE.pattern}")
    return asset


def partition_component(partition: str | None) -> str:
    if partition is None:
        return UNPARTITIONED
    if not partition or len(partition) > 200:
        raise InvalidKeyError(f"partition key {partition!r} must be 1-200 characters")
    encoded = urllib.parse.quote(partition, safe=_PARTITION_SAFE)
    if encoded in (".", "..") or encoded.startswith(".") or encoded == UNPARTITIONED:
        raise InvalidKeyError(f"partition key {partition!r} is reserved or hidden")
    return encoded


def file_component(name: str) -> str:
    if not _FILE_RE.match(name) or ".." in name:
        raise InvalidKeyError(f"file name {name!r} must match {_FILE_RE.pattern} without '..'")
    return name


def partition_prefix(asset: str, partition: str | None) -> str:
    return f"{asset_component(asset)}/{partition_component(partition)}/"


def manifest_key(asset: str, partition: str | None) -> str:
    return partition_prefix(asset, partition) + MANIFEST_NAME


def version_hash(checksums: dict[str, str]) -> str:
    """The directory name component of one write: a hash of its sorted {name: sha256}."""
    for name, sha256 in checksums.items():
        file_component(name)
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise InvalidKeyError(f"checksum {sha256!r} of {name!r} is not a sha256 hex digest")
    listing = "\n".join(f"{name}\t{checksums[name]}" for name in sorted(checksums))
    return hashlib.sha256(listing.encode()).hexdigest()[:20]


def data_file_key(asset: str, partition: str | None, version: str, name: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{20}", version):
        raise InvalidKeyError(f"version {version!r} is not a version hash")
    return partition_prefix(asset, partition) + f"v-{version}/{file_component(name)}"


def describe(asset: str, partition: str | None) -> str:
    """How errors name a partition: 'token_shards[shard-0003]' or 'tokenizer'."""
    return asset if partition is None else f"{asset}[{partition}]"


def checkpoint_key(asset: str, partition: str | None, tag: str, name: str) -> str:
    """Where a training checkpoint is mirrored; never listed in a manifest, so never read as data."""
    if not re.fullmatch(r"[0-9a-f]{8,64}", tag):
        raise InvalidKeyError(f"checkpoint tag {tag!r} must be a hex fingerprint")
    return partition_prefix(asset, partition) + f"checkpoints/{tag}/{file_component(name)}"
