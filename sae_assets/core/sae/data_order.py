"""Orders other than our exact shuffle in which SAE training can see a run's activations.

The shuffling comparison of "My best guess at the important tricks for training 1L SAEs"
(its author found no shuffle no worse than a shuffled buffer) needs three orders of the same
training rows; the first is the pipeline's own, the other two are here:
- exact: `shuffled_shards` read by `core.sae.data.TrainingStream`, a uniform permutation of
  every row each epoch (the out-of-core multi-pass shuffle);
- buffer: `buffered_batches`, a SAELens-style mixing buffer over cache order. Rows arrive in
  cache order; once `buffer_rows` are held, the buffer is permuted, the first part is served in
  batches and the last `mix_fraction` of it (half, as SAELens's `mixing_buffer` keeps) stays to
  be mixed with the next rows. A row can only be served after it arrives, and it is served on
  average about `buffer_rows` rows later, so batches stay correlated with the cache order on
  scales beyond the buffer;
- none: `cache_order_batches`, cache order itself (shard after shard, sequence after sequence,
  token after token), as activations come off a forward pass.

Both return train_sae's `Batches`: `batches(start_step)` yields the (B, D) batches of steps
start_step, start_step + 1, ..., each a pure function of its step (the buffer's randomness is
seeded and replayed from step 0), epoch after epoch without end. Tests: tests/test_training_tricks.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

# Letter key: N rows in cache order, B batch rows, D activation width.

Batches = Callable[[int], Iterator[Tensor]]
MIX_FRACTION = 0.5
"""The part of a full buffer kept back to mix with the next rows (SAELens's default)."""


def cache_order_batches(acts_ND: Tensor, batch_size: int) -> Batches:
    """Batches of consecutive rows of `acts_ND`; batch s holds rows s*B .. s*B + B - 1 modulo N,
    so an epoch's end runs on into the next epoch's start."""
    N = acts_ND.shape[0]
    if N == 0 or batch_size < 1:
        raise ValueError(f"need rows and batch_size >= 1, got {N} rows and batch_size {batch_size}")
    offsets_B = torch.arange(batch_size)

    def batches(start_step: int) -> Iterator[Tensor]:
        for step in itertools.count(start_step):
            yield acts_ND[(step * batch_size + offsets_B) % N]

    return batches


def mixing_buffer(chunks: Iterable[Tensor], *, buffer_rows: int, batch_size: int, generator: torch.Generator,
                  mix_fraction: float = MIX_FRACTION) -> Iterator[Tensor]:
    """(B, D) batches from (n, D) `chunks` mixed in a buffer (see the module docstring).

    Each time the buffer holds `buffer_rows` or more rows it is permuted (`generator`), whole
    batches are served from its front until only about `mix_fraction` x buffer_rows remain
    (at least one batch is served), and the rest waits for the next chunks. When the chunks
    end, the whole batches left are served in buffer order. Bad sizes raise ValueError at once."""
    if buffer_rows < batch_size or batch_size < 1:
        raise ValueError(f"need buffer_rows >= batch_size >= 1, got {buffer_rows} and {batch_size}")
    if not 0 <= mix_fraction < 1:
        raise ValueError(f"mix_fraction must be in [0, 1), got {mix_fraction}")
    return _mixed(chunks, buffer_rows, batch_size, generator, keep=int(buffer_rows * mix_fraction))


def _mixed(chunks: Iterable[Tensor], buffer_rows: int, batch_size: int, generator: torch.Generator, *,
           keep: int) -> Iterator[Tensor]:
    held_ND: Tensor | None = None
    for chunk_nD in chunks:
        held_ND = chunk_nD if held_ND is None else torch.cat([held_ND, chunk_nD])
        if held_ND.shape[0] < buffer_rows:
            continue
        held_ND = held_ND[torch.randperm(held_ND.shape[0], generator=generator)]
        served = max(1, (held_ND.shape[0] - keep) // batch_size) * batch_size
        yield from held_ND[:served].split(batch_size)
        held_ND = held_ND[served:]
    if held_ND is not None:
        whole = held_ND.shape[0] // batch_size * batch_size
        yield from held_ND[:whole].split(batch_size)


def buffered_batches(acts_ND: Tensor, batch_size: int, *, buffer_rows: int, seed: int,
                     mix_fraction: float = MIX_FRACTION) -> Batches:
    """Cache order (`cache_order_batches`, one batch at a time) through `mixing_buffer`, seeded
    by `seed`; batch s is found by replaying the buffer from step 0, so it is a pure function of s."""
    in_order = cache_order_batches(acts_ND, batch_size)
    mixing_buffer((), buffer_rows=buffer_rows, batch_size=batch_size, generator=torch.Generator(),
                  mix_fraction=mix_fraction)  # bad sizes fail here, not at the first batch

    def batches(start_step: int) -> Iterator[Tensor]:
        generator = torch.Generator().manual_seed(seed)
        mixed = mixing_buffer(in_order(0), buffer_rows=buffer_rows, batch_size=batch_size, generator=generator,
                              mix_fraction=mix_fraction)
        return itertools.islice(mixed, start_step, None)

    return batches
