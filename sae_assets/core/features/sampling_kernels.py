"""Compiled (numba) per-batch kernel of the feature sampler, the path of batches on the CPU.

`update` folds one dense (B, W) batch of feature activations into a `FeatureRangeSampler`'s
state arrays (numpy views of its tensors): a vectorised pass builds 64-bit masks of the entries
> 0 (or NaN), then, 64 features at a time so that their state rows stay in cache, each such
entry updates count, sum, max and histogram and is compared with its feature's worst kept top-K
entry (value desc, token asc) and worst sample entry (hash order key asc); only an entry that
beats one is inserted: into the sorted top-K row (O(K)), or into the sample row, filled in
arrival order and then kept as a 4-ary max-heap (O(log S)); both are rare once rows are full.
Blocks of features run on up to torch's thread count of threads (the kernel releases the GIL).
The tables equal those of the torch code in sampling.py (the path of CUDA batches) bit for bit,
sums included (float64, per batch in token order, then added to the running sum, as
`torch.bincount` does). Only sampling.py imports this module, on its first CPU batch; the
kernels compile on first use (a few seconds) and are cached on disk (`cache=True`). Tests:
tests/test_features_core.py runs its brute-force, merge and error tests through this path and
compares it with the torch path on random data with ties.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

# Letter key: B tokens in a batch, W features in the range, K kept entries per feature (top_k),
# S kept entries of the sample per feature (sample_k), H histogram bins, E = H - 1 inner edges,
# T = 4096 buckets of float32 bit patterns, M blocks of 64 features.

OK, NAN, REPEATED = 0, 1, 2
"""Status codes of `update_batch`: done; a NaN activation; a token offered twice."""

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_SIGN = np.uint64(1 << 63)
_EMPTY = np.iinfo(np.int64).max
_DEBRUIJN = np.uint64(0x03F79D71B4CB0A89)
_DEBRUIJN_POS = np.zeros(64, dtype=np.int64)  # bit i set alone: _DEBRUIJN_POS[(2**i * _DEBRUIJN) >> 58] = i
_DEBRUIJN_POS[[((1 << i) * 0x03F79D71B4CB0A89 % (1 << 64)) >> 58 for i in range(64)]] = np.arange(64)


@numba.njit(cache=True, nogil=True)
def _lowest_bit(mask):
    """Index of the lowest set bit of a non-zero uint64 (a de Bruijn multiply and a lookup)."""
    return _DEBRUIJN_POS[((mask & (~mask + np.uint64(1))) * _DEBRUIJN) >> np.uint64(58)]


@numba.njit(cache=True, nogil=True)
def _mix64(z):
    """splitmix64 finaliser of a uint64 (wrapping arithmetic), as `_mix64_np` in sampling.py."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@numba.njit(cache=True, nogil=True)
def _insert_top(val_WK, tok_WK, key_WK, w, v, t):
    """Insert (v, t) into row w, sorted by (value desc, token asc), which it does not rank below;
    the row's last entry drops out. False if the row already holds (v, t)."""
    K = val_WK.shape[1]
    if val_WK[w, K - 1] == v and tok_WK[w, K - 1] == t:
        return False
    j = K - 1
    while j > 0:
        pv, pt = val_WK[w, j - 1], tok_WK[w, j - 1]
        if pv > v or (pv == v and pt < t):
            break
        if pv == v and pt == t:
            return False
        val_WK[w, j], tok_WK[w, j], key_WK[w, j] = pv, pt, key_WK[w, j - 1]
        j -= 1
    val_WK[w, j], tok_WK[w, j], key_WK[w, j] = v, t, -v
    return True


@numba.njit(cache=True, nogil=True)
def _sift_down(key_WS, tok_WS, val_WS, w, i, n, o, t, v):
    """Place (o, t, v) at slot i of row w, a 4-ary max-heap by key over its first n slots
    (children of slot i: 4i + 1 .. 4i + 4), and move it down until no child has a larger key.
    Half as deep as a binary heap; the largest of four children is found without branches."""
    while True:
        c = 4 * i + 1
        if c + 3 < n:
            k0, k1, k2, k3 = key_WS[w, c], key_WS[w, c + 1], key_WS[w, c + 2], key_WS[w, c + 3]
            a, ka = c + (k1 > k0), max(k0, k1)
            b, kb = c + 2 + (k3 > k2), max(k2, k3)
            best, best_key = (b if kb > ka else a), max(ka, kb)
        elif c < n:
            best, best_key = c, key_WS[w, c]
            for j in range(c + 1, n):
                if key_WS[w, j] > best_key:
                    best, best_key = j, key_WS[w, j]
        else:
            break
        if best_key <= o:
            break
        key_WS[w, i], tok_WS[w, i], val_WS[w, i] = best_key, tok_WS[w, best], val_WS[w, best]
        i = best
    key_WS[w, i], tok_WS[w, i], val_WS[w, i] = o, t, v


