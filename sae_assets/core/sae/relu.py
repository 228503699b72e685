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

from torch import Tensor

from sae_assets.core.sae.base import SparseAutoencoder, StepInfo

# Letter key: B batch rows, D input width, F features.


def l1_warmup_scale(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Factor in [0, 1] on the L1 coefficient: step / (fraction * total), capped at 1."""
    warmup_steps = warmup_fraction * total_steps
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


class ReluSae(SparseAutoencoder):
    """Anthropic 2024 ReLU SAE; `l1_coefficient` is lambda for inputs scaled to norm sqrt(D)."""

    architecture: ClassVar[str] = "relu"
    saelens_architecture: ClassVar[str] = "standard"
    init_decoder_norm: ClassVar[float] = 0.1
    elementwise_activation: ClassVar[bool] = True
    activation_is_relu: ClassVar[bool] = True

    def __init__(self, d_in: int, width: int, *, l1_coefficient: float, l1_warmup_fraction: float = 0.0,
                 apply_b_dec_to_input: bool = False) -> None:
        super().__init__(d_in, width, apply_b_dec_to_input=apply_b_dec_to_input)
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
