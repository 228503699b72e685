"""TopK SAE with the AuxK loss (OpenAI, "Scaling and evaluating sparse autoencoders", 2024).

f = ReLU(TopK_k((x - b_dec) W_enc + b_enc)): the k largest pre-activations of each row are
kept (then ReLU'd, as SAELens' TopK does, so a loaded copy gives the same features) and every
other one is zeroed. No sparsity penalty; L0 <= k by construction. Dead latents are revived by
AuxK: the residual e = x - x_hat (detached) is reconstructed from the top `aux_k` dead
latents alone, e_hat = f_aux W_dec, and `aux_coefficient * ||e - e_hat||^2` is added; it needs
the dead mask (`StepInfo.dead_F`) and is exactly 0 when nothing is dead. Decoder rows are kept
at unit norm: the gradient component parallel to each row is removed before the step and rows
are renormalised after it. Exported to SAELens as architecture 'topk'. Training goes through
the k kept latents only (`train_codes`; `sparse.sparse_decode`, `pre_entries`: k x B x D
instead of F x B x D, except the encoder's forward product; `sparse_decoder = False` on an
instance restores the dense path, which tests compare against), and so does AuxK's. The AuxK
loss and the unit-norm decoder are module functions (`auxk_loss`, `remove_parallel_gradient`,
`normalize_rows`) shared with BatchTopK, Matryoshka and (unit norm only) JumpReLU.
Tests: tests/test_sae_core.py, tests/test_sae_architectures.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from sae_assets.core.sae.base import SparseAutoencoder, StepInfo, reconstruction_target
from sae_assets.core.sae.sparse import SparseCodes, sparse_decode

# Letter key: B batch rows, D input width, F features, K kept latents (k or aux_k).


def topk_activation(pre_BF: Tensor, k: int) -> Tensor:
    """(B, F) with the k largest entries of each row ReLU'd in place and zeros elsewhere."""
    values_BK, indices_BK = pre_BF.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre_BF).scatter_(-1, indices_BK, values_BK.relu())


def topk_codes(pre_BF: Tensor, k: int) -> SparseCodes:
    """`topk_activation` as SparseCodes: the k largest entries of each row, ReLU'd."""
    values_BK, indices_BK = pre_BF.topk(k, dim=-1, sorted=False)
    return SparseCodes.from_rows(values_BK.relu(), indices_BK, pre_BF.shape[1])


