"""Anthropic's resampling of dead features ("Towards Monosemanticity", 2023), for any SAE here.

`resample_dead_features(sae, optimizer, x_BD, dead_F, generator)` scores the inputs by their
reconstruction loss ||x - x_hat||^2 (in the SAE's scaled space), draws one input per dead
feature with probability proportional to loss^2 (without replacement while there are enough
inputs with non-zero loss), and for each dead feature i sets decoder row i to the normalised
input (x - b_dec, the part the decoder must explain), encoder column i to that direction
times 0.2 x the mean encoder norm of the live features, b_enc[i] to 0, and the
architecture's own per-feature parameters to their initial values (`reset_features`: a
JumpReLU threshold, a Gated SAE's r_mag and b_mag). Adam's moment
estimates (exp_avg, exp_avg_sq, and max_exp_avg_sq under AMSGrad) of exactly those rows and
columns are zeroed (`reset_adam_rows`); live features and their optimizer state are left
untouched. Deterministic given the torch `generator`.

`method="rare"` keeps all of that but chooses the directions differently, after the comments
on "Informed initialization of sparse dictionaries": re-initialise dead features from the
inputs the SAE currently reconstructs worst, but from rare-feature vectors extracted from them
rather than the raw inputs (`rare_feature_directions`). `method="reinit"` is the plain
re-initialisation that "My best guess at the important tricks for training 1L SAEs" found much
worse than Anthropic's: random directions (`random_directions`), all else alike, so the methods
differ only in where a revived feature points. A transcoder (`target_BD` given: the rows its
output hook holds) is scored by its error on the target; 'anthropic' gives a revived feature
the chosen row's target direction (y - b_dec) as decoder row and its input direction as encoder
column, 'reinit' independent random directions in the two spaces; 'rare' is for SAEs only
(the config refuses it for transcoders). Tests: tests/test_sae_core.py,
tests/test_resample_rare.py, tests/test_training_tricks.py; toy comparison: bench/informed_init.py.
"""

from __future__ import annotations

import typing

import torch
from torch import Tensor

from sae_assets.core.config import ResampleMethod
from sae_assets.core.sae.base import SparseAutoencoder
from sae_assets.core.sae.init import minibatch_kmeans, unit_rows

# Letter key: B batch rows, D input width, F features, R resampled features, M poorly reconstructed inputs.

RESAMPLE_METHODS: tuple[str, ...] = typing.get_args(ResampleMethod)  # as sae.resample_method allows

ENCODER_NORM_FACTOR = 0.2
"""New encoder columns get this fraction of the mean live encoder norm (Anthropic)."""
POOR_INPUTS_PER_FEATURE = 4
"""method='rare' looks at the R x this worst-reconstructed inputs of the batch (all, if fewer)."""
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@torch.no_grad()
def reset_adam_rows(optimizer: torch.optim.Optimizer, param: Tensor, index_R: Tensor, dim: int) -> None:
    """Zero Adam's moment estimates of `param` at `index_R` along `dim` (if it has state yet)."""
    state = optimizer.state.get(param, {})
    for key in _MOMENT_KEYS:
        if key in state and torch.is_tensor(state[key]) and state[key].shape == param.shape:
            state[key].index_fill_(dim, index_R.to(state[key].device), 0.0)


@torch.no_grad()
def _scaled_residuals(sae: SparseAutoencoder, x_BD: Tensor, target_BE: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(B, E) reconstruction targets in the SAE's scaled units (its inputs, or a transcoder's
    targets) and (B, E) their residuals y - y_hat."""
    xs_BD = x_BD * sae.input_scale
    ys_BE = xs_BD if target_BE is None else target_BE * sae.target_scale
    return ys_BE, ys_BE - sae.decode_scaled(sae.activate(sae.pre_activations(xs_BD)))


@torch.no_grad()
def loss_weights(sae: SparseAutoencoder, x_BD: Tensor, target_BE: Tensor | None = None) -> Tensor:
    """(B,) float64 sampling weights: squared per-input reconstruction loss (all 1 if all 0)."""
    weights_B = _scaled_residuals(sae, x_BD, target_BE)[1].pow(2).sum(-1).double().pow(2).cpu()
    if not torch.isfinite(weights_B).all() or weights_B.sum() <= 0:
        return torch.ones_like(weights_B)
    return weights_B


@torch.no_grad()
def anthropic_directions(sae: SparseAutoencoder, x_BD: Tensor, R: int, generator: torch.Generator,
                         target_BE: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(R, E) unit decoder directions y - b_dec of rows drawn with probability proportional to
    loss^2 (y = x for an SAE), and (R, D) the encoder directions: the same for an SAE, a
    transcoder's the drawn rows' unit inputs."""
    weights_B = loss_weights(sae, x_BD, target_BE)
    replace = R > int((weights_B > 0).sum())
    chosen_R = torch.multinomial(weights_B, R, replacement=replace, generator=generator).to(x_BD.device)
    if target_BE is None:
        directions_RD = unit_rows(x_BD[chosen_R] * sae.input_scale - sae.b_dec)
        return directions_RD, directions_RD
    return unit_rows(target_BE[chosen_R] * sae.target_scale - sae.b_dec), unit_rows(x_BD[chosen_R] * sae.input_scale)


