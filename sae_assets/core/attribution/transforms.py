"""How a datum's gradient share becomes its parameter shift: one rule per optimizer.

The batch loss is a mean, so the gradient of a weight is the sum of per-datum shares g_i
(for a Linear layer g_i = G_i^T A_i over the datum's positions). Clipping multiplies every
share by the step's coefficient c = min(1, max_norm / (||g|| + 1e-6)). Then:

- **SGD** (momentum 0): the applied update is -lr * c * sum_i g_i - lr * wd * theta, so the
  datum's shift -lr * c * g_i is *exact*: the shifts sum to the update, less the weight-decay
  term (zero unless weight_decay is set), which belongs to no datum.
- **AdamW** (and Adam without weight decay): with m_t = b1 m_{t-1} + (1-b1) c g and
  v_t = b2 v_{t-1} + (1-b2) (c g)^2, torch applies
  `theta -= lr*wd*theta + lr/(1-b1^t) * m_t / (sqrt(v_t)/sqrt(1-b2^t) + eps)`. The update is
  split into three parts: *attributable* -lr (1-b1)/(1-b1^t) * c g / denom, linear in this
  step's gradient and shared out exactly as -lr (1-b1)/(1-b1^t) * c g_i / denom per datum;
  *carried* -lr b1 m_{t-1} / ((1-b1^t) denom), the momentum of earlier steps' data; and
  *decay* -lr wd theta. The shifts sum exactly to the attributable part; what is approximate
  is the per-datum meaning: the preconditioner denom (from v_t, which holds every datum's
  squared gradient) is shared by all data, and momentum spreads a datum's effect over later
  steps, where it is counted as carried, not re-attributed.

`split_update` returns the per-datum scale and the non-attributable parts of one parameter's
update; the capture checks sum_i scale*g_i against (theta_after - theta_before) - carried -
decay. Other optimizers (SGD with momentum, Adam with coupled L2 decay, AMSGrad, maximize)
are refused with a clear error. Tests: tests/test_attribution_core.py.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class UpdateSplit(NamedTuple):
    scale: torch.Tensor
    """Multiplies a datum's unclipped gradient share to give its shift: a 0-d tensor (SGD) or
    the parameter's shape (Adam's elementwise preconditioner); float32."""
    carried: torch.Tensor
    """Momentum from earlier steps inside this step's update (float64; zeros for SGD)."""
    decay: torch.Tensor
    """The weight-decay term of this step's update (float64)."""


class Before(NamedTuple):
    """What a parameter held before the optimizer step (the step overwrites it)."""

    value: torch.Tensor
    exp_avg: torch.Tensor | None


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """'sgd' or 'adam' (Adam/AdamW); ValueError naming the setting capture cannot attribute."""
    for group in optimizer.param_groups:
        if group.get("maximize") or group.get("amsgrad"):
            raise ValueError("capture cannot attribute updates with maximize=True or amsgrad=True")
    if type(optimizer) is torch.optim.SGD:
        if any(g["momentum"] for g in optimizer.param_groups):
            raise ValueError("capture supports SGD with momentum=0 (exact) or AdamW (approximate); "
                             "SGD momentum is not supported")
        return "sgd"
    if type(optimizer) is torch.optim.AdamW:
        return "adam"
    if type(optimizer) is torch.optim.Adam:
        coupled = not optimizer.param_groups[0].get("decoupled_weight_decay", False)
        if coupled and any(g["weight_decay"] for g in optimizer.param_groups):
            raise ValueError("capture cannot attribute Adam with coupled (L2) weight decay; use AdamW")
        return "adam"
    raise ValueError(f"capture does not know how {type(optimizer).__name__} turns gradients into updates; "
                     "use torch.optim.SGD (momentum=0) or torch.optim.AdamW")


def group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, Any]:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise ValueError("a tracked weight is not optimized by the optimizer passed to the capture")


def before_step(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> Before:
    exp_avg = optimizer.state.get(param, {}).get("exp_avg")
    return Before(param.detach().clone(), None if exp_avg is None else exp_avg.detach().clone())


def split_update(optimizer: torch.optim.Optimizer, kind: str, param: torch.Tensor, before: Before,
                 clip_coefficient: torch.Tensor) -> UpdateSplit:
    """The per-datum scale and the carried / decay parts of `param`'s update just applied."""
    group = group_of(optimizer, param)
    lr, wd = float(group["lr"]), float(group["weight_decay"])
    decay = -lr * wd * before.value.double()
    if kind == "sgd":
        scale = (-lr * clip_coefficient).to(torch.float32)
        return UpdateSplit(scale, torch.zeros_like(decay), decay)
    state = optimizer.state[param]
    beta1, beta2 = group["betas"]
    step = float(state["step"])
    bias1, bias2_sqrt = 1 - beta1 ** step, (1 - beta2 ** step) ** 0.5
    denom = (state["exp_avg_sq"].sqrt() / bias2_sqrt).add_(group["eps"])  # as torch's AdamW computes it
    scale = (-lr * (1 - beta1) / bias1) * clip_coefficient.to(denom.dtype) / denom
    previous = before.exp_avg.double() if before.exp_avg is not None else torch.zeros_like(decay)
    carried = (-lr / bias1) * beta1 * previous / denom.double()
    return UpdateSplit(scale.to(torch.float32), carried, decay)
