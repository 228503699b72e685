"""What changed since the last site build, and why, from the manifests' lineage.

Every site_json partition (a feature range) lists one `feature-<id>.json` per feature with its
sha256, and the data versions of everything it was computed from (`upstream`). A site build
records the version of each range it used, so the next build can compare, range by range, the
manifest it used then with the one it uses now:

- which feature documents changed (their sha256 differ), appeared or disappeared;
- why: the inputs whose versions differ, named as a researcher would (the dictionary was
  retrained; new data shards, or recomputed ones, reached the examples; the language model or
  tokenizer changed; the context windows were recomputed), a config change (the range's config
  hash) or new code (its code version).

`lineage_of` gives the part of that a feature page shows: the dictionary version, the shards
the examples came from and the range's versions. Work and bytes are O(ranges + changed
features): unchanged ranges are skipped on their version alone, and each range lists at most
`max_listed` changed ids (with the full count). Nothing here reads a clock, so a rebuild from
the same store writes the same bytes. Tests: tests/test_site_changes.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from sae_assets.core.partition_budget import FEATURE_RANGE_PREFIX

_FEATURE_FILE = re.compile(r"feature-(\d+)\.json$")
_KEY = re.compile(r"^(?P<asset>[A-Za-z0-9_]+)(?:\[(?P<partition>.*)\])?$")


def feature_hashes(files: Mapping[str, object]) -> dict[int, str]:
    """{feature id: sha256} of a site_json manifest's files (FileEntry values or plain hashes)."""
    out = {}
    for name, entry in files.items():
        match = _FEATURE_FILE.fullmatch(name)
        if match:
            out[int(match.group(1))] = entry if isinstance(entry, str) else entry.sha256
    return out


def split_key(key: str) -> tuple[str, str | None]:
    """('asset', 'partition' or None) of an upstream key 'asset[partition]'."""
    match = _KEY.match(key)
    if not match:
        return key, None
    return match.group("asset"), match.group("partition")


def base_asset(asset: str) -> str:
    """The asset a name stands for whatever dictionary it serves: `feature_samples__topk_w1024_k32`
    (a further served dictionary's, features.dictionaries) -> `feature_samples`."""
    return asset.split("__", 1)[0]


def shards_of(keys: Iterable[str]) -> list[str]:
    """The shard partitions named by feature_samples cells 'feature_samples[features-…|shard-…]'
    (the cell's dimension that is not a feature range) or by per-shard assets, sorted, unique."""
    shards = set()
    for key in keys:
        asset, partition = split_key(key)
        if partition and base_asset(asset) in ("feature_samples", "cached_activations", "context_gather", "token_shards"):
            shards.update(p for p in partition.split("|") if not p.startswith(FEATURE_RANGE_PREFIX))
    return sorted(shards)


def describe_shards(shards: list[str]) -> str:
    """'shard-00000 … shard-00015 (16 shards)', or the names when there are few."""
    if len(shards) <= 3:
        return ", ".join(shards) + (" (1 shard)" if len(shards) == 1 else f" ({len(shards)} shards)")
    return f"{shards[0]} \u2026 {shards[-1]} ({len(shards)} shards)"


_REASONS = {
    "sae_dictionary": "the dictionary was retrained",
    "sae_metrics": "the dictionary was rescored",
    "language_model": "the language model changed",
    "tokenizer": "the tokenizer changed",
    "context_windows": "the context windows were recomputed",
}


def change_reasons(old: Mapping, new: Mapping, *, examples_upstream: tuple[Mapping, Mapping] | None = None) -> list[str]:
    """Why a range's document set changed, from its old and new site_json manifests.

    `old`/`new`: {"upstream": {...}, "config_hash": str, "code_version": str}. With
    `examples_upstream` (the old and new feature_examples manifests' upstream maps), a change
    of the examples is told apart into new and recomputed data shards.
    """
    reasons = []
    if old.get("code_version") != new.get("code_version"):
        reasons.append(f"new site_json code (version {old.get('code_version')} \u2192 {new.get('code_version')})")
    if old.get("config_hash") != new.get("config_hash"):
        reasons.append("a config change (a key that shapes the feature pages)")
    old_up, new_up = old.get("upstream", {}), new.get("upstream", {})
    for key in sorted(set(old_up) | set(new_up)):
        if old_up.get(key) == new_up.get(key):
            continue
        asset = base_asset(split_key(key)[0])
        if asset == "feature_examples":
            reasons.extend(_examples_reasons(examples_upstream) if examples_upstream else ["the examples changed"])
        elif asset in _REASONS:
            reasons.append(_REASONS[asset])
        else:
            reasons.append(f"{key} changed")
    return list(dict.fromkeys(reasons)) or ["unchanged inputs (a rebuild)"]


def _examples_reasons(examples_upstream: tuple[Mapping, Mapping]) -> list[str]:
    old, new = examples_upstream
    old_shards, new_shards = shards_of(old), shards_of(new)
    added = sorted(set(new_shards) - set(old_shards))
    removed = sorted(set(old_shards) - set(new_shards))
    old_by, new_by = _versions_by_shard(old), _versions_by_shard(new)
    redone = sorted(s for s in set(old_shards) & set(new_shards) if old_by[s] != new_by[s])
    reasons = []
    if added:
        reasons.append(f"new data: {describe_shards(added)}")
    if removed:
        reasons.append(f"data removed: {describe_shards(removed)}")
    if redone:
        reasons.append(f"recomputed: {describe_shards(redone)}")
    return reasons or ["the examples changed"]


def _versions_by_shard(upstream: Mapping[str, str]) -> dict[str, dict[str, str]]:
    by_shard: dict[str, dict[str, str]] = {}
    for key, version in upstream.items():
        for shard in shards_of([key]):
            by_shard.setdefault(shard, {})[key] = version
    return by_shard


def range_changes(feature_range: str, old_files: Mapping | None, new_files: Mapping, reasons: list[str], *,
                  max_listed: int = 1000) -> dict:
    """One range's entry of the change list: changed / added / removed feature ids (at most
    `max_listed` of each, with counts) and the reasons. `old_files` None: a range the last build
    did not have."""
    new = feature_hashes(new_files)
    if old_files is None:
        return {"range": feature_range, "changed": [], "added": sorted(new)[:max_listed], "removed": [],
                "counts": {"changed": 0, "added": len(new), "removed": 0}, "reasons": reasons}
    old = feature_hashes(old_files)
    changed = sorted(f for f in new.keys() & old.keys() if new[f] != old[f])
    added, removed = sorted(new.keys() - old.keys()), sorted(old.keys() - new.keys())
    return {"range": feature_range, "changed": changed[:max_listed], "added": added[:max_listed],
            "removed": removed[:max_listed], "counts": {"changed": len(changed), "added": len(added),
                                                        "removed": len(removed)}, "reasons": reasons}


def lineage_of(site_json_upstream: Mapping[str, str], examples_upstream: Mapping[str, str], *, feature_range: str,
               site_json_version: str) -> dict:
    """What a feature page shows of its provenance: the dictionary and its version, the shards its
    examples came from, the language model's version and the range's site_json version."""
    dictionary = next(((split_key(k)[1], v) for k, v in site_json_upstream.items()
                       if split_key(k)[0] == "sae_dictionary"), (None, None))
    shards = shards_of(examples_upstream)
    return {"range": feature_range, "site_json_version": site_json_version,
            "dictionary": dictionary[0], "dictionary_version": dictionary[1],
            "language_model_version": site_json_upstream.get("language_model"),
            "shards": describe_shards(shards) if shards else None, "shard_count": len(shards)}
