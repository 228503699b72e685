"""Exact uniform out-of-core shuffle of Arrow tables: scatter to K buckets, gather, recurse.

Anthropic's multi-pass shuffle, made exactly uniform. Pass 0: the (N, K) count table
(`bucket_count_table`, multivariate hypergeometric, seeded by (seed, pass) only) is drawn
once (core/shuffle_plan.py keeps it with the shards it is for); every scatter job labels its
shard's rows with a uniformly random arrangement of exactly `counts[i, k]` labels k
(`scatter_batches`, streamed in fixed row blocks so the result does not depend on how the
input is batched), and hands each bucket's pieces to the caller's writers. Gather
(`gather_bucket`): concatenate bucket k's pieces in job order and permute them in memory,
or, above the memory budget, split them the same way into K2 sub-buckets spilled through
caller callables and recurse (`GatherStats` reports the depth used). `finite_batches`
refuses NaN/inf rows while streaming. All randomness is a PCG64 stream keyed on (seed,
pass, path, job|bucket), so retries are byte-identical. Cutting each job's slice into K
*equal* parts (`equal_cut_count_table`) is stratified, not uniform; it exists only so
tests/test_shuffle.py can show the statistics catch it. Pure numpy + pyarrow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

MAX_HYPERGEOMETRIC_TOTAL = 10**9
"""numpy's multivariate_hypergeometric needs sum(colors) < 1e9; above it, see bucket_count_table."""
SCATTER_BLOCK_ROWS = 4096
"""Rows labelled (and buffered) at a time by scatter. Part of the shuffle's key, like seed."""
OUTPUT_BATCH_ROWS = 8192
_STREAM_TAG = 0x5AE5_4FF1  # separates these streams from any other use of the same seed
_TABLE, _LABELS, _PERMUTE = 1, 2, 3

SpillWrite = Callable[[str, pa.RecordBatch], None]  # append a batch to the named spill file
SpillRead = Callable[[str], pa.Table]  # every batch written to the name, in order


class PermutationError(ValueError):
    """The shuffled rows are not a permutation of the input rows (rows lost or duplicated)."""


class NonFiniteActivationError(ValueError):
    """A row to shuffle holds NaN or inf."""


def _rng(purpose: int, seed: int, pass_index: int, *ids: int) -> np.random.Generator:
    if seed < 0 or pass_index < 0 or min(ids, default=0) < 0:
        raise ValueError(f"seed, pass_index and ids must be >= 0, got {seed}, {pass_index}, {ids}")
    key = [_STREAM_TAG, purpose, int(seed), int(pass_index), len(ids), *map(int, ids)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))


