"""Context windows of the browser's examples, computed in two passes (Anthropic, "The engineering challenges of scaling interpretability").

The examples a feature page shows are chosen once from its merged samples
(`select_shown_examples`): every top-K entry, the first `random_examples` entries of the
uniform sample, and in each of the `activation_levels` equal-width intervals of (0, max]
(core/features/intervals.py) the first `examples_per_level` activations by hash among the
sample and the top-K. Hash order makes every choice fixed by the seed and independent of
sharding, and the choice in an interval uniform wherever the sample holds that many there or
the interval lies within the top-K (as the top intervals of a heavy-tailed feature do, which a
sample alone would leave empty). Examples lie anywhere in the dataset, so:

1. `gather_context_windows` runs per data shard: for one feature range it takes the shown
   examples found in the shard, cuts the window [t - before, t + after] around each (clipped to
   its sequence), reads each needed token's cached hook activation once, encodes it once with
   the range's encoder slice, and keeps for every example only *its* feature's activation on
   its window. The raw activations (D floats a token) never leave the pass, so what it writes
   grows as examples x window, independent of d_model and of the corpus.
2. `assemble_context_windows` runs per feature range over the pass-1 tables of every shard: it
   concatenates them and checks that they cover the shown examples exactly and agree with the
   examples' own activations.

Token offsets inside a shard are row numbers of cached_activations and token_shards
(`offset = sequence * T + position`), which is how windows are clipped to one sequence.
Pure numpy/pyarrow/torch; tests: tests/test_feature_windows.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from sae_assets.core import schemas
from sae_assets.core.activations.reader import as_float32, to_numpy_matrix
from sae_assets.core.features.intervals import interval_of
from sae_assets.core.features.merge import FeatureSamples
from sae_assets.core.features.sampling import feature_token_hash
from sae_assets.core.progress import QUIET, ProgressLog

# Letter key: E shown examples, U unique window tokens, L window slots (sum of window lengths),
# D hook width, W features in the range, B tokens encoded per step.

ROLES = ("top", "random", "level")
_OFFSET_MASK = (1 << schemas.SHARD_BITS) - 1


class WindowError(ValueError):
    """The gathered windows do not cover the shown examples (a missing or stale shard)."""


def _rank_within(groups: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal values of an already grouped array."""
    if not len(groups):
        return np.zeros(0, np.int64)
    starts = np.r_[0, np.flatnonzero(groups[1:] != groups[:-1]) + 1]
    return np.arange(len(groups)) - np.repeat(starts, np.diff(np.r_[starts, len(groups)]))


def select_shown_examples(samples: FeatureSamples, *, random_examples: int, activation_levels: int,
                          examples_per_level: int) -> pa.Table:
    """The examples a feature page shows (`schemas.shown_examples_schema`), sorted by feature."""
    top, sample = samples.top, samples.sample
    parts = [{"feature": top.column("feature").to_numpy(), "token_index": top.column("token_index").to_numpy(),
              "activation": top.column("activation").to_numpy(), "role": np.zeros(top.num_rows, np.int8),
              "rank": top.column("rank").to_numpy(), "level": np.zeros(top.num_rows, np.int32)}]
    s_feature, s_rank = sample.column("feature").to_numpy(), sample.column("rank").to_numpy()
    s_tok, s_act = sample.column("token_index").to_numpy(), sample.column("activation").to_numpy()
    pick = s_rank < random_examples
    parts.append({"feature": s_feature[pick], "token_index": s_tok[pick], "activation": s_act[pick],
                  "role": np.ones(int(pick.sum()), np.int8), "rank": s_rank[pick],
                  "level": np.zeros(int(pick.sum()), np.int32)})
    if activation_levels and examples_per_level and len(s_feature):
        parts.append(_interval_examples(samples, activation_levels, examples_per_level))
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.lexsort((cols["rank"], cols["level"], cols["role"], cols["feature"]))
    cols = {k: v[order] for k, v in cols.items()}
    cols["role"] = np.asarray(ROLES, dtype=object)[cols["role"]]
    return pa.table({k: cols[k] for k in ("feature", "token_index", "activation", "role", "rank", "level")},
                    schema=schemas.shown_examples_schema())


