"""The feature map: a seeded 2-D layout of a dictionary's decoder directions, for the browser's #map.

`decoder_layout(W_dec_FD)` places every feature of the dictionary so that features whose
decoder directions point the same way sit close together, as Anthropic's and Neuronpedia's
feature maps do:

1. each decoder row is divided by its norm (a zero row stays zero): the map is of directions,
   so euclidean distance between rows is a function of their cosine;
2. wider than `PCA_DIMS`, the rows are projected on their top `PCA_DIMS` right singular
   vectors, found by seeded subspace iteration over blocks of rows (`top_directions`: a few
   passes of O(F x D x PCA_DIMS), memory O(D x PCA_DIMS) beside one block), the usual step
   before UMAP on wide data;
3. UMAP (umap-learn; `N_NEIGHBORS` neighbours, min_dist `MIN_DIST`, euclidean) lays the
   projection out in 2-D with `random_state=seed`, which makes umap-learn single-threaded and
   its result a function of its input: about O(F log F x PCA_DIMS) for nearest-neighbour
   descent plus O(F x N_NEIGHBORS) a layout epoch;
4. the layout is quantised on a `GRID` x `GRID` grid, both axes scaled alike (distances keep
   their ratios): 4 bytes of coordinates a feature, the same bytes on every rerun.

Measured on one core (bench/feature_map_scale.py, d_model 256): 0.5-0.7 ms a feature from 16k
to 131k features, UMAP's CPU growing as ~F^1.1, so ~15 CPU-minutes at a million features; the
projection at d_model 4096 adds ~5. Memory: the (F, PCA_DIMS) projection, 256 MB at a million.

UMAP needs more points than neighbours: with at most `N_NEIGHBORS` features the layout is the
projection on the first two singular vectors instead (`FeatureLayout.method` says "pca"), which
the page names. `map_document` packs a layout with the features' densities for the page: per
feature x and y (uint16) and a log10-density code (uint16, 0 = never fired), 6 bytes, base64 in
the script (8 bytes a feature: 8 MB at a million features), with the colour scale's stops.
Tests: tests/test_feature_map.py.
"""

from __future__ import annotations

import base64
import math
import warnings
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

PCA_DIMS = 64
"""Decoder rows wider than this are projected on their top PCA_DIMS singular vectors before UMAP."""
N_NEIGHBORS = 15
"""UMAP's neighbourhood (its default): local structure against global."""
MIN_DIST = 0.1
"""UMAP's minimum distance between laid-out points (its default)."""
GRID = 65535
"""The largest quantised coordinate: coordinates are uint16 in [0, GRID]."""
CODES = 65535
"""The largest log10-density code; 1..CODES span [log10_low, log10_high], 0 is never fired."""
VIRIDIS = ("#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b",
           "#fde725")
"""The colour scale from the rarest to the densest feature (matplotlib's viridis at 10 stops)."""
DEAD_COLOUR = "#c0c4cc"
BLOCK_ROWS = 4096


class FeatureLayout(NamedTuple):
    """A dictionary's feature map."""

    xy_F2: np.ndarray
    """(F, 2) uint16: feature f's quantised position, row f."""
    method: str
    """'umap', or 'pca' for a dictionary with too few features for UMAP (at most N_NEIGHBORS)."""


def unit_block(W_FD, lo: int, hi: int) -> np.ndarray:
    """(hi - lo, D) float64: rows [lo, hi) of W (a numpy array or torch tensor) divided by their
    norms, a zero row staying zero. Only this block is copied, so W can be the SAE's own weight."""
    block = W_FD[lo:hi]
    block = np.asarray(block.detach().cpu().numpy() if hasattr(block, "detach") else block, dtype=np.float64)
    if not np.isfinite(block).all():
        raise ValueError(f"decoder rows {lo}..{hi - 1} hold non-finite values")
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return block / np.where(norms > 0, norms, 1)


