"""Gated SAE: which features fire and how strongly are estimated by two paths sharing W_enc.

Rajamanoharan, Conmy, Smith, Lieberum, Varma, Kramár, Shah and Nanda, "Improving Dictionary
Learning with Gated Sparse Autoencoders" (2024). With x' = x - b_dec, the gate path is
pi_gate = x' W_enc + b_gate and the magnitude path pi_mag = x' (W_enc * exp(r_mag)) + b_mag
(W_mag shares W_enc's directions, rescaled per feature by r_mag);
f = 1[pi_gate > 0] * ReLU(pi_mag). The Heaviside passes no gradient, so the gate learns from
the loss ||x - x_hat||^2 + lambda(t) * sum_i ReLU(pi_gate)_i ||W_dec_i*|| (L1 weighted by decoder
norms, as relu.py, so the decoder needs no norm constraint and starts at norm 0.1) +
||x - (ReLU(pi_gate) W_dec* + b_dec*)||^2, where * marks frozen (detached) copies: the gate's
own reconstruction trains the gate without moving the decoder. The paper's L1 assumes unit
decoder rows; with the norms in the penalty instead, the decoder must be frozen in both places
or in neither (Rajamanoharan, on the paper's LessWrong post: "definitely better than having the
decoder weights frozen in one place but not the other"). Frozen only in the gate's
reconstruction, the penalty's gradient shrinks decoder rows while nothing but the magnitudes
holds them up, and the cheapest way to cut the penalty is a zero decoder row behind an open
gate: on the embedded default (width 512, 488 steps) 492 of 512 rows fell below norm 1e-3, L0
stayed ~200 for L1 coefficients 1 to 10, and four times the steps made it worse (499 rows).
So the norms are frozen in the penalty too: it trains the gate alone. Here `b_enc` is b_gate (so
`pre_activations` gives pi_gate and resampling resets it); `r_mag` and `b_mag` are
parameters of their own, reset to 0 for resampled features. Exported to SAELens as 'gated'
(W_enc, b_gate, r_mag, b_mag, W_dec, b_dec; no b_enc). Tests: tests/test_sae_architectures.py.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sae_assets.core.sae.base import SparseAutoencoder, StepInfo, reconstruction_target
from sae_assets.core.sae.relu import l1_warmup_scale

# Letter key: B batch rows, D input width, F features (W for a slice of them), R resampled features.


class GatedSae(SparseAutoencoder):
    """Gated SAE; `l1_coefficient` is lambda on the decoder-norm-weighted gate L1."""

    architecture: ClassVar[str] = "gated"
    saelens_architecture: ClassVar[str] = "gated"
    training_revision: ClassVar[int] = 1  # 1: decoder norms frozen in the sparsity penalty
    init_decoder_norm: ClassVar[float] = 0.1
    elementwise_activation: ClassVar[bool] = True

    def __init__(self, d_in: int, width: int, *, l1_coefficient: float, l1_warmup_fraction: float = 0.0,
                 apply_b_dec_to_input: bool = True, d_out: int | None = None) -> None:
        super().__init__(d_in, width, apply_b_dec_to_input=apply_b_dec_to_input, d_out=d_out)
        if l1_coefficient < 0 or not 0 <= l1_warmup_fraction < 1:
            raise ValueError(f"need l1_coefficient >= 0 and l1_warmup_fraction in [0, 1), got "
                             f"{l1_coefficient}, {l1_warmup_fraction}")
        self.l1_coefficient, self.l1_warmup_fraction = float(l1_coefficient), float(l1_warmup_fraction)
        self.r_mag = nn.Parameter(torch.zeros(width))
        self.b_mag = nn.Parameter(torch.zeros(width))

    @property
    def b_gate(self) -> Tensor:
        """(F,) the gate bias (stored as b_enc)."""
        return self.b_enc

    def activate(self, pre_BF: Tensor) -> Tensor:
        return self.activate_range(pre_BF, 0, self.width)

    def activate_range(self, pre_BW: Tensor, lo: int, hi: int) -> Tensor:
        """pre is pi_gate of features [lo, hi); pi_mag = (pi_gate - b_gate) * exp(r_mag) + b_mag."""
        mag_BW = (pre_BW - self.b_enc[lo:hi]) * self.r_mag[lo:hi].exp() + self.b_mag[lo:hi]
        return (pre_BW > 0).to(pre_BW.dtype) * mag_BW.relu()

    def penalties(self, x_BD: Tensor, pre_BF: Tensor, f_BF: Tensor, x_hat_BD: Tensor,
                  info: StepInfo) -> tuple[Tensor, Tensor]:
        gate_BF = pre_BF.relu()
        scale = l1_warmup_scale(info.step, info.total_steps, self.l1_warmup_fraction)
        norm_F = self.W_dec.detach().norm(dim=-1)  # frozen, as in the gate's reconstruction
        sparsity = self.l1_coefficient * scale * (gate_BF * norm_F).sum(-1).mean()
        via_gate_BD = gate_BF @ self.W_dec.detach() + self.b_dec.detach()
        return sparsity, (reconstruction_target(x_BD, info) - via_gate_BD).pow(2).sum(-1).mean()

    @torch.no_grad()
    def reset_features(self, index_R: Tensor) -> list[tuple[Tensor, int]]:
        self.r_mag[index_R] = 0.0
        self.b_mag[index_R] = 0.0
        return [(self.r_mag, 0), (self.b_mag, 0)]

    @torch.no_grad()
    def saelens_tensors(self) -> dict[str, Tensor]:
        return {"b_gate": self.b_enc.detach(), "r_mag": self.r_mag.detach(), "b_mag": self.b_mag.detach()}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.b_enc.copy_(tensors["b_gate"])
        self.r_mag.copy_(tensors["r_mag"])
        self.b_mag.copy_(tensors["b_mag"])

    def hyperparameters(self) -> dict[str, Any]:
        return {"l1_coefficient": self.l1_coefficient, "l1_warmup_fraction": self.l1_warmup_fraction,
                "apply_b_dec_to_input": self.apply_b_dec_to_input}
