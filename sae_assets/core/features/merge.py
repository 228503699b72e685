"""Feature-sample tables and their exact merge: the data model of the feature browser's examples.

A `FeatureSamples` holds three Arrow tables for the features [lo, hi) (top-K activations, a
uniform sample of activating tokens, per-feature statistics) with explicit schemas, and the
parameters that made them, also written into every table's schema metadata so that
`FeatureSamples.from_tables` rebuilds it from Parquet. `features.FeatureRangeSampler` produces
one per shard; `merge_feature_samples` combines shards (disjoint token sets) into the tables
one sampler would have produced over their union: the top-K of the union in the same order
(activation descending, token index ascending), the bottom-k of the union by hash (token index
breaking ties), counts and histograms added, max of maxima, float64 sums added (the only column
whose last bits depend on how tokens were split). It is exact and associative. The schemas live in
schemas.py. Tests: tests/test_features_core.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sae_assets.core.schemas import feature_sample_schema, feature_stats_schema, feature_top_schema

META_KEY = b"feature_samples"
"""Schema-metadata key of every table: JSON with lo, hi, top_k, sample_k, seed, n_tokens, hist_edges."""


class FeatureSamples(NamedTuple):
    """What a sampler (or a merge) produced for the features [lo, hi): three Arrow tables.

    Each table is sorted by (feature, rank) and carries the fields below as JSON under
    `META_KEY` in its schema metadata, so `from_tables` rebuilds this from Parquet files.
    """

    top: pa.Table
    """`feature_top_schema`: up to top_k rows per feature; fewer where fewer tokens fired."""
    sample: pa.Table
    """`feature_sample_schema`: up to sample_k rows per feature, a uniform sample without
    replacement of the tokens where it fired (all of them where fewer than sample_k)."""
    stats: pa.Table
    """`feature_stats_schema(len(hist_edges) - 1)`: hi - lo rows (on disk only the non-zero
    ones, see `stored`)."""
    lo: int
    hi: int
    top_k: int
    sample_k: int
    seed: int
    n_tokens: int
    """Tokens offered (active or not): count / n_tokens is a feature's density."""
    hist_edges: tuple[float, ...]

    def stored(self) -> tuple[pa.Table, pa.Table, pa.Table]:
        """(top, sample, stats) as written to storage: stats rows only for features that fired.

        A shard's stats would otherwise take a row per feature of the range whatever the shard's
        size, so the bytes of every shard x range cell would grow as shards x features; with only
        the non-zero rows they grow with the shard's active entries. `from_tables` restores the
        rest as the zero rows they were.
        """
        s = self.stats
        nonzero = pc.or_(pc.or_(pc.greater(s.column("count"), 0), pc.not_equal(s.column("sum"), 0.0)),
                         pc.not_equal(s.column("max"), 0.0))
        return self.top, self.sample, s.filter(nonzero)

    def meta(self) -> dict:
        return dict(lo=self.lo, hi=self.hi, top_k=self.top_k, sample_k=self.sample_k, seed=str(self.seed),
                    n_tokens=self.n_tokens, hist_edges=list(self.hist_edges))

    @classmethod
    def from_tables(cls, top: pa.Table, sample: pa.Table, stats: pa.Table) -> FeatureSamples:
        """Rebuild from the three tables (e.g. read back from Parquet); their metadata must agree."""
        metas = [(t.schema.metadata or {}).get(META_KEY) for t in (top, sample, stats)]
        if metas[0] is None or len(set(metas)) != 1:
            raise ValueError("feature sample tables lack matching b'feature_samples' schema metadata")
        m = json.loads(metas[0])
        edges = tuple(float(e) for e in m["hist_edges"])
        want = [feature_top_schema(), feature_sample_schema(), feature_stats_schema(len(edges) - 1)]
        for name, table, schema in zip(("top", "sample", "stats"), (top, sample, stats), want):
            if not table.schema.equals(schema, check_metadata=False):
                raise ValueError(f"{name} table schema {table.schema} != expected {schema}")
        lo, hi = int(m["lo"]), int(m["hi"])
        if stats.num_rows != hi - lo:
            stats = _dense_stats(stats, lo, hi)
        return cls(top, sample, stats, lo, hi, int(m["top_k"]), int(m["sample_k"]), int(m["seed"]),
                   int(m["n_tokens"]), edges)


def _dense_stats(stats: pa.Table, lo: int, hi: int) -> pa.Table:
    """A row per feature of [lo, hi) from the rows of the features that fired (`stored`); zeros elsewhere."""
    feature = stats.column("feature").to_numpy().astype(np.int64)
    if len(feature) and (feature[0] < lo or feature[-1] >= hi or np.any(np.diff(feature) <= 0)):
        raise ValueError(f"stats rows must name distinct features of [{lo}, {hi}) in increasing order")
    row_W = np.full(hi - lo, -1, np.int64)
    row_W[feature - lo] = np.arange(len(feature))
    has_W = row_W >= 0
    columns = {}
    for field in stats.schema:
        values = stats.column(field.name).combine_chunks()
        if field.name == "feature":
            columns[field.name] = pa.array(np.arange(lo, hi, dtype=np.int32))
        elif field.name == "hist":
            bins = field.type.list_size
            dense_WH = np.zeros((hi - lo, bins), np.int64)
            dense_WH[has_W] = np.asarray(values.flatten()).reshape(-1, bins)
            columns[field.name] = pa.FixedSizeListArray.from_arrays(pa.array(dense_WH.reshape(-1)), bins)
        else:
            dense_W = np.zeros(hi - lo, values.type.to_pandas_dtype())
            dense_W[has_W] = values.to_numpy()
            columns[field.name] = pa.array(dense_W, values.type)
    return pa.table(columns, schema=stats.schema)


