"""The dictionary overview page of the feature browser: density, health, training and the frontier.

`dictionary_overview` gathers, for one dictionary of the sweep, what a researcher looks at
before opening any feature page (as Neuronpedia's and SAEDashboard's dictionary pages do):

- the histogram of log10 feature density (the fraction of tokens on which a feature is
  non-zero) over the live features, with the dead features (never non-zero on the browsed
  tokens) and the dense ones (density >= `dense_threshold`) counted apart;
- L0 and loss recovered against zero and mean ablation, from `sae_metrics`;
- the training curves (loss, MSE, L0, dead fraction against step), thinned to at most
  `max_curve_points` rows so that the page stays small whatever the run's length;
- the sweep's frontier: L0 against loss recovered for every point that has metrics, this one
  marked.

Everything is O(features) to compute (one pass over the densities) and O(bins + curve points +
sweep points) to store: the page loads one small script whatever the width. Tests:
tests/test_site_panels.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

DENSE_THRESHOLD = 0.1
"""A feature non-zero on at least this fraction of tokens counts as dense (the usual cut-off)."""

CURVE_COLUMNS = ("step", "loss", "mse", "l0", "dead_fraction")
METRIC_KEYS = ("l0", "loss_recovered", "loss_recovered_vs_mean", "fvu", "dead_fraction")
"""sae_metrics' keys shown: loss_recovered is against zero ablation."""


def density_histogram(density_F: np.ndarray, *, bins_per_decade: int = 4, dense_threshold: float = DENSE_THRESHOLD,
                      lowest_decade: int | None = None) -> dict:
    """Histogram of log10 density over the live features (density > 0) and the dead / dense counts.

    Bins are `bins_per_decade` per decade from `lowest_decade` (default: the decade of the
    rarest live feature) up to log10(1) = 0; edges are log10 values. NaN or negative densities
    are an error: they mean a broken index, not a feature.
    """
    density_F = np.asarray(density_F, dtype=np.float64)
    if density_F.ndim != 1 or not np.all(np.isfinite(density_F)) or np.any(density_F < 0) or np.any(density_F > 1):
        raise ValueError("feature densities must be a 1-D array of finite values in [0, 1]")
    if not 0 < dense_threshold <= 1:
        raise ValueError(f"dense_threshold must be in (0, 1], got {dense_threshold}")
    live_F = density_F[density_F > 0]
    log_F = np.log10(live_F)
    low = lowest_decade if lowest_decade is not None else (math.floor(float(log_F.min())) if len(log_F) else -1)
    low = min(low, -1)
    edges_E = np.linspace(low, 0.0, (0 - low) * bins_per_decade + 1)
    counts_H, _ = np.histogram(log_F, bins=edges_E)
    return {"log10_edges": [round(float(e), 6) for e in edges_E], "counts": counts_H.astype(int).tolist(),
            "features": int(len(density_F)), "live": int(len(live_F)), "dead": int(len(density_F) - len(live_F)),
            "dense": int(np.count_nonzero(density_F >= dense_threshold)), "dense_threshold": float(dense_threshold),
            "median_log10_density": float(np.median(log_F)) if len(log_F) else None}


def thin_curve(rows: Sequence[Mapping], max_points: int = 400) -> list[dict]:
    """At most `max_points` rows of a training curve (evenly spaced, the last row kept), with only
    the plotted columns; non-finite values become None (JSON has no NaN)."""
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    rows = list(rows)
    if len(rows) > max_points:
        picks = np.unique(np.linspace(0, len(rows) - 1, max_points).round().astype(int))
        rows = [rows[i] for i in picks]
    return [{k: _finite(row.get(k)) for k in CURVE_COLUMNS if k in row} for row in rows]


def frontier_points(metrics_by_point: Mapping[str, Mapping | None], current: str) -> list[dict]:
    """One row per sweep point with metrics: its key, L0 and loss recovered, `current` marked."""
    rows = []
    for key, metrics in metrics_by_point.items():
        if not metrics:
            continue
        rows.append({"point": key, "current": key == current,
                     **{k: _finite(metrics.get(k)) for k in ("l0", "loss_recovered", "loss_recovered_vs_mean")}})
    return rows


def dictionary_overview(density_F: np.ndarray, *, dictionary: str, n_tokens: int, metrics: Mapping | None,
                        curve: Sequence[Mapping], metrics_by_point: Mapping[str, Mapping | None],
                        dense_threshold: float = DENSE_THRESHOLD, max_curve_points: int = 400,
                        hook: str = "", target_hook: str = "") -> dict:
    """The overview document of one dictionary (see the module docstring); JSON-ready. `hook`:
    what it reads; `target_hook`: what it reconstructs, where it differs (a transcoder)."""
    return {"dictionary": dictionary, "n_tokens": int(n_tokens), "hook": hook,
            "target_hook": target_hook if target_hook != hook else "",
            "density": density_histogram(density_F, dense_threshold=dense_threshold),
            "metrics": {k: _finite(metrics.get(k)) for k in METRIC_KEYS if k in metrics} if metrics else None,
            "curve": thin_curve(curve, max_curve_points),
            "frontier": frontier_points(metrics_by_point, dictionary)}


def _finite(value):
    if value is None or isinstance(value, bool):
        return value
    value = float(value)
    return value if math.isfinite(value) else None
