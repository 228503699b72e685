"""Storage keys: the one module that decides where every artifact lives.

An artifact partition is the prefix `<asset>/<partition>/`; it holds `manifest.json` and its
data files under `v-<content hash>/<name>`, where the hash covers the names and checksums of
all the files of one write. Files written together stay together in one directory (so an
SAE's cfg.json and sae_weights.safetensors load as SAELens expects), a version's key changes
whenever any byte changes, and a half-written rerun can never clobber what the current
manifest points at. Every committed manifest is also kept as `manifests/<data version>.json`
(its history, which resources/gc.py prunes); `checkpoints/<tag>/` holds mirrored checkpoints.
Keys are relative: the backend adds its root directory or S3 prefix. Every component is
checked so that no asset, partition or file name can climb out of the root.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
import uuid

UNPARTITIONED = "_all"
MANIFEST_NAME = "manifest.json"
HISTORY_DIR = "manifests"

_ASSET_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Characters kept as-is in a partition component; everything else is percent-encoded, so a
# multi-partition key like "shard-0003|f0000-0255" maps to one safe path component.
_PARTITION_SAFE = "-_.=+"
_VERSION_DIR_RE = re.compile(r"v-[0-9a-f]{20}")
_MANIFEST_HASH_RE = re.compile(r"[0-9a-f]{24}")
_HISTORY_FILE_RE = re.compile(r"manifests/[0-9a-f]{24}\.json")
_TEMP_RE = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")


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


def decode_partition(component: str) -> str | None:
    """The partition key that a partition component encodes (the inverse of partition_component)."""
    return None if component == UNPARTITIONED else urllib.parse.unquote(component)


def file_component(name: str) -> str:
    if not _FILE_RE.match(name) or ".." in name:
        raise InvalidKeyError(f"file name {name!r} must match {_FILE_RE.pattern} without '..'")
    return name


def partition_prefix(asset: str, partition: str | None) -> str:
    return f"{asset_component(asset)}/{partition_component(partition)}/"


def manifest_key(asset: str, partition: str | None) -> str:
    return partition_prefix(asset, partition) + MANIFEST_NAME


def history_prefix(asset: str, partition: str | None) -> str:
    """Where every committed manifest of the partition is kept, named by its data version."""
    return partition_prefix(asset, partition) + HISTORY_DIR + "/"


def is_manifest_hash(version: str) -> bool:
    """True for a string of the form of `Manifest.data_version` and `content_version`."""
    return bool(_MANIFEST_HASH_RE.fullmatch(version))


def history_key(asset: str, partition: str | None, data_version: str) -> str:
    if not is_manifest_hash(data_version):
        raise InvalidKeyError(f"data version {data_version!r} is not a manifest hash")
    return history_prefix(asset, partition) + f"{data_version}.json"


def is_history_component(relative: str) -> bool:
    """True for a partition-relative key `manifests/<data version>.json`."""
    return bool(_HISTORY_FILE_RE.fullmatch(relative))


def collectable_component(relative: str) -> bool:
    """True for a key (relative to its partition prefix) that a garbage collector may remove
    once nothing retains it: a version's file `v-<hash>/<name>`, a history entry, or a local
    temp file beside either or beside the manifest. Never `manifest.json`, `checkpoints/...`
    or anything of unknown form."""
    directory, _, name = relative.rpartition("/")
    if is_temp_name(name):
        return directory in ("", HISTORY_DIR) or bool(_VERSION_DIR_RE.fullmatch(directory))
    return bool(_VERSION_DIR_RE.fullmatch(directory) and _FILE_RE.match(name)) or is_history_component(relative)


def temp_name(name: str) -> str:
    """The hidden name a LocalBackend writes before renaming into place: `.<name>.<uuid4>.tmp`."""
    return f".{name}.{uuid.uuid4().hex}.tmp"


def is_temp_name(name: str) -> bool:
    return bool(_TEMP_RE.fullmatch(name))


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
