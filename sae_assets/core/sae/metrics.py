"""Evaluation metrics of a sparse dictionary (SAE): reconstruction, sparsity and loss recovered.

`reconstruction_stats` streams batches of activations (N, D) through any `Dictionary`
(encode/decode in the caller's activation units, `W_dec` of shape (F, D)) and returns L0,
MSE, fraction of variance unexplained and per-feature firing counts, with memory bounded by
one batch. `feature_density`, `dead_fraction`, `dense_fraction` and `density_histogram` turn
the counts into the sparsity numbers and plot data. `loss_recovered` splices the
reconstruction into a TransformerLens 4 `TransformerBridge` at a hook point and compares the
next-token loss with the clean model and with zero and mean ablation (0% = the ablation's
loss, 100% = the clean loss); `spliced_losses` gives the same per sequence for one batch, and
for a transcoder (`target_hook`) reads its input at the hook and splices its output in at the
target hook, from the input of the same forward pass. The
evaluation sae_metrics records is assembled from these in `sae_assets.core.sae.evaluation`.
Pure torch/numpy; tests: tests/test_sae_metrics.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from sae_assets.core.model.lm import check_hook_names, model_device, next_token_loss

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

# Letter key: N tokens, D activation width, F features, B sequences, T positions, V vocabulary.


class Dictionary(Protocol):
    """What the metrics need from a sparse dictionary; any SAE class satisfies it structurally."""

    W_dec: torch.Tensor
    """Decoder matrix (F, D); its shape gives the widths, its dtype/device where to compute."""

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Feature activations f (N, F) of activations x (N, D); a feature fires where f != 0."""
        ...

    def decode(self, f_NF: torch.Tensor) -> torch.Tensor:
        """Reconstruction x_hat (N, D) in the same units as the activations given to `encode`."""
        ...


class ReconstructionStats(NamedTuple):
    """How well a dictionary reconstructs a set of activations, and how often features fire."""

    l0: float
    """Mean number of active (non-zero) features per token."""
    mse: float
    """Mean over tokens of the squared error summed over the D dimensions, ||x - x_hat||^2."""
    mse_per_element: float
    """`mse / D`: the mean squared error of one activation element."""
    fvu: float
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, with the
    mean taken over the whole evaluation set (NaN if the activations have zero variance)."""
    feature_counts: np.ndarray
    """(F,) int64: tokens on which each feature fired."""
    n_tokens: int
    """Tokens (rows) evaluated; `feature_counts / n_tokens` is each feature's density."""
    activation_mean: np.ndarray
    """(D,) float64: the mean activation over the evaluation set (usable for mean ablation)."""


class DensityHistogram(NamedTuple):
    """Histogram of log10 feature density, for plotting; counts + never_fired = features."""

    edges: np.ndarray
    """(bins + 1,) float64 bin edges in log10(density); the last bin includes its right edge."""
    counts: np.ndarray
    """(bins,) int64 features per bin; densities outside the range are clipped into the end bins."""
    never_fired: int
    """Features with density 0 (log10 undefined), counted apart from the bins."""


class LossRecovered(NamedTuple):
    """Next-token loss (nats per predicted token) with the hook point clean, spliced, ablated."""

    clean_loss: float
    """The unmodified model."""
    sae_loss: float
    """Activation at the hook replaced by decode(encode(x)) at every position."""
    zero_ablation_loss: float
    """Activation at the hook replaced by zeros."""
    mean_ablation_loss: float
    """Activation at the hook replaced by the mean activation at every position."""
    recovered_vs_zero: float
    """(zero - sae) / (zero - clean): 1 = as good as clean, 0 = no better than zeros (NaN if
    zero ablation does not change the loss)."""
    recovered_vs_mean: float
    """(mean - sae) / (mean - clean), the same against mean ablation."""
    kl_divergence: float
    """Mean KL(clean || spliced) of the next-token distributions, nats per predicted token."""
    n_tokens: int
    """Predicted tokens every mean is over: M * (T - 1) for tokens (M, T)."""


