"""Compiled (numba) per-batch kernel of the feature sampler, the path of batches on the CPU.

`update` folds one dense (B, W) batch of feature activations into a `FeatureRangeSampler`'s
state arrays (numpy views of its tensors), a chunk of rows at a time (about 256 KB of the
batch, so the second pass finds it in cache): a vectorised pass builds 64-bit masks of the
entries > 0 (or NaN), then, 64 features at a time so that their state stays in cache, each
such entry updates count, sum, max and histogram and is compared with its feature's worst
kept top-K entry (value desc, token asc) and worst sample entry (hash order key asc). Only an
entry that beats one goes further: into the sorted top-K row (O(K)), or into the feature's
buffer of sample candidates, merged into its sorted sample row when the buffer fills and at
the end of the batch (O(S + c log c)); both are rare once rows are full. Entries <= 0 are not
active, so a ReLU dictionary's raw pre-activations give the tables of its activations.
The tables equal those of the torch code in sampling.py (the path of CUDA batches) bit for
bit, sums included (float64, per batch in token order, then added to the running sum, as
`torch.bincount` does), in the same row layout. Features can be split between threads (the
kernel releases the GIL). Only sampling.py imports this module, on its first CPU batch; the
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
# S kept entries of the sample per feature (sample_k), C buffered sample candidates per feature,
# H histogram bins, E = H - 1 inner edges, T = 4096 buckets of float32 bit patterns, M blocks
# of 64 features, R rows of a chunk.

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
def _flush_samples(smp_key_WS, smp_tok_WS, smp_val_WS, cand_key_WC, cand_tok_WC, cand_val_WC, cand_n_W, w,
                   tmp_key_S, tmp_tok_S, tmp_val_S):
    """Merge row w's pending candidates into its sample row, which stays sorted by key ascending
    with its real entries (value > 0) first and empty slots (key and token INT64_MAX, value 0)
    after them, the torch path's layout: a few candidates are inserted one by one; more are
    sorted, then one merge pass keeps the S smallest keys, O(S + c log c). Returns the position in the candidate buffer of a key already
    in the row or repeated among the candidates (a token offered twice), else -1."""
    c, S = cand_n_W[w], smp_key_WS.shape[1]
    cand_n_W[w] = 0
    r = 0  # real entries in the row
    while r < S and smp_val_WS[w, r] > 0:
        r += 1
    if c <= 4:  # late in a shard most rows get one or two: each inserted in place, O(S - position)
        for q in range(c):
            o = cand_key_WC[w, q]
            lo, hi = 0, r
            while lo < hi:  # the first real entry whose key is >= o
                mid = (lo + hi) >> 1
                if smp_key_WS[w, mid] < o:
                    lo = mid + 1
                else:
                    hi = mid
            if lo < r and smp_key_WS[w, lo] == o:
                return q
            if lo == S:  # beaten by the candidates inserted before it
                continue
            last = r if r < S else S - 1  # the last slot's entry drops out when the row is full
            for i in range(last, lo, -1):
                smp_key_WS[w, i], smp_tok_WS[w, i], smp_val_WS[w, i] = (
                    smp_key_WS[w, i - 1], smp_tok_WS[w, i - 1], smp_val_WS[w, i - 1])
            smp_key_WS[w, lo], smp_tok_WS[w, lo], smp_val_WS[w, lo] = o, cand_tok_WC[w, q], cand_val_WC[w, q]
            if r < S:
                r += 1
        return -1
    order_c = np.argsort(cand_key_WC[w, :c])
    i = j = n = 0
    while n < S and (i < r or j < c):
        if j < c and (i == r or cand_key_WC[w, order_c[j]] < smp_key_WS[w, i]):
            q = order_c[j]
            if j + 1 < c and cand_key_WC[w, order_c[j + 1]] == cand_key_WC[w, q]:
                return q
            tmp_key_S[n], tmp_tok_S[n], tmp_val_S[n] = cand_key_WC[w, q], cand_tok_WC[w, q], cand_val_WC[w, q]
            j += 1
        else:
            if j < c and cand_key_WC[w, order_c[j]] == smp_key_WS[w, i]:
                return order_c[j]
            tmp_key_S[n], tmp_tok_S[n], tmp_val_S[n] = smp_key_WS[w, i], smp_tok_WS[w, i], smp_val_WS[w, i]
            i += 1
        n += 1
    for p in range(n):  # n >= r: the slots past n were empty before and stay so
        smp_key_WS[w, p], smp_tok_WS[w, p], smp_val_WS[w, p] = tmp_key_S[p], tmp_tok_S[p], tmp_val_S[p]
    return -1


CANDIDATES_PER_ROW = 64
"""C: sample candidates a feature collects before they are merged into its row (and at the end
of every batch); a few merges per row fill it, and late in a shard most batches bring 0-3."""


def candidate_buffers(width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scratch of `update_batch`, empty between calls: keys (W, C), tokens (W, C), values (W, C),
    counts (W,)."""
    C = CANDIDATES_PER_ROW
    return (np.empty((width, C), np.int64), np.empty((width, C), np.int64), np.empty((width, C), np.float32),
            np.zeros(width, np.int64))


