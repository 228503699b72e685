"""Serve shuffled activations to SAE training as float32 batches, without loading the dataset.

`ShuffledActivationReader` reads the `shuffled_shards` bucket tables (memory-mapped Arrow
tables, or callables that open one) for one hook column, or several side by side (a
transcoder's input | target: a row's widths concatenated, in the order given). Each epoch it permutes the bucket
order with seed (seed, epoch), then walks the buckets in windows of `window` buckets and
yields the window's rows in a uniformly random order, seeded (seed, epoch, bucket) for a
one-bucket window, as (B, d) float32 torch tensors (float16 and bfloat16-as-uint16 columns
are converted). Guarantees: every row appears exactly once per epoch; batches are full
except perhaps the last (`drop_last` drops it); epoch e's order depends only on (seed, e,
the buckets' contents and order, window, batch_size), so a restarted run can skip to batch
b with `skip_batches`. `exclude_token_ids` drops the rows of those tokens (special tokens) as
they are read, from the same permutation, so the kept rows keep their order. Only the window's
buckets are open; resident memory is the pages a batch touches plus one batch.
`to_numpy_matrix` gives the zero-copy (n, d) view it reads through. Tests: tests/test_shuffle.py,
tests/test_special_tokens.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

TableSource = pa.Table | Callable[[], pa.Table]
_READER_TAG = 0x4EAD_E2  # separates the reader's streams from the shuffle's


def to_numpy_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(n, d) numpy view of a fixed_size_list column, zero-copy when it has one chunk.

    float16/float32 come back as such; uint16 is how bfloat16 is stored (numpy has no
    bfloat16): the raw bits come back, convert with `bf16_bits_to_float32`. Several chunks
    are concatenated (a copy); nulls are an error.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)
    if not pa.types.is_fixed_size_list(column.type):
        raise TypeError(f"expected a fixed_size_list column, got {column.type}")
    if column.null_count:
        raise ValueError(f"activation column has {column.null_count} null rows")
    width = column.type.list_size
    values = column.flatten()  # respects the array's offset; no copy without nulls
    return values.to_numpy(zero_copy_only=True).reshape(len(column), width)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 numbers stored as uint16 bits (exact: the top half of a float32)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def as_float32(rows: np.ndarray) -> np.ndarray:
    """A float32 copy of float16/float32 rows, or of bfloat16 rows stored as uint16 bits."""
    return bf16_bits_to_float32(rows) if rows.dtype == np.uint16 else rows.astype(np.float32)


class ShuffledActivationReader:
    """Epochs of shuffled (B, d) float32 batches from bucket tables; see the module docstring."""

    def __init__(
        self, buckets: Sequence[TableSource], *, hook: str | Sequence[str], batch_size: int, seed: int,
        window: int = 1, drop_last: bool = False, with_token_index: bool = False,
        rows_per_bucket: Sequence[int] | None = None, exclude_token_ids: Sequence[int] = (),
    ):
        if batch_size < 1 or window < 1 or seed < 0:
            raise ValueError(f"batch_size {batch_size} and window {window} must be >= 1, seed >= 0")
        self.hooks = (hook,) if isinstance(hook, str) else tuple(hook)
        if not self.hooks:
            raise ValueError("the reader needs at least one hook column")
        self.buckets, self.batch_size, self.seed = list(buckets), batch_size, seed
        self.window, self.drop_last, self.with_token_index = window, drop_last, with_token_index
        self.exclude_token_ids = np.asarray(sorted(set(exclude_token_ids)), dtype=np.int64)
        if rows_per_bucket is None:  # opening a memory-mapped file reads only its footer
            rows_per_bucket = [self._open(b).num_rows for b in range(len(self.buckets))]
        if len(rows_per_bucket) != len(self.buckets):
            raise ValueError(f"{len(rows_per_bucket)} row counts for {len(self.buckets)} buckets")
        self.rows_per_bucket = np.asarray(rows_per_bucket, dtype=np.int64)

    @property
    def num_rows(self) -> int:
        """Rows of the buckets (excluded tokens' rows included)."""
        return int(self.rows_per_bucket.sum())

    def __len__(self) -> int:
        """Batches per epoch (an upper bound when tokens are excluded)."""
        full, rest = divmod(self.num_rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _open(self, bucket: int) -> pa.Table:
        source = self.buckets[bucket]
        table = source() if callable(source) else source
        for hook in self.hooks:
            if hook not in table.column_names:
                raise KeyError(f"bucket {bucket} has no column {hook!r}; has {table.column_names}")
        return table

    def _rng(self, epoch: int, *ids: int) -> np.random.Generator:
        key = [_READER_TAG, self.seed, epoch, len(ids), *ids]
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))

    def epoch(
        self, epoch: int, *, skip_batches: int = 0,
    ) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """Yield epoch `epoch`'s batches: acts_BD, or (acts_BD, token_index_B) if asked for.

        The epoch is one stream of rows (windows in bucket order, each permuted) cut into
        consecutive batches; `skip_batches` starts at batch b without reading earlier rows
        (not with `exclude_token_ids`, whose dropped rows leave batch b's start unknown until read).
        """
        if skip_batches and len(self.exclude_token_ids):
            raise ValueError("skip_batches needs a reader without exclude_token_ids")
        order = self._rng(epoch).permutation(len(self.buckets))  # bucket visiting order
        skip_rows, stream_pos = skip_batches * self.batch_size, 0
        carry: list[tuple[np.ndarray, np.ndarray | None]] = []  # < batch_size rows pending
        carried = 0
        for start in range(0, len(order), self.window):
            group = [int(b) for b in order[start:start + self.window]]
            sizes = self.rows_per_bucket[group]
            first = max(skip_rows - stream_pos, 0)  # rows of this window before the restart
            stream_pos += int(sizes.sum())
            if first >= sizes.sum():
                continue
            perm = self._rng(epoch, *group).permutation(int(sizes.sum()))[first:]  # (n_window,)
            mats, ids, seg_rows = self._segments(group)
            offsets = np.concatenate([[0], np.cumsum(seg_rows)])  # window row -> (segment, row)
            keep = self._kept_rows(group)  # (n_window,) bool, or None when nothing is excluded
            for lo in range(0, perm.size, self.batch_size):
                sel = perm[lo:lo + self.batch_size]
                if keep is not None:
                    sel = sel[keep[sel]]
                carry.append(self._rows(sel, offsets, mats, ids))
                carried += sel.size
                if carried >= self.batch_size:
                    batch, carry, carried = _take_batch(carry, self.batch_size)
                    yield self._to_torch(batch)
        if carried and not self.drop_last:
            yield self._to_torch(_take_batch(carry, carried)[0])

    def _kept_rows(self, group: list[int]) -> np.ndarray | None:
        """(n_window,) True for the window's rows whose token is not excluded (None: none is)."""
        if not len(self.exclude_token_ids):
            return None
        token_ids = [np.asarray(self._open(b).column("token_id").to_numpy()) for b in group]
        return ~np.isin(np.concatenate(token_ids), self.exclude_token_ids)

    def _segments(self, group: list[int]) -> tuple[list[list[np.ndarray]], list[np.ndarray] | None, list[int]]:
        """Per segment (a chunk of the first hook's column), zero-copy (n_c, d_h) views of each
        hook's rows there, for the group's buckets in window row order."""
        mats: list[list[np.ndarray]] = []
        ids: list[np.ndarray] | None = [] if self.with_token_index else None
        for b in group:
            table = self._open(b)
            if table.num_rows != self.rows_per_bucket[b]:
                raise ValueError(f"bucket {b} has {table.num_rows} rows, expected {self.rows_per_bucket[b]}")
            start = 0
            for chunk in table.column(self.hooks[0]).chunks:  # other columns may be chunked otherwise
                mats.append([to_numpy_matrix(chunk)] + [to_numpy_matrix(table.column(h).slice(start, len(chunk)))
                                                        for h in self.hooks[1:]])
                if ids is not None:
                    ids.append(table.column("token_index").slice(start, len(chunk)).to_numpy())
                start += len(chunk)
        return mats, ids, [m[0].shape[0] for m in mats]

    def _rows(self, sel, offsets, mats, ids) -> tuple[np.ndarray, np.ndarray | None]:
        """(n, d) float32 rows and (n,) token indices for window rows `sel`."""
        which = np.searchsorted(offsets, sel, side="right") - 1  # (n,) segment of each row
        local = sel - offsets[which]  # (n,) row within that segment
        widths = np.cumsum([0] + [m.shape[1] for m in mats[0]])  # column offsets of the hooks
        acts = np.empty((sel.size, int(widths[-1])), np.float32)
        tokens = np.empty(sel.size, np.int64) if ids is not None else None
        order = np.argsort(which, kind="stable")  # rows grouped by segment
        segs, firsts = np.unique(which[order], return_index=True)
        for seg, idx in zip(segs, np.split(order, firsts[1:])):
            for h, mat in enumerate(mats[seg]):
                acts[idx, widths[h]:widths[h + 1]] = as_float32(mat[local[idx]])
            if ids is not None:
                tokens[idx] = ids[seg][local[idx]]
        return acts, tokens

    def _to_torch(self, batch):
        acts, tokens = batch
        if self.with_token_index:
            return torch.from_numpy(acts), torch.from_numpy(tokens)
        return torch.from_numpy(acts)


def _take_batch(carry, size):
    """Split the first `size` rows off a list of (acts, tokens) chunks."""
    acts = np.concatenate([a for a, _ in carry])
    tokens = None if carry[0][1] is None else np.concatenate([t for _, t in carry])
    head = (acts[:size], None if tokens is None else tokens[:size])
    rest = [] if acts.shape[0] == size else [(acts[size:], None if tokens is None else tokens[size:])]
    return head, rest, acts.shape[0] - size