def bucket_capacities(total_rows: int, num_buckets: int) -> np.ndarray:
    """(K,) int64 bucket sizes: `total_rows` split as evenly as possible, larger ones first."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    base, extra = divmod(int(total_rows), num_buckets)
    return np.full(num_buckets, base, np.int64) + (np.arange(num_buckets) < extra)


def bucket_count_table(
    rows_per_shard: Sequence[int], num_buckets: int, seed: int, pass_index: int = 0,
    *, path: tuple[int, ...] = (),
) -> np.ndarray:
    """(N, K) int64 table: rows of shard i that go to bucket k, for an exactly uniform shuffle.

    Buckets get `bucket_capacities(sum(rows), K)` rows. Row i is drawn from the multivariate
    hypergeometric over the capacities still unfilled, which is the law of the (shard,
    bucket) counts of a uniform random permutation cut into K consecutive ranges. Seeded by
    (seed, pass_index, *path) only: every job computes the same table. `path` names the
    parent buckets of a nested pass (gather_bucket passes it). Totals of 1e9 rows or more
    exceed numpy's hypergeometric; there each row's bucket is uniform and independent
    (multinomial rows): still exactly uniform, but bucket sizes then vary by ~sqrt(T/K).
    """
    rows = np.asarray(rows_per_shard, dtype=np.int64).reshape(-1)
    if (rows < 0).any():
        raise ValueError(f"rows_per_shard must be >= 0, got {rows.tolist()}")
    rng = _rng(_TABLE, seed, pass_index, *path)
    table = np.zeros((len(rows), num_buckets), np.int64)  # (N, K)
    if int(rows.sum()) >= MAX_HYPERGEOMETRIC_TOTAL:
        for i, n in enumerate(rows):
            table[i] = rng.multinomial(n, np.full(num_buckets, 1.0 / num_buckets))
        return table
    remaining = bucket_capacities(int(rows.sum()), num_buckets)  # (K,) unfilled capacity
    for i, n in enumerate(rows):
        table[i] = rng.multivariate_hypergeometric(remaining, int(n))
        remaining -= table[i]
    return table


def equal_cut_count_table(rows_per_shard: Sequence[int], num_buckets: int) -> np.ndarray:
    """(N, K) table of the naive scheme: every shard cut into K equal parts. NOT uniform.

    Used only by the test that shows it is stratified: with it, the first 1/K of the output
    always holds exactly 1/K of every shard, which a uniform permutation almost never does.
    """
    return np.stack([bucket_capacities(int(n), num_buckets) for n in rows_per_shard])


def scatter_batches(
    batches: Iterable[pa.RecordBatch], counts_row: Sequence[int], *, seed: int, job: int,
    pass_index: int = 0, path: tuple[int, ...] = (), block_rows: int = SCATTER_BLOCK_ROWS,
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Stream one shard's rows into buckets: yields (bucket, piece) pairs to append to files.

    Exactly `counts_row[k]` rows go to bucket k, chosen as a uniformly random arrangement of
    those labels over row positions. Rows are handled in fixed blocks of `block_rows`
    positions (the input batching is irrelevant): block b's label counts are drawn from the
    multivariate hypergeometric over the labels left, then its rows are permuted and cut,
    so peak memory is one block plus one input batch. The pieces for each bucket, in the
    order yielded, are identical for identical rows. Raises if the shard's row count
    disagrees with sum(counts_row) (a count table built from stale row counts).
    """
    remaining = np.asarray(counts_row, dtype=np.int64).copy()  # (K,) labels not yet used
    if remaining.ndim != 1 or (remaining < 0).any() or block_rows < 1:
        raise ValueError(f"bad counts_row {remaining.tolist()} or block_rows {block_rows}")
    if int(remaining.sum()) >= MAX_HYPERGEOMETRIC_TOTAL:
        raise ValueError(f"job {job}: shards of >= 1e9 rows are not supported; use more shards")
    rng = _rng(_LABELS, seed, pass_index, *path, job)
    pending: list[pa.RecordBatch] = []  # rows of the current block, <= block_rows in total
    pending_rows = 0
    for batch in batches:
        while batch.num_rows:
            take = min(block_rows - pending_rows, batch.num_rows)
            pending.append(batch.slice(0, take))
            pending_rows += take
            batch = batch.slice(take)
            if pending_rows == block_rows:
                yield from _split_block(pending, remaining, rng, job)
                pending, pending_rows = [], 0
    if pending_rows:
        yield from _split_block(pending, remaining, rng, job)
    if remaining.any():
        raise ValueError(f"job {job}: shard has {int(remaining.sum())} fewer rows than counts_row says")


def _split_block(
    pending: list[pa.RecordBatch], remaining: np.ndarray, rng: np.random.Generator, job: int,
) -> Iterator[tuple[int, pa.RecordBatch]]:
    block = pa.Table.from_batches(pending)
    m = block.num_rows
    if m > remaining.sum():
        raise ValueError(f"job {job}: shard has more rows than counts_row says ({remaining.sum()} left)")
    counts = rng.multivariate_hypergeometric(remaining, m)  # (K,) labels in this block
    remaining -= counts  # in place: the caller's running state
    shuffled = block.take(rng.permutation(m)).combine_chunks()  # (m,) rows, labels in runs
    ends = np.cumsum(counts)
    for k in np.flatnonzero(counts):
        yield int(k), _one_batch(shuffled.slice(ends[k] - counts[k], counts[k]))


