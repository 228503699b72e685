"""Streaming top-k |shift| per datum over tensors fed one at a time.

The capture computes one tracked tensor's per-datum shifts (B, P_t) at a time; `DatumTopK`
keeps, for each datum, the k entries of largest magnitude seen so far, as (signed value,
flat index into the tracked space). The global top-k of a datum is a subset of the union of
its per-tensor top-ks, so merging after each tensor is exact while memory stays at one
tensor plus (B, 2k). A tie at the cut keeps the entries of lowest flat index, and `result`
orders each datum's entries by descending |value|, ties by ascending flat index: the output
is a function of the shifts alone, whatever torch.topk's internal order. Tests: tests/test_attribution_core.py.
"""

from __future__ import annotations

import numpy as np
import torch


def _select(abs_BP: torch.Tensor, kept: int) -> torch.Tensor:
    """(B, kept) positions of the largest entries per row; a tie at the cut keeps the lowest positions."""
    if kept >= abs_BP.shape[1]:
        return torch.arange(abs_BP.shape[1], device=abs_BP.device).expand(abs_BP.shape[0], -1)
    top = abs_BP.topk(kept + 1, dim=1, sorted=True)  # one more, to see whether a tie straddles the cut
    if bool((top.values[:, kept - 1] > top.values[:, kept]).all()):
        return top.indices[:, :kept]  # the usual case: the k largest are unambiguous
    kth_B1 = top.values[:, kept - 1 : kept]
    greater, equal = abs_BP > kth_B1, abs_BP == kth_B1
    need_B1 = kept - greater.sum(1, keepdim=True)
    chosen = greater | (equal & (equal.cumsum(1) <= need_B1))
    return chosen.nonzero()[:, 1].view(abs_BP.shape[0], kept)  # row-major, so positions ascend


class DatumTopK:
    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"top_k must be >= 1, got {k}")
        self.k = k
        self._values: torch.Tensor | None = None  # (B, <=k) signed shifts
        self._index: torch.Tensor | None = None  # (B, <=k) int64 flat indices

    def add(self, shift_BP: torch.Tensor, offset: int) -> None:
        """Merge one tensor's per-datum shifts (B, P), its entries numbered from `offset`.

        Tensors must come in increasing `offset` order, so that position order is index order."""
        top_idx_BK = _select(shift_BP.abs(), min(self.k, shift_BP.shape[1]))
        values_BK, index_BK = shift_BP.gather(1, top_idx_BK), top_idx_BK + offset
        if self._values is not None:
            index_BK, order = torch.cat([self._index, index_BK], dim=1).sort(dim=1)
            values_BK = torch.cat([self._values, values_BK], dim=1).gather(1, order)
            if values_BK.shape[1] > self.k:
                best = _select(values_BK.abs(), self.k)
                values_BK, index_BK = values_BK.gather(1, best), index_BK.gather(1, best)
        self._values, self._index = values_BK, index_BK

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """((B, K) float32 values, (B, K) int64 flat indices), K = min(k, entries seen)."""
        if self._values is None:
            raise ValueError("no tensor was added")
        values = self._values.detach().cpu().numpy().astype(np.float32)
        index = self._index.detach().cpu().numpy().astype(np.int64)
        order = np.lexsort((index, -np.abs(values)), axis=-1)
        return np.take_along_axis(values, order, axis=1), np.take_along_axis(index, order, axis=1)
