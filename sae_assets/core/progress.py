"""Progress lines for long loops: step/total, tokens/s, loss and an ETA, at a steady cadence.

A Dagster asset makes a `ProgressLog(what, emit=context.log.info)` and hands it to a core
function, whose loop calls `start(total)`, then `update(done, tokens=..., loss=...)` after each
step and `close()` at the end. A line goes out at the first update, then at the first update
once `every_seconds` have passed since the last line, and a final line at close: a step of ten
minutes and one of ten seconds both report regularly, and a tight loop never floods the log.
Rates and the ETA are means since `start`, so a resumed run is timed on its own steps. With
`emit=None` (`QUIET`, what core functions use when given nothing) every call returns at once.
Stdlib only. Tests: tests/test_progress.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["QUIET", "ProgressLog", "format_duration"]


def format_duration(seconds: float) -> str:
    """'42s', '1m 05s' or '2h 03m'."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s // 60 % 60:02d}m"


class ProgressLog:
    """Progress lines of one long step, e.g.
    `sae_dictionary[relu-w1024-l1_5]: step 300/1000 (30.0%), 12,345 tokens/s, loss 0.0123, ETA 1m 05s`.

    Parameters
    ----------
    what
        The name each line starts with (asset and partition).
    emit
        Takes one line (Dagster's `context.log.info`); None reports nothing.
    every_seconds
        Least time between two lines before the final one.
    clock
        Seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, what: str, *, emit: Callable[[str], None] | None = None, every_seconds: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what, self.emit, self.every_seconds, self.clock = what, emit, every_seconds, clock
        self.total, self._first_done, self._started, self._last_line = 0, 0, 0.0, 0.0
        self._state: tuple[int, int, float | None] | None = None  # (done, tokens, loss) of the last update
        self._shown: tuple[int, int, float | None] | None = None  # ... of the last line

    def start(self, total: int, *, done: int = 0) -> None:
        """Begin a loop of `total` steps, `done` of them already behind it (a resumed run)."""
        if self.emit is None:
            return
        self.total, self._first_done, self._started = int(total), int(done), self.clock()
        self._state = self._shown = None

    def update(self, done: int, *, tokens: int, loss=None) -> None:
        """`done` of `total` steps finished, `tokens` processed since start; a line if one is due.
        `loss` is a float or a 0-d tensor (converted only for a line, so no device sync per step)."""
        if self.emit is None:
            return
        self._state = (int(done), int(tokens), loss)
        now = self.clock()
        if self._shown is None or now - self._last_line >= self.every_seconds:
            self._line(now)

    def close(self) -> None:
        """The final line (unless the last update already showed it)."""
        if self.emit is None or self._state is None or self._state == self._shown:
            return
        self._line(self.clock())

    def _line(self, now: float) -> None:
        done, tokens, loss = self._state
        elapsed = now - self._started
        parts = [f"step {done}/{self.total} ({100 * done / max(self.total, 1):.1f}%)"]
        if elapsed > 0:
            parts.append(f"{tokens / elapsed:,.0f} tokens/s")
        if loss is not None:
            parts.append(f"loss {float(loss):.4g}")  # a 0-d tensor is read only when a line is due
        if done >= self.total:
            parts.append(f"done in {format_duration(elapsed)}")
        elif done > self._first_done and elapsed > 0:
            parts.append(f"ETA {format_duration((self.total - done) * elapsed / (done - self._first_done))}")
        else:
            parts.append("ETA unknown")
        self.emit(f"{self.what}: {', '.join(parts)}")
        self._shown, self._last_line = self._state, now


QUIET = ProgressLog("quiet")
"""Reports nothing and keeps no state: what a core loop uses when given no ProgressLog."""
