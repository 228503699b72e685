"""One evaluation of a sparse dictionary: everything sae_metrics records, from three token samples.

`evaluate_dictionary(model, sae, hook, eval_ST, mean_ST, density_ST, batch_size=...)` runs the
language model on three sets of fixed-length sequences (numpy (S, T) token ids):
- `eval_ST` (M, T), held out: L0, MSE, FVU and loss recovered (clean, reconstruction spliced
  in at the hook, zero and mean ablation, KL), kept per sequence;
- `mean_ST`, sequences the model trained on: their mean activation at the hook is the
  mean-ablation baseline, so no evaluated token shapes its own baseline;
- `density_ST`, held out: feature firing is counted over these tokens (dead and dense
  fractions, the density histogram), so that "dead" can mean "silent on many tokens".
`core.sae.data.evaluation_sample` draws the three from a run's sequences.

A transcoder (`target_hook`) reads `hook` and reconstructs `target_hook`: MSE and FVU compare
its output with the target hook's activations, its output is spliced in there (from the input
of the same forward pass), the zero and mean ablations replace the target hook (its mean over
mean_ST), and firing is counted on the input hook.

Special tokens (`exclude_token_ids`: BOS/EOS/padding when special_tokens.exclude is on) are
kept out of every score but the language model still sees them: the reconstruction and the
zero/mean ablations are spliced in only at the other positions (special positions keep their
clean activation), and L0, MSE, FVU, the mean-ablation mean and the firing counts are taken
over the other positions only. The losses are still scored at every predicted position, so
they measure what replacing the non-special activations does to the model.

Standard errors treat the evaluation sequences as independent draws (the sample is uniform
over held-out sequences). Each quantity is a ratio of per-sequence sums, R = sum a_i / sum
b_i, and its standard error is the delta-method (ratio-estimator) one:
    se(R) = sqrt(M / (M - 1) * sum_i (a_i - R b_i)^2) / |sum_i b_i|   (NaN when M < 2).
Loss recovered vs zero ablation: a_i = zero_i - sae_i, b_i = zero_i - clean_i (against mean
ablation alike); FVU: a_i = the squared reconstruction error of sequence i, b_i = its squared
deviation from the evaluation mean (the mean itself taken as fixed). No resampling, so the
numbers are a pure function of the inputs. Tests: tests/test_sae_metrics.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from sae_assets.core.activations.caching import hook_activations
from sae_assets.core.corpus.special_tokens import keep_positions
from sae_assets.core.model.lm import check_hook_names, model_device
from sae_assets.core.sae.metrics import (
    DensityHistogram, Dictionary, check_activations, dead_fraction, dense_fraction, density_histogram,
    dictionary_widths, feature_density, input_width, reconstruct, spliced_losses,
)

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

# Letter key: S sequences (M evaluated), T positions, N tokens, D activation width, F features.


class Evaluation(NamedTuple):
    """What one evaluation found; `metrics` is the flat record sae_metrics stores and shows."""

    metrics: dict[str, float]
    """l0, mse, mse_per_element, fvu, loss_recovered (vs zero ablation), loss_recovered_vs_mean,
    clean/sae/zero_ablation/mean_ablation losses, kl_divergence, eval_tokens (on eval_ST);
    fvu_se, loss_recovered_se, loss_recovered_vs_mean_se (standard errors, module docstring);
    eval_sequences; mean_ablation_tokens (tokens of mean_ST); dead_fraction, dense_fraction and
    dead_counted_over_tokens (on density_ST)."""
    feature_counts: np.ndarray
    """(F,) int64: tokens of density_ST on which each feature fired."""
    density_tokens: int
    """Tokens of density_ST (the `dead_counted_over_tokens` of the metrics)."""
    histogram: DensityHistogram
    """log10 feature density over density_ST."""

    @property
    def feature_density(self) -> np.ndarray:
        """(F,) float64 fraction of density_ST tokens on which each feature fired."""
        return feature_density(self.feature_counts, self.density_tokens)


def ratio_and_se(a_S: torch.Tensor, b_S: torch.Tensor) -> tuple[float, float]:
    """R = sum a / sum b and its delta-method standard error over the S sequences (NaN if undefined)."""
    a_S, b_S = a_S.double(), b_S.double()
    total_b = float(b_S.sum())
    if total_b == 0:
        return float("nan"), float("nan")
    r = float(a_S.sum()) / total_b
    m = a_S.numel()
    if m < 2:
        return r, float("nan")
    return r, math.sqrt(m / (m - 1) * float((a_S - r * b_S).square().sum())) / abs(total_b)


def _check_tokens(name: str, tokens_ST: np.ndarray) -> None:
    if tokens_ST.ndim != 2 or tokens_ST.shape[0] == 0 or tokens_ST.shape[1] < 2:
        raise ValueError(f"evaluate_dictionary: {name} must be (S>=1, T>=2) token ids, got {tuple(tokens_ST.shape)}")


def _kept_rows(keep_ST: np.ndarray, batch: int, batch_size: int) -> torch.Tensor:
    """(B*T,) bool: which rows of `hook_activations`' batch `batch` are kept."""
    return torch.from_numpy(keep_ST[batch * batch_size:(batch + 1) * batch_size].reshape(-1))