def build_feature_samples(top: dict[str, np.ndarray], sample: dict[str, np.ndarray],
                          stats: dict[str, np.ndarray], **meta) -> FeatureSamples:
    """Tables (with metadata) from column arrays already sorted by (feature, rank)."""
    edges = tuple(float(e) for e in meta.pop("hist_edges"))
    fs = FeatureSamples(None, None, None, hist_edges=edges, **meta)  # type: ignore[arg-type]
    md = {META_KEY: json.dumps(fs.meta()).encode()}
    hist_WH = np.ascontiguousarray(stats.pop("hist"), dtype=np.int64)
    hist = pa.FixedSizeListArray.from_arrays(pa.array(hist_WH.reshape(-1)), hist_WH.shape[1])
    top_t = pa.table(top, schema=feature_top_schema().with_metadata(md))
    sample_t = pa.table(sample, schema=feature_sample_schema().with_metadata(md))
    stats_t = pa.table({**stats, "hist": hist}, schema=feature_stats_schema(hist_WH.shape[1]).with_metadata(md))
    return fs._replace(top=top_t, sample=sample_t, stats=stats_t)


def _column(tables: list[pa.Table], name: str) -> np.ndarray:
    return np.concatenate([t.column(name).to_numpy() for t in tables]) if tables else np.zeros(0)


def _merge_selection(tables: list[pa.Table], key: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The first k rows per feature of the union in the order (key, token); columns sorted by (feature, rank)."""
    feature = _column(tables, "feature").astype(np.int32)
    tok = _column(tables, "token_index").astype(np.int64)
    order = np.lexsort((tok, key, feature))
    f_s, tok_s, key_s = feature[order], tok[order], key[order]
    dup = (f_s[1:] == f_s[:-1]) & (tok_s[1:] == tok_s[:-1]) & (key_s[1:] == key_s[:-1])
    if dup.any():
        at = int(np.argmax(dup))
        raise ValueError(f"token {tok_s[at]} appears in two parts for feature {f_s[at]}: "
                         "merged parts must come from disjoint sets of tokens (overlapping shards?)")
    starts = np.r_[0, np.flatnonzero(f_s[1:] != f_s[:-1]) + 1]  # first row of each feature
    rank = np.arange(len(f_s)) - np.repeat(starts, np.diff(np.r_[starts, len(f_s)]))
    keep = order[rank < k]
    return {"feature": feature[keep], "rank": rank[rank < k].astype(np.int32), "key": key[keep],
            "token_index": tok[keep], "activation": _column(tables, "activation")[keep].astype(np.float32)}


def merge_feature_samples(parts: Sequence[FeatureSamples], *, top_k: int | None = None,
                          sample_k: int | None = None) -> FeatureSamples:
    """Exact union of samples over disjoint token sets; top_k/sample_k default to the parts' smallest.

    Every part must cover the same [lo, hi) with the same seed and histogram edges, and keep at
    least the requested top_k and sample_k (a part truncated to fewer cannot give an exact merge).
    """
    if not parts:
        raise ValueError("merge_feature_samples needs at least one part")
    first = parts[0]
    for i, p in enumerate(parts):
        for field in ("lo", "hi", "seed", "hist_edges"):
            if getattr(p, field) != getattr(first, field):
                raise ValueError(f"part {i} has {field}={getattr(p, field)!r}, part 0 has {getattr(first, field)!r}: "
                                 "only samples of the same feature range, seed and histogram edges merge")
    top_k = min(p.top_k for p in parts) if top_k is None else int(top_k)
    sample_k = min(p.sample_k for p in parts) if sample_k is None else int(sample_k)
    for i, p in enumerate(parts):
        if p.top_k < top_k or p.sample_k < sample_k:
            raise ValueError(f"part {i} kept top_k={p.top_k}, sample_k={p.sample_k}: cannot merge exactly to "
                             f"top_k={top_k}, sample_k={sample_k}")
    lo, width = first.lo, first.hi - first.lo

    tops = [p.top for p in parts]
    top = _merge_selection(tops, -_column(tops, "activation").astype(np.float32), top_k)
    del top["key"]
    samples = [p.sample for p in parts]
    sample = _merge_selection(samples, _column(samples, "hash").astype(np.uint64), sample_k)
    sample = {"feature": sample["feature"], "rank": sample["rank"], "hash": sample["key"],
              "token_index": sample["token_index"], "activation": sample["activation"]}

    features = np.arange(lo, first.hi, dtype=np.int32)
    count, total = np.zeros(width, np.int64), np.zeros(width, np.float64)
    peak, hist = np.zeros(width, np.float32), np.zeros((width, len(first.hist_edges) - 1), np.int64)
    for i, p in enumerate(parts):
        s = p.stats
        if not np.array_equal(s.column("feature").to_numpy(), features):
            raise ValueError(f"part {i}: stats table must have one row per feature {lo}..{first.hi - 1}, in order")
        count += s.column("count").to_numpy()
        total += s.column("sum").to_numpy()
        peak = np.maximum(peak, s.column("max").to_numpy())
        hist += np.asarray(s.column("hist").combine_chunks().flatten()).reshape(width, -1)
    stats = {"feature": features, "count": count, "sum": total, "max": peak, "hist": hist}
    return build_feature_samples(top, sample, stats, lo=lo, hi=first.hi, top_k=top_k, sample_k=sample_k,
                                 seed=first.seed, n_tokens=sum(p.n_tokens for p in parts),
                                 hist_edges=first.hist_edges)
