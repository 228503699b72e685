"""Data for SAE training and evaluation: exact-size training batches and the samples metrics use.

Dictionaries are evaluated on the language model's held-out sequences, so training must never
see those tokens: `heldout_tokens` recovers each row's sequence from its 64-bit global token
index and applies the model's own split. `training_batches` turns the shuffled-bucket reader
into (B, D) batches of exactly `batch_size` rows (with their token indices if asked), epoch
after epoch, and can start at any step so that a resumed training run sees exactly the batches
an uninterrupted one would; `TrainingStream` bundles it with the run's settings, checks the
initialisation sample and names the bucket and token of a non-finite row. `sample_sequences`
draws a sample for evaluation: the sequences of one side of the split with the lowest seeded
hash of their first global token index, so a sample is uniform over all shards and the same
however the rows are grouped or ordered; `evaluation_sample` draws the three sae_metrics uses.
Tests: tests/test_sae_assets.py, tests/test_sae_metrics.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from sae_assets.core import schemas
from sae_assets.core.activations.reader import ShuffledActivationReader
from sae_assets.core.config import DictionaryPoint, RunConfig
from sae_assets.core.model.lm import split_is_validation

# Letter key: N rows (tokens), B batch rows, D activation width, S sequences, T positions.


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
    with_token_index: bool = False,
) -> Iterator[torch.Tensor] | Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (B, D) float32 batches of training rows (held-out tokens dropped), from step
    `start_step` on; with `with_token_index`, (acts_BD, token_index_B) pairs. Epoch e of the
    reader follows epoch e-1 (a batch may hold the end of one and the start of the next); the
    stream is a pure function of the reader's seed, so batch s is the same whether or not the
    run was interrupted."""
    if not reader.with_token_index:
        raise ValueError("training_batches needs a reader built with with_token_index=True")
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    pending_rows, step, epoch = 0, 0, 0
    while True:
        produced = False
        for acts_BD, index_B in reader.epoch(epoch):
            keep_B = torch.from_numpy(~heldout_tokens(index_B.numpy(), context_length, val_fraction, split_seed))
            if not bool(keep_B.any()):
                continue
            produced = True
            pending.append((acts_BD[keep_B], index_B[keep_B]))
            pending_rows += int(keep_B.sum())
            while pending_rows >= batch_size:
                acts_ND, index_N = torch.cat([a for a, _ in pending]), torch.cat([i for _, i in pending])
                rest = len(acts_ND) - batch_size
                pending, pending_rows = ([(acts_ND[batch_size:], index_N[batch_size:])] if rest else []), rest
                if step >= start_step:
                    yield (acts_ND[:batch_size], index_N[:batch_size]) if with_token_index else acts_ND[:batch_size]
                step += 1
        if not produced:
            raise ValueError("the shuffled activations hold no training rows (all held out, special or empty)")
        epoch += 1


def describe_token(token_index: int) -> str:
    """'global token index 1099511627781 (shard 1, offset 5)'."""
    shard = token_index >> schemas.SHARD_BITS
    return f"global token index {token_index} (shard {shard}, offset {token_index - (shard << schemas.SHARD_BITS)})"


