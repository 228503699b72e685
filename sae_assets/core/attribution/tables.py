"""Shift tables: publishing captured ranges, and grouping parameters into units.

`publish_shifts` turns a raw capture range (flat indices) into the `parameter_shifts` table
(tensor, row, column, rank within the datum's top-k). `with_units` adds the unit each entry
belongs to (tensors.py: an MLP neuron is a row of mlp.in.weight and a column of
mlp.out.weight; a head is a d_head block of q/k/v rows or o columns). `parameter_counts`
counts how often each parameter lands in a top-k; `unit_attribution` summarises each unit;
`unit_data` lists each unit's attributed data with multiplicity (the number of steps at
which the datum moved one of the unit's parameters into its top-k).
Tests: tests/test_attribution_core.py.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from sae_assets.core import schemas
from sae_assets.core.attribution.tensors import TensorLayout

UNIT = ["unit_kind", "layer", "unit"]


def publish_shifts(raw: pa.Table, layout: TensorLayout, top_k: int) -> pa.Table:
    """The parameter_shifts table of one captured range (raw_shift_schema, K entries per datum)."""
    kept = min(top_k, layout.total)
    if raw.num_rows % kept:
        raise ValueError(f"capture table has {raw.num_rows} rows, not a multiple of the {kept} kept per datum")
    position, row, column = layout.decode(raw.column("flat_index").to_numpy())
    names = np.array(layout.names, dtype=object)
    return pa.Table.from_arrays([
        raw.column("step"), raw.column("datum_id"),
        pa.array((np.arange(raw.num_rows) % kept).astype(np.int32)),
        pa.array(names[position], type=pa.string()), pa.array(row), pa.array(column), raw.column("value"),
    ], schema=schemas.parameter_shift_schema())


def tensor_frame(layout: TensorLayout) -> pl.DataFrame:
    return pl.DataFrame({
        "tensor": [t.name for t in layout.tensors], "unit_kind": [t.unit_kind for t in layout.tensors],
        "layer": [t.layer for t in layout.tensors], "unit_axis": [t.unit_axis for t in layout.tensors],
        "unit_width": [t.unit_width for t in layout.tensors],
    }, schema={"tensor": pl.String, "unit_kind": pl.String, "layer": pl.Int32, "unit_axis": pl.String,
               "unit_width": pl.Int32})


def with_units(shifts: pl.DataFrame, layout: TensorLayout) -> pl.DataFrame:
    """`shifts` (parameter_shift_schema) plus unit_kind, layer and unit columns."""
    unknown = set(shifts["tensor"].unique().to_list()) - set(layout.names)
    if unknown:
        raise ValueError(f"shift tables name tensors {sorted(unknown)} that the capture layout lacks")
    index = pl.when(pl.col("unit_axis") == "row").then(pl.col("row")).otherwise(pl.col("column"))
    return (shifts.join(tensor_frame(layout), on="tensor", how="left")
            .with_columns((index // pl.col("unit_width")).cast(pl.Int32).alias("unit"))
            .drop("unit_axis", "unit_width"))


def parameter_counts(units: pl.DataFrame) -> pa.Table:
    """How often each parameter lands in a datum's top-k, most frequent first."""
    frame = (units.group_by(["tensor", "row", "column", *UNIT])
             .agg(pl.len().cast(pl.Int64).alias("count"),
                  pl.col("value").abs().cast(pl.Float64).sum().alias("abs_shift_sum"))
             .sort(["count", "tensor", "row", "column"], descending=[True, False, False, False]))
    return frame.to_arrow().select(schemas.parameter_count_schema().names).cast(schemas.parameter_count_schema())


def unit_attribution(units: pl.DataFrame) -> pa.Table:
    """Per unit: distinct parameters hit, top-k entries, (step, datum) pairs and distinct data."""
    frame = (units.group_by(UNIT)
             .agg(pl.struct("tensor", "row", "column").n_unique().cast(pl.Int64).alias("parameters"),
                  pl.len().cast(pl.Int64).alias("entries"),
                  pl.struct("step", "datum_id").n_unique().cast(pl.Int64).alias("data"),
                  pl.col("datum_id").n_unique().cast(pl.Int64).alias("distinct_data"),
                  pl.col("value").abs().cast(pl.Float64).sum().alias("abs_shift_sum"))
             .sort(["data", "unit_kind", "layer", "unit"], descending=[True, False, False, False]))
    return frame.to_arrow().select(schemas.unit_attribution_schema().names).cast(schemas.unit_attribution_schema())


def unit_data(units: pl.DataFrame) -> pl.DataFrame:
    """(unit_kind, layer, unit, datum_id, multiplicity): steps at which the datum hit the unit."""
    return (units.select([*UNIT, "step", "datum_id"]).unique()
            .group_by([*UNIT, "datum_id"]).agg(pl.len().cast(pl.Int64).alias("multiplicity"))
            .sort([*UNIT, "datum_id"]))
