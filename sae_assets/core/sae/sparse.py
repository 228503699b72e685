"""Sparse training pieces of the TopK family: kept entries as bags, their decode, their encoder gradient.

`SparseCodes` holds a batch's kept activations (values, rows, features, per-row offsets);
`sparse_decode` is codes.dense() @ W_dec as an `embedding_bag` of decoder rows weighted by the
values, N x D forward and backward for N kept entries instead of B x F x D. `PreEntries` reads
the kept entries of pre = (x - c) @ W_enc + b_enc from pre-activations computed without a graph
and back-propagates from those N entries alone (a sparse (F, B) @ (B, D) product to W_enc).
`CentredLinear` is (x - c) @ W + b whose gradient to c is -W (sum_B grad), not the (B, F) @
(F, D) product autograd takes through the centred input. `base.SparseAutoencoder.loss` uses
them when an architecture sets `sparse_decoder` (TopK, BatchTopK, Matryoshka).
Tests: tests/test_sae_architectures.py (dense against sparse: loss and every gradient).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as nnf

# Letter key: B batch rows, D input width, F features, K kept latents per row, N kept entries.


class SparseCodes(NamedTuple):
    """A batch's non-zero activations as bags of decoder rows, one bag per row, in row order."""

    values_N: Tensor
    """(N,) activations (attached to the graph); entries may be 0 (a ReLU'd TopK value)."""
    rows_N: Tensor
    """(N,) long, the batch row of each entry, non-decreasing."""
    features_N: Tensor
    """(N,) long, the feature of each entry."""
    offsets_B: Tensor
    """(B,) long, where each row's bag starts in the entries (empty bags allowed)."""
    width: int
    """F, the dictionary width."""

    @staticmethod
    def from_rows(values_BK: Tensor, features_BK: Tensor, width: int) -> SparseCodes:
        """Codes with exactly K entries per row (TopK)."""
        B, K = values_BK.shape
        rows_BK = torch.arange(B, device=values_BK.device).unsqueeze(1).expand(B, K)
        offsets_B = torch.arange(0, B * K, K, device=values_BK.device)
        return SparseCodes(values_BK.reshape(-1), rows_BK.reshape(-1), features_BK.reshape(-1), offsets_B, width)

    @staticmethod
    def from_flat(values_N: Tensor, flat_N: Tensor, batch: int, width: int) -> SparseCodes:
        """Codes from entries of the flattened (B x F) batch at flat indices row x F + feature
        (any order; BatchTopK), sorted here into row order."""
        flat_N, order_N = flat_N.sort()
        rows_N = flat_N // width
        counts_B = torch.bincount(rows_N, minlength=batch)
        offsets_B = counts_B.cumsum(0) - counts_B
        return SparseCodes(values_N[order_N], rows_N, flat_N - rows_N * width, offsets_B, width)

    def dense(self) -> Tensor:
        """(B, F) activations with the entries in place and zeros elsewhere (attached)."""
        B = self.offsets_B.shape[0]
        flat_N = self.rows_N * self.width + self.features_N
        return self.values_N.new_zeros(B * self.width).scatter_(0, flat_N, self.values_N).view(B, self.width)


class CentredLinear(torch.autograd.Function):
    """(x - c) @ W + b with the gradient to c taken as -W (sum_B grad): D x F work where autograd,
    going through the centred input, would take a (B, F) @ (F, D) product; the others as usual."""

    @staticmethod
    def forward(ctx: Any, x_BD: Tensor, c_D: Tensor, W_DF: Tensor, b_F: Tensor) -> Tensor:
        xc_BD = x_BD - c_D
        ctx.save_for_backward(xc_BD, W_DF)
        return torch.addmm(b_F, xc_BD, W_DF)

    @staticmethod
    def backward(ctx: Any, grad_BF: Tensor) -> tuple[Tensor | None, ...]:
        xc_BD, W_DF = ctx.saved_tensors
        need_x, need_c, need_W, need_b = ctx.needs_input_grad
        grad_F = grad_BF.sum(0) if need_c or need_b else None
        return (grad_BF @ W_DF.T if need_x else None, -(W_DF @ grad_F) if need_c else None,
                xc_BD.T @ grad_BF if need_W else None, grad_F if need_b else None)


class PreEntries(torch.autograd.Function):
    """Entries (rows_N, features_N) of pre = (x - c) @ W + b, read from pre computed without a
    graph, whose backward uses the N entries alone: W's column j gets sum grad_n (x - c)[row_n]
    over the entries of feature j (a sparse (F, B) @ (B, D) product, N x D), b_j the sum of
    their grads, c minus W times those sums (D x F); no (B, F) gradient, no B x F x D product."""

    @staticmethod
    def forward(ctx: Any, pre_BF: Tensor, x_BD: Tensor, c_D: Tensor | None, W_DF: Tensor, b_F: Tensor,
                rows_N: Tensor, features_N: Tensor) -> Tensor:
        ctx.save_for_backward(x_BD, c_D if c_D is not None else x_BD.new_zeros(0), W_DF, rows_N, features_N)
        ctx.centred = c_D is not None
        return pre_BF[rows_N, features_N]

    @staticmethod
    def backward(ctx: Any, grad_N: Tensor) -> tuple[Tensor | None, ...]:
        x_BD, c_D, W_DF, rows_N, features_N = ctx.saved_tensors
        _, need_x, need_c, need_W, need_b, _, _ = ctx.needs_input_grad
        F, B = W_DF.shape[1], x_BD.shape[0]
        grad_F = grad_N.new_zeros(F).index_add_(0, features_N, grad_N)
        grad_W = grad_x = None
        if need_W or need_x:
            grad_FB = torch.sparse_coo_tensor(torch.stack([features_N, rows_N]), grad_N, (F, B),
                                              check_invariants=False)
            if need_W:
                xc_BD = x_BD - c_D if ctx.centred else x_BD
                grad_W = torch.sparse.mm(grad_FB, xc_BD).T  # (D, F)
            if need_x:
                grad_x = torch.sparse.mm(grad_FB.t(), W_DF.T)  # (B, D)
        grad_c = -(W_DF @ grad_F) if need_c and ctx.centred else None
        return None, grad_x, grad_c, grad_W, grad_F if need_b else None, None, None


def sparse_decode(codes: SparseCodes, W_dec_FD: Tensor) -> Tensor:
    """(B, D) sum over each row's entries of value x W_dec[feature], = codes.dense() @ W_dec.

    An embedding_bag: forward and backward cost N x D (the gradient to W_dec lands on the used
    rows only, to each value it is <grad row, W_dec row>), not B x F x D."""
    return nnf.embedding_bag(codes.features_N, W_dec_FD, codes.offsets_B, mode="sum",
                            per_sample_weights=codes.values_N.to(W_dec_FD.dtype))
