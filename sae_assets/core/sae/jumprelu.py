"""JumpReLU SAE trained on L0 through straight-through estimators.

Rajamanoharan, Lieberum, Sonnerat, Conmy, Varma, Kramár and Nanda, "Jumping Ahead: Improving
Reconstruction Fidelity with JumpReLU Sparse Autoencoders" (2024). f = z * H(z - theta) with
z = x W_enc + b_enc and a learned per-feature threshold theta = exp(log_threshold) (positive by
construction); loss = ||x - x_hat||^2 + lambda(t) * sum_i H(z_i - theta_i), the L0 itself.
H has no useful derivative, so theta learns through pseudo-derivatives with a rectangle kernel
K(u) = 1[|u| < 1/2] of bandwidth eps: d/dtheta JumpReLU = -(theta / eps) K((z - theta) / eps)
and d/dtheta H = -(1 / eps) K((z - theta) / eps). z gets H(z - theta) through the activation
and, unlike the paper (where the L0 term reaches theta alone), d/dz H = +(1 / eps) K((z - theta)
/ eps) through the L0 term: H is a function of z - theta. Anthropic's January 2025 update
("Dictionary learning optimization techniques") likewise lets the straight-through gradient
reach every parameter, not just the thresholds. Why: theta is learned in log space, so Adam
moves log theta by at most about lr per step, a factor ~1.5 in theta over 500 steps at lr 1e-3,
whatever the coefficient; on the embedded default (width 512, 488 steps, theta_0 = eps = 0.001)
L0 coefficients 0.01, 0.1 and 1 all ended at L0 201. Through z, the encoder and b_enc lower the
pre-activations of the features the penalty wants closed, and the L0 follows the coefficient
within a few hundred steps (86, 25 and 8 there). theta_0 = eps = 0.1, in the units of the scaled
input (norm sqrt(D), unit decoder rows: pre-activations of order 1, a median of ~0.6 where > 0
there): the paper's 0.001 and 0.001 suit runs of far more steps; SAELens now defaults to 0.01
and 0.05 and Anthropic's update starts theta at 0.1. Decoder rows are kept at unit norm (L0 has
no scale to trade), lambda ramps up over `l0_warmup_fraction`, and resampling resets a revived
feature's threshold to theta_0. Exported to SAELens as 'jumprelu' with `threshold`.
Tests: tests/test_sae_architectures.py.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sae_assets.core.sae.base import LossOutput, SparseAutoencoder, StepInfo, active_counts
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
    """H(z - theta); (1 / eps) K(...) to z and -(1 / eps) K(...) to theta (a function of z - theta)."""

    @staticmethod
    def forward(ctx: Any, pre_BF: Tensor, threshold_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_BF, threshold_F)
        ctx.bandwidth = bandwidth
        return (pre_BF > threshold_F).to(pre_BF.dtype)

    @staticmethod
    def backward(ctx: Any, grad_BF: Tensor) -> tuple[Tensor, Tensor, None]:
        pre_BF, threshold_F = ctx.saved_tensors
        grad_pre_BF = _kernel_BF(pre_BF, threshold_F, ctx.bandwidth) * grad_BF
        return grad_pre_BF, -grad_pre_BF.sum(0), None


class _JumpReLULoss(torch.autograd.Function):
    """The training loss with a hand-written backward: ||x - x_hat||^2 summed over features and
    averaged over the batch, and c * (mean over the batch of the L0), from scaled inputs xs (B, D)
    and log thresholds; the same gradients as `jumprelu` and `step` under autograd, up to float
    rounding (tests/test_sae_architectures.py), in fewer passes over (B, F) tensors:

    - forward: z = addmm, f = z where z > theta (one pass), x_hat = addmm, the L0 count from
      the signs of f (theta > 0, so f > 0 exactly where z > theta);
    - backward: g_f = one product; g_z = g_f where f > 0 (one pass), plus c / (B eps) inside
      the window (the L0 term's pseudo-derivative to z); the pseudo-derivatives of both terms
      share their window, so theta's gradient is one masked column sum:
      d/dtheta_i = -(1/eps) sum_b 1[|z_bi - theta_i| < eps/2] (theta_i g_f_bi + c / B).

    Returns mse, penalty, f (B, F; no gradient) and the column sums of f (F,; no gradient).
    """

    @staticmethod
    def forward(ctx, xs_BD: Tensor, ys_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, W_dec_FD: Tensor,
                b_dec_D: Tensor, log_threshold_F: Tensor, coefficient: float, bandwidth: float):
        B = xs_BD.shape[0]
        threshold_F = log_threshold_F.exp()
        pre_BF = torch.addmm(b_enc_F, xs_BD, W_enc_DF)
        f_BF = torch.where(pre_BF > threshold_F, pre_BF, 0.0)
        diff_BD = torch.addmm(b_dec_D, f_BF, W_dec_FD).sub_(ys_BD)  # x_hat - y (y = x for an SAE)
        count = torch.sign(f_BF).sum(1).sum(dtype=torch.float64)  # exact below 2**24 features
        mse = diff_BD.pow(2).sum() / B
        penalty = (coefficient * count / B).to(mse.dtype)
        f_sum_F = f_BF.sum(0)
        ctx.save_for_backward(xs_BD, pre_BF, f_BF, W_enc_DF, W_dec_FD, diff_BD, threshold_F)
        ctx.coefficient, ctx.bandwidth = coefficient, bandwidth
        ctx.mark_non_differentiable(f_BF, f_sum_F)
        return mse, penalty, f_BF, f_sum_F

    @staticmethod
    def backward(ctx, g_mse, g_penalty, _g_f, _g_f_sum):
        xs_BD, pre_BF, f_BF, W_enc_DF, W_dec_FD, diff_BD, threshold_F = ctx.saved_tensors
        B, eps = xs_BD.shape[0], ctx.bandwidth
        g_xhat_BD = diff_BD * (2 * g_mse / B)
        g_f_BF = g_xhat_BD @ W_dec_FD.t()
        g_pre_BF = torch.ops.aten.threshold_backward(g_f_BF, f_BF, 0)  # H(z - theta): f > 0 there
        window_BF = pre_BF.sub(threshold_F).abs_() < eps / 2
        per_row = g_penalty * ctx.coefficient / B  # d(penalty) / d(H(z_bi - theta_i))
        g_pre_BF += window_BF * (per_row / eps)  # d/dz H = +(1/eps) K
        g_threshold_F = torch.where(window_BF, g_f_BF.mul_(threshold_F).add_(per_row), 0.0).sum(0) * (-1 / eps)
        g_x = g_pre_BF @ W_enc_DF.t() if ctx.needs_input_grad[0] else None
        g_y = -g_xhat_BD if ctx.needs_input_grad[1] else None
        return (g_x, g_y, xs_BD.t() @ g_pre_BF, g_pre_BF.sum(0), f_BF.t() @ g_xhat_BD, g_xhat_BD.sum(0),
                g_threshold_F * threshold_F, None, None)


def jumprelu(pre_BF: Tensor, threshold_F: Tensor, bandwidth: float) -> Tensor:
    """z * H(z - theta) with the paper's pseudo-derivative for theta."""
    return _JumpReLU.apply(pre_BF, threshold_F, bandwidth)


def step(pre_BF: Tensor, threshold_F: Tensor, bandwidth: float) -> Tensor:
    """H(z - theta) (the L0 count per entry) with pseudo-derivatives for z and theta."""
    return _Step.apply(pre_BF, threshold_F, bandwidth)


class JumpReLUSae(SparseAutoencoder):
    """JumpReLU SAE; `l0_coefficient` is lambda, `init_threshold` theta_0, `bandwidth` eps."""

    architecture: ClassVar[str] = "jumprelu"
    saelens_architecture: ClassVar[str] = "jumprelu"
    training_revision: ClassVar[int] = 1  # 1: the L0 term's pseudo-derivative reaches z; theta_0 = eps = 0.1
    init_decoder_norm: ClassVar[float] = 1.0
    elementwise_activation: ClassVar[bool] = True

    def __init__(self, d_in: int, width: int, *, l0_coefficient: float, l0_warmup_fraction: float = 0.0,
                 init_threshold: float = 0.1, bandwidth: float = 0.1, apply_b_dec_to_input: bool = False,
                 d_out: int | None = None) -> None:
        super().__init__(d_in, width, apply_b_dec_to_input=apply_b_dec_to_input, d_out=d_out)
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

    def loss(self, x_BD: Tensor, step_info: StepInfo | None = None, target_BD: Tensor | None = None) -> LossOutput:
        """The loss through `_JumpReLULoss` (no pre-encoder bias, (B, D) inputs), else the generic
        graph (`penalties`)."""
        if self.apply_b_dec_to_input or x_BD.ndim != 2:
            return super().loss(x_BD, step_info, target_BD)
        info = step_info if step_info is not None else StepInfo()
        coefficient = self.l0_coefficient * l1_warmup_scale(info.step, info.total_steps, self.l0_warmup_fraction)
        xs_BD = x_BD * self.input_scale
        ys_BE = self.scaled_target(x_BD, target_BD)
        mse, sparsity, f_BF, f_sum_F = _JumpReLULoss.apply(xs_BD, xs_BD if ys_BE is None else ys_BE, self.W_enc,
                                                           self.b_enc, self.W_dec, self.b_dec, self.log_threshold,
                                                           coefficient, self.bandwidth)
        l0, _ = active_counts(f_BF)
        return LossOutput(mse + sparsity, mse, sparsity, mse.new_zeros(()), l0, f_BF, f_sum_F > 0)

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
