"""How many partitions a run makes, and the limit they must stay under.

Dagster recommends at most 100,000 partitions per asset. The feature pipeline crosses data
shards with feature ranges (feature_samples, context_gather), so a corpus of S shards and a
dictionary of F features browsed R at a time make S x ceil(F / R) cells. `plan_partitions`
counts them; `budget_problem` says, for a plan over the limit, which range width or shard count
would bring it under, naming the config keys. `RunConfig` checks the plan when the shard count
is fixed by the config; partition sync checks it again with the count of a growing corpus.
`bench/scale_projection.py` uses the same plan to project partitions and runs at scale.
Tests: tests/test_config.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FEATURE_RANGE_PREFIX = "features-"
"""How a feature-range partition key begins: `features-<lo>-<hi - 1>` (sae_assets.defs.partitions)."""

MAX_PARTITIONS_PER_ASSET = 100_000
"""Dagster's recommended ceiling of partitions per asset (more slows the UI and the daemon)."""


@dataclass(frozen=True)
class PartitionPlan:
    """The partition counts of one run: S shards crossed with ceil(F / R) feature ranges."""

    shards: int
    """S: data shards (partitions of corpus_shards ... cached_activations)."""
    dictionary_width: int
    """F: features of the browsed dictionary."""
    range_width: int
    """R: features per feature-range partition (features.range_width)."""

    @property
    def ranges(self) -> int:
        return math.ceil(self.dictionary_width / self.range_width)

    @property
    def cells(self) -> int:
        """shard x range partitions of feature_samples and context_gather."""
        return self.shards * self.ranges

    @property
    def max_per_asset(self) -> int:
        return max(self.shards, self.ranges, self.cells)


def plan_partitions(*, shards: int, dictionary_width: int, range_width: int) -> PartitionPlan:
    if shards < 1 or dictionary_width < 1 or range_width < 1:
        raise ValueError(f"shards, dictionary_width and range_width must be >= 1, "
                         f"got {shards}, {dictionary_width}, {range_width}")
    return PartitionPlan(shards, dictionary_width, range_width)


def smallest_range_width(shards: int, width: int, limit: int = MAX_PARTITIONS_PER_ASSET) -> int | None:
    """The smallest features.range_width that keeps S x ceil(F / R) <= limit (None: no width can)."""
    max_ranges = limit // shards
    if max_ranges < 1:
        return None
    # ceil(F / R) <= m  <=>  R >= F / m; the smallest such R is ceil(F / m).
    return math.ceil(width / min(max_ranges, width))


def largest_shard_count(plan: PartitionPlan, limit: int = MAX_PARTITIONS_PER_ASSET) -> int:
    """The most shards that keep the cells of `plan`'s ranges within the limit."""
    return min(limit, limit // plan.ranges)


def budget_problem(plan: PartitionPlan, *, documents_per_shard: int = 0,
                   limit: int = MAX_PARTITIONS_PER_ASSET) -> str | None:
    """None when every asset of `plan` stays within `limit` partitions; else what to change.

    With `documents_per_shard` > 0 the shard count comes from a growing corpus cut into shards
    of that many documents, so the fix names corpus.documents_per_shard instead of
    corpus.num_shards.
    """
    shards_key = "corpus.documents_per_shard" if documents_per_shard else "corpus.num_shards"
    if plan.max_per_asset <= limit:
        return None
    width = smallest_range_width(plan.shards, plan.dictionary_width, limit)
    fixes = []
    if width is not None:
        fixes.append(f"set features.range_width >= {width:,} ({math.ceil(plan.dictionary_width / width):,} ranges)")
    if plan.ranges <= limit:
        most = largest_shard_count(plan, limit)
        fixes.append(f"set corpus.documents_per_shard >= {math.ceil(plan.shards * documents_per_shard / most):,} "
                     f"(at most {most:,} shards)" if documents_per_shard else f"set corpus.num_shards <= {most:,}")
    what = (f"{plan.ranges:,} feature ranges (dictionary width {plan.dictionary_width:,} / features.range_width "
            f"{plan.range_width:,}) x {plan.shards:,} shards ({shards_key}) = {plan.cells:,} shard x range partitions")
    return (f"gives {what}, over Dagster's recommended {limit:,} partitions per asset: "
            f"{', or '.join(fixes) if fixes else 'use fewer shards and wider feature ranges'}")