def dictionary_widths(sae: Dictionary) -> tuple[int, int]:
    """(F, D): features and the width of what the dictionary reconstructs (a transcoder's output)."""
    w = sae.W_dec
    if w.ndim != 2:
        raise ValueError(f"dictionary W_dec must have shape (F, D), got {tuple(w.shape)}")
    return int(w.shape[0]), int(w.shape[1])


def input_width(sae: Dictionary) -> int:
    """The width of what the dictionary reads: `d_in` where it says (a transcoder's input hook),
    else its reconstruction width."""
    return int(getattr(sae, "d_in", dictionary_widths(sae)[1]))


def check_activations(
    x_ND: torch.Tensor, width: int, where: str, row_name: Callable[[int], str] = "row {}".format
) -> None:
    """Raise ValueError for a width that is not the dictionary's or for NaN/inf, saying where."""
    if x_ND.ndim != 2:
        raise ValueError(f"{where}: activations must have shape (N, D), got {tuple(x_ND.shape)}")
    if x_ND.shape[1] != width:
        raise ValueError(f"{where}: activations have width D={x_ND.shape[1]} but the dictionary's "
                         f"W_dec has width D={width}")
    bad_N = ~torch.isfinite(x_ND).all(dim=1)
    if bool(bad_N.any()):
        rows = torch.nonzero(bad_N).flatten()
        raise ValueError(f"{where}: {len(rows)} activation rows contain NaN or inf "
                         f"(first at {row_name(int(rows[0]))})")


