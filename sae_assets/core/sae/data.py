"""Data for SAE training and evaluation: exact-size training batches and the held-out split.

Dictionaries are evaluated on the language model's held-out sequences, so training must never
see those tokens: `heldout_tokens` recovers each row's sequence from its 64-bit global token
index and applies the model's own split. `training_batches` turns the shuffled-bucket reader
into (B, D) batches of exactly `batch_size` rows, epoch after epoch, and can start at any
step so that a resumed training run sees exactly the batches an uninterrupted one would.
Tests: tests/test_sae_assets.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from sae_assets.core import schemas
from sae_assets.core.activations.reader import ShuffledActivationReader
from sae_assets.core.model.lm import split_is_validation


def sequence_ids(token_index_N: np.ndarray, context_length: int) -> np.ndarray:
    """(N,) the first_token_index of the sequence each token belongs to."""
    shard = token_index_N >> schemas.SHARD_BITS
    offset = token_index_N - (shard << schemas.SHARD_BITS)
    return (shard << schemas.SHARD_BITS) + offset - offset % context_length


def heldout_tokens(token_index_N: np.ndarray, context_length: int, val_fraction: float, seed: int) -> np.ndarray:
    """(N,) bool: True for tokens of sequences the language model held out."""
    return split_is_validation(sequence_ids(token_index_N, context_length), val_fraction, seed)


def training_batches(
    reader: ShuffledActivationReader,
    *,
    batch_size: int,
    start_step: int,
    context_length: int,
    val_fraction: float,
    split_seed: int,
) -> Iterator[torch.Tensor]:
    """Endless (B, D) float32 batches of training rows (held-out tokens dropped), from step
    `start_step` on. Epoch e of the reader follows epoch e-1; the stream is a pure function of
    the reader's seed, so batch s is the same whether or not the run was interrupted."""
    if not reader.with_token_index:
        raise ValueError("training_batches needs a reader built with with_token_index=True")
    pending: list[torch.Tensor] = []
    pending_rows, step, epoch = 0, 0, 0
    while True:
        produced = False
        for acts_BD, index_B in reader.epoch(epoch):
            keep_B = ~heldout_tokens(index_B.numpy(), context_length, val_fraction, split_seed)
            kept = acts_BD[torch.from_numpy(keep_B)]
            if len(kept) == 0:
                continue
            produced = True
            pending.append(kept)
            pending_rows += len(kept)
            while pending_rows >= batch_size:
                merged = torch.cat(pending)
                batch, rest = merged[:batch_size], merged[batch_size:]
                pending, pending_rows = ([rest] if len(rest) else []), len(rest)
                if step >= start_step:
                    yield batch
                step += 1
        if not produced:
            raise ValueError("the shuffled activations hold no training rows (all held out or empty)")
        epoch += 1


def heldout_sequences(tokens_ST: np.ndarray, first_S: np.ndarray, *, val_fraction: float, seed: int,
                      limit: int) -> np.ndarray:
    """(M, T): the first `limit` sequences the language model held out, in global index order."""
    held_S = split_is_validation(first_S, val_fraction, seed)
    order = np.argsort(first_S[held_S], kind="stable")
    return tokens_ST[held_S][order][:limit]
