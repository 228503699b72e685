"""Training checkpoints: everything needed to resume an SAE run bit-identically, in one file.

A `Checkpointer` holds references to the live training objects (SAE, Adam, LR scheduler,
dead-feature tracker, the resampling generator) and `save(path, progress)` writes their state
plus `Progress` (step = the data position, tokens, resample count, the curve so far) and the
global torch CPU RNG state with `torch.save` to a temporary name beside `path`, fsyncs it and
`os.replace`s it over `path`, so a reader sees the old checkpoint or the new one, never half of
one. `save` refuses a state with non-finite parameters (the last good checkpoint stays).
`load(path)` restores every object in place and returns the `Progress`; a `fingerprint`
(the training-relevant config) recorded at save must match, so a checkpoint of another run
is never resumed by mistake. Files load with `weights_only=True`. Tests: tests/test_sae_core.py.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_assets.core.sae.base import SparseAutoencoder
from sae_assets.core.sae.schedule import LrScheduler
from sae_assets.core.sae.tracker import DeadFeatureTracker

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1


@dataclass
class Progress:
    """Where a run is: `step` optimizer steps done (also the data position), and its history."""

    step: int = 0
    tokens: int = 0
    resamples: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)


class Checkpointer:
    """Saves and restores the state of one training run's objects."""

    def __init__(self, sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, scheduler: LrScheduler,
                 tracker: DeadFeatureTracker, generator: torch.Generator, *, fingerprint: str = "") -> None:
        self.sae, self.optimizer, self.scheduler = sae, optimizer, scheduler
        self.tracker, self.generator, self.fingerprint = tracker, generator, fingerprint

    def state(self, progress: Progress) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "progress": asdict(progress),
            "model": {k: v.detach().cpu().clone() for k, v in self.sae.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "tracker": self.tracker.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def save(self, path: str | Path, progress: Progress) -> None:
        """Atomically write the state to `path` (temp file + fsync + os.replace)."""
        bad = [name for name, p in self.sae.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise ValueError(f"refusing to checkpoint non-finite parameters {bad} at step {progress.step}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as handle:
                torch.save(self.state(progress), handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load(self, path: str | Path) -> Progress:
        """Restore every object from `path` in place; return the saved progress."""
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(f"checkpoint {path} has format {state.get('format')!r}, expected {FORMAT_VERSION}")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(f"checkpoint {path} belongs to another run (config fingerprint "
                             f"{state['fingerprint']!r}, this run {self.fingerprint!r}); delete it to restart")
        self.sae.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.tracker.load_state_dict(state["tracker"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        p = state["progress"]
        return Progress(int(p["step"]), int(p["tokens"]), int(p["resamples"]), list(p["curve"]))