def _interval_examples(samples: FeatureSamples, levels: int, per_level: int) -> dict[str, np.ndarray]:
    """The first `per_level` activations by hash in each interval of each feature, among the
    sample and the top-K (a token in both counts once); columns of the shown-examples table."""
    top, sample = samples.top, samples.sample
    t_feature, t_tok = top.column("feature").to_numpy(), top.column("token_index").to_numpy()
    feature = np.concatenate([sample.column("feature").to_numpy(), t_feature]).astype(np.int64)
    tok = np.concatenate([sample.column("token_index").to_numpy(), t_tok])
    act = np.concatenate([sample.column("activation").to_numpy(), top.column("activation").to_numpy()])
    hashes = np.concatenate([sample.column("hash").to_numpy(), feature_token_hash(samples.seed, t_feature, t_tok)])
    level = interval_of(act, samples.stats.column("max").to_numpy()[feature - samples.lo], levels)
    order = np.lexsort((tok, hashes, level, feature))
    twice = (feature[order][1:] == feature[order][:-1]) & (tok[order][1:] == tok[order][:-1])  # adjacent: same hash
    order = order[np.r_[True, ~twice]]
    rank = _rank_within(feature[order] * (levels + 1) + level[order])
    pick = order[rank < per_level]
    return {"feature": feature[pick].astype(np.int32), "token_index": tok[pick], "activation": act[pick],
            "role": np.full(len(pick), 2, np.int8), "rank": rank[rank < per_level],
            "level": level[pick].astype(np.int32)}


def window_spans(token_index: np.ndarray, *, context_length: int, before: int, after: int) -> tuple[np.ndarray, np.ndarray]:
    """((E,), (E,)) first and last global token index of each example's window, within its sequence."""
    position = (token_index & _OFFSET_MASK) % context_length
    first = token_index - np.minimum(before, position)
    last = token_index + np.minimum(after, context_length - 1 - position)
    return first.astype(np.int64), last.astype(np.int64)


