"""Notable tokens of a unit: the univariate token-selection heuristic of
"Gradient capture / training-data attribution from outlier parameter shifts".

A unit's attributed data are the training sequences ("data", one context window each) that
moved one of its parameters into their top-k shifts, counted once per step at which they
did (tables.unit_data). Their tokens form the attributed sample; the training split's
tokens form the reference. The seed found that ranking by count surfaces 'the' and ',', and
ranking by relative frequency surfaces one-off rarities, so it chains three filters:

1. keep tokens with count >= c in the attributed sample (seed: c = 20);
2. of these, the top r by relative frequency freq_attributed / freq_train (seed: r = 200);
3. of these, the top s by count (seed: s = 5).

Ties break by the other criterion, then by token id, so the choice is deterministic.
Tests: tests/test_attribution_core.py (including a planted token that always moves one neuron).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa

from sae_assets.core import schemas
from sae_assets.core.attribution.tables import UNIT


class Notable(NamedTuple):
    token_ids: np.ndarray
    """(n,) int64, by descending count: the rank order."""
    counts: np.ndarray
    freq_attributed: np.ndarray
    freq_train: np.ndarray
    relative_freq: np.ndarray


def notable_tokens(counts: np.ndarray, train_freq: np.ndarray, *, min_count: int, top_relative: int,
                   top_count: int) -> Notable:
    """The heuristic on one unit: `counts` (V,) tokens in its attributed sample, `train_freq` (V,)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    ids = np.flatnonzero(counts >= max(1, min_count))
    if total == 0 or ids.size == 0:
        empty = np.zeros(0)
        return Notable(ids.astype(np.int64), ids.astype(np.int64), empty, empty, empty)
    freq_attr = counts[ids] / total
    freq_train = np.maximum(np.asarray(train_freq, dtype=np.float64)[ids], 1e-300)
    relative = freq_attr / freq_train
    by_relative = np.lexsort((ids, -counts[ids], -relative))[:top_relative]
    ids, freq_attr, freq_train, relative = ids[by_relative], freq_attr[by_relative], freq_train[by_relative], \
        relative[by_relative]
    by_count = np.lexsort((ids, -relative, -counts[ids]))[:top_count]
    return Notable(ids[by_count], counts[ids[by_count]], freq_attr[by_count], freq_train[by_count],
                   relative[by_count])


def sample_counts(datum_rows: np.ndarray, multiplicity: np.ndarray, tokens_DT: np.ndarray, vocab: int) -> np.ndarray:
    """(V,) token counts of the data at `datum_rows` of tokens_DT, each `multiplicity` times."""
    weights = np.repeat(np.asarray(multiplicity, dtype=np.float64), tokens_DT.shape[1])
    counted = np.bincount(tokens_DT[datum_rows].reshape(-1), weights=weights, minlength=vocab)
    return np.rint(counted).astype(np.int64)


def unit_notable_tokens(data: pl.DataFrame, datum_ids: np.ndarray, tokens_DT: np.ndarray, train_freq: np.ndarray,
                        token_text: Sequence[str], *, min_count: int, top_relative: int, top_count: int) -> pa.Table:
    """The notable_token_schema table of every unit in `data` (tables.unit_data).

    `datum_ids` (D,) are the stable ids of the rows of tokens_DT (D, T); every attributed
    datum must be among them.
    """
    vocab, order = len(train_freq), np.argsort(datum_ids, kind="stable")
    rows: dict[str, list] = {name: [] for name in schemas.notable_token_schema().names}
    for (kind, layer, unit), group in data.group_by(UNIT, maintain_order=True):
        ids = group["datum_id"].to_numpy()
        where = order[np.searchsorted(datum_ids, ids, sorter=order).clip(0, len(order) - 1)]
        if not np.array_equal(datum_ids[where], ids):
            missing = ids[datum_ids[where] != ids][:3]
            raise ValueError(f"attributed data {missing.tolist()} are not in the token shards")
        counts = sample_counts(where, group["multiplicity"].to_numpy(), tokens_DT, vocab)
        found = notable_tokens(counts, train_freq, min_count=min_count, top_relative=top_relative,
                               top_count=top_count)
        for rank, token in enumerate(found.token_ids.tolist()):
            values = (kind, layer, unit, rank, token, token_text[token], int(found.counts[rank]),
                      float(found.freq_attributed[rank]), float(found.freq_train[rank]),
                      float(found.relative_freq[rank]))
            for name, value in zip(rows, values):
                rows[name].append(value)
    return pa.Table.from_pydict(rows, schema=schemas.notable_token_schema())
