"""Learning-rate schedule of SAE training: warm-up, constant, linear decay, re-warm-up.

`LrScheduler.lr(step)` = base * warm(step) * decay(step). warm ramps linearly from 1/10 of
the LR to the full LR over `warmup_steps` at the start and, after every resample it is told
about (`on_resample`), again from 1/10 over `rewarm_steps` ("My best guess at the important tricks for training
1L SAEs": "times the learning rate by 1/10 and again warm up"). decay falls linearly to 0 over the final `decay_fraction` of the
steps (Anthropic, April 2024). The only state is the list of resample steps, so
`state_dict`/`load_state_dict` make it resumable. Tests: tests/test_sae_core.py.
"""

from __future__ import annotations

from typing import Any

from sae_assets.core.config import SaeConfig

WARM_START_FACTOR = 0.1
"""A warm-up starts at this fraction of the LR ("My best guess at the important tricks for training 1L SAEs")."""


def warmup_factor(steps_since_start: int, warmup_steps: int, start: float = WARM_START_FACTOR) -> float:
    """Linear ramp from `start` (at 0) to 1 (at `warmup_steps` and after)."""
    if warmup_steps <= 0 or steps_since_start >= warmup_steps:
        return 1.0
    return start + (1.0 - start) * max(0, steps_since_start) / warmup_steps


def decay_factor(step: int, total_steps: int, decay_fraction: float) -> float:
    """1 until the last `decay_fraction` of the steps, then linear to 0 at `total_steps`."""
    decay_steps = decay_fraction * total_steps
    decay_start = total_steps - decay_steps
    if decay_steps <= 0 or step < decay_start:
        return 1.0
    return max(0.0, (total_steps - step) / decay_steps)


class LrScheduler:
    """The LR at each step; `on_resample(step)` starts a re-warm-up at that step."""

    def __init__(self, base_lr: float, total_steps: int, *, warmup_steps: int = 0, decay_fraction: float = 0.0,
                 rewarm_steps: int = 0, rewarm_after_resample: bool = True) -> None:
        if base_lr <= 0 or total_steps < 1:
            raise ValueError(f"need base_lr > 0 and total_steps >= 1, got {base_lr}, {total_steps}")
        self.base_lr, self.total_steps = float(base_lr), int(total_steps)
        self.warmup_steps, self.decay_fraction = int(warmup_steps), float(decay_fraction)
        self.rewarm_steps, self.rewarm_after_resample = int(rewarm_steps), bool(rewarm_after_resample)
        self.resample_steps: list[int] = []

    @classmethod
    def from_config(cls, cfg: SaeConfig, total_steps: int) -> LrScheduler:
        return cls(cfg.learning_rate, total_steps, warmup_steps=cfg.lr_warmup_steps,
                   decay_fraction=cfg.lr_decay_fraction, rewarm_steps=cfg.rewarm_steps,
                   rewarm_after_resample=cfg.rewarm_after_resample)

    def on_resample(self, step: int) -> None:
        """Record a resample at `step`; from then on the LR re-warms (if enabled)."""
        if self.rewarm_after_resample:
            self.resample_steps.append(int(step))

    def factor(self, step: int) -> float:
        """lr(step) / base_lr."""
        warm = warmup_factor(step, self.warmup_steps)
        since = [step - s for s in self.resample_steps if s <= step]
        if since:
            warm = warmup_factor(min(since), self.rewarm_steps)
        return warm * decay_factor(step, self.total_steps, self.decay_fraction)

    def lr(self, step: int) -> float:
        return self.base_lr * self.factor(step)

    def state_dict(self) -> dict[str, Any]:
        return {"resample_steps": list(self.resample_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resample_steps = [int(s) for s in state["resample_steps"]]
