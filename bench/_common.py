"""Helpers shared by the bench/ scripts: repo-root import path, temp configs, interleaved timing.

Each script runs as `python bench/<name>.py`, so this directory is on sys.path and
`import _common` works without making bench/ a package. `REPO_ROOT` is put on sys.path here
so the scripts can import `sae_assets` and `resources` from the checkout. Nothing here
writes outside the temporary directory the caller passes.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def isolate_env(tmp: Path) -> None:
    """Point Dagster (and anything honouring these variables) at `tmp`, before importing it."""
    home = tmp / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")


def write_config(tmp: Path, overrides: dict[str, Any], base_path: str | None = None, name: str = "bench.yaml") -> str:
    """A YAML config under `tmp`: `base_path`'s keys (if any), then `overrides`, storage.root in tmp.

    The packaged defaults still apply underneath (load_config merges over them).
    """
    import yaml

    data: dict[str, Any] = (yaml.safe_load(Path(base_path).read_text()) or {}) if base_path else {}
    data = merge(data, overrides)
    storage = dict(data.get("storage") or {})
    if storage.get("backend", "local") == "local":
        storage["root"] = str(tmp / "artifacts")
    storage.setdefault("cache_dir", str(tmp / "s3-cache"))
    data["storage"] = storage
    path = tmp / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def merge(base: dict, override: dict) -> dict:
    """`override` laid over `base`, as load_config merges a config file over the defaults."""
    from sae_assets.core.config import merge_mappings

    return merge_mappings(base, override)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def interleave(subjects: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each callable `warmup` times, then `repeats` rounds of all of them (order rotated
    each round so none always runs first); return seconds per repetition per name."""
    names = list(subjects)
    for _ in range(warmup):
        for name in names:
            subjects[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            seconds[name].append(timed(subjects[name])[0])
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """'median (min-max)' in seconds, for the printed tables."""
    return f"{statistics.median(values):.4f} s ({min(values):.4f}-{max(values):.4f}, n={len(values)})"


def interleave_results(subjects: dict[str, Callable[[], float]], repeats: int,
                       warmup: int = 1) -> dict[str, list[float]]:
    """Like `interleave`, but keep what each call returns (e.g. a rate it measured itself, when
    set-up must stay out of the timing) instead of its wall time."""
    names = list(subjects)
    for _ in range(warmup):
        for name in names:
            subjects[name]()
    values: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            values[name].append(float(subjects[name]()))
    return values


def paired_ratio(subject_seconds: list[float], baseline_seconds: list[float]) -> float:
    """Median over rounds of baseline/subject seconds (= subject/baseline throughput), pairing
    the runs of the same round, so that load which shifts between rounds cancels out."""
    return statistics.median(b / s for s, b in zip(subject_seconds, baseline_seconds, strict=True))


def paired_rounds(pairs: dict[str, tuple[Callable[[], float], Callable[[], float]]], repeats: int,
                  warmup: int = 1) -> dict[str, tuple[list[float], list[float]]]:
    """For each round and each named (subject, baseline) pair, run the two back to back (which
    goes first alternates by round) and keep what each returns; `warmup` rounds are discarded.

    On a shared machine whose load comes and goes, the ratio within a pair (seconds apart)
    is much steadier than a ratio of medians taken over minutes."""
    values: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in pairs}
    for r in range(warmup + repeats):
        for name, (subject, baseline) in pairs.items():
            if r % 2 == 0:
                a, b = float(subject()), float(baseline())
            else:
                b = float(baseline())
                a = float(subject())
            if r >= warmup:
                values[name][0].append(a)
                values[name][1].append(b)
    return values