def reconstruct(sae: Dictionary, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_NF, x_hat_ND) computed on the dictionary's device and dtype; x_hat in x's dtype/device."""
    w = sae.W_dec
    f_NF = sae.encode(x_ND.to(device=w.device, dtype=w.dtype))
    x_hat_ND = sae.decode(f_NF)
    if x_hat_ND.shape != (x_ND.shape[0], w.shape[1]):
        raise ValueError(f"dictionary decode returned shape {tuple(x_hat_ND.shape)} for input {tuple(x_ND.shape)}")
    return f_NF, x_hat_ND.to(device=x_ND.device, dtype=x_ND.dtype)


class _ReconstructionSums:
    """Running sums behind `ReconstructionStats`, all in float64 / int64.

    The variance about the global mean is merged batch by batch (Chan et al.'s parallel
    update), which stays accurate when the mean is large next to the spread, unlike
    sum ||x||^2 - N ||mean||^2.
    """

    def __init__(self, n_features: int, width: int) -> None:
        self.n = 0
        self.active = 0
        self.squared_error = 0.0
        self.counts_F = torch.zeros(n_features, dtype=torch.int64)
        self.mean_D = torch.zeros(width, dtype=torch.float64)
        self.deviation = 0.0  # sum over tokens of ||x - running mean||^2

    def update(self, x_ND: torch.Tensor, f_NF: torch.Tensor, x_hat_ND: torch.Tensor) -> None:
        x64_ND = x_ND.double()
        active_NF = f_NF != 0
        self.counts_F += active_NF.sum(dim=0).cpu()
        self.active += int(active_NF.sum())
        self.squared_error += float((x64_ND - x_hat_ND.double()).square().sum())
        n_b = x_ND.shape[0]
        mean_b_D = x64_ND.mean(dim=0).cpu()
        deviation_b = float((x64_ND - mean_b_D.to(x64_ND.device)).square().sum())
        total = self.n + n_b
        delta_D = mean_b_D - self.mean_D
        self.deviation += deviation_b + float(delta_D.square().sum()) * self.n * n_b / total
        self.mean_D += delta_D * (n_b / total)
        self.n = total

    def result(self) -> ReconstructionStats:
        width = self.mean_D.shape[0]
        mse = self.squared_error / self.n
        return ReconstructionStats(
            l0=self.active / self.n,
            mse=mse,
            mse_per_element=mse / width,
            fvu=self.squared_error / self.deviation if self.deviation > 0 else float("nan"),
            feature_counts=self.counts_F.numpy(),
            n_tokens=self.n,
            activation_mean=self.mean_D.numpy(),
        )


@torch.no_grad()
def reconstruction_stats(sae: Dictionary, batches: Iterable[torch.Tensor]) -> ReconstructionStats:
    """L0, MSE, FVU and firing counts of `sae` over every row of `batches` (each (N, D)).

    Streams: only one batch and O(F + D) sums are held. Deterministic for a given batch order.
    Raises ValueError for a width that is not the dictionary's, for NaN/inf (naming the batch
    and row) and for an empty stream.
    """
    n_features, width = dictionary_widths(sae)
    sums = _ReconstructionSums(n_features, width)
    for i, x_ND in enumerate(batches):
        x_ND = torch.as_tensor(x_ND)
        where = f"activation batch {i}"
        check_activations(x_ND, width, where, lambda r, base=sums.n: f"row {r} (row {base + r} of the stream)")
        if x_ND.shape[0] == 0:
            continue
        f_NF, x_hat_ND = reconstruct(sae, x_ND)
        if f_NF.shape != (x_ND.shape[0], n_features):
            raise ValueError(f"{where}: dictionary encode returned shape {tuple(f_NF.shape)}, "
                             f"expected {(x_ND.shape[0], n_features)}")
        sums.update(x_ND, f_NF, x_hat_ND)
    if sums.n == 0:
        raise ValueError("reconstruction_stats got no activation rows")
    return sums.result()


def feature_density(counts: np.ndarray, tokens: int) -> np.ndarray:
    """(F,) float64 fraction of tokens on which each feature fired."""
    if tokens <= 0:
        raise ValueError(f"feature density needs tokens > 0, got {tokens}")
    return np.asarray(counts, dtype=np.float64) / tokens


def dead_fraction(counts: np.ndarray) -> float:
    """Fraction of features that never fired on the evaluation set."""
    counts = np.asarray(counts)
    return float((counts == 0).mean())


def dense_fraction(counts: np.ndarray, tokens: int, threshold: float = 0.1) -> float:
    """Fraction of features firing on more than `threshold` of the tokens."""
    return float((feature_density(counts, tokens) > threshold).mean())


def density_histogram(
    counts: np.ndarray, tokens: int, *, low: float = -8.0, high: float = 0.0, step: float = 0.25
) -> DensityHistogram:
    """Histogram of log10(density) over fixed bins [low, high] of width `step`.

    Features that fired are clipped into the end bins when outside the range; features that
    never fired are counted separately in `never_fired`.
    """
    n_bins = int(round((high - low) / step))
    if n_bins < 1 or not np.isclose(n_bins * step, high - low):
        raise ValueError(f"density histogram range [{low}, {high}] is not a whole number of steps of {step}")
    density_F = feature_density(counts, tokens)
    fired = density_F > 0
    edges = np.linspace(low, high, n_bins + 1)
    log_density = np.clip(np.log10(density_F[fired]), low, high)
    hist, _ = np.histogram(log_density, bins=edges)
    return DensityHistogram(edges=edges, counts=hist.astype(np.int64), never_fired=int((~fired).sum()))


def _replace_once(replacement: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """A TransformerLens forward hook returning `replacement(activation)`.

    In compatibility mode a hook point with aliases calls the hook once per alias name, passing
    the previous call's output; the replacement must then be applied only once.
    """
    last: list[torch.Tensor] = []

    def hook_fn(activation: torch.Tensor, hook: object) -> torch.Tensor:
        if last and activation is last[0]:
            return activation
        out = replacement(activation)
        last[:] = [out]
        return out

    return hook_fn


def _kl_sums(clean_BTV: torch.Tensor, other_BTV: torch.Tensor) -> torch.Tensor:
    """(B,) float64: per sequence, the sum over positions 0..T-2 of KL(clean || other)."""
    log_p = F.log_softmax(clean_BTV[:, :-1].float(), dim=-1)  # (B, T-1, V)
    log_q = F.log_softmax(other_BTV[:, :-1].float(), dim=-1)
    kl_BT = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (B, T-1)
    return kl_BT.double().sum(dim=1).cpu()


def _loss_sums(logits_BTV: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
    """(B,) float64: per sequence, the summed next-token cross-entropy."""
    loss_N = next_token_loss(logits_BTV, tokens_BT, reduction="none").double()
    return loss_N.reshape(tokens_BT.shape[0], -1).sum(dim=1).cpu()


def _at_kept(keep_BT: torch.Tensor | None, replacement: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """`replacement` applied only at the positions where keep_BT (B, T) is True (all without it);
    the other positions (special tokens) keep the clean activation."""
    if keep_BT is None:
        return replacement

    def replace_kept(act: torch.Tensor) -> torch.Tensor:  # act (B, T, ...)
        keep = keep_BT.to(act.device).reshape(*keep_BT.shape, *([1] * (act.ndim - 2)))
        return torch.where(keep, replacement(act), act)

    return replace_kept


def spliced_losses(model, sae, batch_BT, hook_name, width, first, mean_D,
                   keep_BT: torch.Tensor | None = None, target_hook: str | None = None,
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per-sequence (B,) float64 loss sums of one batch, its hook activations (B*T, D) and the
    activations the dictionary reconstructs (B*T, E): the same tensor for an SAE, a transcoder's
    `target_hook` activations otherwise (`width` is E, checked on both for an SAE).

    The sums are over the T-1 predicted tokens of each sequence: 'clean', 'sae' (the
    reconstruction spliced in at the target hook), 'zero' (zero ablation), 'mean' (mean
    ablation, only when `mean_D` is given) and 'kl' (KL(clean || spliced)). A transcoder's
    spliced output is computed from its input hook's activation in the same forward pass (the
    input hook must run before the target hook). With `keep_BT` (B, T) bool, the reconstruction
    and the ablations replace the activation only where it is True (special tokens keep their
    clean activation); every position is still scored. `first` is the index of the batch's first
    sequence in the evaluation tokens (for errors).
    """
    target = target_hook or hook_name
    captured: dict[str, torch.Tensor] = {}
    clean_BTV = model.run_with_hooks(batch_BT, fwd_hooks=[(h, capture_into(captured, h, clone=True))
                                                          for h in dict.fromkeys((hook_name, target))])
    acts_ND = captured[hook_name].reshape(-1, captured[hook_name].shape[-1])  # (B*T, D)
    target_NE = captured[target].reshape(-1, captured[target].shape[-1])  # (B*T, E)
    seq_len = batch_BT.shape[1]
    where = lambda r: f"token sequence {first + r // seq_len}, position {r % seq_len}"  # noqa: E731
    check_activations(acts_ND, input_width(sae), f"hook {hook_name!r}", where)
    if target != hook_name:
        check_activations(target_NE, width, f"target hook {target!r}", where)

    if target == hook_name:
        def splice(act: torch.Tensor) -> torch.Tensor:
            return reconstruct(sae, act.reshape(-1, act.shape[-1]))[1].reshape(act.shape)
        sae_hooks = [(hook_name, _replace_once(_at_kept(keep_BT, splice)))]
    else:
        live: dict[str, torch.Tensor] = {}

        def transcode(act: torch.Tensor) -> torch.Tensor:
            if hook_name not in live:
                raise ValueError(f"transcoder input hook {hook_name!r} did not run before its target hook {target!r}: "
                                 "the input must come earlier in the forward pass")
            x_ND = live[hook_name].reshape(-1, live[hook_name].shape[-1])
            return reconstruct(sae, x_ND)[1].reshape(act.shape).to(act.dtype)
        sae_hooks = [(hook_name, capture_into(live, hook_name)), (target, _replace_once(_at_kept(keep_BT, transcode)))]
    sae_BTV = model.run_with_hooks(batch_BT, fwd_hooks=sae_hooks)
    zero_BTV = model.run_with_hooks(batch_BT, fwd_hooks=[(target, _replace_once(_at_kept(keep_BT, torch.zeros_like)))])
    sums = {
        "clean": _loss_sums(clean_BTV, batch_BT),
        "sae": _loss_sums(sae_BTV, batch_BT),
        "zero": _loss_sums(zero_BTV, batch_BT),
        "kl": _kl_sums(clean_BTV, sae_BTV),
    }
    if mean_D is not None:
        sums["mean"] = _mean_ablated_sums(model, batch_BT, target, mean_D, keep_BT)
    return sums, acts_ND, target_NE


