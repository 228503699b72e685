"""The shuffle's pass-0 plan: the (N, K) count table together with the shards it was drawn for.

The table depends on every shard's row count, so it is drawn once (`ShufflePlan.draw`) and
every scatter job and every gather reads the same plan: job j scatters `shards[j]` by row j
of the table, and bucket k gathers column k. Pieces cut by different plans do not fit
together (the buckets' sizes then differ from their capacities, and the permutation is not
uniform); `ShufflePlanError` is how callers refuse them. The plan round-trips through JSON
byte for byte, and `digest` names its content. Tests: tests/test_shuffle.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sae_assets.core.shuffle import bucket_count_table

PLAN_FORMAT = 1


class ShufflePlanError(ValueError):
    """Inputs or pieces disagree with the count table they must follow (a stale or mixed plan)."""


@dataclass(frozen=True, eq=False)
class ShufflePlan:
    """The pass-0 count table and whom it is for: what every scatter job and gather must share.

    Build it with `ShufflePlan.draw`; `to_json` / `from_json` round-trip it byte for byte, and
    `digest` names its content (equal digests, equal plans).
    """

    shards: tuple[str, ...]
    """Input partition keys in job order: job j scatters shards[j]."""
    rows: tuple[int, ...]
    """(N,) rows of each input shard the table was drawn for."""
    num_buckets: int
    seed: int
    table: np.ndarray
    """(N, K) int64, read-only: rows of shard j that go to bucket k (`bucket_count_table`)."""

    def __post_init__(self) -> None:
        table_NK = np.array(self.table, dtype=np.int64).reshape(len(self.shards), self.num_buckets)
        table_NK.flags.writeable = False
        object.__setattr__(self, "table", table_NK)

    @classmethod
    def draw(cls, shards: Sequence[str], rows: Sequence[int], num_buckets: int, seed: int) -> ShufflePlan:
        if len(shards) != len(rows) or len(set(shards)) != len(shards):
            raise ValueError(f"need one row count per distinct shard, got {list(shards)} and {list(rows)}")
        table_NK = bucket_count_table(rows, num_buckets, seed)
        return cls(tuple(shards), tuple(map(int, rows)), int(num_buckets), int(seed), table_NK)

    @property
    def capacities(self) -> np.ndarray:
        """(K,) rows each bucket must gather: the table's column sums."""
        return self.table.sum(axis=0)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json()).hexdigest()[:24]

    def to_json(self) -> bytes:
        return json.dumps({"format": PLAN_FORMAT, "shards": list(self.shards), "rows": list(self.rows),
                           "num_buckets": self.num_buckets, "seed": self.seed,
                           "counts": self.table.tolist()}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> ShufflePlan:
        try:
            raw = json.loads(data)
            if raw.pop("format") != PLAN_FORMAT:
                raise ValueError("unknown format")
            plan = cls(tuple(raw["shards"]), tuple(raw["rows"]), raw["num_buckets"], raw["seed"],
                       raw["counts"])  # a ragged or mis-shaped table raises here
        except (ValueError, KeyError, TypeError) as exc:
            raise ShufflePlanError(f"{where}: not a shuffle plan ({type(exc).__name__}: {exc})") from exc
        if (plan.table < 0).any() or plan.table.sum(axis=1).tolist() != list(plan.rows):
            raise ShufflePlanError(f"{where}: the count table's rows do not sum to the shards' row counts")
        return plan

    def job(self, shard: str, *, where: str, hint: str = "") -> int:
        """The job index of `shard`; ShufflePlanError (ending in `hint`) if the plan does not list it."""
        if shard not in self.shards:
            raise ShufflePlanError(f"{where}: the plan (digest {self.digest}) does not list {shard}; it was "
                                   f"drawn for {len(self.shards)} shards {_short(self.shards)}{_then(hint)}")
        return self.shards.index(shard)

    def check_config(self, num_buckets: int, seed: int, *, where: str, hint: str = "") -> None:
        if (self.num_buckets, self.seed) != (num_buckets, seed):
            raise ShufflePlanError(
                f"{where}: the plan (digest {self.digest}) was drawn for num_buckets={self.num_buckets}, "
                f"seed={self.seed}; the config says num_buckets={num_buckets}, seed={seed}{_then(hint)}")

    def check_pieces(self, bucket: int, piece_rows: Sequence[int], names: Sequence[str], *, where: str) -> None:
        """Raise ShufflePlanError unless piece j of `bucket` (named names[j]) holds counts[j, bucket] rows."""
        want = self.table[:, bucket]
        wrong = [f"{n} has {r} rows, the plan says {w}" for n, r, w in zip(names, piece_rows, want.tolist()) if r != w]
        if len(piece_rows) != len(want) or wrong:
            raise ShufflePlanError(
                f"{where}: bucket {bucket} would gather {sum(piece_rows)} rows from {len(piece_rows)} pieces; "
                f"its capacity in the plan (digest {self.digest}) is {int(want.sum())} from {len(want)} shards: "
                + "; ".join(wrong[:10]))


def _then(hint: str) -> str:
    return f"; {hint}" if hint else ""


def _short(items: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}]"
