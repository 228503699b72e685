"""Activation intervals of a feature page: L equal-width groups of (0, max], each with its share.

SAEDashboard (and sae_vis before it) shows a feature's examples in 10 groups: the range (0, max]
cut into equal-width intervals, highest first, each titled with its bounds and the share it
"contains", each with a few examples drawn at random from inside it. Here group i of L holds the
activations in ((i - 1) / L * max, i / L * max] (`interval_of`; one rule for the shown examples
of core/features/windows.py and for the shares) and its share is the fraction of the feature's
*non-zero* activations that fall in it. (SAEDashboard divides by every token of its batch, zeros
included, and closes each interval at both ends, so its lowest interval holds every zero.)

`interval_shares` takes the shares from what feature_examples keeps per feature, exact wherever
that fixes them, and says which are:

- where the uniform sample (or the top-K) holds every activation (count <= sample_k), every
  share is exact;
- the number of activations above an interval edge t is exact from the top-K whenever t lies
  in or above the interval of the top-K's smallest value: nothing left out of the top-K passes t;
- elsewhere it is estimated from the activation histogram: the exact counts of the bins above
  t's bin, plus t's bin count spread evenly over that bin's range. Its error is at most that one
  bin's count. (Splitting the bin in the proportion of its sampled activations instead erred 3 to
  11 times more, summed over the intervals, on exponential, log-normal, half-normal and uniform
  activations with 160 sampled of 20,000: a bin holds few of the sample, and the histogram's
  8 bins a decade are narrow enough to be near linear inside.)

The cost is O(top_k + sample_k + histogram bins + L) per feature; nothing grows with tokens.
Tests: tests/test_feature_windows.py.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sae_assets.core.features.merge import FeatureSamples

# Letter key: W features in the range, L intervals, H histogram bins, N activations of one feature.


def interval_of(activation: np.ndarray, peak: np.ndarray, levels: int) -> np.ndarray:
    """int64 interval 1..levels of each activation: i holds ((i - 1) / levels * peak, i / levels * peak]."""
    ratio = np.asarray(activation, np.float64) / np.maximum(np.asarray(peak, np.float64), 1e-30)
    return np.clip(np.ceil(ratio * levels), 1, levels).astype(np.int64)


class IntervalShares(NamedTuple):
    """The shares of a range's features in their L intervals (interval i in column i - 1)."""

    share: np.ndarray
    """(W, L) float64: fraction of the feature's non-zero activations in each interval (rows sum to
    1; all 0 for a feature that never fired)."""
    exact: np.ndarray
    """(W, L) bool: the share is exact (otherwise estimated from the histogram, see above)."""


def _segments(feature: np.ndarray, lo: int, width: int) -> np.ndarray:
    """(W + 1,) row offsets of each feature's rows in a table sorted by feature."""
    return np.searchsorted(feature.astype(np.int64) - lo, np.arange(width + 1))


def _above_edges(count: int, peak: float, hist_H: np.ndarray, inner_edges: np.ndarray, top_N: np.ndarray,
                 sample_N: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """((L + 1,) activations above edge i = i / L * peak, (L + 1,) exact) of one feature that fired."""
    complete = sample_N if len(sample_N) == count else top_N if len(top_N) == count else None
    if complete is not None:  # every activation is known
        per_interval = np.bincount(interval_of(complete, peak, levels), minlength=levels + 1)
        return count - np.cumsum(per_interval).astype(np.float64), np.ones(levels + 1, bool)  # in intervals > i
    above, exact = np.zeros(levels + 1), np.zeros(levels + 1, bool)
    above[0], exact[0], exact[levels] = count, True, True
    top_interval = interval_of(top_N, peak, levels)
    bin_edges = np.r_[0.0, inner_edges, np.inf]  # the end bins hold what lies outside the inner edges
    for i in range(1, levels):
        if i >= top_interval.min():  # nothing outside the top-K lies above edge i
            above[i], exact[i] = (top_interval > i).sum(), True
            continue
        t = peak * i / levels
        j = int(np.searchsorted(inner_edges, t, side="right"))  # t's bin, as the sampler bins values
        low, high = bin_edges[j], min(bin_edges[j + 1], peak)
        above[i] = hist_H[j + 1:].sum() + hist_H[j] * (np.clip((high - t) / (high - low), 0, 1) if high > low else 0)
    return np.minimum(np.maximum.accumulate(above[::-1])[::-1], count), exact  # monotone over the edges


def interval_shares(samples: FeatureSamples, levels: int) -> IntervalShares:
    """The share of each feature's non-zero activations in each of its `levels` intervals of (0, max]."""
    width = samples.hi - samples.lo
    stats = samples.stats
    count_W, peak_W = stats.column("count").to_numpy(), stats.column("max").to_numpy().astype(np.float64)
    hist_WH = np.asarray(stats.column("hist").combine_chunks().flatten()).reshape(width, -1)
    inner_edges = np.asarray(samples.hist_edges[1:-1], np.float64)
    top_act, sample_act = (t.column("activation").to_numpy() for t in (samples.top, samples.sample))
    top_at = _segments(samples.top.column("feature").to_numpy(), samples.lo, width)
    sample_at = _segments(samples.sample.column("feature").to_numpy(), samples.lo, width)
    share, exact = np.zeros((width, levels)), np.zeros((width, levels), bool)
    fired = np.flatnonzero(count_W > 0) if levels else np.zeros(0, np.int64)
    for w in fired:
        above, known = _above_edges(int(count_W[w]), float(peak_W[w]), hist_WH[w], inner_edges,
                                    top_act[top_at[w]:top_at[w + 1]], sample_act[sample_at[w]:sample_at[w + 1]], levels)
        share[w] = (above[:-1] - above[1:]) / count_W[w]
        exact[w] = known[:-1] & known[1:]
    return IntervalShares(share, exact)
