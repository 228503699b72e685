"""Per-feature k best entries, kept in sorted rows: the torch path of the feature sampler.

`BestK(width, k, key_dtype, device, unique_keys=...)` keeps for each of `width` features the k
entries that come first in the order (key, token index), one sorted (W, K) row per feature,
and merges candidate entries batch by batch (`offer`) exactly, whatever order and batching
they arrive in. `FeatureRangeSampler` uses two: the top-K by activation (key = -activation)
and the bottom-k sample by hash. This path serves tensors on a GPU and is the reference the
compiled CPU kernel (sampling_kernels.py) is tested against byte for byte.
Tests: tests/test_features_core.py.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

_INT64_MAX = torch.iinfo(torch.int64).max


class BestK:
    """Per-feature k best entries in the order (key, token), one sorted row per feature.

    Empty slots hold value 0 (real entries are activations > 0) and sort last. With
    `unique_keys` (the sample: the hash is a bijection of the token for each feature) one sort
    per row suffices; otherwise (the top-K: equal activations) rows are sorted by token first.
    """

    def __init__(self, width: int, k: int, key_dtype: torch.dtype, device: torch.device, *, unique_keys: bool):
        self.k, self.unique_keys = k, unique_keys
        self._empty_key = float("inf") if key_dtype.is_floating_point else _INT64_MAX
        self.key_WK = torch.full((width, k), self._empty_key, dtype=key_dtype, device=device)
        self.tok_WK = torch.full((width, k), _INT64_MAX, dtype=torch.int64, device=device)
        self.val_WK = torch.zeros((width, k), dtype=torch.float32, device=device)

    def offer(self, w_N: Tensor, key_N: Tensor, tok_N: Tensor, val_N: Tensor) -> None:
        """Merge candidates into the rows; exact whatever order and batching they come in."""
        # A candidate worse than its row's k-th entry can never be kept; ties go through.
        keep_N = (key_N <= self.key_WK[:, -1][w_N]).nonzero()[:, 0]
        if not len(keep_N):
            return
        keep_N = keep_N[torch.argsort(w_N[keep_N], stable=True)]  # grouped by row
        w_N, key_N, tok_N, val_N = (x[keep_N] for x in (w_N, key_N, tok_N, val_N))
        W, dev = self.key_WK.shape[0], w_N.device
        counts_W = torch.bincount(w_N, minlength=W)
        col_N = torch.arange(len(w_N), device=dev) - (counts_W.cumsum(0) - counts_W)[w_N]  # rank within row
        rows_R = counts_W.nonzero()[:, 0]
        if int(counts_W.max()) * len(rows_R) <= 4 * len(w_N) + 4 * len(rows_R):
            self._merge_rows(rows_R, w_N, col_N, key_N, tok_N, val_N)
            return
        # Skewed counts (a dense feature among sparse ones): pad each size class separately.
        size_W = torch.full((W,), -1, dtype=torch.int64, device=dev)
        size_W[rows_R] = torch.log2(counts_W[rows_R].double()).ceil().long() // 2  # classes of x4
        for size in torch.unique(size_W[rows_R]).tolist():
            sel_N = (size_W[w_N] == size).nonzero()[:, 0]
            self._merge_rows((size_W == size).nonzero()[:, 0], *(x[sel_N] for x in (w_N, col_N, key_N, tok_N, val_N)))

    def _merge_rows(self, rows_R: Tensor, w_N: Tensor, col_N: Tensor, key_N: Tensor, tok_N: Tensor,
                    val_N: Tensor) -> None:
        """Re-select rows `rows_R` from their state (R, K) and their candidates padded to (R, C)."""
        slot_W = torch.zeros(self.key_WK.shape[0], dtype=torch.int64, device=w_N.device)
        slot_W[rows_R] = torch.arange(len(rows_R), device=w_N.device)
        R, C = len(rows_R), int(col_N.max()) + 1
        padded = []
        for state, fill, new in ((self.key_WK, self._empty_key, key_N), (self.tok_WK, _INT64_MAX, tok_N),
                                 (self.val_WK, 0.0, val_N)):
            pad_RC = torch.full((R, C), fill, dtype=state.dtype, device=state.device)
            pad_RC.view(-1).scatter_(0, slot_W[w_N] * C + col_N, new)  # a flat scatter: far cheaper than index_put
            padded.append(pad_RC)
        if self.unique_keys:
            self._merge_sorted(rows_R, *padded)
            return
        merged = [torch.cat([state[rows_R], pad_RC], dim=1)  # (R, K + C)
                  for state, pad_RC in zip((self.key_WK, self.tok_WK, self.val_WK), padded)]
        key_RM, tok_RM, _ = merged
        order = torch.argsort(tok_RM, dim=1)
        order = order.gather(1, torch.argsort(key_RM.gather(1, order), dim=1, stable=True))
        key_RM, tok_RM, val_RM = (x.gather(1, order) for x in merged)
        dup = (key_RM[:, 1:] == key_RM[:, :-1]) & (tok_RM[:, 1:] == tok_RM[:, :-1]) & (val_RM[:, 1:] > 0)
        if bool(dup.any()):
            r, c = dup.nonzero()[0].tolist()
            self._raise_repeated(int(tok_RM[r, c]), int(rows_R[r]))
        for state, merged_RM in ((self.key_WK, key_RM), (self.tok_WK, tok_RM), (self.val_WK, val_RM)):
            state.index_copy_(0, rows_R, merged_RM[:, :self.k].contiguous())

    def _merge_sorted(self, rows_R: Tensor, key_RC: Tensor, tok_RC: Tensor, val_RC: Tensor) -> None:
        """Unique keys: sort only the candidates, then merge two sorted lists by rank arithmetic.

        The state rows (R, K) are already sorted, so re-sorting them with every batch (what
        dominated the sampler's time) is unnecessary: an entry's rank in the union is its rank
        in its own list plus the number of entries of the other list with a smaller key.
        """
        order = torch.argsort(key_RC, dim=1)
        key_RC, tok_RC, val_RC = (x.gather(1, order) for x in (key_RC, tok_RC, val_RC))
        key_RK, tok_RK, val_RK = self.key_WK[rows_R], self.tok_WK[rows_R], self.val_WK[rows_R]
        K, C = key_RK.shape[1], key_RC.shape[1]
        below_RC = torch.searchsorted(key_RK, key_RC)  # state entries with a smaller key
        hit = below_RC.clamp(max=K - 1)
        same = (key_RK.gather(1, hit) == key_RC) & (val_RC > 0) & (val_RK.gather(1, hit) > 0)
        if bool(same.any()):
            r, c = same.nonzero()[0].tolist()
            self._raise_repeated(int(tok_RC[r, c]), int(rows_R[r]))
        # Candidates before state entry j: those inserted at positions <= j (a running count).
        inserted_RK = torch.zeros(len(rows_R), K + 1, dtype=torch.int64, device=key_RC.device)
        inserted_RK = inserted_RK.scatter_add_(1, below_RC, torch.ones_like(below_RC)).cumsum(1)[:, :K]
        rank_RK = torch.arange(K, device=key_RC.device) + inserted_RK
        rank_RC = torch.arange(C, device=key_RC.device) + below_RC
        # Scatter real entries to their ranks; empty slots and ranks >= K go to a dump column.
        dump = K + C
        idx_RK = torch.where((val_RK > 0) & (rank_RK < K), rank_RK, dump)
        idx_RC = torch.where((val_RC > 0) & (rank_RC < K), rank_RC, dump)
        for state, fill, old, new in ((self.key_WK, self._empty_key, key_RK, key_RC), (self.tok_WK, _INT64_MAX, tok_RK, tok_RC),
                                      (self.val_WK, 0.0, val_RK, val_RC)):
            out = torch.full((len(rows_R), dump + 1), fill, dtype=state.dtype, device=state.device)
            out.scatter_(1, idx_RK, old).scatter_(1, idx_RC, new)
            state.index_copy_(0, rows_R, out[:, :K])

    @staticmethod
    def _raise_repeated(token: int, row: int) -> None:
        raise ValueError(f"token {token} was offered twice for feature offset {row}: "
                         "each token must be seen once (a repeated batch?)")

    def columns(self, lo: int) -> dict[str, np.ndarray]:
        w, rank = (self.val_WK > 0).nonzero(as_tuple=True)  # row-major: sorted by (feature, rank)
        return {"feature": (w + lo).cpu().numpy().astype(np.int32), "rank": rank.cpu().numpy().astype(np.int32),
                "key": self.key_WK[w, rank].cpu().numpy(), "token_index": self.tok_WK[w, rank].cpu().numpy(),
                "activation": self.val_WK[w, rank].cpu().numpy()}
