"""BatchTopK SAE: top k x B activations over the whole batch in training, one threshold at inference.

Bussmann, Leask and Nanda, "BatchTopK Sparse Autoencoders" (2024). In training (`loss`, via
`activate_train`) the pre-activations z = (x - b_dec) W_enc + b_enc of a (B, F) batch are
ReLU'd and only the k x B largest entries of the whole batch are kept, so rows share a budget
of k on average. Each training batch also updates the inference threshold theta, a moving
average of the smallest activation the batch kept: the plain mean over the first
1 / (1 - `threshold_decay`) batches (so the first batch does not dominate), an exponential
one after; a buffer, so checkpoints and `io` carry it. At inference (`activate`, hence
`encode` and `encode_range`) each entry is kept alone when z > theta: f = z * 1[z > theta],
elementwise, so a slice of features encodes without the others (the training curve's L0 is
k exactly; sae_metrics measures the inference one). No sparsity penalty; dead
latents are revived by TopK's AuxK loss (`topk.auxk_loss`), decoder rows stay at unit norm.
Training goes through the k x B kept entries only (`train_codes`; `sparse.sparse_decode`,
`SparseAutoencoder.pre_entries`; `sparse_decoder = False` restores the dense path). The batch
top-k itself runs in stages, per-row candidates then the batch's best (`batch_topk`; exact).
Exported to SAELens as 'jumprelu' with `threshold` = theta for every feature (as SAELens saves
its own BatchTopK SAEs). Tests: tests/test_sae_architectures.py.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from sae_assets.core.sae.base import SparseAutoencoder, StepInfo, reconstruction_target
from sae_assets.core.sae.sparse import SparseCodes
from sae_assets.core.sae.topk import auxk_loss, normalize_rows, remove_parallel_gradient, sparse_entries

# Letter key: B batch rows, D input width, F features, N = B x F entries, K kept entries (k x B).


CANDIDATES_PER_K = 4
"""`batch_topk`'s first stage keeps this many times k candidates per row."""


def batch_topk(acts_BF: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values_K, flat indices_K = row x F + feature) of the K = k x B largest entries of acts,
    in no particular order. In stages, because one top-K over all B x F entries runs on one
    core: each row's top c = 4k (rows in parallel), then the top K of those B x c candidates.
    Their K-th value t is at most the true one, so the true top K lies in {acts >= t}: when
    every row's smallest candidate is below t, no row left any of it out and the answer is
    exact; otherwise the stages rerun with c = the most entries >= t in any row (exact by the
    same argument), or, when that is half the width or more, one top-K over everything."""
    B, F = acts_BF.shape
    K, c = k * B, CANDIDATES_PER_K * k
    if c >= F:
        return acts_BF.flatten().topk(K, sorted=False)
    candidates_Bc, features_Bc = acts_BF.topk(c, dim=-1, sorted=False)
    values_K, at_K = candidates_Bc.flatten().topk(K, sorted=False)
    threshold = values_K.min()
    if bool((candidates_Bc.amin(-1) >= threshold).any()):
        c = int((acts_BF >= threshold).sum(-1).max())
        if 2 * c >= F:
            return acts_BF.flatten().topk(K, sorted=False)
        candidates_Bc, features_Bc = acts_BF.topk(c, dim=-1, sorted=False)
        values_K, at_K = candidates_Bc.flatten().topk(K, sorted=False)
    return values_K, at_K // c * F + features_Bc.flatten()[at_K]


def batch_topk_activation(pre_BF: Tensor, k: int) -> Tensor:
    """(B, F) keeping the k x B largest ReLU'd entries of the whole batch, zeros elsewhere."""
    acts_BF = pre_BF.relu()
    values_K, indices_K = batch_topk(acts_BF, k)
    return torch.zeros_like(acts_BF).flatten().scatter(0, indices_K, values_K).view_as(pre_BF)


def batch_topk_codes(pre_BF: Tensor, k: int) -> SparseCodes:
    """`batch_topk_activation` as SparseCodes (rows hold between 0 and F entries, k on average)."""
    B, F = pre_BF.shape
    values_K, indices_K = batch_topk(pre_BF.relu(), k)
    return SparseCodes.from_flat(values_K, indices_K, B, F)


