"""Matryoshka BatchTopK SAE: nested dictionaries, each prefix trained to reconstruct alone.

Bussmann, Nabeshima, Karvonen and Nanda, "Learning Multi-Level Features with Matryoshka Sparse
Autoencoders" (2025). Activations are BatchTopK's (`batchtopk.BatchTopKSae`: batch top-k in
training, one learnt threshold at inference). For prefix sizes m_1 < m_2 < ... < m_n = F the
loss is sum_i ||x - (f[:, :m_i] W_dec[:m_i] + b_dec)||^2 (plus AuxK), so the first m_1
features must make a usable dictionary by themselves, the first m_2 refine it, and so on:
general features settle early in the order, specific ones later, and absorption is reduced.
The outer level (i = n) is `LossOutput.mse`; the inner levels go into `LossOutput.aux` with
the AuxK term. Prefixes default to `config.default_matryoshka_prefixes` (F/8, F/4, F/2, F).
Inference is exactly BatchTopK's, so it is exported to SAELens as 'jumprelu' too. Decoding is
sparse in training as BatchTopK's: the inner prefixes come from one embedding_bag over the
kept entries with one bag per (row, level) and a cumulative sum over levels
(`prefix_reconstructions_sparse`, N x D + B x L x D work instead of a dense B x m_i x D per
prefix).
Tests: tests/test_sae_architectures.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.nn import functional as nnf

from sae_assets.core.config import default_matryoshka_prefixes
from sae_assets.core.sae.base import StepInfo, reconstruction_target
from sae_assets.core.sae.batchtopk import BatchTopKSae
from sae_assets.core.sae.sparse import SparseCodes
from sae_assets.core.sae.topk import auxk_loss, sparse_entries

# Letter key: B batch rows, D input width, F features, M features of one level (m_i - m_{i-1}),
# L levels (prefixes), N kept entries.


class MatryoshkaSae(BatchTopKSae):
    """Matryoshka BatchTopK SAE with nested prefix sizes `prefixes` (ending at the width)."""

    architecture: ClassVar[str] = "matryoshka"

    def __init__(self, d_in: int, width: int, *, k: int, prefixes: Sequence[int] | None = None, aux_k: int = 256,
                 aux_coefficient: float = 1 / 32, threshold_decay: float = 0.99,
                 apply_b_dec_to_input: bool = True, d_out: int | None = None) -> None:
        super().__init__(d_in, width, k=k, aux_k=aux_k, aux_coefficient=aux_coefficient,
                         threshold_decay=threshold_decay, apply_b_dec_to_input=apply_b_dec_to_input, d_out=d_out)
        sizes = tuple(int(m) for m in prefixes) if prefixes else default_matryoshka_prefixes(width)
        if not (sizes[0] >= 1 and sizes[-1] == width and all(a < b for a, b in zip(sizes, sizes[1:]))):
            raise ValueError(f"prefixes must be strictly increasing sizes >= 1 ending at the width {width}; "
                             f"got {list(sizes)}")
        self.prefixes = sizes

    def prefix_reconstructions(self, f_BF: Tensor) -> list[Tensor]:
        """(B, D) reconstructions (scaled space) from the first m_i features, one per prefix."""
        out, x_hat_BD, lo = [], self.b_dec, 0
        for hi in self.prefixes:
            f_BM = f_BF[:, lo:hi]
            x_hat_BD = x_hat_BD + f_BM @ self.W_dec[lo:hi]
            out.append(x_hat_BD)
            lo = hi
        return out

    def prefix_reconstructions_sparse(self, codes: SparseCodes) -> Tensor:
        """(B, L, D) reconstructions (scaled space) from the first m_i features, from sparse codes:
        the entries are bagged by (row, level), summed per bag, then summed cumulatively over levels."""
        B, L = codes.offsets_B.shape[0], len(self.prefixes)
        bounds = torch.tensor(self.prefixes[:-1], device=codes.features_N.device)
        level_N = torch.bucketize(codes.features_N, bounds, right=True)  # m_{i-1} <= feature < m_i -> i
        key_N, order_N = (codes.rows_N * L + level_N).sort()
        counts = torch.bincount(key_N, minlength=B * L)
        levels_BLD = nnf.embedding_bag(codes.features_N[order_N], self.W_dec, counts.cumsum(0) - counts, mode="sum",
                                       per_sample_weights=codes.values_N[order_N].to(self.W_dec.dtype))
        return levels_BLD.view(B, L, -1).cumsum(1) + self.b_dec

    def penalties(self, x_BD: Tensor, pre_BF: Tensor, f_BF: Tensor, x_hat_BD: Tensor,
                  info: StepInfo) -> tuple[Tensor, Tensor]:
        if info.codes is not None:
            parts = self.prefix_reconstructions_sparse(info.codes).unbind(1)
        else:
            parts = self.prefix_reconstructions(f_BF)
        target_BD = reconstruction_target(x_BD, info)
        inner = [(target_BD - part_BD).pow(2).sum(-1).mean() for part_BD in parts[:-1]]
        aux = self.aux_coefficient * auxk_loss(self.W_dec, target_BD, pre_BF, x_hat_BD, info.dead_F, self.aux_k,
                                               sparse_entries(self, x_BD, pre_BF, info))
        return x_hat_BD.new_zeros(()), sum(inner, aux)

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "prefixes": list(self.prefixes)}