def clip_to_documents(token_index: np.ndarray, first: np.ndarray, last: np.ndarray, token_ids,
                      boundary_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """((E,), (E,)) the window spans [first, last] cut back to each example's own document.

    Documents are packed as `doc eos doc eos ...`: a window starts after the last boundary token
    (an id of `boundary_ids`) before its example and ends at the first boundary at or after it,
    so the previous document's text never shows. `token_ids(index_L)` gives the token ids of
    global token indices.
    """
    if not len(boundary_ids) or not len(token_index):
        return first, last
    slot_L = _expand(first, last)  # (L,) span after span
    example_L = np.repeat(np.arange(len(first)), last - first + 1)
    boundary_L = np.isin(token_ids(slot_L), np.asarray(boundary_ids))
    before_L = boundary_L & (slot_L < token_index[example_L])
    first, last = first.copy(), last.copy()
    np.maximum.at(first, example_L[before_L], slot_L[before_L] + 1)
    np.minimum.at(last, example_L[boundary_L & ~before_L], slot_L[boundary_L & ~before_L])
    return first, last


def _expand(first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """(L,) every index of every span [first, last], span after span."""
    lengths = last - first + 1
    starts = np.repeat(first - np.r_[0, np.cumsum(lengths)[:-1]], lengths)
    return starts + np.arange(int(lengths.sum()))


def gather_context_windows(shown: pa.Table, activations: pa.Table,
                           encode_range: Callable[[torch.Tensor], torch.Tensor], *, shard: int, hook: str,
                           context_length: int, before: int, after: int, lo: int, batch_size: int,
                           boundary_ids: Sequence[int] = (), device: str = "cpu", where: str,
                           progress_log: ProgressLog | None = None) -> pa.Table:
    """Pass 1 for one feature range and one shard: the windows of the shown examples found in it.

    `activations` is the shard's cached_activations table (row r holds offset r); `hook` its
    column; `encode_range(x_BD)` gives the (B, W) activations of the range's features [lo, hi).
    Each window token is read once and encoded once with the range's encoder slice (B tokens at
    a time, as cached: no dtype change beyond float32 for the matmul, so the values equal what
    `feature_samples` saw), and every example keeps only *its* feature's activation on its
    window. Windows stop at document boundaries (`boundary_ids`, e.g. the end-of-text token;
    `clip_to_documents`). Returns `schemas.context_windows_schema`, one row per distinct
    (feature, example token) in the shard, sorted by feature then token: bytes grow as
    examples x window, not with the hook width D. A progress log counts the encoded batches and
    their tokens.
    """
    tok = shown.column("token_index").to_numpy()
    here = (tok >> schemas.SHARD_BITS) == shard
    feature, tok = shown.column("feature").to_numpy()[here], tok[here]
    if len(tok):  # one window per (feature, token), even where an example has several roles
        pairs = np.unique(np.stack([feature.astype(np.int64), tok]), axis=1)  # sorted by feature, then token
        feature, tok = pairs[0].astype(np.int32), pairs[1]
    first, last = window_spans(tok, context_length=context_length, before=before, after=after)
    first, last = clip_to_documents(tok, first, last, lambda index_L: _token_ids(activations, index_L, where),
                                    boundary_ids)
    token_index_U = np.unique(_expand(first, last)) if len(tok) else np.zeros(0, np.int64)  # (U,) sorted
    rows_U = token_index_U & _OFFSET_MASK
    if len(rows_U) and rows_U[-1] >= activations.num_rows:
        raise WindowError(f"{where}: example token {int(token_index_U[-1])} lies beyond the shard's "
                          f"{activations.num_rows} cached tokens (stale feature_examples?)")
    taken = activations.select([schemas.TOKEN_INDEX, schemas.TOKEN_ID, hook]).take(pa.array(rows_U, pa.int64()))
    if not np.array_equal(taken.column(schemas.TOKEN_INDEX).to_numpy(), token_index_U):
        raise WindowError(f"{where}: cached_activations rows are not in token order; cannot locate windows")
    acts_UD = to_numpy_matrix(taken.column(hook))
    ids_U = taken.column(schemas.TOKEN_ID).to_numpy()
    slot_tok_L = _expand(first, last) if len(tok) else np.zeros(0, np.int64)
    slot_row_L = np.searchsorted(token_index_U, slot_tok_L)  # every slot's token is in U by construction
    slot_w_L = np.repeat(feature.astype(np.int64) - lo, last - first + 1)
    values_L = np.zeros(len(slot_tok_L), np.float32)
    by_row = np.argsort(slot_row_L, kind="stable")  # slots grouped by token row, batch by batch
    bounds = np.searchsorted(slot_row_L[by_row], np.arange(0, len(token_index_U) + batch_size, batch_size))
    report = progress_log or QUIET
    report.start(-(-len(token_index_U) // batch_size))  # ceil
    for b, start in enumerate(range(0, len(token_index_U), batch_size)):
        sel = by_row[bounds[b]:bounds[b + 1]]
        x_BD = torch.from_numpy(as_float32(acts_UD[start:start + batch_size])).to(device)
        with torch.no_grad():
            f_BW = encode_range(x_BD).float().cpu().numpy()
        values_L[sel] = f_BW[slot_row_L[sel] - start, slot_w_L[sel]]
        report.update(b + 1, tokens=min(start + batch_size, len(token_index_U)))
    report.close()
    offsets = np.r_[0, np.cumsum(last - first + 1)].astype(np.int32)
    return pa.table({
        "feature": feature, "token_index": tok, "first_token_index": first,
        "token_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids_U[slot_row_L], pa.int32())),
        "activations": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values_L, pa.float32())),
    }, schema=schemas.context_windows_schema())


def _token_ids(activations: pa.Table, token_index_L: np.ndarray, where: str) -> np.ndarray:
    """(L,) token ids of the shard's global token indices (row r holds offset r)."""
    rows_L = token_index_L & _OFFSET_MASK
    if len(rows_L) and int(rows_L.max()) >= activations.num_rows:
        raise WindowError(f"{where}: example token {int(token_index_L[rows_L.argmax()])} lies beyond the shard's "
                          f"{activations.num_rows} cached tokens (stale feature_examples?)")
    return activations.column(schemas.TOKEN_ID).take(pa.array(rows_L, pa.int64())).to_numpy()


def assemble_context_windows(shown: pa.Table, parts: Sequence[pa.Table], *, where: str,
                             shard_names: Sequence[str] | None = None) -> pa.Table:
    """Pass 2 for one feature range: every shard's pass-1 windows, in one table, checked.

    Checks that the windows cover exactly the distinct (feature, token) pairs of `shown` and that
    each window's value at its example token is the example's own activation (a window encoded
    with another dictionary or range fails here). Returns `schemas.context_windows_schema`,
    sorted by feature then token. `shard_names[i]` names part i in errors.
    """
    names = list(shard_names) if shard_names is not None else [f"part {i}" for i in range(len(parts))]
    for name, part in zip(names, parts):
        if part.schema != schemas.context_windows_schema():
            raise WindowError(f"{where}: the windows of {name} do not follow the context_windows schema "
                              f"(rematerialize context_gather[{name}])")
    windows = (pa.concat_tables(parts) if parts else schemas.context_windows_schema().empty_table()).sort_by(
        [("feature", "ascending"), ("token_index", "ascending")])
    _check_coverage(shown, windows, where)
    _check_centres(shown, windows, where)
    return windows


def _check_centres(shown: pa.Table, windows: pa.Table, where: str) -> None:
    """Each window's value at its example token equals the example's activation in `shown`."""
    if not windows.num_rows:
        return
    starts = windows.column("activations").combine_chunks().offsets.to_numpy()[:-1]
    values = windows.column("activations").combine_chunks().flatten().to_numpy()
    token, first = windows.column("token_index").to_numpy(), windows.column("first_token_index").to_numpy()
    centre = values[starts + (token - first)].astype(np.float64)
    # Coverage is checked: the distinct (feature, token) pairs of `shown`, in lexicographic
    # order, are the windows' rows one to one; take each pair's first example's activation.
    pairs = np.stack([shown.column("feature").to_numpy().astype(np.int64), shown.column("token_index").to_numpy()])
    _, first_row = np.unique(pairs, axis=1, return_index=True)
    expected = shown.column("activation").to_numpy()[first_row].astype(np.float64)
    # Same cached values, same encoder: only the matmul's summation order may differ.
    bad = np.abs(centre - expected) > 1e-4 + 1e-3 * np.abs(expected)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise WindowError(f"{where}: {int(bad.sum())} window(s) disagree with their example's activation, "
                          f"e.g. feature {int(windows.column('feature')[i].as_py())} at token {int(token[i])}: {centre[i]:.6g} in the window, "
                          f"{expected[i]:.6g} in feature_examples (windows from another dictionary or range): "
                          f"rematerialize context_gather")


def _check_coverage(shown: pa.Table, span: pa.Table, where: str) -> None:
    want = np.unique(np.stack([shown.column("feature").to_numpy().astype(np.int64),
                               shown.column("token_index").to_numpy()]), axis=1) if shown.num_rows else np.zeros((2, 0))
    have = np.stack([span.column("feature").to_numpy().astype(np.int64), span.column("token_index").to_numpy()])
    if want.shape != have.shape or not np.array_equal(want, have):
        have_set = set(map(tuple, have.T.tolist()))
        missing = [(f, t) for f, t in want.T.tolist() if (f, t) not in have_set]
        shards = sorted({int(t) >> schemas.SHARD_BITS for _, t in missing})
        raise WindowError(f"{where}: the gathered windows do not match the shown examples "
                          f"({len(missing)} missing, from shard(s) {shards[:10]}; "
                          f"{have.shape[1]} gathered for {want.shape[1]} wanted): rematerialize context_gather")