def top_directions(W_FD, k: int, *, seed: int, iterations: int = 4, oversample: int = 16) -> np.ndarray:
    """(D, k) orthonormal: the top k right singular vectors of the unit rows A of W (uncentred), by
    seeded subspace iteration on A^T A, BLOCK_ROWS rows at a time (iterations + 1 passes)."""
    F, D = W_FD.shape
    width = min(D, k + oversample)
    Q_DW = np.linalg.qr(np.random.default_rng(seed).standard_normal((D, width)))[0]

    def gram_times(Q_DW):  # A^T A Q
        Y_DW = np.zeros((D, Q_DW.shape[1]))
        for lo in range(0, F, BLOCK_ROWS):
            A_BD = unit_block(W_FD, lo, lo + BLOCK_ROWS)
            Y_DW += A_BD.T @ (A_BD @ Q_DW)
        return Y_DW

    for _ in range(iterations):
        Q_DW = np.linalg.qr(gram_times(Q_DW))[0]
    small_WW = Q_DW.T @ gram_times(Q_DW)  # Rayleigh-Ritz: the top eigenvectors of the projected Gram matrix
    values, vectors = np.linalg.eigh((small_WW + small_WW.T) / 2)
    V_Dk = Q_DW @ vectors[:, np.argsort(-values, kind="stable")[:k]]
    largest_k = V_Dk[np.abs(V_Dk).argmax(axis=0), np.arange(V_Dk.shape[1])]
    return V_Dk * np.where(largest_k < 0, -1.0, 1.0)  # each vector's largest entry positive: one sign, always


def project(W_FD, V_Dk: np.ndarray) -> np.ndarray:
    """(F, k) float32 coordinates of the unit rows of W on the columns of V."""
    out = np.empty((W_FD.shape[0], V_Dk.shape[1]), dtype=np.float32)
    for lo in range(0, len(out), BLOCK_ROWS):
        out[lo:lo + BLOCK_ROWS] = unit_block(W_FD, lo, lo + BLOCK_ROWS) @ V_Dk
    return out


def umap_2d(X_FK: np.ndarray, *, seed: int) -> np.ndarray:
    """(F, 2) float32: umap-learn's seeded layout of the rows of X (more than N_NEIGHBORS rows)."""
    with warnings.catch_warnings():
        # umap/__init__.py warns on import when TensorFlow (only for ParametricUMAP, unused here) is absent.
        warnings.filterwarnings("ignore", message="Tensorflow not installed", category=ImportWarning)
        from umap import UMAP
    # n_jobs=1 is what random_state implies; said explicitly, umap-learn has nothing to warn about.
    reducer = UMAP(n_components=2, n_neighbors=N_NEIGHBORS, min_dist=MIN_DIST, metric="euclidean",
                   random_state=seed, n_jobs=1, verbose=False)
    return np.asarray(reducer.fit_transform(X_FK), dtype=np.float32)


