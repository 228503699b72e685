"""Zero-weight ablation of units and the prediction flips it causes: the ground truth of
"Gradient capture / training-data attribution from outlier parameter shifts".

A unit (tensors.unit_weights) is switched off by zeroing its weights in place: an MLP
neuron's row of mlp.in (and its bias) and column of mlp.out; a head's q/k/v rows and o
columns. Over a set of windows (the unit's attributed training sequences) the model's
next-token prediction (argmax) at every position is taken with and without the unit. For a
token w, its *instances* are the positions where the clean or the ablated prediction is w,
and its *flips* those of them where the two differ; the proportion flipped is flips /
instances (seed: 56% of the positions predicting 'war' flipped when neuron 96 was ablated).
A control arm ablates a random unit of the same kind and layer over the same windows, so a
reader sees whether attributed units beat chance. Tests: tests/test_attribution_core.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from sae_assets.core.attribution.tensors import unit_weights


@contextmanager
def zero_ablated(model: torch.nn.Module, unit_kind: str, layer: int, unit: int) -> Iterator[None]:
    """Within the block, the unit's weights are zero; they are restored exactly afterwards."""
    slices = unit_weights(model, unit_kind, layer, unit)
    saved = [tensor.detach()[index].clone() for tensor, index in slices]
    try:
        with torch.no_grad():
            for tensor, index in slices:
                tensor[index] = 0.0
        yield
    finally:
        with torch.no_grad():
            for (tensor, index), value in zip(slices, saved):
                tensor[index] = value


@torch.no_grad()
def predictions(model: torch.nn.Module, tokens_WT: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(W, T) int64 argmax next-token predictions at every position of the windows (W, T)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        out = [model(tokens_WT[i : i + batch_size].to(device)).argmax(-1).cpu()
               for i in range(0, len(tokens_WT), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, tokens_WT.shape[1], dtype=torch.int64)


def flip_counts(clean: np.ndarray, ablated: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(instances (V,), flips (V,)) of two prediction arrays of the same shape."""
    clean, ablated = np.asarray(clean).reshape(-1), np.asarray(ablated).reshape(-1)
    changed = clean != ablated
    instances = np.bincount(clean, minlength=vocab) + np.bincount(ablated[changed], minlength=vocab)
    flips = np.bincount(clean[changed], minlength=vocab) + np.bincount(ablated[changed], minlength=vocab)
    return instances.astype(np.int64), flips.astype(np.int64)


def control_unit(n_units: int, layer: int, unit: int, seed: int) -> int:
    """A random other unit of the same layer, fixed by (seed, layer, unit)."""
    if n_units < 2:
        raise ValueError(f"layer {layer} has {n_units} unit(s): no other unit to serve as a control")
    draw = int(np.random.default_rng([seed, layer, unit]).integers(n_units - 1))
    return draw + (draw >= unit)


def flip_rows(arm: str, unit_key: tuple[str, int, int], for_unit: int, instances: np.ndarray, flips: np.ndarray,
              notable: set[int], token_text: Sequence[str]) -> list[tuple]:
    """Rows of ablation_flip_schema for tokens with instances, by proportion, flips, token id."""
    ids = np.flatnonzero(instances)
    proportion = flips[ids] / instances[ids]
    order = np.lexsort((ids, -flips[ids], -proportion))
    kind, layer, unit = unit_key
    return [(arm, kind, layer, unit, for_unit, int(t), token_text[t], int(instances[t]), int(flips[t]),
             float(p), int(t) in notable) for t, p in zip(ids[order], proportion[order])]


def notable_proportion(instances: np.ndarray, flips: np.ndarray, notable: Sequence[int]) -> float | None:
    """Flips / instances pooled over the notable tokens; None when none was predicted."""
    chosen = np.asarray(sorted(notable), dtype=np.int64)
    seen = int(instances[chosen].sum()) if chosen.size else 0
    return int(flips[chosen].sum()) / seen if seen else None
