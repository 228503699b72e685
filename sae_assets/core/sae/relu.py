"""ReLU SAE with Anthropic's April 2024 recipe: L1 weighted by decoder norms, no norm constraint.

f = ReLU(x W_enc + b_enc) (no pre-encoder bias: `apply_b_dec_to_input=False`, as in the
recipe), x_hat = f W_dec + b_dec, loss = ||x - x_hat||^2 + lambda(t) * sum_i f_i ||W_dec_i||.
Because the penalty is weighted by the decoder row norms, the decoder needs no unit-norm
constraint; rows start at norm 0.1 with W_enc = W_dec^T (`init_decoder_norm`). lambda(t) ramps
linearly from 0 over the first `l1_warmup_fraction` of training (`l1_warmup_scale`). Exported
to SAELens as architecture 'standard'. Tests: tests/test_sae_core.py.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from sae_assets.core.sae.base import LossOutput, SparseAutoencoder, StepInfo, active_counts

# Letter key: B batch rows, D input width, F features.


def l1_warmup_scale(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Factor in [0, 1] on the L1 coefficient: step / (fraction * total), capped at 1."""
    warmup_steps = warmup_fraction * total_steps
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


class _ReluRecipeLoss(torch.autograd.Function):
    """The recipe's loss with a hand-written backward: ||x - x_hat||^2 and c * sum_i f_i ||W_dec_i||,
    each summed over features and averaged over the batch, from scaled inputs xs (B, D).

    Autograd's version of the same graph makes about a dozen passes over (B, F) tensors per
    step (the ReLU's output, the broadcast product with the norms and its backward, the ReLU
    backward, the sum of the two gradients of f); at small d_in those passes cost as much as
    the five products. Here: the penalty is (sum_b f_bF) @ ||W_dec||, a (F,) vector rather than
    a (B, F) product; the gradient of f is one addmm with the penalty's constant row as its
    bias; the ReLU backward is one masked pass. Gradients equal autograd's up to float
    rounding (tests/test_sae_core.py). Returns mse, penalty, f (B, F; no gradient) and the
    column sums of f (F,; no gradient: > 0 exactly where a feature fired, as f >= 0).
    The target ys (B, E) is xs itself for an SAE (autograd adds the two input gradients), a
    transcoder's scaled output-hook activations otherwise.
    """

    @staticmethod
    def forward(ctx, xs_BD: Tensor, ys_BE: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, W_dec_FE: Tensor,
                b_dec_E: Tensor, coefficient: float):
        B = xs_BD.shape[0]
        f_BF = torch.addmm(b_enc_F, xs_BD, W_enc_DF).relu_()
        diff_BE = torch.addmm(b_dec_E, f_BF, W_dec_FE).sub_(ys_BE)  # x_hat - y
        norm_F = W_dec_FE.norm(dim=-1)
        f_sum_F = f_BF.sum(0)
        mse = diff_BE.pow(2).sum() / B
        penalty = coefficient * (f_sum_F @ norm_F) / B
        ctx.save_for_backward(xs_BD, f_BF, W_enc_DF, W_dec_FE, diff_BE, norm_F, f_sum_F)
        ctx.coefficient = coefficient
        ctx.mark_non_differentiable(f_BF, f_sum_F)
        return mse, penalty, f_BF, f_sum_F

    @staticmethod
    def backward(ctx, g_mse, g_penalty, _g_f, _g_f_sum):
        xs_BD, f_BF, W_enc_DF, W_dec_FE, diff_BE, norm_F, f_sum_F = ctx.saved_tensors
        B = xs_BD.shape[0]
        g_xhat_BE = diff_BE * (2 * g_mse / B)
        per_unit = g_penalty * ctx.coefficient / B  # d(penalty) / d(f_bi ||W_dec_i||)
        g_f_BF = torch.addmm(norm_F * per_unit, g_xhat_BE, W_dec_FE.t())
        g_pre_BF = torch.ops.aten.threshold_backward(g_f_BF, f_BF, 0)  # 0 where f = 0, as relu's backward
        # d||W_dec_i|| / dW_dec_i = W_dec_i / ||W_dec_i|| (0 for a zero row, as autograd's norm)
        row_scale_F = torch.where(norm_F > 0, per_unit * f_sum_F / norm_F.clamp_min(torch.finfo(norm_F.dtype).tiny), 0)
        g_W_dec = torch.addmm(W_dec_FE * row_scale_F[:, None], f_BF.t(), g_xhat_BE)
        g_x = g_pre_BF @ W_enc_DF.t() if ctx.needs_input_grad[0] else None
        g_y = -g_xhat_BE if ctx.needs_input_grad[1] else None
        return g_x, g_y, xs_BD.t() @ g_pre_BF, g_pre_BF.sum(0), g_W_dec, g_xhat_BE.sum(0), None