def capture_into(store: dict[str, torch.Tensor], name: str, *, clone: bool = False) -> Callable:
    """A forward hook keeping its activation (detached; a copy with `clone`) in store[name] and
    changing nothing."""
    def keep(activation: torch.Tensor, hook: object) -> None:
        store[name] = activation.detach().clone() if clone else activation.detach()
    return keep


def _mean_ablated_sums(model, batch_BT: torch.Tensor, hook_name: str, mean_D: torch.Tensor,
                       keep_BT: torch.Tensor | None = None) -> torch.Tensor:
    def fill(act: torch.Tensor) -> torch.Tensor:
        return mean_D.to(device=act.device, dtype=act.dtype).expand_as(act).contiguous()

    logits_BTV = model.run_with_hooks(batch_BT, fwd_hooks=[(hook_name, _replace_once(_at_kept(keep_BT, fill)))])
    return _loss_sums(logits_BTV, batch_BT)


def _recovered(ablated: float, spliced: float, clean: float) -> float:
    return (ablated - spliced) / (ablated - clean) if ablated != clean else float("nan")


@torch.no_grad()
def loss_recovered(
    model: TransformerBridge,
    sae: Dictionary,
    tokens: torch.Tensor,
    hook_name: str,
    *,
    batch_size: int,
    mean_activation: torch.Tensor | None = None,
) -> LossRecovered:
    """Clean, spliced, zero- and mean-ablated next-token loss of `model` on tokens (M, T).

    Each batch runs the clean forward (capturing the hook's activation, checked for width and
    NaN), then the forwards with the hook's output replaced (`model.run_with_hooks(batch,
    fwd_hooks=[(hook_name, fn)])`). Activations (..., D) are flattened to (N, D) for the
    dictionary. Without `mean_activation`, the mean over every position of `tokens` is used,
    which takes a second pass for the mean ablation. Losses and KL are exact means over the
    M * (T - 1) predicted tokens. The model runs in eval mode and is restored afterwards.
    """
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise ValueError(f"loss_recovered needs tokens of shape (M>=1, T>=2), got {tuple(tokens.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_hook_names(model, [hook_name])
    _, width = dictionary_widths(sae)
    mean_D = None if mean_activation is None else torch.as_tensor(mean_activation).reshape(-1)
    if mean_D is not None:
        check_activations(mean_D.reshape(1, -1), width, "mean_activation")
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        totals: dict[str, float] = {}
        act_sum_D, act_rows = torch.zeros(width, dtype=torch.float64), 0
        for start in range(0, tokens.shape[0], batch_size):
            batch_BT = tokens[start : start + batch_size].to(device)
            sums, acts_ND, _ = spliced_losses(model, sae, batch_BT, hook_name, width, start, mean_D)
            act_sum_D += acts_ND.double().sum(dim=0).cpu()
            act_rows += acts_ND.shape[0]
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + float(value.sum())
        if mean_D is None:
            mean_D = act_sum_D / act_rows
            totals["mean"] = sum(
                float(_mean_ablated_sums(model, tokens[s : s + batch_size].to(device), hook_name, mean_D).sum())
                for s in range(0, tokens.shape[0], batch_size)
            )
    finally:
        model.train(was_training)
    n = tokens.shape[0] * (tokens.shape[1] - 1)
    clean, spliced, zero, mean = (totals[k] / n for k in ("clean", "sae", "zero", "mean"))
    return LossRecovered(
        clean_loss=clean, sae_loss=spliced, zero_ablation_loss=zero, mean_ablation_loss=mean,
        recovered_vs_zero=_recovered(zero, spliced, clean), recovered_vs_mean=_recovered(mean, spliced, clean),
        kl_divergence=totals["kl"] / n, n_tokens=n,
    )
