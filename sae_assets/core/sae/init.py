"""Decoder initialisations, conventional and data-informed ("Informed initialization of sparse dictionaries"), each deterministic.

Every initialiser has the signature `(sample_ND, F, generator) -> W_dec_FD` and returns F
unit-norm decoder rows; the architecture then scales them (`SparseAutoencoder.initialize`:
0.1 for the Anthropic ReLU recipe, 1 for TopK) and sets W_enc = W_dec^T. All randomness comes
from the torch `generator` (a CPU generator), so a seed fixes the result. Methods:
'anthropic' (random directions), 'orthogonal' (QR of a Gaussian matrix: orthonormal rows when
F <= D, orthonormal columns then unit rows when F > D), 'xavier' (Glorot-uniform entries),
'data' (normalised random input rows), 'svd' (top right-singular vectors of the sample, sign
chosen so the sample projects positively, extended with data rows when F > rank),
'kmeans_rare' (rare-feature collection by centroid subtraction: mini-batch k-means with one
cluster per rare row, one random member per cluster minus its centroid, normalised) and
'outlier_rare' (the samples with the highest local outlier factor, normalised); the two rare
methods fill the other `1 - rare_fraction` of rows with data rows, as in the seed. Tests:
tests/test_sae_core.py; comparison on toy data: bench/toy_init.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# Letter key: N sample rows, D input width, F dictionary rows, C clusters, K neighbours.

DEFAULT_RARE_FRACTION = 0.05
"""Share of rows the rare-feature methods collect (the seed's best centroid setting)."""
LOF_NEIGHBOURS = 250
"""n_neighbors of the local outlier factor, as in the seed."""
MAX_OUTLIER_ROWS = 4096
"""The outlier search keeps an (N, N) distance matrix; larger samples are subsampled."""


def unit_rows(W_FD: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return W_FD / W_FD.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _usable(sample_ND: Tensor) -> Tensor:
    """The sample as float32 on the CPU, without all-zero rows (they carry no direction)."""
    sample_ND = sample_ND.detach().float().cpu()
    norms_N = sample_ND.norm(dim=-1)
    kept = sample_ND[norms_N > 1e-6 * norms_N.max().clamp_min(1e-30)]
    if kept.shape[0] == 0:
        raise ValueError("the initialisation sample has no non-zero row")
    return kept


def _pick(n: int, count: int, generator: torch.Generator) -> Tensor:
    """`count` row indices in [0, n): without replacement when possible."""
    if count <= n:
        return torch.randperm(n, generator=generator)[:count]
    return torch.randint(n, (count,), generator=generator)


def anthropic_init(sample_ND: Tensor, F: int, generator: torch.Generator) -> Tensor:
    """Uniformly random directions (normalised Gaussian rows)."""
    return unit_rows(torch.randn(F, sample_ND.shape[1], generator=generator))


def orthogonal_init(sample_ND: Tensor, F: int, generator: torch.Generator) -> Tensor:
    """Orthogonal initialisation (Hu et al. 2020) of the (F, D) decoder, rows then normalised."""
    D = sample_ND.shape[1]
    Q, R = torch.linalg.qr(torch.randn(max(F, D), min(F, D), generator=generator))
    Q = Q * torch.sign(torch.diagonal(R)).masked_fill(torch.diagonal(R) == 0, 1.0)
    return unit_rows(Q if F >= D else Q.T)


def xavier_init(sample_ND: Tensor, F: int, generator: torch.Generator) -> Tensor:
    """Glorot-uniform entries in +-sqrt(6 / (F + D)), rows normalised."""
    D = sample_ND.shape[1]
    bound = math.sqrt(6.0 / (F + D))
    return unit_rows((torch.rand(F, D, generator=generator) * 2 - 1) * bound)


def data_init(sample_ND: Tensor, F: int, generator: torch.Generator) -> Tensor:
    """Normalised random rows of the sample."""
    sample_ND = _usable(sample_ND)
    return unit_rows(sample_ND[_pick(sample_ND.shape[0], F, generator)])


def svd_init(sample_ND: Tensor, F: int, generator: torch.Generator) -> Tensor:
    """Top right-singular vectors of the sample, extended with data rows when F > rank."""
    sample_ND = _usable(sample_ND)
    _, S_R, Vh_RD = torch.linalg.svd(sample_ND, full_matrices=False)
    rank = int((S_R > S_R[0] * 1e-6).sum())
    r = min(F, rank)
    V_rD = Vh_RD[:r]
    signs_r = torch.sign((sample_ND @ V_rD.T).sum(0))
    V_rD = V_rD * signs_r.masked_fill(signs_r == 0, 1.0)[:, None]
    if r == F:
        return unit_rows(V_rD)
    return torch.cat([unit_rows(V_rD), data_init(sample_ND, F - r, generator)])


def minibatch_kmeans(sample_ND: Tensor, C: int, generator: torch.Generator, *, iterations: int = 100,
                     batch_size: int = 1024) -> Tensor:
    """(C, D) centroids by Sculley's mini-batch k-means (per-centre learning rate 1 / count)."""
    N = sample_ND.shape[0]
    centroids_CD = sample_ND[_pick(N, C, generator)].clone()
    counts_C = torch.zeros(C)
    for _ in range(iterations):
        batch_bD = sample_ND[torch.randint(N, (min(batch_size, N),), generator=generator)]
        nearest_b = torch.cdist(batch_bD, centroids_CD).argmin(-1)
        counts_C += torch.bincount(nearest_b, minlength=C)
        sums_CD = torch.zeros_like(centroids_CD).index_add_(0, nearest_b, batch_bD)
        hits_C = torch.bincount(nearest_b, minlength=C).float()
        # Sculley's sequential update, taken per batch: c <- c + (sum_x - n c) / count.
        step_C = torch.where(counts_C > 0, 1.0 / counts_C.clamp_min(1), 0.0)
        centroids_CD += step_C[:, None] * (sums_CD - hits_C[:, None] * centroids_CD)
    return centroids_CD


def kmeans_rare_rows(sample_ND: Tensor, C: int, generator: torch.Generator) -> Tensor:
    """(C, D) rare-feature candidates: per cluster, a random member minus its centroid."""
    N = sample_ND.shape[0]
    centroids_CD = minibatch_kmeans(sample_ND, C, generator)
    assigned_N = torch.cdist(sample_ND, centroids_CD).argmin(-1)
    order_N = torch.randperm(N, generator=generator)
    first_C = torch.full((C,), N).scatter_reduce(0, assigned_N[order_N], torch.arange(N), "amin")
    chosen_C = torch.where(first_C < N, order_N[first_C.clamp_max(N - 1)], -1)
    empty = chosen_C < 0
    chosen_C[empty] = torch.randint(N, (int(empty.sum()),), generator=generator)
    return sample_ND[chosen_C] - centroids_CD[assigned_N[chosen_C]]


def kmeans_rare_init(sample_ND: Tensor, F: int, generator: torch.Generator, *,
                     rare_fraction: float = DEFAULT_RARE_FRACTION) -> Tensor:
    """Data rows, of which `rare_fraction` are replaced by centroid-subtracted residuals."""
    sample_ND = _usable(sample_ND)
    n_rare = min(F, max(1, round(rare_fraction * F)))
    rare_CD = unit_rows(kmeans_rare_rows(sample_ND, n_rare, generator))
    return torch.cat([rare_CD, data_init(sample_ND, F - n_rare, generator)])


def local_outlier_factor(sample_ND: Tensor, K: int = LOF_NEIGHBOURS) -> Tensor:
    """(N,) LOF scores (Breunig et al. 2000); above 1 = sparser than the neighbours."""
    N = sample_ND.shape[0]
    K = max(1, min(K, N - 1))
    dist_NN = torch.cdist(sample_ND, sample_ND)
    dist_NN.fill_diagonal_(float("inf"))
    knn_dist_NK, knn_idx_NK = dist_NN.topk(K, dim=-1, largest=False)
    k_distance_N = knn_dist_NK[:, -1]
    reach_NK = torch.maximum(knn_dist_NK, k_distance_N[knn_idx_NK])
    lrd_N = 1.0 / reach_NK.mean(-1).clamp_min(1e-12)
    return lrd_N[knn_idx_NK].mean(-1) / lrd_N


def outlier_rare_init(sample_ND: Tensor, F: int, generator: torch.Generator, *,
                      rare_fraction: float = DEFAULT_RARE_FRACTION, n_neighbours: int = LOF_NEIGHBOURS) -> Tensor:
    """Data rows, of which `rare_fraction` are the sample's strongest local outliers."""
    sample_ND = _usable(sample_ND)
    if sample_ND.shape[0] > MAX_OUTLIER_ROWS:
        sample_ND = sample_ND[_pick(sample_ND.shape[0], MAX_OUTLIER_ROWS, generator)]
    n_rare = min(F, max(1, round(rare_fraction * F)), sample_ND.shape[0])
    outliers = local_outlier_factor(sample_ND, n_neighbours).topk(n_rare).indices
    return torch.cat([unit_rows(sample_ND[outliers]), data_init(sample_ND, F - n_rare, generator)])


INITIALIZERS: dict[str, Callable[[Tensor, int, torch.Generator], Tensor]] = {
    "anthropic": anthropic_init,
    "orthogonal": orthogonal_init,
    "xavier": xavier_init,
    "data": data_init,
    "svd": svd_init,
    "kmeans_rare": kmeans_rare_init,
    "outlier_rare": outlier_rare_init,
}


def init_decoder(method: str, sample_ND: Tensor, F: int, generator: torch.Generator) -> Tensor:
    """(F, D) unit-norm decoder rows by the named method (SaeConfig.init)."""
    if method not in INITIALIZERS:
        raise ValueError(f"unknown SAE init {method!r}; allowed: {', '.join(INITIALIZERS)}")
    if sample_ND.ndim != 2 or F < 1:
        raise ValueError(f"need a (N, D) sample and F >= 1, got {tuple(sample_ND.shape)} and {F}")
    return INITIALIZERS[method](sample_ND, F, generator)
