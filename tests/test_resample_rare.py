"""Resampling dead features from rare-feature vectors of poorly reconstructed inputs (method 'rare').

A hand-built ReLU SAE whose live latents are exactly the common features of the inputs, so the
part of an input it cannot reconstruct is known: the rare feature(s) the input carries. The
'rare' method must point the revived features at those rare directions (Anthropic's method
points them at whole inputs, common features included) and spread them over distinct rare
features; the rest of a resample (encoder norm, biases, Adam state) is Anthropic's.
"""

from __future__ import annotations

import pytest
import torch

from sae_assets.core.sae import ReluSae
from sae_assets.core.sae.resample import rare_feature_directions, resample_dead_features
from sae_assets.core.sae.training import make_optimizer

D, LIVE, DEAD = 16, 4, 2
F = LIVE + DEAD
RARE_A, RARE_B = 10, 11
"""Basis directions of the two rare features; the common features are e_0 .. e_3."""

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _sae() -> ReluSae:
    """Live latents 0..3 encode and decode e_0..e_3 exactly; latents 4, 5 are dead (never fire)."""
    sae = ReluSae(D, F, l1_coefficient=0.1)
    with torch.no_grad():
        sae.W_dec[:LIVE] = torch.eye(D)[:LIVE]
        sae.W_enc[:, :LIVE] = torch.eye(D)[:, :LIVE]
        sae.W_dec[LIVE:] = torch.nn.functional.normalize(torch.ones(DEAD, D), dim=-1)
        sae.b_enc[LIVE:] = -100.0
    return sae


def _inputs(rows: int = 64) -> torch.Tensor:
    """(rows, D): large common coefficients on e_0..e_3; rows 0..7 add rare A, rows 8..15 rare B."""
    generator = torch.Generator().manual_seed(0)
    x = torch.zeros(rows, D)
    x[:, :LIVE] = 2.0 + torch.rand(rows, LIVE, generator=generator)
    x[:8, RARE_A] = 1.0 + 0.5 * torch.rand(8, generator=generator)
    x[8:16, RARE_B] = 1.0 + 0.5 * torch.rand(8, generator=generator)
    return x


def _dead_mask() -> torch.Tensor:
    dead_F = torch.zeros(F, dtype=torch.bool)
    dead_F[LIVE:] = True
    return dead_F


def _cosines_with_rare(W_dec: torch.Tensor) -> torch.Tensor:
    """(DEAD, 2) cosines of the revived decoder rows with rare A and rare B."""
    rows = torch.nn.functional.normalize(W_dec[LIVE:], dim=-1)
    return rows[:, [RARE_A, RARE_B]]


def test_rare_resampling_points_dead_features_at_the_unexplained_rare_features():
    sae, x = _sae(), _inputs()
    optimizer = make_optimizer(sae, 1e-3)
    sae.loss(x).total.backward()
    optimizer.step()  # Adam has state for every row now
    with torch.no_grad():  # undo the step: the test needs the hand-set weights
        fresh = _sae()
        for name, param in sae.named_parameters():
            param.copy_(getattr(fresh, name))
    revived = resample_dead_features(sae, optimizer, x, _dead_mask(), torch.Generator().manual_seed(0),
                                     method="rare")
    assert sorted(revived.tolist()) == [LIVE, LIVE + 1]
    cos = _cosines_with_rare(sae.W_dec)
    # Each revived row is one rare feature (not an input, whose common part dominates) ...
    assert (cos.max(dim=1).values > 0.99).all(), cos
    # ... and the two revived rows found different rare features.
    assert set(cos.argmax(dim=1).tolist()) == {0, 1}, cos
    live_norm = torch.eye(D)[:, :LIVE].norm(dim=0).mean()
    assert torch.allclose(sae.W_enc[:, LIVE:].norm(dim=0), torch.full((DEAD,), 0.2 * float(live_norm)))
    assert (sae.b_enc[LIVE:] == 0).all()
    assert torch.equal(sae.W_dec[:LIVE], torch.eye(D)[:LIVE]) and (sae.b_enc[:LIVE] == 0).all()
    for param, dim in ((sae.W_dec, 0), (sae.W_enc, 1)):
        for key in ("exp_avg", "exp_avg_sq"):
            state = optimizer.state[param][key]
            assert (state.index_select(dim, revived) == 0).all()
            assert (state.index_select(dim, torch.arange(LIVE)) != 0).any()
    assert (sae.encode(x[:16])[:, LIVE:] > 0).any(0).all()  # the revived features fire on rare inputs


def test_anthropic_resampling_points_at_whole_inputs_where_rare_points_at_residuals():
    """The contrast that makes the first test meaningful: same SAE, same inputs, plain method."""
    sae, x = _sae(), _inputs()
    resample_dead_features(sae, make_optimizer(sae, 1e-3), x, _dead_mask(), torch.Generator().manual_seed(0),
                           method="anthropic")
    assert (_cosines_with_rare(sae.W_dec).max(dim=1).values < 0.5).all()


def test_rare_directions_are_deterministic_and_handle_more_dead_features_than_inputs():
    sae, x = _sae(), _inputs(rows=16)
    first = rare_feature_directions(sae, x, 3, torch.Generator().manual_seed(5))
    again = rare_feature_directions(sae, x, 3, torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    many = rare_feature_directions(sae, x, 40, torch.Generator().manual_seed(5))  # 40 > 16 inputs
    assert many.shape == (40, D) and torch.allclose(many.norm(dim=-1), torch.ones(40))


def test_unknown_resample_method_is_refused():
    sae = _sae()
    with pytest.raises(ValueError, match="unknown resample method 'worst'.*anthropic, rare"):
        resample_dead_features(sae, make_optimizer(sae, 1e-3), _inputs(), _dead_mask(),
                               torch.Generator().manual_seed(0), method="worst")