def gather_bucket(
    pieces: Sequence[pa.Table | pa.RecordBatch], *, bucket: int, seed: int,
    memory_budget_bytes: int, spill_write: SpillWrite | None = None,
    spill_read: SpillRead | None = None, pass_index: int = 0, path: tuple[int, ...] = (),
    schema: pa.Schema | None = None, batch_rows: int = OUTPUT_BATCH_ROWS,
    block_rows: int = SCATTER_BLOCK_ROWS, stats: GatherStats | None = None,
) -> Iterator[pa.RecordBatch]:
    """Yield bucket `bucket` (of pass `pass_index`) uniformly permuted, in batches of `batch_rows`.

    `pieces[j]` holds what scatter job j sent to this bucket (memory-mapped tables are best;
    an empty or missing job is an empty table). At most `memory_budget_bytes` of rows are
    permuted in memory (plus 8 bytes a row of indices); above it the bucket is split into
    K2 = ceil(bytes / budget) sub-buckets by the same table+labelling method at pass
    `pass_index + 1`, each spilled via `spill_write(name, batch)` / `spill_read(name)`, then
    gathered in turn (recursively). The order depends on seed, block_rows and the budget.
    `stats`, if given, records the passes and spilled rows it took (complete once exhausted).
    """
    if schema is None:
        if not pieces:
            raise ValueError(f"bucket {bucket}: no pieces and no schema")
        schema = pieces[0].schema
    if memory_budget_bytes < 1 or batch_rows < 1:
        raise ValueError(f"memory_budget_bytes ({memory_budget_bytes}) and batch_rows ({batch_rows}) "
                         "must be >= 1")
    gather = _Gather(schema, seed, memory_budget_bytes, spill_write, spill_read, block_rows, pass_index,
                     GatherStats() if stats is None else stats)
    tables = [_as_table(p, schema, f"job {j}") for j, p in enumerate(pieces)]
    yield from _rebatch(gather.gather(tables, bucket, pass_index, path), schema, batch_rows)


@dataclass
class GatherStats:
    """What one gather_bucket call did, filled in while it runs."""

    passes: int = 0
    """Passes over the bucket's rows: 1 if it fit the budget, else 1 + the deepest spill level."""
    spilled_rows: int = 0
    """Rows written to spill files, summed over every level."""


@dataclass(frozen=True)
class _Gather:
    """What stays fixed while gather recurses: schema, seed, budget, spill callables, stats."""

    schema: pa.Schema
    seed: int
    budget: int
    spill_write: SpillWrite | None
    spill_read: SpillRead | None
    block_rows: int
    first_pass: int
    stats: GatherStats = field(compare=False)

    def gather(self, tables: list[pa.Table], bucket: int, pass_index: int,
               path: tuple[int, ...]) -> Iterator[pa.RecordBatch]:
        nbytes, rows = sum(t.nbytes for t in tables), [t.num_rows for t in tables]
        if nbytes <= self.budget or sum(rows) <= 1:
            table = pa.concat_tables(tables) if tables else self.schema.empty_table()
            table = table.combine_chunks()  # the copy the budget is for
            self.stats.passes = max(self.stats.passes, pass_index - self.first_pass + 1)
            perm = _rng(_PERMUTE, self.seed, pass_index, *path, bucket).permutation(table.num_rows)
            for start in range(0, table.num_rows, OUTPUT_BATCH_ROWS):  # (n,) -> batches
                yield _one_batch(table.take(perm[start:start + OUTPUT_BATCH_ROWS]))
            return
        if self.spill_write is None or self.spill_read is None:
            raise ValueError(
                f"bucket {'/'.join(map(str, (*path, bucket)))} of pass {pass_index} holds {nbytes} "
                f"bytes > memory budget {self.budget}; pass spill_write/spill_read for another pass")
        sub_path, sub_pass = (*path, bucket), pass_index + 1
        k2 = min(max(2, math.ceil(nbytes / self.budget)), sum(rows))  # sub-buckets of <= budget
        counts = bucket_count_table(rows, k2, self.seed, sub_pass, path=sub_path)  # (N, K2)
        names = [f"shuffle-p{sub_pass}-{'-'.join(map(str, sub_path))}-{k}" for k in range(k2)]
        written: set[int] = set()
        for j, table in enumerate(tables):
            pieces = scatter_batches(table.to_batches(), counts[j], seed=self.seed, job=j,
                                     pass_index=sub_pass, path=sub_path, block_rows=self.block_rows)
            for k, piece in pieces:
                self.spill_write(names[k], piece)
                self.stats.spilled_rows += piece.num_rows
                written.add(k)
        for k in range(k2):  # sub-buckets in order: their concatenation is the bucket, permuted
            sub = [_as_table(self.spill_read(names[k]), self.schema, names[k])] if k in written else []
            yield from self.gather(sub, k, sub_pass, sub_path)