@numba.njit(cache=True, nogil=True)
def _push_sample(key_WS, tok_WS, val_WS, w, filled, o, t, v):
    """Put order key o into row w, which holds `filled` real entries: appended while the row is
    not full (it becomes a 4-ary max-heap by key when it fills), else replacing the root (the worst
    kept entry), whose key o must not exceed. False if the row holds key o already (the hash
    is a bijection of the token: a repeated token)."""
    S = key_WS.shape[1]
    same = 0
    for i in range(min(filled, S)):  # a branch-free count, vectorised
        same += key_WS[w, i] == o
    if same:
        return False
    if filled < S:
        key_WS[w, filled], tok_WS[w, filled], val_WS[w, filled] = o, t, v
        if filled == S - 1:
            for i in range((S - 2) // 4, -1, -1):  # heapify
                _sift_down(key_WS, tok_WS, val_WS, w, i, S, key_WS[w, i], tok_WS[w, i], val_WS[w, i])
        return True
    _sift_down(key_WS, tok_WS, val_WS, w, 0, S, o, t, v)
    return True


def sorted_heap_rows(key_WS: np.ndarray, tok_WS: np.ndarray, val_WS: np.ndarray):
    """Copies of heap rows sorted by key ascending, empty slots (value 0) last: the torch layout."""
    order_WS = np.lexsort((key_WS, val_WS == 0), axis=1)
    return tuple(np.take_along_axis(x, order_WS, axis=1) for x in (key_WS, tok_WS, val_WS))


_BITS_SHIFT = 19
"""float32 bit patterns >> 19 (sign, exponent, 4 mantissa bits): 4096 buckets of the values >= 0."""


def hist_bin_table(inner_edges_E: np.ndarray) -> np.ndarray:
    """(4096,) int64: the histogram bin of the smallest float32 of each bit-pattern bucket; the
    kernel steps up from it to the exact bin (about one step for the default edges)."""
    n_finite = (0x7F800000 >> _BITS_SHIFT) + 1  # up to +inf; the buckets above hold only NaNs
    lows = (np.arange(n_finite, dtype=np.uint32) << np.uint32(_BITS_SHIFT)).view(np.float32).astype(np.float64)
    bin_T = np.full(1 << (32 - _BITS_SHIFT - 1), len(inner_edges_E), dtype=np.int64)
    bin_T[:n_finite] = np.searchsorted(inner_edges_E, lows, side="right")
    return bin_T


@numba.njit(cache=True, nogil=True)
def update_batch(f_BW, bits_BW, tok_B, wlo, whi, fkey_W, inner_edges_E, bin_T, top_key_WK, top_tok_WK, top_val_WK,
                 smp_key_WS, smp_tok_WS, smp_val_WS, count_W, sum_W, max_W, hist_WH):
    """Fold the features [wlo, whi) of a float32 (B, W) batch (bits_BW: the same memory as
    int32) with int64 tokens (B,) into the state arrays, in place; other rows are not touched.

    fkey_W: uint64 feature keys; inner_edges_E: float64 histogram edges without the end ones;
    bin_T: `hist_bin_table(inner_edges_E)`. Top rows (W, K), sorted: key = -value (float32, +inf
    when empty), int64 token (INT64_MAX when empty), float32 value (0 when empty). Sample rows
    (W, S): int64 order key hash ^ 2**63 (INT64_MAX when empty), token, value; filled in arrival
    order, a 4-ary max-heap by key once full. Returns (status, b, w): OK, or NAN / REPEATED at entry
    (b, w), where the state is left half-updated (the sampler must then be discarded).
    """
    B = f_BW.shape[0]
    K, S, Eu = top_val_WK.shape[1], smp_key_WS.shape[1], np.uint64(inner_edges_E.shape[0])
    sum_batch_W = np.zeros(whi, dtype=np.float64)
    worst_val_W, worst_tok_W = top_val_WK[:whi, K - 1].copy(), top_tok_WK[:whi, K - 1].copy()
    worst_key_W = np.empty(whi, dtype=np.int64)  # INT64_MAX until the row is full
    for w in range(wlo, whi):
        worst_key_W[w] = smp_key_WS[w, 0] if count_W[w] >= S else _EMPTY
    mixed_B = np.empty(B, dtype=np.uint64)  # mix64(token), the first half of the hash
    for b in range(B):
        mixed_B[b] = _mix64(np.uint64(tok_B[b]))
    # mask_BM[b, m] bit i: entry (b, wlo + 64 m + i) is > 0 or NaN, i.e. its int32 bits are > 0
    # or in (-2**23, 0) (a NaN with the sign bit). Built row by row; unsigned column indices let
    # numba skip its negative-index fix-up, so LLVM turns the fixed 64-lane loop into vector code.
    M = (whi - wlo + 63) // 64
    mask_BM = np.empty((B, M), dtype=np.uint64)
    for b in range(B):
        for m in range(M):
            w0u, lanes, mask = np.uint64(wlo + 64 * m), min(64, whi - wlo - 64 * m), np.uint64(0)
            if lanes == 64:
                for i in range(64):
                    x = bits_BW[b, w0u + np.uint64(i)]
                    mask |= np.uint64((x > -8388608) & (x != 0)) << np.uint64(i)
            else:
                for i in range(lanes):
                    x = bits_BW[b, w0u + np.uint64(i)]
                    mask |= np.uint64((x > -8388608) & (x != 0)) << np.uint64(i)
            mask_BM[b, m] = mask
    # Then block by block over all B tokens: the state rows of 64 features (~250 KB for the
    # default k) stay in cache while the block's entries are folded in.
    for m in range(M):
        w0u = np.uint64(wlo + 64 * m)
        for b in range(B):
            t, mixed, mask = tok_B[b], mixed_B[b], mask_BM[b, m]
            while mask:
                wu = w0u + np.uint64(_lowest_bit(mask))  # unsigned: see above
                mask &= mask - np.uint64(1)
                v = f_BW[b, wu]
                if not v > 0:
                    return NAN, b, np.int64(wu)
                count_W[wu] += 1
                vd = np.float64(v)
                sum_batch_W[wu] += vd
                if v > max_W[wu]:
                    max_W[wu] = v
                h = np.uint64(bin_T[bits_BW[b, wu] >> _BITS_SHIFT])  # then up to the number of inner edges <= v
                while h < Eu and inner_edges_E[h] <= vd:
                    h += np.uint64(1)
                hist_WH[wu, h] += 1
                if v > worst_val_W[wu] or (v == worst_val_W[wu] and t <= worst_tok_W[wu]):  # ties go in: repeats are found
                    if not _insert_top(top_val_WK, top_tok_WK, top_key_WK, np.int64(wu), v, t):
                        return REPEATED, b, np.int64(wu)
                    worst_val_W[wu], worst_tok_W[wu] = top_val_WK[wu, K - 1], top_tok_WK[wu, K - 1]
                o = np.int64(_mix64(mixed + fkey_W[wu]) ^ _SIGN)
                if o <= worst_key_W[wu]:
                    if not _push_sample(smp_key_WS, smp_tok_WS, smp_val_WS, np.int64(wu), count_W[wu] - 1, o, t, v):
                        return REPEATED, b, np.int64(wu)
                    if count_W[wu] >= S:
                        worst_key_W[wu] = smp_key_WS[wu, 0]
    for w in range(wlo, whi):
        sum_W[w] += sum_batch_W[w]
    return OK, 0, 0


_POOL: ThreadPoolExecutor | None = None
_POOL_WORKERS = 0
_POOL_LOCK = threading.Lock()


def update(f_BW: np.ndarray, tok_B: np.ndarray, state: tuple, threads: int) -> tuple[int, int, int]:
    """`update_batch` over all W features, split into up to `threads` blocks of whole 64-feature
    words run at once (the kernel releases the GIL; the rows of the state are independent, so
    the split does not change the result). `state`: the arguments after `wlo, whi`. Returns the
    first failure by (status NAN before REPEATED, b, w), or (OK, 0, 0)."""
    global _POOL, _POOL_WORKERS
    W = f_BW.shape[1]
    bits_BW = f_BW.view(np.int32)
    parts = max(1, min(threads, W // 64))
    edges = [64 * ((W // 64) * i // parts) for i in range(parts)] + [W]
    if parts == 1:
        return update_batch(f_BW, bits_BW, tok_B, 0, W, *state)
    with _POOL_LOCK:
        if _POOL_WORKERS < parts - 1:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL, _POOL_WORKERS = ThreadPoolExecutor(parts - 1, thread_name_prefix="feature-sampling"), parts - 1
        pool = _POOL
    futures = [pool.submit(update_batch, f_BW, bits_BW, tok_B, lo, hi, *state) for lo, hi in zip(edges[1:], edges[2:])]
    results = [update_batch(f_BW, bits_BW, tok_B, 0, edges[1], *state)] + [f.result() for f in futures]  # block 0 here
    failures = [r for r in results if r[0] != OK]
    return min(failures, key=lambda r: (r[0] != NAN, r[1], r[2])) if failures else (OK, 0, 0)