def random_directions(R: int, D: int, generator: torch.Generator) -> Tensor:
    """(R, D) unit directions drawn uniformly on the sphere (normalised isotropic Gaussians), on the CPU."""
    return unit_rows(torch.randn(R, D, generator=generator, dtype=torch.float32))


@torch.no_grad()
def rare_feature_directions(sae: SparseAutoencoder, x_BD: Tensor, R: int, generator: torch.Generator, *,
                            poor_inputs_per_feature: int = POOR_INPUTS_PER_FEATURE) -> Tensor:
    """(R, D) unit rare-feature vectors from the worst-reconstructed inputs of the batch.

    1. Score each input by its reconstruction loss ||x - x_hat||^2 (scaled units) and keep the
       M = min(B, R x `poor_inputs_per_feature`) worst: the top-sorted poorly reconstructed
       inputs of the write-up's comments (no random draw).
    2. Extract a rare-feature vector from each: the residual x - x_hat. The write-up collects
       rare features by subtracting an estimate of the common features (a batch average or a
       k-means centroid) from an input; at a resample the live dictionary is a better estimate
       of the common features, so its reconstruction x_hat is what is subtracted. An input that
       carries a feature no live latent explains keeps about that feature's direction.
    3. So that many dead features do not all copy the same feature, cluster the M unit
       residuals into R groups (mini-batch k-means, as the write-up's centroid method) and take
       each group's mean direction; an empty group takes the worst residual not yet used.
    """
    xs_BD, residual_BD = _scaled_residuals(sae, x_BD)
    loss_B = residual_BD.pow(2).sum(-1)
    M = min(x_BD.shape[0], R * max(1, poor_inputs_per_feature))
    worst_M = loss_B.topk(M).indices  # in decreasing loss
    rare_MD = unit_rows(residual_BD[worst_M].float().cpu())
    if M <= R:  # too few inputs to cluster: one residual per feature, cycling through the worst
        return unit_rows(rare_MD[torch.arange(R) % M]).to(x_BD.device)
    centroids_RD = minibatch_kmeans(rare_MD, R, generator, iterations=20, batch_size=M)
    assigned_M = torch.cdist(rare_MD, centroids_RD).argmin(-1)
    sums_RD = torch.zeros(R, rare_MD.shape[1]).index_add_(0, assigned_M, rare_MD)
    empty_R = torch.bincount(assigned_M, minlength=R) == 0
    # Empty groups take the worst residuals in turn (rare_MD is ordered by decreasing loss).
    sums_RD[empty_R] = rare_MD[torch.arange(int(empty_R.sum())) % M]
    return unit_rows(sums_RD).to(x_BD.device)


@torch.no_grad()
def resample_dead_features(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, x_BD: Tensor,
                           dead_F: Tensor, generator: torch.Generator, *,
                           method: ResampleMethod = "anthropic", target_BE: Tensor | None = None) -> Tensor:
    """Re-initialise the dead features from poorly reconstructed inputs; returns their indices.

    method 'anthropic': decoder rows = normalised x - b_dec of inputs drawn by loss^2;
    'rare': rare-feature vectors of the worst-reconstructed inputs (`rare_feature_directions`);
    'reinit': random directions (`random_directions`; the inputs are not looked at).
    Encoder columns, b_enc, per-feature parameters and Adam state are reset alike for all three.
    """
    if method not in RESAMPLE_METHODS:
        raise ValueError(f"unknown resample method {method!r}; allowed: {', '.join(RESAMPLE_METHODS)}")
    dead_R = dead_F.nonzero().squeeze(-1).to(sae.W_dec.device)
    R = dead_R.numel()
    if R == 0:
        return dead_R
    if sae.transcoder != (target_BE is not None):
        raise ValueError("resampling a transcoder needs its targets (target_BE), and an SAE takes none")
    if method == "rare":
        if sae.transcoder:
            raise ValueError("method 'rare' draws rare-feature vectors of the input: not for a transcoder")
        directions_RD = encoder_RD = rare_feature_directions(sae, x_BD, R, generator)
    elif method == "reinit":
        directions_RD = random_directions(R, sae.d_out, generator).to(sae.W_dec.device, sae.W_dec.dtype)
        encoder_RD = (random_directions(R, sae.d_in, generator).to(directions_RD) if sae.transcoder
                      else directions_RD)
    else:
        directions_RD, encoder_RD = anthropic_directions(sae, x_BD, R, generator, target_BE)
    live_F = ~dead_F.to(sae.W_enc.device)
    live_DF = sae.W_enc[:, live_F] if bool(live_F.any()) else sae.W_enc  # all dead: use every column
    live_norm = live_DF.norm(dim=0).mean()
    sae.W_dec[dead_R] = directions_RD
    sae.W_enc[:, dead_R] = (ENCODER_NORM_FACTOR * live_norm * encoder_RD).T
    sae.b_enc[dead_R] = 0.0
    reset_adam_rows(optimizer, sae.W_dec, dead_R, 0)
    reset_adam_rows(optimizer, sae.W_enc, dead_R, 1)
    reset_adam_rows(optimizer, sae.b_enc, dead_R, 0)
    for param, dim in sae.reset_features(dead_R):
        reset_adam_rows(optimizer, param, dead_R, dim)
    return dead_R
