"""Per-feature example tables for the feature browser: exact top-K, a uniform sample, statistics.

`FeatureRangeSampler(lo, hi, top_k=..., seed=...)` streams batches of SAE feature activations
for the features [lo, hi) (`update(f_BW, token_index_B)`) and keeps, per feature: the top_k
activations, ordered by value descending then global token index ascending; a uniform sample
of sample_k (default 10·top_k) activating tokens, namely the sample_k smallest
`feature_token_hash(seed, feature, token)` among the tokens where the feature is > 0
(bottom-k sampling); and the count, sum and max of its positive activations with a histogram
over fixed edges. Both selections depend only on the set of (token, activation) pairs, so
shards processed in any batches and merged by `merge_feature_samples` (features/merge.py,
which also defines the tables) give the tables one pass would. Memory is O(B·W) per batch plus O(W·(top_k + sample_k))
state: a batch's active entries are first compared with each feature's current worst kept
entry, and only the survivors are sorted together with their feature's row. Every token must
be offered once; after a ValueError from `update` start again with a new sampler. CPU batches
go through one compiled pass (sampling_kernels.py, numba) with the same results; CUDA batches
through the torch code here. Tests: tests/test_features_core.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from sae_assets.core import schemas
from sae_assets.core.activations.reader import as_float32, to_numpy_matrix
from sae_assets.core.corpus.special_tokens import keep_positions
from sae_assets.core.features.best_k import BestK
from sae_assets.core.features.merge import FeatureSamples, build_feature_samples, merge_feature_samples
from sae_assets.core.progress import QUIET, ProgressLog

__all__ = ["DEFAULT_HIST_EDGES", "FeatureRangeSampler", "FeatureSamples", "feature_keys", "feature_token_hash",
           "merge_feature_samples", "sample_activation_table"]

# Letter key: B tokens in a batch, W features in the range [lo, hi), K kept entries per
# feature (top_k or sample_k), H histogram bins, N active entries / candidates of a batch,
# R rows (features) being merged, C candidates per row after padding, M = K + C.

DEFAULT_HIST_EDGES: tuple[float, ...] = tuple(np.logspace(-4, 3, 57).tolist())
"""Log-spaced histogram edges 1e-4 .. 1e3 (56 bins, 8 per decade); values outside go to the end bins."""

_INT64_MIN = torch.iinfo(torch.int64).min
_U64 = 1 << 64
_M1, _M2, _GAMMA = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15


# --- the hash ---------------------------------------------------------------------------------
# mix64 is the splitmix64 finaliser (a bijection of 64-bit words); all arithmetic is mod 2**64:
#   mix64(z)               = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27;
#                            z *= 0x94D049BB133111EB; z ^= z >> 31
#   feature_key(seed, f)   = mix64(mix64(seed) + (f + 1) * 0x9E3779B97F4A7C15)
#   hash(seed, f, token)   = mix64(mix64(token) + feature_key(seed, f))        (uint64)
# For fixed (seed, f) the hash is a bijection of the token index, so no two tokens of a feature
# share a hash and "smallest hashes" is a total order (the token tie-break never fires).
# Tables store the hash as uint64; torch, which lacks uint64 arithmetic, orders by the int64
# `order key` = hash ^ 2**63, whose signed order is the hash's unsigned order.

def _mix64_np(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # wrap-around is the point (numpy warns only on 0-d values)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
        return z ^ (z >> np.uint64(31))


def feature_keys(seed: int, features: np.ndarray) -> np.ndarray:
    """uint64 per-feature keys `feature_key(seed, f)` of global feature ids (any shape)."""
    if not 0 <= int(seed) < _U64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    f = np.asarray(features, dtype=np.int64).astype(np.uint64)
    base = _mix64_np(np.array([int(seed)], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        return _mix64_np(base + (f + np.uint64(1)) * np.uint64(_GAMMA))


def feature_token_hash(seed: int, features: np.ndarray, token_index: np.ndarray) -> np.ndarray:
    """uint64 hash(seed, feature, token) of global feature ids and token indices (broadcast).

    The reference implementation in numpy; the sampler computes the same values in torch.
    """
    tok = np.asarray(token_index, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        return _mix64_np(_mix64_np(tok) + feature_keys(seed, features))


def _signed(u: int) -> int:
    return u - _U64 if u >= 1 << 63 else u


def _srl(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bit patterns."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64_t(z: Tensor) -> Tensor:
    z = (z ^ _srl(z, 30)) * _signed(_M1)
    z = (z ^ _srl(z, 27)) * _signed(_M2)
    return z ^ _srl(z, 31)


def order_key_to_hash(k: np.ndarray) -> np.ndarray:
    """uint64 hashes of the int64 order keys the sampler sorts by (hash ^ 2**63)."""
    return np.asarray(k, dtype=np.int64).view(np.uint64) ^ np.uint64(1 << 63)


def check_hist_edges(edges) -> np.ndarray:
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or len(e) < 2 or not np.all(np.isfinite(e)) or not np.all(np.diff(e) > 0):
        raise ValueError("hist_edges must be a 1-D, finite, strictly increasing sequence of >= 2 edges")
    return e


# --- the sampler ------------------------------------------------------------------------------

def _active_entries(f_BW: Tensor) -> Tensor:
    """(N,) flat indices of the entries > 0, in row-major order."""
    if f_BW.device.type == "cpu":  # numpy's flatnonzero is several times faster than torch's nonzero on CPU
        return torch.from_numpy(np.flatnonzero(f_BW.numpy() > 0))
    return (f_BW > 0).view(-1).nonzero()[:, 0]


class FeatureRangeSampler:
    """Streams (B, W) activations of the features [lo, hi) into per-feature top-K, sample and stats.

    Parameters
    ----------
    lo, hi
        The global feature ids covered; `update` takes activations of exactly hi - lo features.
    top_k
        Largest activations kept per feature (value descending, then token index ascending).
    seed
        Seed of the sample's hash, in [0, 2**64); the same seed gives the same sample anywhere.
    sample_k
        Size of the uniform sample of activating tokens per feature; default 10 * top_k.
    hist_edges
        Histogram bin edges of the positive activations (values outside go to the end bins).
    compiled
        Update CPU state with the compiled kernel (sampling_kernels.py); False runs the torch
        code, the path of CUDA batches, on the CPU too (for tests). The tables are the same.
    kernel_threads
        Threads of the compiled kernel, each over its own features (the tables do not depend
        on it). One by default: after each product torch's OpenMP workers spin for a while,
        and a second kernel thread competes with them for the cores (bench/feature_sampling.py
        at d_in 128 on 2 cores: 0.64x the bare encoder with 2, 0.75x with 1).

    State lives on the device of the first batch; `result()` may be called at any time.
    """

    def __init__(self, lo: int, hi: int, *, top_k: int, seed: int, sample_k: int | None = None,
                 hist_edges=DEFAULT_HIST_EDGES, compiled: bool = True, kernel_threads: int = 1) -> None:
        if not 0 <= lo < hi or hi > 2**31:
            raise ValueError(f"feature range must satisfy 0 <= lo < hi <= 2**31, got [{lo}, {hi})")
        sample_k = 10 * top_k if sample_k is None else sample_k
        if top_k < 1 or sample_k < 1:
            raise ValueError(f"top_k and sample_k must be >= 1, got {top_k} and {sample_k}")
        self.lo, self.hi, self.width = int(lo), int(hi), int(hi - lo)
        self.top_k, self.sample_k = int(top_k), int(sample_k)
        self.seed = int(seed)
        self.hist_edges = check_hist_edges(hist_edges)
        self._keys_W = feature_keys(self.seed, np.arange(self.lo, self.hi)).view(np.int64)  # validates seed
        self.n_tokens = 0
        self.compiled = bool(compiled)
        if kernel_threads < 1:
            raise ValueError(f"kernel_threads must be >= 1, got {kernel_threads}")
        self.kernel_threads = int(kernel_threads)
        self._device: torch.device | None = None
        self._kernel_args: tuple | None = None  # the compiled kernel's arguments, from its first batch on

    def _init_state(self, device: torch.device) -> None:
        W, H = self.width, len(self.hist_edges) - 1
        self._device = device
        self._top = BestK(W, self.top_k, torch.float32, device, unique_keys=False)  # key = -activation
        self._sample = BestK(W, self.sample_k, torch.int64, device, unique_keys=True)  # key = hash order key
        self._key_W = torch.from_numpy(self._keys_W).to(device)
        self._inner_edges = torch.from_numpy(self.hist_edges[1:-1]).to(device)
        self._count_W = torch.zeros(W, dtype=torch.int64, device=device)
        self._sum_W = torch.zeros(W, dtype=torch.float64, device=device)
        self._max_W = torch.zeros(W, dtype=torch.float32, device=device)
        self._hist_WH = torch.zeros(W, H, dtype=torch.int64, device=device)

    def state_tensors(self) -> dict[str, Tensor]:
        """Every tensor the sampler keeps between batches (their sizes never grow)."""
        if self._device is None:
            return {}
        return {"top_key": self._top.key_WK, "top_tok": self._top.tok_WK, "top_val": self._top.val_WK,
                "sample_key": self._sample.key_WK, "sample_tok": self._sample.tok_WK,
                "sample_val": self._sample.val_WK, "count": self._count_W, "sum": self._sum_W,
                "max": self._max_W, "hist": self._hist_WH}

    @torch.no_grad()
    def update(self, f_BW: Tensor, token_index_B) -> None:
        """Offer B tokens: activations (B, W) of features lo..hi and their global token indices (B,)."""
        f_BW = torch.as_tensor(f_BW)
        if f_BW.ndim != 2 or f_BW.shape[1] != self.width:
            raise ValueError(f"activations must be (B, {self.width}) for features [{self.lo}, {self.hi}), "
                             f"got {tuple(f_BW.shape)}")
        if self._device is None:
            self._init_state(f_BW.device)
        f_BW = f_BW.to(self._device, torch.float32).contiguous()
        tok_B = torch.as_tensor(token_index_B, device=self._device)
        if tok_B.shape != (f_BW.shape[0],) or tok_B.dtype.is_floating_point or tok_B.dtype == torch.bool:
            raise ValueError(f"token_index must be ({f_BW.shape[0]},) integers, got {tuple(tok_B.shape)} {tok_B.dtype}")
        tok_B = tok_B.to(torch.int64)
        if f_BW.shape[0] == 0:
            return
        if self.compiled and self._device.type == "cpu":
            self._update_compiled(f_BW.detach().numpy(), tok_B.contiguous().numpy())
            self.n_tokens += int(f_BW.shape[0])
            return
        max_W = f_BW.amax(0)  # dense, so that NaN anywhere is seen
        if bool(torch.isnan(max_W).any()):
            bad = (torch.isnan(max_W).nonzero()[:, 0] + self.lo).tolist()
            raise ValueError(f"NaN activations for feature(s) {bad[:5]} (range [{self.lo}, {self.hi}))")
        self._max_W = torch.maximum(self._max_W, max_W)
        idx_N = _active_entries(f_BW)  # row-major
        b_N, w_N = idx_N // self.width, idx_N % self.width
        v_N, t_N = f_BW.view(-1)[idx_N], tok_B[b_N]
        if f_BW.is_cuda:  # atomics would make a sparse float sum irreproducible there
            self._sum_W += f_BW.clamp_min(0).sum(0, dtype=torch.float64)
        else:
            self._sum_W += torch.bincount(w_N, weights=v_N.double(), minlength=self.width)
        self._count_W += torch.bincount(w_N, minlength=self.width)
        H = self._hist_WH.shape[1]
        bin_N = torch.bucketize(v_N.double(), self._inner_edges, right=True)
        self._hist_WH += torch.bincount(w_N * H + bin_N, minlength=self.width * H).view(self.width, H)
        self._top.offer(w_N, -v_N, t_N, v_N)
        order_N = _mix64_t(_mix64_t(tok_B)[b_N] + self._key_W[w_N]) ^ _INT64_MIN  # hash ^ 2**63
        self._sample.offer(w_N, order_N, t_N, v_N)
        self.n_tokens += int(f_BW.shape[0])

    def _update_compiled(self, f_BW: np.ndarray, tok_B: np.ndarray) -> None:
        """One pass of the compiled kernel over a C-contiguous float32 (B, W) batch on the CPU."""
        from sae_assets.core.features import sampling_kernels as kernels  # numba: only when used

        if self._kernel_args is None:  # constants, scratch, then numpy views sharing the state tensors' memory
            edges_E = self._inner_edges.numpy()
            self._kernel_args = (self._keys_W.view(np.uint64), edges_E, kernels.hist_bin_table(edges_E),
                                 *kernels.candidate_buffers(self.width),
                                 *(x.numpy() for x in self.state_tensors().values()))
        status, b, w = kernels.update(f_BW, tok_B, self._kernel_args, self.kernel_threads)
        if status == kernels.NAN:
            bad = (np.flatnonzero(np.isnan(f_BW).any(0)) + self.lo).tolist()
            raise ValueError(f"NaN activations for feature(s) {bad[:5]} (range [{self.lo}, {self.hi}))")
        if status == kernels.REPEATED:
            BestK._raise_repeated(int(tok_B[b]), int(w))

    def result(self) -> FeatureSamples:
        """The tables for every token offered so far (the sampler can go on afterwards)."""
        if self._device is None:
            self._init_state(torch.device("cpu"))
        top = self._top.columns(self.lo)
        del top["key"]
        sample = self._sample.columns(self.lo)
        sample = {"feature": sample["feature"], "rank": sample["rank"], "hash": order_key_to_hash(sample["key"]),
                  "token_index": sample["token_index"], "activation": sample["activation"]}
        stats = {"feature": np.arange(self.lo, self.hi, dtype=np.int32), "count": self._count_W.cpu().numpy(),
                 "sum": self._sum_W.cpu().numpy(), "max": self._max_W.cpu().numpy(),
                 "hist": self._hist_WH.cpu().numpy()}
        return build_feature_samples(top, sample, stats, lo=self.lo, hi=self.hi, top_k=self.top_k,
                                     sample_k=self.sample_k, seed=self.seed, n_tokens=self.n_tokens,
                                     hist_edges=self.hist_edges)


def _float32_input(rows_BD: np.ndarray) -> Tensor:
    """A float32 tensor of activation rows: float32 rows as they are, without a copy, else converted.

    Rows of a memory-mapped (read-only) Arrow file are wrapped read-only: torch warns about such
    arrays because writing through them would fail, and nothing here writes to its input
    (`encode_range` only multiplies it), so that warning is silenced for this one wrap.
    """
    if rows_BD.dtype != np.float32:
        return torch.from_numpy(as_float32(rows_BD))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(rows_BD)


def sample_activation_table(table, *, hook: str, encode_range, lo: int, hi: int, top_k: int, sample_k: int,
                            seed: int, batch_size: int, device: str = "cpu",
                            progress_log: ProgressLog | None = None,
                            exclude_token_ids: Sequence[int] = ()) -> FeatureSamples:
    """Run a `FeatureRangeSampler` over a cached_activations table, `batch_size` tokens at a time.

    `encode_range(x_BD)` gives the (B, hi - lo) feature activations of float32 inputs; memory
    is O(batch_size x (D + hi - lo)) on top of the sampler's fixed state. The rows of tokens in
    `exclude_token_ids` (special tokens; the table's `token_id` column says which) are dropped
    batch by batch, so that only a batch is ever copied, never the table's activation column;
    the tables are those of the table without those rows, up to the float rounding of the
    encoder's product on batches of other sizes. A progress log counts the batches (its steps)
    and the tokens kept.
    """
    if hook not in table.column_names:
        raise ValueError(f"activations have no column {hook!r} (have {table.column_names})")
    excluded = tuple(sorted(set(exclude_token_ids)))
    columns = ["token_index", hook, *([schemas.TOKEN_ID] if excluded else [])]
    if excluded and schemas.TOKEN_ID not in table.column_names:
        raise ValueError(f"activations have no column {schemas.TOKEN_ID!r} to exclude special tokens by")
    sampler = FeatureRangeSampler(lo, hi, top_k=top_k, sample_k=sample_k, seed=seed)
    batches = table.select(columns).to_batches(max_chunksize=batch_size)  # a list of views
    report = progress_log or QUIET
    report.start(len(batches))
    for step, batch in enumerate(batches, start=1):
        rows_BD, tok_B = to_numpy_matrix(batch.column(1)), batch.column(0).to_numpy()
        if excluded:
            keep_B = keep_positions(batch.column(2).to_numpy(), excluded)
            if not keep_B.all():  # a copy of this batch's kept rows only
                rows_BD, tok_B = rows_BD[keep_B], tok_B[keep_B]
        if len(tok_B):
            with torch.no_grad():
                f_BW = encode_range(_float32_input(rows_BD).to(device))
            sampler.update(f_BW, torch.tensor(tok_B, device=f_BW.device))
        report.update(step, tokens=sampler.n_tokens)
    report.close()
    return sampler.result()
