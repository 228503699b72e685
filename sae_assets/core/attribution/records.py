"""Captured steps, gathered into training-step ranges and handed out as Arrow tables.

The capture appends one `StepRecord` per optimizer step; `RangeBuffer` holds the records of
the current range (steps start..end, 1-based, inclusive) and, when its last step arrives,
calls the sink with a `RangeCapture`: the raw shift table (step, datum id, flat index,
value; `schemas.raw_shift_schema`) and the per-step table (`schemas.capture_step_schema`).
So memory holds one range, and a range's tables depend only on its steps.
`step_ranges` cuts a run of N steps into ranges. Tests: tests/test_attribution_core.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from sae_assets.core import schemas


class StepRecord(NamedTuple):
    step: int
    datum_ids: np.ndarray
    """(B,) int64 stable datum ids (global index of each sequence's first token)."""
    values: np.ndarray
    """(B, K) float32 shifts, per datum by descending |value|."""
    flat_index: np.ndarray
    """(B, K) int64 indices into the tracked space (`TensorLayout.decode`)."""
    stats: dict[str, float]
    """lr, clip coefficient, loss, sum-check errors and update norms (capture_step_schema)."""


class RangeCapture(NamedTuple):
    start: int
    end: int
    shifts: pa.Table
    steps: pa.Table


def step_ranges(total_steps: int, steps_per_range: int) -> list[tuple[int, int]]:
    """[(1, R), (R+1, 2R), ..., (.., total_steps)]: inclusive, 1-based step ranges."""
    if total_steps < 1 or steps_per_range < 1:
        raise ValueError(f"need total_steps >= 1 and steps_per_range >= 1, got {total_steps}, {steps_per_range}")
    return [(start, min(start + steps_per_range - 1, total_steps))
            for start in range(1, total_steps + 1, steps_per_range)]


def _shift_table(records: list[StepRecord]) -> pa.Table:
    steps = np.concatenate([np.full(r.values.size, r.step, dtype=np.int32) for r in records])
    datums = np.concatenate([np.repeat(r.datum_ids, r.values.shape[1]) for r in records])
    return pa.Table.from_arrays([
        pa.array(steps), pa.array(datums.astype(np.int64)),
        pa.array(np.concatenate([r.flat_index.reshape(-1) for r in records])),
        pa.array(np.concatenate([r.values.reshape(-1) for r in records])),
    ], schema=schemas.raw_shift_schema())


def _step_table(records: list[StepRecord]) -> pa.Table:
    schema = schemas.capture_step_schema()
    columns: dict[str, Any] = {f.name: [] for f in schema}
    for record in records:
        row = {"step": record.step, **record.stats}
        for name in columns:
            columns[name].append(row[name])
    return pa.Table.from_pydict(columns, schema=schema)


class RangeBuffer:
    """Collects step records and flushes each completed range to `sink`, in order."""

    def __init__(self, ranges: list[tuple[int, int]], sink: Callable[[RangeCapture], None]):
        if not ranges or ranges[0][0] != 1 or any(b[0] != a[1] + 1 for a, b in zip(ranges, ranges[1:])):
            raise ValueError(f"capture ranges must tile steps 1..N without gaps, got {ranges[:3]}...")
        self.ranges, self.sink = list(ranges), sink
        self._pending: list[StepRecord] = []
        self._next = 0  # index of the range being filled

    def add(self, record: StepRecord) -> None:
        if self._next >= len(self.ranges):
            raise ValueError(f"step {record.step} is beyond the captured ranges (last step {self.ranges[-1][1]})")
        start, end = self.ranges[self._next]
        expected = start + len(self._pending)
        if record.step != expected:
            raise ValueError(f"capture expected step {expected}, got step {record.step}")
        self._pending.append(record)
        if record.step == end:
            self.sink(RangeCapture(start, end, _shift_table(self._pending), _step_table(self._pending)))
            self._pending, self._next = [], self._next + 1

    def close(self) -> None:
        """Raise unless every range was completed (training ran exactly the captured steps)."""
        if self._next != len(self.ranges):
            done = self.ranges[self._next - 1][1] if self._next else 0
            raise ValueError(f"training stopped after step {done + len(self._pending)}, but capture ranges "
                             f"run to step {self.ranges[-1][1]}")
