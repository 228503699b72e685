"""Features that co-fire on a feature's top examples: which other features of its feature range
are active at its top-K example tokens, and in what fraction of them.

Computed beside the context windows, in the same two passes:
1. `gather_cofiring` (context_gather, per shard and feature range): the range's top examples
   whose token lies in the shard; each distinct token's cached activation is encoded once with
   the range's encoder slice, and the ids of its active features are kept (no activations leave
   the pass). Cost: E x D x W per range, so F x top_k x D x W in all: linear in the features.
   Co-firing across the whole dictionary would cost F x D per example token, F^2 x top_k x D
   in all (features x d_model per example), which no stage may; so the panel names the range.
2. `assemble_cofiring` (context_windows, per range): every shard's table, checked to cover the
   range's top tokens exactly.
`cofiring_features` (site_json) then counts, per feature, the other features active on its top
examples. Pure numpy/pyarrow/torch; tests: tests/test_site_panels.py (against a dense encode).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from sae_assets.core import schemas
from sae_assets.core.activations.reader import as_float32, to_numpy_matrix

# Letter key: U distinct top-example tokens in the shard, D hook width, F dictionary features,
# B tokens encoded per step, W features in the range, K co-firing features kept.

_OFFSET_MASK = (1 << schemas.SHARD_BITS) - 1


class CofiringError(ValueError):
    """The co-firing tables do not cover the range's top examples (a missing or stale shard)."""


def _top_tokens(shown: pa.Table) -> np.ndarray:
    return shown.filter(pc.equal(shown.column("role"), "top")).column("token_index").to_numpy()


def gather_cofiring(shown: pa.Table, activations: pa.Table, encode: Callable[[torch.Tensor], torch.Tensor], *,
                    shard: int, hook: str, batch_size: int, lo: int = 0, device: str = "cpu",
                    where: str) -> pa.Table:
    """`schemas.cofiring_schema` rows for the distinct top-example tokens of `shown` in this shard,
    sorted by token: the ids (lo + column) of every feature `encode(x_BD) -> (B, W)` finds active
    there. Memory per step is batch_size x W."""
    tok = _top_tokens(shown)
    token_index_U = np.unique(tok[(tok >> schemas.SHARD_BITS) == shard])
    rows_U = token_index_U & _OFFSET_MASK
    if len(rows_U) and rows_U[-1] >= activations.num_rows:
        raise CofiringError(f"{where}: example token {int(token_index_U[-1])} lies beyond the shard's "
                            f"{activations.num_rows} cached tokens (stale feature_examples?)")
    taken = activations.select([schemas.TOKEN_INDEX, hook]).take(pa.array(rows_U, pa.int64()))
    if not np.array_equal(taken.column(schemas.TOKEN_INDEX).to_numpy(), token_index_U):
        raise CofiringError(f"{where}: cached_activations rows are not in token order")
    acts_UD = to_numpy_matrix(taken.column(hook))
    ids, counts = [], np.zeros(len(token_index_U), np.int64)
    for start in range(0, len(token_index_U), batch_size):
        x_BD = torch.from_numpy(as_float32(acts_UD[start:start + batch_size])).to(device)
        with torch.no_grad():
            row_N, feature_N = (encode(x_BD) > 0).nonzero(as_tuple=True)  # row-major: ids ascend per row
        counts[start:start + len(x_BD)] = torch.bincount(row_N, minlength=len(x_BD)).cpu().numpy()
        ids.append(feature_N.cpu().numpy().astype(np.int32) + lo)
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int32)
    flat = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    return pa.table({"token_index": token_index_U,
                     "features": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32()))},
                    schema=schemas.cofiring_schema())


def assemble_cofiring(shown: pa.Table, parts: Sequence[pa.Table], *, where: str) -> pa.Table:
    """Every shard's `gather_cofiring` table for one range, sorted by token, checked to hold
    exactly the range's distinct top-example tokens."""
    for part in parts:
        if part.schema != schemas.cofiring_schema():
            raise CofiringError(f"{where}: a co-firing table does not follow its schema (rematerialize context_gather)")
    table = (pa.concat_tables(parts) if parts else schemas.cofiring_schema().empty_table()).sort_by("token_index")
    want = np.unique(_top_tokens(shown))
    if not np.array_equal(table.column("token_index").to_numpy(), want):
        raise CofiringError(f"{where}: the co-firing tables hold {table.num_rows} tokens for {len(want)} distinct "
                            "top-example tokens: rematerialize context_gather")
    return table


def cofiring_features(shown: pa.Table, cofiring: pa.Table, lo: int, hi: int,
                      k: int = 10) -> list[list[tuple[int, float]]]:
    """Per feature of [lo, hi): up to `k` (other feature, fraction of its top examples where that
    feature is active), highest fraction first, ties by feature id."""
    by_token = dict(zip(cofiring.column("token_index").to_numpy().tolist(), cofiring.column("features").to_pylist()))
    top = shown.filter(pc.equal(shown.column("role"), "top"))
    examples: dict[int, list[int]] = {}
    for f, t in zip(top.column("feature").to_pylist(), top.column("token_index").to_pylist()):
        examples.setdefault(f, []).append(t)
    out = []
    for f in range(lo, hi):
        tokens = examples.get(f, [])
        if not tokens:
            out.append([])
            continue
        ids, counts = np.unique(np.concatenate([np.asarray(by_token[t], np.int64) for t in tokens]),
                                return_counts=True)
        keep = ids != f
        ids, counts = ids[keep], counts[keep]
        order = np.lexsort((ids, -counts))[:k]
        out.append([(int(ids[i]), counts[i] / len(tokens)) for i in order])
    return out
