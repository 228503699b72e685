"""Toy data with known sparse ground-truth features, and MMCS, for judging initialisations.

As in "Informed initialization of sparse dictionaries" (after Sharkey et al., "Taking features out of superposition with sparse
autoencoders"): G ground-truth features are random unit vectors in D dimensions (G > D, so
they are in superposition, e.g. 128/256, 128/512, 128/1024). Feature g fires independently in
a row with probability p_g, long-tailed (Zipf: p_g proportional to (g + 1)^-exponent, scaled
so that `mean_active` features fire per row on average, capped at 1), with a uniform(0, 1)
coefficient; a row is the coefficient-weighted sum of its firing features. `toy_batches`
draws batch `step` from a generator seeded by (seed, step), so `batches(start_step)` resumes
exactly (the pattern `train_sae` needs). `mmcs(W_dec_FD, features_GD)` is the mean over
ground-truth features of the largest cosine similarity with any decoder row.
Tests: tests/test_sae_core.py; benchmark: bench/toy_init.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

# Letter key: G ground-truth features, D input width, B batch rows, F dictionary rows.

_FEATURES, _BATCHES = 0x70F_FEA7, 0x70F_BA7C  # stream tags: toy draws never coincide with other seeded draws


def _generator(*key: int) -> torch.Generator:
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) % (2**63))


class ToyData(NamedTuple):
    features_GD: Tensor
    """(G, D) unit-norm ground-truth directions."""
    probs_G: Tensor
    """(G,) firing probability of each feature, most frequent first."""


def make_toy_data(n_features: int, d: int, *, seed: int = 0, mean_active: float = 5.0,
                  exponent: float = 1.0) -> ToyData:
    """G = n_features random unit directions in d dims with Zipf-like firing probabilities."""
    generator = _generator(_FEATURES, seed)
    features_GD = torch.randn(n_features, d, generator=generator)
    features_GD /= features_GD.norm(dim=-1, keepdim=True)
    weights_G = (torch.arange(n_features, dtype=torch.float64) + 1) ** -exponent
    probs_G = (weights_G * mean_active / weights_G.sum()).clamp_max(1.0).float()
    return ToyData(features_GD, probs_G)


def toy_batch(data: ToyData, batch_size: int, generator: torch.Generator) -> Tensor:
    """(B, D) rows: sum over firing features of uniform(0, 1) coefficient x direction."""
    G = data.probs_G.shape[0]
    fires_BG = torch.rand(batch_size, G, generator=generator) < data.probs_G
    coefficients_BG = torch.rand(batch_size, G, generator=generator) * fires_BG
    return coefficients_BG @ data.features_GD


def toy_batches(data: ToyData, batch_size: int, *, seed: int = 0) -> Callable[[int], Iterator[Tensor]]:
    """batches(start_step): an endless iterator whose batch for step s depends only on (seed, s)."""

    def batches(start_step: int) -> Iterator[Tensor]:
        step = start_step
        while True:
            generator = _generator(_BATCHES, seed, step)
            yield toy_batch(data, batch_size, generator)
            step += 1

    return batches


@torch.no_grad()
def mmcs(W_dec_FD: Tensor, features_GD: Tensor) -> float:
    """Mean over ground-truth features of the max cosine similarity with any decoder row."""
    rows_FD = W_dec_FD.detach().float().cpu()
    rows_FD = rows_FD / rows_FD.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    truth_GD = features_GD.float() / features_GD.float().norm(dim=-1, keepdim=True)
    return float((truth_GD @ rows_FD.T).max(dim=-1).values.mean())
