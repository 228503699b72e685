"""JumpReLU SAE trained on L0 through straight-through estimators.

Rajamanoharan, Lieberum, Sonnerat, Conmy, Varma, Kramár and Nanda, "Jumping Ahead: Improving
Reconstruction Fidelity with JumpReLU Sparse Autoencoders" (2024). f = z * H(z - theta) with
z = x W_enc + b_enc and a learned per-feature threshold theta = exp(log_threshold) (positive by
construction); loss = ||x - x_hat||^2 + lambda(t) * sum_i H(z_i - theta_i), the L0 itself.
H has no useful derivative, so theta learns through pseudo-derivatives with a rectangle kernel
K(u) = 1[|u| < 1/2] of bandwidth eps: d/dtheta JumpReLU = -(theta / eps) K((z - theta) / eps)
and d/dtheta H = -(1 / eps) K((z - theta) / eps); z gets the plain derivative (H(z - theta)
through the activation, none through the L0 term). The paper's defaults for inputs scaled to
norm about sqrt(D) are theta_0 = 0.001 and eps = 0.001. Decoder rows are kept at unit norm
(L0 has no scale to trade), lambda ramps up over `l0_warmup_fraction`, and resampling resets
a revived feature's threshold to theta_0. Exported to SAELens as 'jumprelu' with `threshold`.
Tests: tests/test_sae_architectures.py.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sae_assets.core.sae.base import SparseAutoencoder, StepInfo
from sae_assets.core.sae.relu import l1_warmup_scale
from sae_assets.core.sae.topk import normalize_rows, remove_parallel_gradient

# Letter key: B batch rows, D input width, F features (or a slice of them), R resampled features.


def _kernel_BF(pre_BF: Tensor, threshold_F: Tensor, bandwidth: float) -> Tensor:
    """K((z - theta) / eps) / eps: the rectangle kernel that stands in for the delta at theta."""
    return ((pre_BF - threshold_F).abs() < bandwidth / 2).to(pre_BF.dtype) / bandwidth


class _JumpReLU(torch.autograd.Function):
    """z * H(z - theta); gradient H(z - theta) to z, -(theta / eps) K(...) to theta."""

    @staticmethod
    def forward(ctx: Any, pre_BF: Tensor, threshold_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_BF, threshold_F)
        ctx.bandwidth = bandwidth
        return pre_BF * (pre_BF > threshold_F)

    @staticmethod
    def backward(ctx: Any, grad_BF: Tensor) -> tuple[Tensor, Tensor, None]:
        pre_BF, threshold_F = ctx.saved_tensors
        grad_pre_BF = grad_BF * (pre_BF > threshold_F)
        grad_threshold_F = (-threshold_F * _kernel_BF(pre_BF, threshold_F, ctx.bandwidth) * grad_BF).sum(0)
        return grad_pre_BF, grad_threshold_F, None


class _Step(torch.autograd.Function):
    """H(z - theta); no gradient to z, -(1 / eps) K(...) to theta."""

    @staticmethod
    def forward(ctx: Any, pre_BF: Tensor, threshold_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_BF, threshold_F)
        ctx.bandwidth = bandwidth
        return (pre_BF > threshold_F).to(pre_BF.dtype)

    @staticmethod
    def backward(ctx: Any, grad_BF: Tensor) -> tuple[None, Tensor, None]:
        pre_BF, threshold_F = ctx.saved_tensors
        return None, (-_kernel_BF(pre_BF, threshold_F, ctx.bandwidth) * grad_BF).sum(0), None


def jumprelu(pre_BF: Tensor, threshold_F: Tensor, bandwidth: float) -> Tensor:
    """z * H(z - theta) with the paper's pseudo-derivative for theta."""
    return _JumpReLU.apply(pre_BF, threshold_F, bandwidth)


def step(pre_BF: Tensor, threshold_F: Tensor, bandwidth: float) -> Tensor:
    """H(z - theta) (the L0 count per entry) with the paper's pseudo-derivative for theta."""
    return _Step.apply(pre_BF, threshold_F, bandwidth)


class JumpReLUSae(SparseAutoencoder):
    """JumpReLU SAE; `l0_coefficient` is lambda, `init_threshold` theta_0, `bandwidth` eps."""

    architecture: ClassVar[str] = "jumprelu"
    saelens_architecture: ClassVar[str] = "jumprelu"
    init_decoder_norm: ClassVar[float] = 1.0
    elementwise_activation: ClassVar[bool] = True

    def __init__(self, d_in: int, width: int, *, l0_coefficient: float, l0_warmup_fraction: float = 0.0,
                 init_threshold: float = 0.001, bandwidth: float = 0.001, apply_b_dec_to_input: bool = False) -> None:
        super().__init__(d_in, width, apply_b_dec_to_input=apply_b_dec_to_input)
        if l0_coefficient < 0 or not 0 <= l0_warmup_fraction < 1 or not init_threshold > 0 or not bandwidth > 0:
            raise ValueError(f"need l0_coefficient >= 0, l0_warmup_fraction in [0, 1), init_threshold > 0 and "
                             f"bandwidth > 0; got {l0_coefficient}, {l0_warmup_fraction}, {init_threshold}, "
                             f"{bandwidth}")
        self.l0_coefficient, self.l0_warmup_fraction = float(l0_coefficient), float(l0_warmup_fraction)
        self.init_threshold, self.bandwidth = float(init_threshold), float(bandwidth)
        self.log_threshold = nn.Parameter(torch.full((width,), math.log(self.init_threshold)))

    @property
    def threshold(self) -> Tensor:
        """(F,) theta = exp(log_threshold), attached to the graph."""
        return self.log_threshold.exp()

    def activate(self, pre_BF: Tensor) -> Tensor:
        return jumprelu(pre_BF, self.threshold, self.bandwidth)

    def activate_range(self, pre_BW: Tensor, lo: int, hi: int) -> Tensor:
        return jumprelu(pre_BW, self.log_threshold[lo:hi].exp(), self.bandwidth)

    def l0(self, pre_BF: Tensor) -> Tensor:
        """Scalar mean over the batch of sum_i H(z_i - theta_i), differentiable in theta."""
        return step(pre_BF, self.threshold, self.bandwidth).sum(-1).mean()

    def penalties(self, x_BD: Tensor, pre_BF: Tensor, f_BF: Tensor, x_hat_BD: Tensor,
                  info: StepInfo) -> tuple[Tensor, Tensor]:
        scale = l1_warmup_scale(info.step, info.total_steps, self.l0_warmup_fraction)
        return self.l0_coefficient * scale * self.l0(pre_BF), x_hat_BD.new_zeros(())

    def constrain_gradients(self) -> None:
        remove_parallel_gradient(self.W_dec)

    def constrain_weights(self) -> None:
        normalize_rows(self.W_dec)

    @torch.no_grad()
    def reset_features(self, index_R: Tensor) -> list[tuple[Tensor, int]]:
        self.log_threshold[index_R] = math.log(self.init_threshold)
        return [(self.log_threshold, 0)]

    @torch.no_grad()
    def saelens_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold.detach()}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        threshold_F = tensors["threshold"].to(self.log_threshold).clamp_min(torch.finfo(torch.float32).tiny)
        self.log_threshold.copy_(threshold_F.log())

    def hyperparameters(self) -> dict[str, Any]:
        return {"l0_coefficient": self.l0_coefficient, "l0_warmup_fraction": self.l0_warmup_fraction,
                "init_threshold": self.init_threshold, "bandwidth": self.bandwidth,
                "apply_b_dec_to_input": self.apply_b_dec_to_input}