class BatchTopKSae(SparseAutoencoder):
    """BatchTopK SAE; `threshold` (a buffer) is the inference threshold learnt in training."""

    architecture: ClassVar[str] = "batchtopk"
    saelens_architecture: ClassVar[str] = "jumprelu"
    init_decoder_norm: ClassVar[float] = 1.0
    elementwise_activation: ClassVar[bool] = True

    def __init__(self, d_in: int, width: int, *, k: int, aux_k: int = 256, aux_coefficient: float = 1 / 32,
                 threshold_decay: float = 0.99, apply_b_dec_to_input: bool = True, d_out: int | None = None) -> None:
        super().__init__(d_in, width, apply_b_dec_to_input=apply_b_dec_to_input, d_out=d_out)
        if not 1 <= k <= width or aux_k < 0 or aux_coefficient < 0 or not 0 <= threshold_decay < 1:
            raise ValueError(f"need 1 <= k <= width ({width}), aux_k >= 0, aux_coefficient >= 0 and "
                             f"threshold_decay in [0, 1); got {k}, {aux_k}, {aux_coefficient}, {threshold_decay}")
        self.k, self.aux_k, self.aux_coefficient = int(k), int(aux_k), float(aux_coefficient)
        self.threshold_decay = float(threshold_decay)
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("threshold_batches", torch.tensor(0, dtype=torch.long))
        self.sparse_decoder = True
        """Train through the kept entries only (False: the dense path, f @ W_dec and its backward)."""

    def activate(self, pre_BF: Tensor) -> Tensor:
        """Inference: f = z * 1[z > theta] (theta >= 0, so this is also ReLU'd)."""
        return pre_BF * (pre_BF > self.threshold)

    def activate_train(self, pre_BF: Tensor) -> Tensor:
        """Training: batch top-k; updates theta when gradients are on and the module trains."""
        f_BF = batch_topk_activation(pre_BF, self.k)
        if self.training and torch.is_grad_enabled():
            self.update_threshold(f_BF.detach())
        return f_BF

    def train_codes(self, pre_BF: Tensor) -> SparseCodes:
        """`activate_train` as SparseCodes (and the same threshold update)."""
        codes = batch_topk_codes(pre_BF, self.k)
        if self.training and torch.is_grad_enabled():
            self.update_threshold(codes.values_N.detach())
        return codes

    @torch.no_grad()
    def update_threshold(self, kept: Tensor) -> None:
        """theta <- d * theta + (1 - d) * (smallest positive kept activation), d = min(decay, n / (n + 1))
        after n batches; `kept` holds the kept activations in any shape (zeros ignored)."""
        kept = kept[kept > 0]
        if kept.numel() == 0:
            return
        smallest = kept.min().to(self.threshold)
        n = int(self.threshold_batches)
        decay = min(self.threshold_decay, n / (n + 1))  # the plain mean until the EMA's horizon
        self.threshold.mul_(decay).add_((1 - decay) * smallest)
        self.threshold_batches += 1

    def penalties(self, x_BD: Tensor, pre_BF: Tensor, f_BF: Tensor, x_hat_BD: Tensor,
                  info: StepInfo) -> tuple[Tensor, Tensor]:
        aux = self.aux_coefficient * auxk_loss(self.W_dec, reconstruction_target(x_BD, info), pre_BF, x_hat_BD,
                                               info.dead_F, self.aux_k,
                                               sparse_entries(self, x_BD, pre_BF, info))
        return x_hat_BD.new_zeros(()), aux

    def constrain_gradients(self) -> None:
        remove_parallel_gradient(self.W_dec)

    def constrain_weights(self) -> None:
        normalize_rows(self.W_dec)

    @torch.no_grad()
    def saelens_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold.expand(self.width).clone()}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        threshold_F = tensors["threshold"].to(self.threshold)
        if threshold_F.numel() and not bool((threshold_F == threshold_F[0]).all()):
            raise ValueError(f"a {self.architecture} SAE has one threshold; the file holds per-feature ones")
        self.threshold.fill_(float(threshold_F[0]) if threshold_F.numel() else 0.0)
        self.threshold_batches.fill_(1)

    def hyperparameters(self) -> dict[str, Any]:
        return {"k": self.k, "aux_k": self.aux_k, "aux_coefficient": self.aux_coefficient,
                "threshold_decay": self.threshold_decay, "apply_b_dec_to_input": self.apply_b_dec_to_input}