def _as_table(piece: pa.Table | pa.RecordBatch, schema: pa.Schema, where: str) -> pa.Table:
    table = pa.Table.from_batches([piece]) if isinstance(piece, pa.RecordBatch) else piece
    if not table.schema.equals(schema, check_metadata=False):
        raise ValueError(f"{where}: schema {table.schema} differs from the bucket's {schema}")
    return table.replace_schema_metadata(schema.metadata)


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    batches = table.combine_chunks().to_batches()
    return batches[0] if len(batches) == 1 else pa.RecordBatch.from_pylist([], schema=table.schema)


def _rebatch(batches: Iterable[pa.RecordBatch], schema: pa.Schema, rows: int) -> Iterator[pa.RecordBatch]:
    """Re-cut a stream into batches of exactly `rows` rows (the last may be short)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += batch.num_rows
        while count >= rows:
            table = pa.Table.from_batches(pending, schema=schema)
            yield _one_batch(table.slice(0, rows))
            rest = table.slice(rows)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield _one_batch(pa.Table.from_batches(pending, schema=schema))


def finite_batches(batches: Iterable[pa.RecordBatch], *, where: str,
                   index_column: str = "token_index") -> Iterator[pa.RecordBatch]:
    """Pass `batches` through, raising NonFiniteActivationError at the first NaN or inf row.

    Checks every fixed-size-list column (activations; uint16 ones are bfloat16 bits) one batch
    at a time, so it adds one boolean mask of a batch to peak memory. The error names `where`,
    the column and the row's `index_column` value (its global token index).
    """
    for batch in batches:
        for name, column in zip(batch.schema.names, batch.columns):
            if not pa.types.is_fixed_size_list(column.type):
                continue
            values = column.flatten().to_numpy(zero_copy_only=False)  # (n * d,)
            if values.dtype == np.uint16:  # bfloat16 bits: NaN and inf have every exponent bit set
                bad = (values & np.uint16(0x7F80)) == np.uint16(0x7F80)
            elif values.dtype.kind == "f":
                bad = ~np.isfinite(values)
            else:
                continue
            if bad.any():
                row = int(np.flatnonzero(bad)[0]) // column.type.list_size
                index = batch.column(index_column)[row].as_py() if index_column in batch.schema.names else None
                raise NonFiniteActivationError(
                    f"{where}: {int(bad.reshape(len(column), -1).any(axis=1).sum())} row(s) of a batch hold NaN "
                    f"or inf in {name}, the first at {index_column} {index}; refusing to shuffle them")
        yield batch


def source_checksum(token_index: np.ndarray) -> tuple[int, int]:
    """(count, sum of a 64-bit mix of each index mod 2**64): order-independent, add to combine."""
    x = np.asarray(token_index).astype(np.int64, copy=False).view(np.uint64)
    x = x + np.uint64(0x9E3779B97F4A7C15)  # splitmix64 finalizer: 0 does not map to 0
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return int(x.size), int(np.sum(x, dtype=np.uint64))


def combine_checksums(*checksums: tuple[int, int]) -> tuple[int, int]:
    return sum(c for c, _ in checksums), sum(s for _, s in checksums) % 2**64


def check_permutation(input_indices: np.ndarray, output_indices: np.ndarray) -> None:
    """Raise PermutationError unless `output_indices` is a rearrangement of `input_indices`."""
    a, b = np.sort(np.asarray(input_indices)), np.sort(np.asarray(output_indices))
    if a.shape == b.shape and np.array_equal(a, b):
        return
    values, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    count_in = np.bincount(inverse[:a.size], minlength=values.size)
    count_out = np.bincount(inverse[a.size:], minlength=values.size)
    missing, extra = np.maximum(count_in - count_out, 0), np.maximum(count_out - count_in, 0)
    raise PermutationError(
        f"output is not a permutation of the input: {a.size} rows in, {b.size} out; "
        f"{int(missing.sum())} missing (e.g. token_index {values[missing > 0][:5].tolist()}), "
        f"{int(extra.sum())} duplicated or foreign (e.g. {values[extra > 0][:5].tolist()})")
