"""Training the embedded language model: a small, measured loop over fixed-length sequences.

`train_language_model` runs AdamW on next-token cross-entropy with a linear-warmup /
cosine-decay learning rate (`lr_at_step`), gradient-norm clipping and repeat-free batches
drawn from seeded epoch permutations (`batch_indices`) until `ModelConfig.train_tokens` tokens have
been seen, evaluating on held-out sequences along the way. It returns a `TrainResult` with the
loss curve and the training throughput (evaluation time excluded). A non-finite loss or
gradient stops training with an error naming the step. An optional capture
(`sae_assets.core.attribution.capture.ShiftCapture`) is driven from the loop to record
per-datum parameter shifts; it only reads, so the trained weights are the same with or
without it. Tests: tests/test_lm.py, tests/test_attribution_core.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

from sae_assets.core.config import ModelConfig
from sae_assets.core.model.lm import evaluate_loss, next_token_loss
from sae_assets.core.progress import QUIET, ProgressLog

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

MIN_LR_FRACTION = 0.1
"""Cosine decay ends at this fraction of the peak learning rate."""
ADAM_BETAS = (0.9, 0.95)


class TrainResult(NamedTuple):
    curve: list[dict[str, Any]]
    """One entry per logged step: step, tokens_seen, train_loss (mean since the previous entry),
    lr; entries at evaluation points also hold val_loss."""
    final_train_loss: float
    """The last curve entry's train_loss: mean batch loss since the entry before it (nats)."""
    val_loss: float
    """Mean next-token loss on all validation sequences after training (nats per token)."""
    tokens_per_second: float
    """Training tokens (B*T per step) per second of optimisation, evaluation excluded."""
    steps: int
    train_seconds: float = 0.0
    """Seconds of optimisation (the denominator of tokens_per_second), capture included."""


class StepCapture(Protocol):
    """What the loop calls on a capture (ShiftCapture): arm, snapshot, record, finish."""

    def begin_step(self, step: int, batch_index: torch.Tensor) -> None: ...
    def before_update(self, optimizer: torch.optim.Optimizer) -> None: ...
    def after_update(self, optimizer: torch.optim.Optimizer, *, lr: float, loss: float,
                     grad_norm: torch.Tensor, clip_coefficient: torch.Tensor) -> None: ...
    def close(self) -> None: ...


def training_steps(cfg: ModelConfig, context_length: int) -> int:
    """Optimizer steps of a run: ceil(model.train_tokens / (batch_size * context_length)), >= 1."""
    return max(1, math.ceil(cfg.train_tokens / (cfg.batch_size * context_length)))