ROW_CHUNK_BYTES = 1 << 18
"""Bytes of a batch (rows x features of the range) that one chunk of `update_batch` covers: within
a core's L2 cache (1 MB here), so the entries its masks select are read from there."""

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
def update_batch(f_BW, bits_BW, tok_B, wlo, whi, fkey_W, inner_edges_E, bin_T, cand_key_WC, cand_tok_WC, cand_val_WC,
                 cand_n_W, top_key_WK, top_tok_WK, top_val_WK, smp_key_WS, smp_tok_WS, smp_val_WS, count_W, sum_W, max_W,
                 hist_WH):
    """Fold the features [wlo, whi) of a float32 (B, W) batch (bits_BW: the same memory as
    int32) with int64 tokens (B,) into the state arrays, in place; other rows are not touched.

    fkey_W: uint64 feature keys; inner_edges_E: float64 histogram edges without the end ones;
    bin_T: `hist_bin_table(inner_edges_E)`. Top rows (W, K), sorted: key = -value (float32, +inf
    when empty), int64 token (INT64_MAX when empty), float32 value (0 when empty). Sample rows
    (W, S), sorted: int64 order key hash ^ 2**63 (INT64_MAX when empty), token, value.
    cand_*: `candidate_buffers(W)`, empty on entry and on return. Returns (status, b, w): OK, or
    NAN / REPEATED at entry (b, w), where the state is left half-updated (the sampler must then
    be discarded).
    """
    B = f_BW.shape[0]
    K, S, Eu = top_val_WK.shape[1], smp_key_WS.shape[1], np.uint64(inner_edges_E.shape[0])
    sum_batch_W = np.zeros(whi, dtype=np.float64)
    worst_val_W, worst_tok_W = top_val_WK[:whi, K - 1].copy(), top_tok_WK[:whi, K - 1].copy()
    worst_key_W = np.empty(whi, dtype=np.int64)  # the sample row's largest key once it is full, else INT64_MAX
    for w in range(wlo, whi):
        worst_key_W[w] = smp_key_WS[w, S - 1] if smp_val_WS[w, S - 1] > 0 else _EMPTY
    C = cand_key_WC.shape[1]
    tmp_key_S, tmp_tok_S = np.empty(S, dtype=np.int64), np.empty(S, dtype=np.int64)
    tmp_val_S = np.empty(S, dtype=np.float32)
    mixed_B = np.empty(B, dtype=np.uint64)  # mix64(token), the first half of the hash
    for b in range(B):
        mixed_B[b] = _mix64(np.uint64(tok_B[b]))
    # mask_RM[b - b0, m] bit i: entry (b, wlo + 64 m + i) is > 0 or NaN, i.e. its int32 bits are > 0
    # or in (-2**23, 0) (a NaN with the sign bit). Built row by row; unsigned column indices let
    # numba skip its negative-index fix-up, so LLVM turns the fixed 64-lane loop into vector code.
    M = (whi - wlo + 63) // 64
    R = max(16, ROW_CHUNK_BYTES // (4 * (whi - wlo)))
    mask_RM = np.empty((R, M), dtype=np.uint64)
    for b0 in range(0, B, R):
        # A chunk of R rows at a time, about ROW_CHUNK_BYTES of the batch, so that the second pass
        # finds the chunk's values in the core's cache where the first pass left them.
        b1 = min(B, b0 + R)
        for b in range(b0, b1):
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
                mask_RM[b - b0, m] = mask
        # Then 64 features at a time over the chunk's rows: their per-entry state (count, sum,
        # max, histogram rows and the worst kept entries) stays in cache.
        for m in range(M):
            w0u = np.uint64(wlo + 64 * m)
            for b in range(b0, b1):
                t, mixed, mask = tok_B[b], mixed_B[b], mask_RM[b - b0, m]
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
                    if o <= worst_key_W[wu]:  # a candidate for the sample, merged when its buffer is full
                        if cand_n_W[wu] == C:
                            q = _flush_samples(smp_key_WS, smp_tok_WS, smp_val_WS, cand_key_WC, cand_tok_WC, cand_val_WC,
                                               cand_n_W, np.int64(wu), tmp_key_S, tmp_tok_S, tmp_val_S)
                            if q >= 0:
                                return REPEATED, _batch_row(tok_B, cand_tok_WC[wu, q]), np.int64(wu)
                            if smp_val_WS[wu, S - 1] > 0:
                                worst_key_W[wu] = smp_key_WS[wu, S - 1]
                        c = cand_n_W[wu]
                        cand_key_WC[wu, c], cand_tok_WC[wu, c], cand_val_WC[wu, c] = o, t, v
                        cand_n_W[wu] = c + 1
    for w in range(wlo, whi):
        sum_W[w] += sum_batch_W[w]
        if cand_n_W[w]:
            q = _flush_samples(smp_key_WS, smp_tok_WS, smp_val_WS, cand_key_WC, cand_tok_WC, cand_val_WC, cand_n_W, w,
                               tmp_key_S, tmp_tok_S, tmp_val_S)
            if q >= 0:
                return REPEATED, _batch_row(tok_B, cand_tok_WC[w, q]), w
    return OK, 0, 0


@numba.njit(cache=True, nogil=True)
def _batch_row(tok_B, t):
    """The first row of the batch holding token t (for the error message)."""
    for b in range(tok_B.shape[0]):
        if tok_B[b] == t:
            return b
    return 0


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
