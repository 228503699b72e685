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
untouched. Deterministic given the torch `generator`. Tests: tests/test_sae_core.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_assets.core.sae.base import SparseAutoencoder
from sae_assets.core.sae.init import unit_rows

# Letter key: B batch rows, D input width, F features, R resampled features.

ENCODER_NORM_FACTOR = 0.2
"""New encoder columns get this fraction of the mean live encoder norm (Anthropic)."""
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@torch.no_grad()
def reset_adam_rows(optimizer: torch.optim.Optimizer, param: Tensor, index_R: Tensor, dim: int) -> None:
    """Zero Adam's moment estimates of `param` at `index_R` along `dim` (if it has state yet)."""
    state = optimizer.state.get(param, {})
    for key in _MOMENT_KEYS:
        if key in state and torch.is_tensor(state[key]) and state[key].shape == param.shape:
            state[key].index_fill_(dim, index_R.to(state[key].device), 0.0)


@torch.no_grad()
def loss_weights(sae: SparseAutoencoder, x_BD: Tensor) -> Tensor:
    """(B,) float64 sampling weights: squared per-input reconstruction loss (all 1 if all 0)."""
    xs_BD = x_BD * sae.input_scale
    x_hat_BD = sae.decode_scaled(sae.activate(sae.pre_activations(xs_BD)))
    weights_B = (xs_BD - x_hat_BD).pow(2).sum(-1).double().pow(2).cpu()
    if not torch.isfinite(weights_B).all() or weights_B.sum() <= 0:
        return torch.ones_like(weights_B)
    return weights_B


@torch.no_grad()
def resample_dead_features(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, x_BD: Tensor,
                           dead_F: Tensor, generator: torch.Generator) -> Tensor:
    """Re-initialise the dead features from poorly reconstructed inputs; returns their indices."""
    dead_R = dead_F.nonzero().squeeze(-1).to(sae.W_dec.device)
    R = dead_R.numel()
    if R == 0:
        return dead_R
    weights_B = loss_weights(sae, x_BD)
    replace = R > int((weights_B > 0).sum())
    chosen_R = torch.multinomial(weights_B, R, replacement=replace, generator=generator).to(x_BD.device)
    directions_RD = unit_rows(x_BD[chosen_R] * sae.input_scale - sae.b_dec)
    live_F = ~dead_F.to(sae.W_enc.device)
    live_DF = sae.W_enc[:, live_F] if bool(live_F.any()) else sae.W_enc  # all dead: use every column
    live_norm = live_DF.norm(dim=0).mean()
    sae.W_dec[dead_R] = directions_RD
    sae.W_enc[:, dead_R] = (ENCODER_NORM_FACTOR * live_norm * directions_RD).T
    sae.b_enc[dead_R] = 0.0
    reset_adam_rows(optimizer, sae.W_dec, dead_R, 0)
    reset_adam_rows(optimizer, sae.W_enc, dead_R, 1)
    reset_adam_rows(optimizer, sae.b_enc, dead_R, 0)
    for param, dim in sae.reset_features(dead_R):
        reset_adam_rows(optimizer, param, dead_R, dim)
    return dead_R