def _mean_activation(model, hook: str, tokens_ST: np.ndarray, keep_ST: np.ndarray, width: int, batch_size: int,
                     device) -> torch.Tensor:
    """(D,) float64 mean activation at the hook over the kept positions of tokens_ST."""
    total_D, rows = torch.zeros(width, dtype=torch.float64), 0
    for i, acts_ND in enumerate(hook_activations(model, tokens_ST, hook, batch_size=batch_size, device=device)):
        check_activations(acts_ND, width, f"hook {hook!r} on the mean-ablation sequences (batch {i})")
        kept_ND = acts_ND[_kept_rows(keep_ST, i, batch_size).to(acts_ND.device)]
        total_D += kept_ND.double().sum(dim=0).cpu()
        rows += kept_ND.shape[0]
    return total_D / rows


def _firing_counts(sae: Dictionary, model, hook: str, tokens_ST: np.ndarray, keep_ST: np.ndarray, width: int,
                   batch_size: int, device) -> tuple[np.ndarray, int]:
    """((F,) int64 tokens each feature fired on, tokens counted) over the kept positions of tokens_ST."""
    n_features = dictionary_widths(sae)[0]
    counts_F, rows = torch.zeros(n_features, dtype=torch.int64), 0
    for i, acts_ND in enumerate(hook_activations(model, tokens_ST, hook, batch_size=batch_size, device=device)):
        check_activations(acts_ND, width, f"hook {hook!r} on the density sequences (batch {i})")
        acts_ND = acts_ND[_kept_rows(keep_ST, i, batch_size).to(acts_ND.device)]
        f_NF, _ = reconstruct(sae, acts_ND)
        counts_F += (f_NF != 0).sum(dim=0).cpu()
        rows += acts_ND.shape[0]
    return counts_F.numpy(), rows


