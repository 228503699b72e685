"""Per-feature panels computed from the dictionary's weights: logit effects and their histogram,
nearest features by decoder cosine, and neuron alignment.

`site_json` calls these once per feature range; `site_data.feature_documents` turns them into
the document's `logits`, `logit_histogram`, `neighbours` and `neuron_alignment` entries (and
`neuronpedia_feature` into Neuronpedia's `logits_hist_*`, `topkCosSim*` and `neuron_alignment_*`
fields). Each is exact, and tests/test_site_panels.py checks each against a brute force on a
tiny dictionary.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

# Letter key: W features in the range, F features in the dictionary, D model width, V vocabulary,
# N logit effects kept, B histogram bins, K neighbours or aligned neurons kept.

LOGIT_BINS = 40


class LogitEffects(NamedTuple):
    """The decoder direction through the unembedding, per feature of a range."""

    top_ids: np.ndarray  # (W, N) the most promoted tokens, highest first
    top_values: np.ndarray  # (W, N)
    bottom_ids: np.ndarray  # (W, N) the most suppressed tokens, lowest first
    bottom_values: np.ndarray  # (W, N)
    hist_counts: np.ndarray  # (W, B) tokens of the vocabulary per bin; each row sums to V
    hist_edges: np.ndarray  # (W, B + 1) equal-width bins from the row's min to its max


def logit_effects(W_dec_WD: torch.Tensor, W_U_DV: torch.Tensor, n: int, bins: int = LOGIT_BINS) -> LogitEffects:
    """Decoder rows (W, D) through the unembedding (D, V): top/bottom `n` tokens and a `bins`-bin histogram.

    The full (W, V) product exists only for one feature range at a time.
    """
    effects_WV = (W_dec_WD.float() @ W_U_DV.float().to(W_dec_WD.device)).cpu()
    n = min(n, effects_WV.shape[1])
    top = effects_WV.topk(n, dim=1)
    bottom = effects_WV.topk(n, dim=1, largest=False)
    counts_WB, edges_WB1 = row_histograms(effects_WV, bins)
    return LogitEffects(top.indices.numpy(), top.values.numpy(), bottom.indices.numpy(), bottom.values.numpy(),
                        counts_WB.numpy(), edges_WB1.numpy())


def row_histograms(x_WV: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts (W, B) int64, edges (W, B + 1)): each row's values in `bins` equal-width bins over
    [row min, row max]; the last bin is closed, so every value is counted once. A constant row
    gets edges min..min + 1."""
    low_W1, high_W1 = x_WV.min(dim=1, keepdim=True).values, x_WV.max(dim=1, keepdim=True).values
    width_W1 = torch.where(high_W1 > low_W1, high_W1 - low_W1, torch.ones_like(low_W1))
    edges_WB1 = low_W1 + width_W1 * torch.linspace(0, 1, bins + 1, dtype=x_WV.dtype)
    bin_WV = ((x_WV - low_W1) / width_W1 * bins).floor().long().clamp_(0, bins - 1)
    counts_WB = torch.zeros(x_WV.shape[0], bins, dtype=torch.int64).scatter_add_(1, bin_WV, torch.ones_like(bin_WV))
    return counts_WB, edges_WB1


def _unit_rows(x_ND: torch.Tensor) -> torch.Tensor:
    return x_ND.float() / x_ND.float().norm(dim=1, keepdim=True).clamp_min(1e-12)  # a zero row stays zero


def nearest_features(W_dec_FD: torch.Tensor, lo: int, hi: int, k: int = 10,
                     block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(ids (W, K), cosines (W, K)): for features [lo, hi), the `k` other features of the whole
    dictionary whose decoder rows have the highest cosine similarity, highest first.

    Exact: the range's unit rows meet every feature's, `block` features at a time, so memory is
    W x block; over all ranges the cost is F^2 x D, that of exact neighbours. A feature is never
    its own neighbour.
    """
    F = W_dec_FD.shape[0]
    k = min(k, F - 1)
    mine_WD = _unit_rows(W_dec_FD[lo:hi])
    W = mine_WD.shape[0]
    best_vals = torch.full((W, 0), -torch.inf, device=mine_WD.device)
    best_ids = torch.zeros((W, 0), dtype=torch.int64, device=mine_WD.device)
    rows = torch.arange(W, device=mine_WD.device)
    for start in range(0, F, block):
        stop = min(start + block, F)
        cos_WB = mine_WD @ _unit_rows(W_dec_FD[start:stop]).T
        self_cols = rows + lo - start
        inside = (self_cols >= 0) & (self_cols < stop - start)
        cos_WB[rows[inside], self_cols[inside]] = -torch.inf
        ids_WB = torch.arange(start, stop, device=mine_WD.device).expand(W, -1)
        vals, pick = torch.cat([best_vals, cos_WB], 1).topk(min(k, best_vals.shape[1] + stop - start), dim=1)
        best_ids = torch.cat([best_ids, ids_WB], 1).gather(1, pick)
        best_vals = vals
    return best_ids.cpu().numpy(), best_vals.cpu().numpy()


def neuron_alignment(W_dec_WD: torch.Tensor, k: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices (W, K), values (W, K), L1 fractions (W, K)): the `k` model dimensions each decoder
    row weighs most by |weight|, their signed weights, and the share of the row's L1 norm each holds."""
    w_WD = W_dec_WD.float().cpu()
    k = min(k, w_WD.shape[1])
    top = w_WD.abs().topk(k, dim=1)
    l1_W1 = w_WD.abs().sum(dim=1, keepdim=True).clamp_min(1e-12)
    return top.indices.numpy(), w_WD.gather(1, top.indices).numpy(), (top.values / l1_W1).numpy()
