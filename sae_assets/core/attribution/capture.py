"""Per-datum parameter shifts captured during training: hooks, one forward and one backward.

`ShiftCapture(model, ...)` puts a forward hook on each tracked module (tensors.track): while
armed it keeps the module's input A (B, T, in) (the tensor autograd keeps anyway) and hooks
the output for its gradient G (B, T, out). After the optimizer step each tracked weight is
handled in turn: the per-datum gradients G_i^T A_i come from one batched matmul (for an
embedding, the rows of G indexed by the datum's token ids), `transforms.split_update`
scales them into shifts, `topk.DatumTopK` keeps each datum's k largest, and the shifts'
sum is checked against the attributable part of the update the optimizer applied (theta
after minus before, less momentum and weight decay). Only one tensor's (B, rows, columns)
block exists at a time. The hooks only read, so capture leaves training bit-identical.

The training loop (lm_train.train_language_model) calls `begin_step`, `before_update`,
`after_update` and finally `close`. Completed step ranges go to the sink as Arrow tables
(records.RangeBuffer). Tests: tests/test_attribution_core.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from sae_assets.core.attribution import tensors, transforms
from sae_assets.core.attribution.records import RangeBuffer, RangeCapture, StepRecord
from sae_assets.core.attribution.topk import DatumTopK


def datum_gradients(module: torch.nn.Module, inputs: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """(B, rows, columns) per-datum gradients of module.weight from its input and output grad."""
    batch = grad_out.shape[0]
    grad_BTO = grad_out.reshape(batch, -1, grad_out.shape[-1])
    if isinstance(module, torch.nn.Embedding):
        vocab, width = module.weight.shape
        rows = inputs.reshape(batch, -1) + torch.arange(batch, device=inputs.device)[:, None] * vocab  # (B, T)
        out = torch.zeros(batch * vocab, width, dtype=grad_out.dtype, device=grad_out.device)
        out.index_add_(0, rows.reshape(-1), grad_BTO.reshape(-1, width))
        return out.view(batch, vocab, width)
    acts_BTI = inputs.reshape(batch, -1, inputs.shape[-1])
    return torch.bmm(grad_BTO.transpose(1, 2), acts_BTI)  # (B, out, in): sum_t G_t^T A_t


class ShiftCapture:
    """Captures the top-k per-datum shifts of the tracked weights at every training step."""

    def __init__(self, model: torch.nn.Module, *, datum_ids: np.ndarray | torch.Tensor, top_k: int,
                 ranges: list[tuple[int, int]], sink: Callable[[RangeCapture], None],
                 kinds: Sequence[str] = tensors.DEFAULT_KINDS):
        if top_k < 1:
            raise ValueError(f"attribution.top_k must be >= 1, got {top_k}")
        self.layout, self._modules = tensors.track(model, kinds)
        self.top_k = top_k
        self._datum_ids = torch.as_tensor(np.asarray(datum_ids), dtype=torch.int64)
        self._buffer = RangeBuffer(ranges, sink)
        self._inputs: list[torch.Tensor | None] = [None] * len(self._modules)
        self._grads: list[torch.Tensor | None] = [None] * len(self._modules)
        self._before: list[transforms.Before] = []
        self._batch: torch.Tensor | None = None
        self._step = 0
        self.seconds = 0.0
        """Time spent in capture work (hooks excluded; they only keep references)."""
        self.max_sum_check_error = 0.0
        self.optimizer_kind: str | None = None
        """'sgd' (exact shifts) or 'adam' (preconditioned shares), once a step has run."""
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self._modules)]

    def _hook(self, position: int) -> Callable:
        def keep(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._batch is None or not torch.is_grad_enabled() or not output.requires_grad:
                return
            self._inputs[position] = args[0].detach()
            output.register_hook(lambda grad: self._grads.__setitem__(position, grad.detach()))
        return keep

    def begin_step(self, step: int, batch_index: torch.Tensor) -> None:
        """Arm the hooks for training step `step` on rows `batch_index` (B,) of the training set.

        The rows must be distinct: a datum's shift is recorded once per step, under its id."""
        batch = batch_index.detach().to("cpu", torch.int64)
        if len(torch.unique(batch)) != len(batch):
            raise ValueError(f"training step {step} holds a training row twice ({batch.tolist()}); per-datum "
                             "capture needs distinct rows in a batch, as sae_assets.core.model.training.batch_indices draws them")
        self._batch, self._step = batch, step
        self._inputs = [None] * len(self._modules)
        self._grads = [None] * len(self._modules)

    def before_update(self, optimizer: torch.optim.Optimizer) -> None:
        """After backward and clipping, before optimizer.step(): keep what the step overwrites."""
        started = time.perf_counter()
        self.optimizer_kind = transforms.optimizer_kind(optimizer)
        for spec, grad in zip(self.layout.tensors, self._grads):
            if grad is None:
                raise ValueError(f"tracked tensor {spec.name} received no gradient at step {self._step}; "
                                 "capture needs one forward and one backward through it per step")
        self._before = [transforms.before_step(optimizer, m.weight) for m in self._modules]
        self.seconds += time.perf_counter() - started

    def after_update(self, optimizer: torch.optim.Optimizer, *, lr: float, loss: float,
                     grad_norm: torch.Tensor, clip_coefficient: torch.Tensor) -> None:
        """After optimizer.step(): per-datum shifts, top-k, sum check; record the step."""
        started = time.perf_counter()
        top = DatumTopK(self.top_k)
        sums = {"err": 0.0, "abs": 0.0, "update": 0.0, "attributable": 0.0, "carried": 0.0, "decay": 0.0}
        mass_B = torch.zeros(len(self._batch), dtype=torch.float64)
        for i, (spec, module) in enumerate(zip(self.layout.tensors, self._modules)):
            shift_BP = self._tensor_shifts(i, module, optimizer, clip_coefficient, sums)
            top.add(shift_BP, spec.offset)
            mass_B += torch.linalg.vector_norm(shift_BP, dim=1).double().square().cpu()
        values, index = top.result()
        kept_B = torch.from_numpy(values.astype(np.float64)).square().sum(1)
        stats = {"lr": float(lr), "clip_coefficient": float(clip_coefficient), "grad_norm": float(grad_norm),
                 "loss": float(loss), "sum_check_error": sums["err"], "sum_check_abs_error": sums["abs"],
                 **{f"{k}_norm": math.sqrt(sums[k]) for k in ("update", "attributable", "carried", "decay")},
                 "topk_mass": float((kept_B / mass_B.clamp_min(1e-300)).mean())}
        self.max_sum_check_error = max(self.max_sum_check_error, sums["err"])
        record = StepRecord(self._step, self._datum_ids[self._batch].numpy(), values, index, stats)
        self._batch, self._inputs, self._grads, self._before = None, [None] * len(self._modules), \
            [None] * len(self._modules), []
        self._buffer.add(record)
        self.seconds += time.perf_counter() - started

    def _tensor_shifts(self, i: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       clip_coefficient: torch.Tensor, sums: dict[str, float]) -> torch.Tensor:
        """(B, P) shifts of tracked tensor i; adds its sum check and update norms to `sums`."""
        spec, before = self.layout.tensors[i], self._before[i]
        grads_BRC = datum_gradients(module, self._inputs[i], self._grads[i]).to(module.weight.dtype)
        split = transforms.split_update(optimizer, self.optimizer_kind, module.weight, before, clip_coefficient)
        shift_BRC = grads_BRC * split.scale.to(grads_BRC.device)
        total = shift_BRC.sum(0).double().cpu()
        if not torch.isfinite(total).all():
            raise ValueError(f"per-datum parameter shifts of {spec.name} are not finite at step {self._step}")
        applied = module.weight.detach().double().cpu() - before.value.double().cpu()
        attributable = applied - split.carried.cpu() - split.decay.cpu()
        error = float((total - attributable).abs().max())
        sums["abs"] = max(sums["abs"], error)
        sums["err"] = max(sums["err"], error / max(float(attributable.abs().max()), 1e-30))
        for key, part in (("update", applied), ("attributable", total), ("carried", split.carried),
                          ("decay", split.decay)):
            sums[key] += float(part.square().sum())
        return shift_BRC.reshape(shift_BRC.shape[0], -1)

    def close(self) -> None:
        """End of training: raise unless every captured range was completed and flushed."""
        self._buffer.close()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> ShiftCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
