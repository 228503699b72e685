"""Synthetic feature documents, for measuring the feature browser at scale without a pipeline.

`synthetic_ranges(n_features)` yields `SiteRange`s shaped like site_json's partitions (index
rows from `site_data.index_row`, documents as JSON text with every field the page reads), fast
enough for a 100,000-feature site in seconds and lazily, one range in memory at a time. Top
tokens follow a Zipf-like law over a made-up vocabulary, so some search keys match a handful of
features and a few match thousands; one feature in ten never fired. Everything is seeded.
Used by tests/test_site_scale.py and bench/site_scale.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np

from sae_assets.core.features import site_data
from sae_assets.core.features.site_index import SiteRange

N_TOKENS = 10_000_000
HIST_EDGES = [float(f"{x:.4g}") for x in np.logspace(-3, 2, 21)]
WINDOW = 6  # tokens shown per example; the centre is at index 3


def vocabulary(size: int = 30_000) -> list[str]:
    """Made-up token strings: ' w12', 'W12' and 'w12' share the search key 'w12'."""
    return [(" w", "W", "w")[i % 3] + str(i // 3) for i in range(size)]


def _top_token_ids(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    """(n, 3) token ids of each feature's top examples' centres, Zipf-like over the vocabulary."""
    ranks = np.floor(vocab ** rng.random((n, 3)) - 1).astype(np.int64)  # log-uniform: rank r has p ~ 1/(r+1)
    return np.minimum(ranks, vocab - 1)


class _Writer:
    """Builds document text from pieces encoded once per token (json.dumps of whole dicts is the slow part)."""

    def __init__(self, strings: list[str]):
        self.strings = strings
        self._windows: dict[int, tuple[list[str], str]] = {}
        self._logits: dict[int, str] = {}

    def window(self, centre: int) -> tuple[list[str], str]:
        if centre not in self._windows:
            tokens = [self.strings[(centre * 7 + j * 13) % len(self.strings)] for j in range(WINDOW)]
            tokens[3] = self.strings[centre]
            self._windows[centre] = tokens, json.dumps(tokens, ensure_ascii=False)
        return self._windows[centre]

    def logits(self, feature: int) -> str:
        key = feature % len(self.strings)
        if key not in self._logits:
            top = [[self.strings[(key + k) % len(self.strings)], round(1 - k / 10, 3)] for k in range(5)]
            self._logits[key] = json.dumps({"top": top, "bottom": [[t, -v] for t, v in top]}, ensure_ascii=False)
        return self._logits[key]

    def document(self, feature: int, count: int, peak: float, centres: list[int]) -> tuple[list, str]:
        """(index row, document JSON text) of one feature."""
        density, peak = float(f"{count / N_TOKENS:.4g}"), float(f"{peak:.4g}") if count else 0.0
        top, shown = [], []
        for i, centre in enumerate(centres if count else ()):
            tokens, text = self.window(centre)
            a = float(f"{peak * (1 - 0.2 * i):.4g}")
            top.append({"tokens": tokens, "center": 3})
            shown.append(f'{{"token_index": {feature * 100 + i}, "activation": {a}, "center": 3, "tokens": {text}, '
                         f'"acts": [0.0, 0.0, {float(f"{a / 3:.3g}")}, {a}, 0.0, {float(f"{a / 5:.3g}")}]}}')
        hist = [0] * (len(HIST_EDGES) - 1)
        if count:
            hist[feature % len(hist)] = count
        row = site_data.index_row({"feature": feature, "density": density, "max": peak, "top": top})
        mean = float(f"{peak / 2:.4g}")
        text = (f'{{"feature": {feature}, "dictionary": "synthetic", "count": {count}, "density": {density}, '
                f'"max": {peak}, "mean": {mean}, "histogram": {json.dumps(hist)}, "top": [{", ".join(shown)}], '
                f'"random": [{", ".join(shown[:1])}], "levels": [], "logits": {self.logits(feature)}}}')
        return row, text


def _range(lo: int, hi: int, writer: _Writer, seed: int) -> SiteRange:
    rng = np.random.default_rng([seed, lo])
    dead = rng.random(hi - lo) < 0.1
    counts = np.where(dead, 0, rng.integers(1, 50_000, hi - lo)).tolist()
    peaks = (rng.random(hi - lo) * 20 + 0.5).tolist()
    centres = _top_token_ids(rng, hi - lo, len(writer.strings)).tolist()
    made = [writer.document(f, counts[w], peaks[w], centres[w]) for w, f in enumerate(range(lo, hi))]
    return SiteRange([row for row, _ in made], [(f, text) for f, (_, text) in zip(range(lo, hi), made)],
                     N_TOKENS, HIST_EDGES)


def synthetic_ranges(n_features: int, *, range_width: int = 4096, seed: int = 0) -> Iterator[SiteRange]:
    """The site_json input of an `n_features` dictionary, range by range."""
    writer = _Writer(vocabulary())
    for lo in range(0, n_features, range_width):
        yield _range(lo, min(n_features, lo + range_width), writer, seed)