@dataclass(frozen=True)
class TrainingStream:
    """An SAE's training data: the shuffled buckets less the held-out (and excluded special)
    tokens, in (B, D) batches."""

    reader: ShuffledActivationReader
    batch_size: int
    context_length: int
    val_fraction: float
    split_seed: int
    bucket_names: tuple[str, ...] = ()
    """The buckets' names in reader order (e.g. 'shuffled_shards[bucket-0001]'), for errors."""

    @classmethod
    def for_run(cls, buckets: Sequence, cfg: RunConfig, bucket_names: Sequence[str] = (),
                exclude_token_ids: Sequence[int] = (), point: DictionaryPoint | None = None) -> TrainingStream:
        """The stream sae_dictionary trains on: a reader of `buckets` seeded by sae.seed, batches of
        sae.batch_size, the language model's split (model.val_fraction, model.seed), without the
        rows of `exclude_token_ids` (the special tokens, when special_tokens.exclude is on). The
        rows hold `point`'s training columns (`RunConfig.training_columns`: a transcoder's input |
        target side by side); no point: sae_hook."""
        hooks = cfg.training_columns(point) if point is not None else (cfg.sae_hook,)
        reader = ShuffledActivationReader(buckets, hook=hooks, batch_size=cfg.sae.batch_size,
                                          seed=cfg.sae.seed, with_token_index=True,
                                          exclude_token_ids=exclude_token_ids)
        return cls(reader, cfg.sae.batch_size, cfg.tokenizer.context_length, cfg.model.val_fraction,
                   cfg.model.seed, tuple(bucket_names))

    def indexed(self, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(acts_BD, token_index_B) of steps start_step, start_step + 1, ..."""
        return training_batches(self.reader, batch_size=self.batch_size, start_step=start_step,
                                context_length=self.context_length, val_fraction=self.val_fraction,
                                split_seed=self.split_seed, with_token_index=True)

    def batches(self, start_step: int) -> Iterator[torch.Tensor]:
        """acts_BD of steps start_step, start_step + 1, ... (the `Batches` train_sae takes)."""
        return (acts_BD for acts_BD, _ in self.indexed(start_step))

    def init_sample(self, n_batches: int) -> torch.Tensor:
        """(n_batches * B, D): the first training batches, which set the input scale and the init.

        Raises ValueError if a row holds NaN or inf, naming the first such row (in training
        order) by its global token index and its shuffled bucket."""
        pairs = list(itertools.islice(self.indexed(0), n_batches))
        acts_ND, index_N = torch.cat([a for a, _ in pairs]), torch.cat([i for _, i in pairs])
        bad_N = ~torch.isfinite(acts_ND).all(dim=1)
        if bool(bad_N.any()):
            first = int(index_N[int(bad_N.nonzero()[0, 0])])
            raise ValueError(f"{int(bad_N.sum())} of the {len(acts_ND)} rows of the initialisation sample "
                             f"(the first {len(pairs)} training batches) hold NaN or inf; the first is "
                             f"{self.locate(first)}")
        return acts_ND

    def locate(self, token_index: int) -> str:
        """The token and the bucket holding it, for messages (reads the buckets' token_index columns)."""
        for position, source in enumerate(self.reader.buckets):
            table = source() if callable(source) else source
            if bool((table.column(schemas.TOKEN_INDEX).to_numpy() == token_index).any()):
                name = self.bucket_names[position] if position < len(self.bucket_names) else f"bucket {position}"
                return f"{describe_token(token_index)} in shuffled bucket {name}"
        return describe_token(token_index)


_SAMPLE_TAG = 0x5A3F_1E5E  # keeps sample ranks apart from the split's hash and other seeded streams


def sample_rank(first_S: np.ndarray, seed: int) -> np.ndarray:
    """(S,) uint64: a seeded SplitMix64 hash of each sequence's first global token index."""
    key = np.random.SeedSequence([_SAMPLE_TAG, int(seed)]).generate_state(1, np.uint64)[0]
    with np.errstate(over="ignore"):  # uint64 arithmetic is meant to wrap
        x = np.asarray(first_S, dtype=np.int64).astype(np.uint64) ^ key
        for _ in range(2):
            x = x + np.uint64(0x9E3779B97F4A7C15)
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            x = x ^ (x >> np.uint64(31))
    return x


def sample_sequences(first_S: np.ndarray, *, heldout: bool, val_fraction: float, split_seed: int, seed: int,
                     count: int) -> np.ndarray:
    """(M,) positions into first_S of a uniform sample of M = min(count, available) sequences.

    The candidates are the sequences the language model held out (`heldout`) or trained on;
    the sample is those with the lowest `sample_rank(first, seed)` (ties by first index),
    returned in global-index order. A sequence's rank depends only on its own index, so the
    sample is spread over every shard, is the same however the rows are grouped or ordered,
    and a smaller count gives a subset of a larger one.
    """
    candidates = np.flatnonzero(split_is_validation(first_S, val_fraction, split_seed) == heldout)
    ranked = candidates[np.lexsort((first_S[candidates], sample_rank(first_S[candidates], seed)))]
    chosen = ranked[:max(0, count)]
    return chosen[np.argsort(first_S[chosen], kind="stable")]


class EvaluationSample(NamedTuple):
    """Positions into a run's (S,) sequences of the three samples `evaluate_dictionary` takes."""

    eval_S: np.ndarray
    """sae.eval_sequences held-out sequences, scored for reconstruction and loss recovered."""
    mean_S: np.ndarray
    """As many sequences the language model trained on: the mean-ablation mean comes from them."""
    density_S: np.ndarray
    """Held-out sequences, at least sae.dead_after_tokens tokens of them (all if fewer exist), over
    which dead features are counted; eval_S is a subset (the same ranking, a longer prefix)."""


def evaluation_sample(first_S: np.ndarray, cfg: RunConfig) -> EvaluationSample:
    """The evaluation samples of a run's sequences (their first global token indices (S,)).

    Uniform, seeded by sae.seed, over the language model's split (model.val_fraction,
    model.seed); see `sample_sequences`. Raises ValueError naming the config keys when a side
    of the split is empty."""
    split = {"val_fraction": cfg.model.val_fraction, "split_seed": cfg.model.seed, "seed": cfg.sae.seed}
    count = cfg.sae.eval_sequences
    dead_count = max(count, -(-cfg.sae.dead_after_tokens // cfg.tokenizer.context_length))
    sample = EvaluationSample(sample_sequences(first_S, heldout=True, count=count, **split),
                              sample_sequences(first_S, heldout=False, count=count, **split),
                              sample_sequences(first_S, heldout=True, count=dead_count, **split))
    if len(sample.eval_S) == 0 or len(sample.mean_S) == 0:
        raise ValueError(f"cannot evaluate: {len(sample.eval_S)} held-out and {len(sample.mean_S)} training "
                         f"sequences sampled from {len(first_S)}; change model.val_fraction="
                         f"{cfg.model.val_fraction} or sae.eval_sequences={count}, or add data")
    return sample
