"""Small plots for the Dagster UI: PNGs rendered with matplotlib, embedded as Markdown images.

Dagster shows Markdown metadata on each materialization; a data-URI image there needs no
file server and survives in the event log.
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import polars as pl


def _png_markdown(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return f"![plot](data:image/png;base64,{encoded})"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart_markdown(lefts, heights, *, xlabel: str, note: str = "") -> str:
    """Markdown image of a histogram given bin left edges and counts (equal bin widths)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.2))
    width = float(lefts[1] - lefts[0]) if len(lefts) > 1 else 1.0
    axis.bar(lefts, heights, width=width, align="edge")
    axis.set_xlabel(xlabel)
    axis.set_ylabel("features")
    if note:
        axis.set_title(note, fontsize=9)
    try:
        return _png_markdown(figure)
    finally:
        plt.close(figure)


def line_chart_markdown(frame: pl.DataFrame, x: str, ys: list[str], *, log_y: bool = False) -> str:
    """Markdown image of `ys` against `x`; null values (e.g. val_loss off eval steps) are skipped."""
    plt = _pyplot()

    figure, axis = plt.subplots(figsize=(6, 3.2))
    for column in ys:
        if column not in frame.columns:
            continue
        points = frame.select(x, column).drop_nulls()
        axis.plot(points[x].to_numpy(), points[column].to_numpy(), label=column, marker="." if len(points) < 30 else None)
    axis.set_xlabel(x)
    if log_y:
        axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend()
    try:
        return _png_markdown(figure)
    finally:
        plt.close(figure)