def quantise(xy_F2: np.ndarray) -> np.ndarray:
    """(F, 2) uint16 on [0, GRID], both axes scaled by the same factor, each starting at 0."""
    xy = np.asarray(xy_F2, dtype=np.float64)
    if not np.isfinite(xy).all():
        raise ValueError("the layout has non-finite coordinates")
    if not len(xy):
        return np.zeros((0, 2), dtype=np.uint16)
    low, span = xy.min(axis=0), float((xy.max(axis=0) - xy.min(axis=0)).max())
    if span == 0:
        return np.full(xy.shape, GRID // 2, dtype=np.uint16)
    return np.rint((xy - low) * (GRID / span)).astype(np.uint16)


def decoder_layout(W_dec_FD, *, seed: int = 0) -> FeatureLayout:
    """The feature map of decoder rows `W_dec_FD` (F, D): see the module docstring."""
    if len(W_dec_FD.shape) != 2:
        raise ValueError(f"decoder directions must be a (features, d_model) matrix, got shape {tuple(W_dec_FD.shape)}")
    F, D = W_dec_FD.shape
    if F <= N_NEIGHBORS:  # too few points for UMAP's neighbourhoods: the first two singular vectors
        V_D2 = top_directions(W_dec_FD, 2, seed=seed) if D >= 2 and F else np.eye(D, 2)
        return FeatureLayout(quantise(project(W_dec_FD, V_D2)), "pca")
    V = top_directions(W_dec_FD, PCA_DIMS, seed=seed) if D > PCA_DIMS else np.eye(D)
    return FeatureLayout(quantise(umap_2d(project(W_dec_FD, V), seed=seed)), "umap")


class DensityScale(NamedTuple):
    """The log10-density codes of the map's colours (code 0: never fired)."""

    codes_F: np.ndarray
    """(F,) uint16: 1 + round((log10 density - low) / (high - low) x (CODES - 1)) for a live feature."""
    log10_low: int
    """The decade of the rarest live feature (at most high - 1)."""
    log10_high: int
    """The decade above the densest live feature (at most 0)."""


def density_codes(density_F: np.ndarray) -> DensityScale:
    """Each density's code on a scale from the rarest live feature's decade to the densest's.
    The page turns a code back into log10 density to within (high - low) / (2 (CODES - 1)) decades."""
    density = np.asarray(density_F, dtype=np.float64)
    if density.ndim != 1 or not np.isfinite(density).all() or (density < 0).any() or (density > 1).any():
        raise ValueError("feature densities must be a 1-D array of finite values in [0, 1]")
    live = density > 0
    logs = np.log10(density[live])
    high = min(0, math.ceil(float(logs.max()))) if live.any() else 0
    low = min(high - 1, math.floor(float(logs.min()))) if live.any() else -1
    codes = np.zeros(len(density), dtype=np.uint16)
    codes[live] = 1 + np.rint((logs - low) / (high - low) * (CODES - 1)).astype(np.int64).clip(0, CODES - 1)
    return DensityScale(codes, low, high)


def code_log10(codes, log10_low: int, log10_high: int) -> np.ndarray:
    """log10 density of live codes (>= 1), as the page computes it."""
    return log10_low + (np.asarray(codes, dtype=np.float64) - 1) / (CODES - 1) * (log10_high - log10_low)


def map_document(layout: FeatureLayout, density_F: np.ndarray, *, dictionary: str, n_tokens: int) -> dict:
    """What dictionary-map.js hands the page: the scale, the palette and `points`, base64 of
    x (uint16 little-endian) for every feature, then every y, then every density code."""
    xy = np.asarray(layout.xy_F2, dtype=np.uint16)
    if len(xy) != len(density_F):
        raise ValueError(f"the feature map has {len(xy)} points but the site has {len(density_F)} features: "
                         "rematerialize feature_map for this dictionary")
    scale = density_codes(density_F)
    packed = b"".join(a.astype("<u2").tobytes() for a in (xy[:, 0], xy[:, 1], scale.codes_F))
    return {"dictionary": dictionary, "features": int(len(xy)), "method": layout.method, "n_tokens": int(n_tokens),
            "grid": GRID, "codes": CODES, "log10_low": scale.log10_low, "log10_high": scale.log10_high,
            "palette": list(VIRIDIS), "dead_colour": DEAD_COLOUR, "points": base64.b64encode(packed).decode("ascii")}


def layout_table(layout: FeatureLayout) -> "pa.Table":
    """The layout as feature_map stores it (schemas.feature_map_schema); its method goes in the manifest."""
    import pyarrow as pa

    from sae_assets.core import schemas

    xy = np.asarray(layout.xy_F2, dtype=np.uint16)
    return pa.table([pa.array(np.arange(len(xy), dtype=np.int32)), pa.array(xy[:, 0]), pa.array(xy[:, 1])],
                    schema=schemas.feature_map_schema())


def write_layout(table: "pa.Table", path) -> None:
    """Parquet of a layout table: ids 0..F-1 delta-coded to nearly nothing, x and y (stored as
    32-bit integers) plain and zstd-compressed, about 5 bytes a feature (dictionary pages: 13)."""
    import pyarrow.parquet as pq

    pq.write_table(table, path, use_dictionary=False, compression="zstd",
                   column_encoding={"feature": "DELTA_BINARY_PACKED", "x": "PLAIN", "y": "PLAIN"})


def read_layout(path, method: str, *, where: str) -> FeatureLayout:
    """The layout `write_layout` wrote at `path` (its method from the manifest)."""
    import pyarrow.parquet as pq

    return layout_from_table(pq.read_table(path), method, where=where)


def layout_from_table(table: "pa.Table", method: str, *, where: str) -> FeatureLayout:
    """A stored layout back; its rows must be features 0, 1, ... in order (`where` names it in the error)."""
    features = table.column("feature").to_numpy()
    if not np.array_equal(features, np.arange(len(features))):
        raise ValueError(f"{where}: the layout's rows are not features 0..{len(features) - 1} in order")
    xy = np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], axis=1).astype(np.uint16)
    return FeatureLayout(xy, method)


def read_points(document: dict) -> tuple[np.ndarray, np.ndarray]:
    """((F, 2) uint16 positions, (F,) uint16 density codes) of a map document's `points`."""
    F = document["features"]
    raw = np.frombuffer(base64.b64decode(document["points"]), dtype="<u2")
    return np.stack([raw[:F], raw[F:2 * F]], axis=1), raw[2 * F:3 * F]
