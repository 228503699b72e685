"""How captured parameter shifts travel from language_model to parameter_shifts[step range].

With `attribution.capture` on, language_model trains with a `ShiftCapture`; each completed
step range is written into language_model's own partition as two raw Parquet files
(`capture-shifts-<start>-<end>.parquet`: step, datum id, flat index, value;
`capture-steps-<start>-<end>.parquet`: the per-step table), and the capture settings, tensor
layout and ranges go into its manifest's `extra['attribution']`. parameter_shifts[range]
reads one range back (`read_range`), so each partition can be rematerialized on its own and
gives the same bytes, without retraining. The raw files are part of language_model's data
version: changing the capture settings retrains and makes downstream assets stale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from resources.manifest import Manifest
from resources.storage import ArtifactStore, PartitionWriter
from sae_assets.core.config import RunConfig

if TYPE_CHECKING:  # imported where used: loading the code location must not load torch or pyarrow
    import numpy as np
    import pyarrow as pa
    import torch

    from sae_assets.core.attribution.capture import ShiftCapture
    from sae_assets.core.attribution.records import RangeCapture
    from sae_assets.core.attribution.tensors import TensorLayout

PARQUET = {"compression": "zstd"}


def shift_file(start: int, end: int) -> str:
    return f"capture-shifts-{start:06d}-{end:06d}.parquet"


def step_file(start: int, end: int) -> str:
    return f"capture-steps-{start:06d}-{end:06d}.parquet"


def write_table(out: PartitionWriter, name: str, table: pa.Table) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, out.path(name), **PARQUET)
    out.describe_table(name, rows=table.num_rows, schema=str(table.schema))


@contextlib.contextmanager
def capture_into(out: PartitionWriter, cfg: RunConfig, model: torch.nn.Module, datum_ids: np.ndarray,
                 context_length: int) -> Iterator[ShiftCapture | None]:
    """A ShiftCapture writing each completed range into `out` (None when capture is off)."""
    from sae_assets.core.attribution.capture import ShiftCapture
    from sae_assets.core.attribution.records import step_ranges
    from sae_assets.core.model.training import training_steps

    if not cfg.attribution.capture:
        yield None
        return
    ranges = step_ranges(training_steps(cfg.model, context_length), cfg.attribution.steps_per_range)

    def sink(captured: RangeCapture) -> None:
        write_table(out, shift_file(captured.start, captured.end), captured.shifts)
        write_table(out, step_file(captured.start, captured.end), captured.steps)

    with ShiftCapture(model, datum_ids=datum_ids, top_k=cfg.attribution.top_k, ranges=ranges, sink=sink,
                      kinds=cfg.attribution.tensors) as capture:
        yield capture
    out.extra["attribution"] = {
        **cfg.attribution.capture_settings(), "ranges": [list(r) for r in ranges],
        "layout": capture.layout.to_json(), "tracked_parameters": capture.layout.total,
        "batch_size": cfg.model.batch_size, "optimizer": capture.optimizer_kind,
        "max_sum_check_error": capture.max_sum_check_error,
    }


def capture_metadata(capture: ShiftCapture | None, train_seconds: float) -> dict:
    """Timing facts for the MaterializeResult (never the manifest: they differ run to run)."""
    if capture is None:
        return {"capture": False}
    baseline = max(train_seconds - capture.seconds, 1e-9)
    return {"capture": True, "capture_seconds": round(capture.seconds, 3),
            "capture_overhead": round(train_seconds / baseline, 3),
            "tracked_parameters": capture.layout.total,
            "max_sum_check_error": capture.max_sum_check_error}


def captured(manifest: Manifest) -> dict:
    """language_model's capture facts; a clear error when it was trained without capture."""
    facts = manifest.extra.get("attribution")
    if not facts:
        raise ValueError("language_model was materialized without capture (attribution.capture false, or a named "
                         "model); set attribution.capture: true and rematerialize language_model")
    return facts


def read_range(store: ArtifactStore, manifest: Manifest, start: int, end: int, partition: str
               ) -> tuple[pa.Table, pa.Table, TensorLayout, dict]:
    """(raw shifts, step table, layout, capture facts) of one captured step range."""
    import pyarrow.parquet as pq

    from sae_assets.core.attribution.tensors import TensorLayout

    facts = captured(manifest)
    ranges = [tuple(r) for r in facts["ranges"]]
    if (start, end) not in ranges:
        last = ranges[-1][1]
        where = "outside training (steps 1.." if end > last else "not a captured range of training (steps 1.."
        raise ValueError(f"parameter_shifts[{partition}]: steps {start}..{end} are {where}{last}, captured in "
                         f"ranges of {facts['steps_per_range']} steps); run sync_partitions for the current config "
                         "or rematerialize language_model after changing attribution.steps_per_range")
    shifts = pq.read_table(store.fetch(manifest, shift_file(start, end)))
    steps = pq.read_table(store.fetch(manifest, step_file(start, end)))
    return shifts, steps, TensorLayout.from_json(facts["layout"]), facts