class ReluSae(SparseAutoencoder):
    """Anthropic 2024 ReLU SAE; `l1_coefficient` is lambda for inputs scaled to norm sqrt(D)."""

    architecture: ClassVar[str] = "relu"
    saelens_architecture: ClassVar[str] = "standard"
    init_decoder_norm: ClassVar[float] = 0.1
    elementwise_activation: ClassVar[bool] = True
    activation_is_relu: ClassVar[bool] = True

    def __init__(self, d_in: int, width: int, *, l1_coefficient: float, l1_warmup_fraction: float = 0.0,
                 apply_b_dec_to_input: bool = False, d_out: int | None = None) -> None:
        super().__init__(d_in, width, apply_b_dec_to_input=apply_b_dec_to_input, d_out=d_out)
        if l1_coefficient < 0 or not 0 <= l1_warmup_fraction < 1:
            raise ValueError(f"need l1_coefficient >= 0 and l1_warmup_fraction in [0, 1), got "
                             f"{l1_coefficient}, {l1_warmup_fraction}")
        self.l1_coefficient = float(l1_coefficient)
        self.l1_warmup_fraction = float(l1_warmup_fraction)

    def activate(self, pre_BF: Tensor) -> Tensor:
        return pre_BF.relu()

    def activate_range(self, pre_BW: Tensor, lo: int, hi: int) -> Tensor:
        # encode_range's pre-activations are a fresh tensor: rectified in place when no gradient
        # flows through them (the feature sampler's hot path), one (B, W) allocation fewer.
        return pre_BW.relu() if pre_BW.requires_grad else pre_BW.relu_()

    def loss(self, x_BD: Tensor, step_info: StepInfo | None = None, target_BD: Tensor | None = None) -> LossOutput:
        """The recipe's loss through `_ReluRecipeLoss` (no pre-encoder bias, (B, D) inputs), else
        the generic graph (`penalties`)."""
        if self.apply_b_dec_to_input or x_BD.ndim != 2:
            return super().loss(x_BD, step_info, target_BD)
        info = step_info if step_info is not None else StepInfo()
        coefficient = self.l1_coefficient * l1_warmup_scale(info.step, info.total_steps, self.l1_warmup_fraction)
        xs_BD = x_BD * self.input_scale
        ys_BE = self.scaled_target(x_BD, target_BD)
        mse, sparsity, f_BF, f_sum_F = _ReluRecipeLoss.apply(xs_BD, xs_BD if ys_BE is None else ys_BE, self.W_enc,
                                                             self.b_enc, self.W_dec, self.b_dec, coefficient)
        l0, _ = active_counts(f_BF)
        return LossOutput(mse + sparsity, mse, sparsity, mse.new_zeros(()), l0, f_BF, f_sum_F > 0)

    def weighted_l1(self, f_BF: Tensor) -> Tensor:
        """Scalar mean over the batch of sum_i f_i * ||W_dec_i|| (no coefficient)."""
        return (f_BF * self.W_dec.norm(dim=-1)).sum(-1).mean()

    def penalties(self, x_BD: Tensor, pre_BF: Tensor, f_BF: Tensor, x_hat_BD: Tensor,
                  info: StepInfo) -> tuple[Tensor, Tensor]:
        scale = l1_warmup_scale(info.step, info.total_steps, self.l1_warmup_fraction)
        sparsity = self.l1_coefficient * scale * self.weighted_l1(f_BF)
        return sparsity, x_hat_BD.new_zeros(())

    def hyperparameters(self) -> dict[str, Any]:
        return {"l1_coefficient": self.l1_coefficient, "l1_warmup_fraction": self.l1_warmup_fraction,
                "apply_b_dec_to_input": self.apply_b_dec_to_input}