def _per_sequence(model, sae: Dictionary, hook: str, eval_ST: np.ndarray, keep_ST: np.ndarray, mean_D: torch.Tensor,
                  width: int, batch_size: int, device, target_hook: str | None = None,
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-sequence (M,) float64 sums over the kept positions (losses and kl: over every
    predicted position; squared error, active features, deviation from the sequence's own mean,
    kept tokens) and the (M, D) sequence means of the kept activations (0 for none kept)."""
    parts: dict[str, list[torch.Tensor]] = {}
    means: list[torch.Tensor] = []
    for start in range(0, eval_ST.shape[0], batch_size):
        batch_BT = torch.from_numpy(eval_ST[start:start + batch_size].astype(np.int64)).to(device)
        keep_BT = torch.from_numpy(keep_ST[start:start + batch_size]).to(device)
        sums, acts_ND, target_ND = spliced_losses(model, sae, batch_BT, hook, width, start, mean_D,
                                                  None if bool(keep_BT.all()) else keep_BT, target_hook)
        f_NF, x_hat_ND = reconstruct(sae, acts_ND)
        shape_BTD = (*batch_BT.shape, width)
        keep_BT1 = keep_BT[..., None].double()
        kept_B = keep_BT.sum(dim=1).double()
        x_BTD = target_ND.double().reshape(shape_BTD)  # what is reconstructed (a transcoder: its target)
        mean_BD = (x_BTD * keep_BT1).sum(dim=1) / kept_B.clamp(min=1)[:, None]
        sums["error"] = ((x_BTD - x_hat_ND.double().reshape(shape_BTD)).square() * keep_BT1).sum(dim=(1, 2)).cpu()
        sums["active"] = ((f_NF != 0).reshape(*batch_BT.shape, -1) & keep_BT[..., None]).sum(dim=(1, 2)).double().cpu()
        sums["within"] = ((x_BTD - mean_BD[:, None]).square() * keep_BT1).sum(dim=(1, 2)).cpu()
        sums["tokens"] = kept_B.cpu()
        means.append(mean_BD.cpu())
        for key, value in sums.items():
            parts.setdefault(key, []).append(value)
    return {key: torch.cat(value) for key, value in parts.items()}, torch.cat(means)


def _record(per: dict[str, torch.Tensor], means_SD: torch.Tensor, seq_len: int) -> dict[str, float]:
    """The eval_ST part of the metrics from per-sequence sums."""
    m, width = means_SD.shape
    predicted, tokens = m * (seq_len - 1), float(per["tokens"].sum())
    # deviation of sequence i from the evaluation mean (over kept tokens): its own spread plus
    # its mean's offset, weighted by its kept tokens n_i
    n_S = per["tokens"]
    overall_D = (means_SD * n_S[:, None]).sum(dim=0) / tokens
    deviation_S = per["within"] + n_S * (means_SD - overall_D).square().sum(dim=1)
    fvu, fvu_se = ratio_and_se(per["error"], deviation_S)
    vs_zero, vs_zero_se = ratio_and_se(per["zero"] - per["sae"], per["zero"] - per["clean"])
    vs_mean, vs_mean_se = ratio_and_se(per["mean"] - per["sae"], per["mean"] - per["clean"])
    mse = float(per["error"].sum()) / tokens
    return {
        "l0": float(per["active"].sum()) / tokens, "mse": mse, "mse_per_element": mse / width,
        "fvu": fvu, "fvu_se": fvu_se,
        "loss_recovered": vs_zero, "loss_recovered_se": vs_zero_se,
        "loss_recovered_vs_mean": vs_mean, "loss_recovered_vs_mean_se": vs_mean_se,
        **{f"{name}_loss": float(per[key].sum()) / predicted for name, key in (
            ("clean", "clean"), ("sae", "sae"), ("zero_ablation", "zero"), ("mean_ablation", "mean"))},
        "kl_divergence": float(per["kl"].sum()) / predicted,
        "eval_tokens": tokens, "eval_sequences": float(m),
    }


@torch.no_grad()
def evaluate_dictionary(
    model: TransformerBridge,
    sae: Dictionary,
    hook: str,
    eval_ST: np.ndarray,
    mean_ST: np.ndarray,
    density_ST: np.ndarray,
    *,
    batch_size: int,
    dense_threshold: float = 0.1,
    exclude_token_ids: Sequence[int] = (),
    target_hook: str | None = None,
) -> Evaluation:
    """Score `sae` at `hook` of `model` (see the module docstring for what each sample is for);
    a transcoder reads `hook` and is scored at `target_hook`.

    Positions holding a token of `exclude_token_ids` are left out of the scores (module
    docstring). The model runs in eval mode and is restored afterwards; sequences go
    `batch_size` at a time. Raises ValueError for empty or too-short samples, a sample with
    only excluded tokens, a width that is not the dictionary's, and NaN/inf activations
    (naming the sample and position).
    """
    for name, tokens_ST in (("eval_ST", eval_ST), ("mean_ST", mean_ST), ("density_ST", density_ST)):
        _check_tokens(name, tokens_ST)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keep = {name: keep_positions(tokens_ST, exclude_token_ids)
            for name, tokens_ST in (("eval", eval_ST), ("mean", mean_ST), ("density", density_ST))}
    for name, keep_ST in keep.items():
        if not keep_ST.any():
            raise ValueError(f"evaluate_dictionary: every position of {name}_ST is an excluded special token "
                             f"({list(exclude_token_ids)})")
    target = target_hook or hook
    check_hook_names(model, list(dict.fromkeys((hook, target))))
    _, width = dictionary_widths(sae)
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        mean_D = _mean_activation(model, target, mean_ST, keep["mean"], width, batch_size, device)
        per, means_SD = _per_sequence(model, sae, hook, eval_ST, keep["eval"], mean_D, width, batch_size, device,
                                      target)
        counts_F, density_tokens = _firing_counts(sae, model, hook, density_ST, keep["density"], input_width(sae),
                                                  batch_size, device)
    finally:
        model.train(was_training)
    metrics = _record(per, means_SD, eval_ST.shape[1])
    metrics.update(mean_ablation_tokens=float(keep["mean"].sum()), dead_fraction=dead_fraction(counts_F),
                   dense_fraction=dense_fraction(counts_F, density_tokens, dense_threshold),
                   dead_counted_over_tokens=float(density_tokens))
    return Evaluation(metrics, counts_F, density_tokens, density_histogram(counts_F, density_tokens))