def clip_coefficient(grad_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor clip_grad_norm_ multiplied the gradients by: min(1, max_norm / (norm + 1e-6))."""
    return torch.clamp(max_norm / (grad_norm + 1e-6), max=1.0)


def lr_at_step(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for 0-based `step`: linear warmup to peak, then cosine to 10% of peak."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    min_lr = peak_lr * MIN_LR_FRACTION
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def batch_indices(n_sequences: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """`steps` index batches (B,) into range(N), each free of repeats, from seeded epochs.

    The law: epoch e is the permutation pi_e = randperm(N) drawn from one generator seeded
    with `seed`, and batches are taken from it in order. When fewer than B indices of the
    current epoch remain, the batch takes all r of them and then the first B - r entries of
    pi_(e+1) that are not among those r; the entries it skipped stay, in their order, at the
    front of epoch e+1's remainder. So no batch holds a sequence twice, every epoch uses
    every sequence exactly once, and over any run the counts of any two sequences differ by
    at most one. When B divides N this is plain back-to-back permutations.

    Raises ValueError unless 1 <= B <= N (a batch of distinct sequences needs B of them).
    """
    if n_sequences < 1 or not 1 <= batch_size <= n_sequences:
        raise ValueError(f"model.batch_size={batch_size} must be between 1 and the number of training "
                         f"sequences ({n_sequences}): a batch holds distinct sequences; lower model.batch_size "
                         "or add data")
    return _distinct_batches(n_sequences, batch_size, steps, seed)


def _distinct_batches(n_sequences: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """The generator behind batch_indices (which checks its arguments before the first batch)."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.empty(0, dtype=torch.int64)  # what is left of the current epoch, in order
    for _ in range(steps):
        if pool.numel() < batch_size:
            fresh = torch.randperm(n_sequences, generator=generator)
            taken = torch.zeros(n_sequences, dtype=torch.bool)
            taken[pool] = True
            free_positions = (~taken[fresh]).nonzero().squeeze(1)[: batch_size - pool.numel()]
            keep = torch.ones(n_sequences, dtype=torch.bool)
            keep[free_positions] = False
            yield torch.cat([pool, fresh[free_positions]])
            pool = fresh[keep]
            continue
        yield pool[:batch_size]
        pool = pool[batch_size:]


def make_optimizer(model: torch.nn.Module, cfg: ModelConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not biases or norm scales)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=ADAM_BETAS)


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, *, lr: float,
    max_grad_norm: float, step: int, capture: StepCapture | None = None,
) -> float:
    """One optimiser step on tokens (B, T); returns the batch loss. Raises on a non-finite value.

    With a capture (armed by the caller's `begin_step`), it is handed the optimizer between
    clipping and the step, and the step's lr, loss and clip coefficient after it."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    logits_BTV = model(tokens)
    loss = next_token_loss(logits_BTV, tokens)
    value = loss.item()
    if not math.isfinite(value):
        raise ValueError(f"training loss became {value} at step {step} (lr={lr:.3g}); lower model.learning_rate")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if not torch.isfinite(grad_norm):
        raise ValueError(f"gradient norm became {grad_norm.item()} at step {step} (lr={lr:.3g})")
    if capture is not None:
        capture.before_update(optimizer)
    optimizer.step()
    if capture is not None:
        capture.after_update(optimizer, lr=lr, loss=value, grad_norm=grad_norm,
                             clip_coefficient=clip_coefficient(grad_norm, clip))
    return value


def check_tokens(model: TransformerBridge, tokens: torch.Tensor, name: str) -> None:
    """Raise ValueError unless tokens is a non-empty (N, T) integer tensor the model accepts."""
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, T) tensor of token ids, got shape {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    if not 2 <= tokens.shape[1] <= model.cfg.n_ctx:
        raise ValueError(f"{name} sequence length {tokens.shape[1]} must be in [2, n_ctx={model.cfg.n_ctx}]")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= model.cfg.d_vocab:
        raise ValueError(f"{name} holds token ids in [{low}, {high}], outside the vocabulary [0, {model.cfg.d_vocab})")


def train_language_model(
    model: TransformerBridge,
    train_tokens: torch.Tensor,
    val_tokens: torch.Tensor,
    cfg: ModelConfig,
    *,
    log_every: int = 10,
    eval_every: int = 100,
    eval_sequences: int = 256,
    capture: StepCapture | None = None,
    progress_log: ProgressLog | None = None,
) -> TrainResult:
    """Train `model` in place on train_tokens (N, T) until cfg.train_tokens tokens are seen.

    Steps = ceil(cfg.train_tokens / (cfg.batch_size * T)). The curve gets an entry every
    `log_every` steps and at the last step; every `eval_every` steps the val loss of the
    first `eval_sequences` validation sequences is added, and the last step is scored on
    all of val_tokens (M, T). The model ends in eval mode on cfg.device. A capture sees every
    step (`begin_step` gets the batch's row indices into train_tokens) and is closed at the end.
    A progress log hears of every step, with its batch loss.
    """
    check_tokens(model, train_tokens, "train_tokens")
    check_tokens(model, val_tokens, "val_tokens")
    if log_every < 1 or eval_every < 1:
        raise ValueError(f"log_every and eval_every must be >= 1, got {log_every} and {eval_every}")
    device = torch.device(cfg.device)
    model.to(device, print_details=False)
    n_sequences, seq_len = train_tokens.shape
    tokens_per_step = cfg.batch_size * seq_len
    steps = training_steps(cfg, seq_len)
    optimizer = make_optimizer(model, cfg)
    curve: list[dict[str, Any]] = []
    window: list[float] = []
    train_seconds = 0.0
    report = progress_log or QUIET
    report.start(steps)
    model.train()
    for step, idx_B in enumerate(batch_indices(n_sequences, cfg.batch_size, steps, cfg.seed), start=1):
        lr = lr_at_step(step - 1, peak_lr=cfg.learning_rate, warmup_steps=cfg.warmup_steps, total_steps=steps)
        batch_BT = train_tokens[idx_B].to(device, dtype=torch.int64)
        started = time.perf_counter()
        if capture is not None:
            capture.begin_step(step, idx_B)
        window.append(train_step(model, optimizer, batch_BT, lr=lr, max_grad_norm=cfg.max_grad_norm, step=step,
                                 capture=capture))
        train_seconds += time.perf_counter() - started
        report.update(step, tokens=step * tokens_per_step, loss=window[-1])
        last, evaluate = step == steps, step % eval_every == 0
        if step % log_every and not evaluate and not last:
            continue
        entry: dict[str, Any] = {"step": step, "tokens_seen": step * tokens_per_step,
                                 "train_loss": sum(window) / len(window), "lr": lr}
        if evaluate or last:
            held_out = val_tokens if last else val_tokens[:eval_sequences]
            entry["val_loss"] = evaluate_loss(model, held_out, cfg.batch_size)
        curve.append(entry)
        window = []
    if capture is not None:
        capture.close()
    report.close()
    model.eval()
    return TrainResult(
        curve=curve,
        final_train_loss=curve[-1]["train_loss"],
        val_loss=curve[-1]["val_loss"],
        tokens_per_second=steps * tokens_per_step / max(train_seconds, 1e-9),
        steps=steps,
        train_seconds=train_seconds,
    )
