"""Dead-feature tracker: training tokens since each feature last fired.

`DeadFeatureTracker.update(f_BF)` adds the batch's B tokens to every feature's counter and
zeroes the counters of features that fired (f != 0) anywhere in the batch, so the count has
batch granularity. A feature is dead once its counter exceeds `dead_after_tokens`
(`dead_mask`); resampling calls `reset` for the features it revives. The counters live on the
features' device (no host sync per step) and travel in checkpoints via
`state_dict`/`load_state_dict`. Tests: tests/test_sae_core.py.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# Letter key: B batch rows, F features.


class DeadFeatureTracker:
    """Per-feature count of tokens seen since the feature last fired."""

    def __init__(self, width: int, dead_after_tokens: int, device: torch.device | str = "cpu") -> None:
        if width < 1 or dead_after_tokens < 0:
            raise ValueError(f"need width >= 1 and dead_after_tokens >= 0, got {width}, {dead_after_tokens}")
        self.dead_after_tokens = int(dead_after_tokens)
        self.tokens_since_fired_F = torch.zeros(width, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, f_BF: Tensor) -> None:
        """Count a batch of feature activations (B, F)."""
        self.update_fired((f_BF != 0).any(dim=0), f_BF.shape[0])

    @torch.no_grad()
    def update_fired(self, fired_F: Tensor, rows: int) -> None:
        """Count a batch of `rows` tokens on which the features `fired_F` ((F,) bool) fired."""
        self.tokens_since_fired_F += rows
        self.tokens_since_fired_F.masked_fill_(fired_F.to(self.tokens_since_fired_F.device), 0)

    def dead_mask(self) -> Tensor:
        """(F,) bool: features that have not fired for more than `dead_after_tokens` tokens."""
        return self.tokens_since_fired_F > self.dead_after_tokens

    def dead_fraction(self) -> float:
        return float(self.dead_mask().float().mean())

    def reset(self, features: Tensor) -> None:
        """Mark features (indices or an (F,) bool mask) as just fired."""
        self.tokens_since_fired_F[features.to(self.tokens_since_fired_F.device)] = 0

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_since_fired_F": self.tokens_since_fired_F.detach().cpu().clone(),
                "dead_after_tokens": self.dead_after_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        counts_F = state["tokens_since_fired_F"]
        if counts_F.shape != self.tokens_since_fired_F.shape:
            raise ValueError(f"tracker state has {tuple(counts_F.shape)} features, expected "
                             f"{tuple(self.tokens_since_fired_F.shape)}")
        self.tokens_since_fired_F = counts_F.to(self.tokens_since_fired_F.device, torch.int64).clone()
        self.dead_after_tokens = int(state["dead_after_tokens"])