def auxk_loss(W_dec_FD: Tensor, x_BD: Tensor, pre_BF: Tensor, x_hat_BD: Tensor, dead_F: Tensor | None,
              aux_k: int, entries: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """||e - e_hat||^2 (sum over D, mean over B) from the top aux_k dead latents; no coefficient.

    e = x - x_hat (detached); e_hat = TopK over the dead latents' pre-activations @ W_dec,
    decoded sparsely (aux_k x B x D). The kept values come from `pre_BF` (attached), or, when
    `pre_BF` has no graph, from `entries(rows_N, features_N)` (`SparseAutoencoder.pre_entries`).
    Exactly 0 (no graph) when nothing is dead or aux_k is 0."""
    n_dead = 0 if dead_F is None else int(dead_F.sum())
    k_aux = min(aux_k, n_dead)
    if k_aux == 0:
        return x_hat_BD.new_zeros(())
    residual_BD = (x_BD - x_hat_BD).detach()
    dead_pre_BF = pre_BF.masked_fill(~dead_F.to(pre_BF.device), float("-inf"))
    codes = topk_codes(dead_pre_BF, k_aux)
    if entries is not None:
        codes = codes._replace(values_N=entries(codes.rows_N, codes.features_N).relu())
    e_hat_BD = sparse_decode(codes, W_dec_FD)
    return (e_hat_BD - residual_BD).pow(2).sum(-1).mean()


def sparse_entries(sae: SparseAutoencoder, x_BD: Tensor, pre_BF: Tensor,
                   info: StepInfo) -> Callable[[Tensor, Tensor], Tensor] | None:
    """`auxk_loss`'s `entries` for a `penalties` call: `sae.pre_entries` on this batch when `loss`
    trained sparsely (then `pre_BF` has no graph), else None."""
    if info.codes is None:
        return None
    return lambda rows_N, features_N: sae.pre_entries(x_BD, pre_BF, rows_N, features_N)


@torch.no_grad()
def remove_parallel_gradient(W_dec_FD: Tensor) -> None:
    """Remove from each decoder row's gradient its component along the row (in place)."""
    grad_FD = W_dec_FD.grad
    if grad_FD is None:
        return
    unit_FD = W_dec_FD / W_dec_FD.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    grad_FD -= (grad_FD * unit_FD).sum(-1, keepdim=True) * unit_FD


@torch.no_grad()
def normalize_rows(W_dec_FD: Tensor) -> None:
    """Renormalise decoder rows to unit norm (in place)."""
    W_dec_FD /= W_dec_FD.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class TopKSae(SparseAutoencoder):
    """TopK SAE; `aux_k` dead latents reconstruct the residual, weighted by `aux_coefficient`."""

    architecture: ClassVar[str] = "topk"
    saelens_architecture: ClassVar[str] = "topk"
    init_decoder_norm: ClassVar[float] = 1.0

    def __init__(self, d_in: int, width: int, *, k: int, aux_k: int = 256, aux_coefficient: float = 1 / 32,
                 apply_b_dec_to_input: bool = True, d_out: int | None = None) -> None:
        super().__init__(d_in, width, apply_b_dec_to_input=apply_b_dec_to_input, d_out=d_out)
        if not 1 <= k <= width or aux_k < 0 or aux_coefficient < 0:
            raise ValueError(f"need 1 <= k <= width ({width}), aux_k >= 0, aux_coefficient >= 0; got "
                             f"{k}, {aux_k}, {aux_coefficient}")
        self.k, self.aux_k, self.aux_coefficient = int(k), int(aux_k), float(aux_coefficient)
        self.sparse_decoder = True
        """Train through the k kept latents only (False: the dense path, f @ W_dec and its backward)."""

    def activate(self, pre_BF: Tensor) -> Tensor:
        return topk_activation(pre_BF, self.k)

    def train_codes(self, pre_BF: Tensor) -> SparseCodes:
        return topk_codes(pre_BF, self.k)

    def auxk_loss(self, x_BD: Tensor, pre_BF: Tensor, x_hat_BD: Tensor, dead_F: Tensor | None,
                  entries: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
        """||e - e_hat||^2 (sum over D, mean over B) from the top aux_k dead latents; no coefficient."""
        return auxk_loss(self.W_dec, x_BD, pre_BF, x_hat_BD, dead_F, self.aux_k, entries)

    def penalties(self, x_BD: Tensor, pre_BF: Tensor, f_BF: Tensor, x_hat_BD: Tensor,
                  info: StepInfo) -> tuple[Tensor, Tensor]:
        entries = sparse_entries(self, x_BD, pre_BF, info)
        aux = self.aux_coefficient * self.auxk_loss(reconstruction_target(x_BD, info), pre_BF, x_hat_BD, info.dead_F,
                                                    entries)
        return x_hat_BD.new_zeros(()), aux

    def constrain_gradients(self) -> None:
        """Remove from each decoder row's gradient its component along the row."""
        remove_parallel_gradient(self.W_dec)

    def constrain_weights(self) -> None:
        """Renormalise decoder rows to unit norm."""
        normalize_rows(self.W_dec)

    def saelens_fields(self) -> dict[str, Any]:
        return {"k": self.k, "rescale_acts_by_decoder_norm": False}  # our TopK ranks raw pre-activations

    def hyperparameters(self) -> dict[str, Any]:
        return {"k": self.k, "aux_k": self.aux_k, "aux_coefficient": self.aux_coefficient,
                "apply_b_dec_to_input": self.apply_b_dec_to_input}
