"""The SAE training loop, assembled from a step, a scheduler, a tracker, resampling and checkpoints.

`train_sae(sae, batches, cfg, point, checkpoint_dir=...)` trains for
`cfg.train_tokens // cfg.batch_size` Adam steps. `batches(start_step)` must return an
iterator whose i-th batch is the batch of step `start_step + i`, the same batch whatever
`start_step` the iteration began at (seed or index the data by step, never by how many
batches this process has drawn): that is what makes a resumed run bit-identical to an
uninterrupted one. Each step: optional resampling of dead features (`cfg.resample_method`:
Anthropic's, rare-feature directions or plain re-initialisation) at `cfg.resample_steps`, steps or fractions of the
run resolved once at the start, a ValueError naming the sweep point if one falls outside the
run (with an LR re-warm-up), the LR from `LrScheduler`, `train_step` (loss,
backward, the architecture's decoder constraints, gradient clipping at norm 1, Adam), the
dead-feature tracker, a curve row every `log_every` steps, and a checkpoint every
`cfg.checkpoint_every` steps and at the end. When `checkpoint_dir` holds a checkpoint, the run
continues from it. Non-finite inputs, loss or gradients raise `SaeTrainingError` naming the
step before anything is changed, so the checkpoint on disk stays the last good state.
Tests: tests/test_sae_core.py, tests/test_training_tricks.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from sae_assets.core.config import DictionaryPoint, SaeConfig, resolve_resample_steps
from sae_assets.core.progress import QUIET, ProgressLog
from sae_assets.core.sae.base import LossOutput, SparseAutoencoder, StepInfo
from sae_assets.core.sae.build import RESAMPLE_STREAM, seeded_generator
from sae_assets.core.sae.checkpoint import CHECKPOINT_FILE, Checkpointer, Progress
from sae_assets.core.sae.resample import resample_dead_features
from sae_assets.core.sae.schedule import LrScheduler
from sae_assets.core.sae.tracker import DeadFeatureTracker

# Letter key: B batch rows, D input width, F features.

Batches = Callable[[int], Iterator[Tensor]]
"""batches(start_step) -> iterator of (B, D) batches for steps start_step, start_step + 1, ..."""
OnCheckpoint = Callable[[Path, int], None]
"""on_checkpoint(path, step), called after each checkpoint file is in place."""
MAX_GRAD_NORM = 1.0
ADAM_BETAS = (0.9, 0.999)


class SaeTrainingError(RuntimeError):
    """Training cannot go on (non-finite data or numbers, data ran out); `step` says where."""

    def __init__(self, message: str, *, step: int) -> None:
        super().__init__(message)
        self.step = step


class TrainOutcome(NamedTuple):
    """What a finished run reports (the weights are in the SAE passed in)."""

    curve: list[dict[str, float]]
    """Rows {step, tokens, loss, mse, l0, dead_fraction, lr} every `log_every` steps and at the end."""
    tokens_per_second: float
    """Training throughput of this call (0.0 if it ran no step, e.g. resumed a finished run)."""
    steps: int
    resamples: int
    """Resampling events in the whole run (each revived at least one feature)."""


def total_steps(cfg: SaeConfig) -> int:
    return cfg.total_steps


def resample_schedule(cfg: SaeConfig, point: DictionaryPoint) -> frozenset[int]:
    """The steps at which `point`'s run resamples (empty when `cfg.resample` is off); a
    ValueError naming sae.resample_steps and the point if one falls outside the run."""
    if not cfg.resample:
        return frozenset()
    try:
        return frozenset(resolve_resample_steps(cfg.resample_steps, total_steps(cfg)))
    except ValueError as exc:
        raise ValueError(f"sae.resample_steps {list(cfg.resample_steps)} of sweep point {point.key}: {exc}") from exc


def make_optimizer(sae: SparseAutoencoder, lr: float) -> torch.optim.Adam:
    # The fused kernel (CPU and CUDA) updates each parameter in one pass instead of about ten;
    # the same update up to float rounding.
    fused = all(p.device.type in ("cpu", "cuda") for p in sae.parameters())
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=ADAM_BETAS, fused=fused or None)


def train_step(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, x_BD: Tensor, info: StepInfo,
               lr: float, *, max_grad_norm: float | None = MAX_GRAD_NORM, target_BE: Tensor | None = None) -> LossOutput:
    """One optimizer step on a batch (a transcoder's with its targets (B, E)); raises
    SaeTrainingError (nothing changed) if not finite."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    out = sae.loss(x_BD, info, target_BE)
    if not bool(torch.isfinite(out.total)):
        finite = bool(torch.isfinite(x_BD).all()) and (target_BE is None or bool(torch.isfinite(target_BE).all()))
        what = "the input batch holds NaN/inf values" if not finite else f"the loss is {out.total.item()}"
        raise SaeTrainingError(f"SAE training stopped at step {info.step}: {what}", step=info.step)
    out.total.backward()
    sae.constrain_gradients()
    if max_grad_norm:
        grad_norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), max_grad_norm)
        if not bool(torch.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            raise SaeTrainingError(f"SAE training stopped at step {info.step}: the gradient norm is "
                                   f"{grad_norm.item()}", step=info.step)
    optimizer.step()
    sae.constrain_weights()
    return out


@dataclass
class _Run:
    sae: SparseAutoencoder
    optimizer: torch.optim.Optimizer
    scheduler: LrScheduler
    tracker: DeadFeatureTracker
    cfg: SaeConfig
    total: int
    progress: Progress
    checkpointer: Checkpointer
    resample_at: frozenset[int]


def _start(sae: SparseAutoencoder, cfg: SaeConfig, point: DictionaryPoint, path: Path | None,
           fingerprint: str) -> _Run:
    if sae.architecture != point.architecture or sae.width != point.width:
        raise ValueError(f"the SAE ({sae.architecture}, width {sae.width}) does not match sweep point {point.key}")
    resample_at = resample_schedule(cfg, point)
    device = torch.device(cfg.device)
    sae.to(device)
    total = total_steps(cfg)
    optimizer = make_optimizer(sae, cfg.learning_rate)
    scheduler = LrScheduler.from_config(cfg, total)
    tracker = DeadFeatureTracker(sae.width, cfg.dead_after_tokens, device)
    generator = seeded_generator(cfg.seed, RESAMPLE_STREAM)
    checkpointer = Checkpointer(sae, optimizer, scheduler, tracker, generator,
                                fingerprint=fingerprint)
    try:
        progress = checkpointer.load(path) if path is not None else Progress()
    except FileNotFoundError:  # none yet, or a concurrent run of this partition finished and dropped it
        progress = Progress()
    return _Run(sae, optimizer, scheduler, tracker, cfg, total, progress, checkpointer, resample_at)


def _maybe_resample(run: _Run, x_BD: Tensor, target_BE: Tensor | None, step: int) -> None:
    if step not in run.resample_at:
        return
    dead_F = run.tracker.dead_mask()
    if not bool(dead_F.any()):
        return
    if not bool(torch.isfinite(x_BD).all()) or (target_BE is not None and not bool(torch.isfinite(target_BE).all())):
        # checked here too: resampling would copy NaNs into W_dec
        raise SaeTrainingError(f"SAE training stopped at step {step}: the input batch holds NaN/inf values",
                               step=step)
    revived = resample_dead_features(run.sae, run.optimizer, x_BD, dead_F, run.checkpointer.generator,
                                     method=run.cfg.resample_method, target_BE=target_BE)
    run.tracker.reset(revived)
    run.scheduler.on_resample(step)
    run.progress.resamples += 1


def _one_step(run: _Run, rows_BR: Tensor, log_every: int) -> Tensor:
    """One training step on rows (B, D), or a transcoder's input | target rows (B, D + E);
    returns its loss (0-d, detached)."""
    step = run.progress.step
    if rows_BR.ndim != 2 or rows_BR.shape[1] != run.sae.row_width:
        expected = f"(B, {run.sae.d_in} + {run.sae.d_out}): input | target" if run.sae.transcoder else f"(B, {run.sae.d_in})"
        raise SaeTrainingError(f"SAE training stopped at step {step}: batch has shape {tuple(rows_BR.shape)}, "
                               f"expected {expected}", step=step)
    x_BD, target_BE = run.sae.split_rows(rows_BR.to(run.sae.W_dec.device, torch.float32))
    _maybe_resample(run, x_BD, target_BE, step)
    lr = run.scheduler.lr(step)
    info = StepInfo(step, run.total, run.tracker.dead_mask())
    out = train_step(run.sae, run.optimizer, x_BD, info, lr, target_BE=target_BE)
    if out.fired_F is not None:
        run.tracker.update_fired(out.fired_F, x_BD.shape[0])
    else:
        run.tracker.update(out.f.detach())
    run.progress.step += 1
    run.progress.tokens += x_BD.shape[0]
    if run.progress.step % log_every == 0 or run.progress.step == run.total:
        run.progress.curve.append({
            "step": run.progress.step, "tokens": run.progress.tokens, "loss": out.total.item(),
            "mse": out.mse.item(), "l0": out.l0.item(), "dead_fraction": run.tracker.dead_fraction(), "lr": lr,
        })
    return out.total.detach()


def _checkpoint(run: _Run, path: Path, on_checkpoint: OnCheckpoint | None) -> None:
    try:
        run.checkpointer.save(path, run.progress)
    except ValueError as exc:  # non-finite parameters: keep the last good checkpoint
        raise SaeTrainingError(str(exc), step=run.progress.step) from exc
    if on_checkpoint is not None:
        on_checkpoint(path, run.progress.step)


def train_sae(sae: SparseAutoencoder, batches: Batches, cfg: SaeConfig, point: DictionaryPoint, *,
              checkpoint_dir: Path | None = None, on_checkpoint: OnCheckpoint | None = None,
              log_every: int = 50, fingerprint: str = "", progress_log: ProgressLog | None = None) -> TrainOutcome:
    """Train `sae` in place (resuming from `checkpoint_dir` if it holds a checkpoint).

    `fingerprint` names the configuration the weights come from (sae_dictionary passes its
    manifest's config hash); a checkpoint written under another fingerprint is refused. A
    progress log hears of every step of this call, with its loss.
    """
    path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    run = _start(sae, cfg, point, path, fingerprint)
    started, start_tokens = time.perf_counter(), run.progress.tokens
    report = progress_log or QUIET
    report.start(run.total, done=run.progress.step)
    if run.progress.step < run.total:
        for x_BD in batches(run.progress.step):
            loss = _one_step(run, x_BD, max(1, log_every))
            report.update(run.progress.step, tokens=run.progress.tokens - start_tokens, loss=loss)
            done = run.progress.step == run.total
            if path is not None and (done or run.progress.step % cfg.checkpoint_every == 0):
                _checkpoint(run, path, on_checkpoint)
            if done:
                break
        else:
            raise SaeTrainingError(f"the batches ran out at step {run.progress.step} of {run.total}",
                                   step=run.progress.step)
    report.close()
    elapsed, tokens = time.perf_counter() - started, run.progress.tokens - start_tokens
    return TrainOutcome(list(run.progress.curve), tokens / elapsed if tokens else 0.0, run.progress.step,
                        run.progress.resamples)
