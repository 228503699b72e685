"""Would activation statistics alone have picked the same neurons? The write-up's comparison.

"Gradient capture / training-data attribution from outlier parameter shifts" found that its
attributed neuron for 'war' did not stand out in the layer's activations on 'war'. Here, for
every ablated MLP neuron and its notable tokens, `activation_ranks` runs a seeded uniform
sample of training sequences through the model once, takes the layer's hidden activations
(`blocks.{l}.mlp.hook_post`, (B, T, d_mlp)) and ranks every neuron of the layer by its
selectivity for those tokens: mean activation where the input token is notable minus its mean
over all positions. Rank 1 is the most selective neuron; an attributed neuron ranked near 1
means activations alone would have found it, a rank near d_mlp / 2 that they would not.
Attention heads get no rank (None). Tests: tests/test_attribution_core.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def sample_sequences(n_sequences: int, count: int, seed: int) -> np.ndarray:
    """Sorted row numbers of a seeded uniform sample of `count` of `n_sequences` sequences."""
    rng = np.random.default_rng([seed, 0xAC7])
    return np.sort(rng.choice(n_sequences, size=min(count, n_sequences), replace=False))


@torch.no_grad()
def activation_ranks(model: torch.nn.Module, tokens_ST: np.ndarray, units: Sequence[tuple[str, int, int]],
                     notable: dict[tuple[str, int, int], set[int]], *, batch_size: int) -> list[int | None]:
    """Per unit: its rank (1 = most selective) among its layer's neurons for its notable tokens.

    `tokens_ST` are the sampled sequences; None for heads and for units whose notable tokens
    never occur in them.
    """
    layers = sorted({layer for kind, layer, _ in units if kind == "mlp_neuron"})
    if not layers or not len(tokens_ST):
        return [None] * len(units)
    hooks = {f"blocks.{layer}.mlp.hook_post": layer for layer in layers}
    vocab = int(max(tokens_ST.max(), *(max(t, default=0) for t in notable.values()))) + 1
    # Per layer: activation sums per input token (V, d_mlp) and the token counts (V,); enough
    # for the mean over any token set and over all positions. Memory V x d_mlp per layer.
    sums = {}
    counts_V = np.zeros(vocab, np.int64)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(tokens_ST), batch_size):
            batch_BT = torch.from_numpy(tokens_ST[start:start + batch_size].astype(np.int64))
            _, cache = model.run_with_cache(batch_BT.to(device), names_filter=lambda name: name in hooks)
            flat_N = batch_BT.reshape(-1)
            counts_V += np.bincount(flat_N.numpy(), minlength=vocab)
            for name, layer in hooks.items():
                acts_NH = cache[name].reshape(len(flat_N), -1).double().cpu()
                total_VH = sums.setdefault(layer, torch.zeros(vocab, acts_NH.shape[1], dtype=torch.float64))
                total_VH.index_add_(0, flat_N, acts_NH)
    finally:
        model.train(was_training)
    ranks: list[int | None] = []
    for kind, layer, unit in units:
        chosen = np.array(sorted(notable.get((kind, layer, unit), set())), dtype=np.int64)
        seen = int(counts_V[chosen].sum()) if chosen.size else 0
        if kind != "mlp_neuron" or not seen:
            ranks.append(None)
            continue
        total_VH = sums[layer].numpy()
        selectivity_H = total_VH[chosen].sum(0) / seen - total_VH.sum(0) / counts_V.sum()
        ranks.append(int(np.count_nonzero(selectivity_H > selectivity_H[unit])) + 1)
    return ranks
