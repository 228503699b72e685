"""Activation caching: run a TransformerBridge over token sequences and stream hook outputs.

`cache_activations` yields one Arrow record batch per forward batch (rows = tokens, one
fixed-size-list column per hook point, plus `token_index` and `token_id`), so peak memory is
bounded by the batch, not the shard. `capture_hooks` stops the forward pass as soon as every
requested hook has fired, so a hook in the last block skips ln_final and the unembedding
(TransformerLens' own stop_at_layer only stops *before* a block, never after the last one). `ActivationStats`
accumulates per-hook norm statistics and refuses NaN/inf. Tests: tests/test_activation_assets.py, tests/test_lm.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from sae_assets.core import schemas
from sae_assets.core.progress import QUIET, ProgressLog

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ActivationError(ValueError):
    """Activations cannot be cached as configured (bad hook, NaN, width mismatch)."""


def capture_hooks(model, tokens_BT: torch.Tensor, hook_points: Sequence[str]) -> dict[str, torch.Tensor]:
    """{hook: activation} for one batch, ending the forward pass once the last of them fired."""
    from transformer_lens.model_bridge.exceptions import StopAtLayerException  # bridge's own early exit

    captured: dict[str, torch.Tensor] = {}

    def keeper(name: str):
        def keep(tensor: torch.Tensor, hook) -> None:
            captured[name] = tensor.detach()  # keyed by the requested name: aliases resolve differently
            if len(captured) == len(hook_points):
                raise StopAtLayerException(tensor)

        return keep

    with torch.inference_mode():
        model.run_with_hooks(tokens_BT, fwd_hooks=[(name, keeper(name)) for name in hook_points])
    missing = [name for name in hook_points if name not in captured]
    if missing:
        raise ActivationError(f"hooks {missing} never fired in the forward pass")
    return captured


@dataclass
class ActivationStats:
    """Running per-hook statistics of activation vectors: count, mean/max L2 norm, mean value."""

    count: int = 0
    norm_sum: dict[str, float] = field(default_factory=dict)
    norm_max: dict[str, float] = field(default_factory=dict)
    value_sum: dict[str, float] = field(default_factory=dict)

    def update(self, hook: str, acts_ND: torch.Tensor, where: str) -> None:
        norms_N = acts_ND.float().norm(dim=1)
        # A NaN or inf anywhere in a row makes its norm non-finite; scan elementwise only then.
        if not torch.isfinite(norms_N).all() and not torch.isfinite(acts_ND).all():
            bad = int((~torch.isfinite(acts_ND)).any(dim=1).sum())
            raise ActivationError(f"{where}: {bad} activation rows at hook {hook} contain NaN or inf")
        self.norm_sum[hook] = self.norm_sum.get(hook, 0.0) + float(norms_N.sum())
        self.norm_max[hook] = max(self.norm_max.get(hook, 0.0), float(norms_N.max()))
        self.value_sum[hook] = self.value_sum.get(hook, 0.0) + float(acts_ND.float().mean(dim=1).sum())

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            hook: {"mean_norm": self.norm_sum[hook] / max(self.count, 1), "max_norm": self.norm_max[hook],
                   "mean_value": self.value_sum[hook] / max(self.count, 1)}
            for hook in self.norm_sum
        }


def activation_column(acts_ND: torch.Tensor, dtype: str) -> pa.FixedSizeListArray:
    """(N, D) activations as a fixed-size-list column in the storage dtype (bf16 as uint16 bits)."""
    width = acts_ND.shape[1]
    cast = acts_ND.to(TORCH_DTYPES[dtype]).contiguous().cpu()
    if dtype == "bfloat16":
        flat = cast.view(torch.int16).numpy().view(np.uint16).ravel()
    else:
        flat = cast.numpy().ravel()
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), width)


def cache_activations(
    model,
    tokens_ST: np.ndarray,
    first_token_index_S: np.ndarray,
    *,
    hook_points: Sequence[str],
    dtype: str,
    batch_size: int,
    device: str = "cpu",
    stats: ActivationStats | None = None,
    where: str = "cached_activations",
    progress_log: ProgressLog | None = None,
) -> Iterator[pa.RecordBatch]:
    """Yield record batches of activations for (S, T) token sequences, `batch_size` at a time.

    Row r of batch b is token t of sequence s, in (s, t) order; `token_index` is
    first_token_index_S[s] + t, the stable global index of that token. A progress log counts
    the batches (its steps) and their tokens.
    """
    num_sequences, context_length = tokens_ST.shape
    offsets_T = np.arange(context_length, dtype=np.int64)
    schema = None
    report = progress_log or QUIET
    report.start(-(-num_sequences // batch_size))  # ceil
    for step, start in enumerate(range(0, num_sequences, batch_size), start=1):
        batch_BT = torch.from_numpy(tokens_ST[start : start + batch_size].astype(np.int64)).to(device)
        cache = capture_hooks(model, batch_BT, hook_points)
        index_N = (first_token_index_S[start : start + batch_size, None] + offsets_T[None, :]).ravel()
        columns = [pa.array(index_N, pa.int64()), pa.array(tokens_ST[start : start + batch_size].ravel(), pa.int32())]
        widths = {}
        for hook in hook_points:
            acts_BTD = cache[hook]
            acts_ND = acts_BTD.reshape(-1, acts_BTD.shape[-1])  # (B*T, D)
            widths[hook] = acts_ND.shape[1]
            if stats is not None:
                stats.update(hook, acts_ND, where)
            columns.append(activation_column(acts_ND, dtype))
        if stats is not None:
            stats.count += len(index_N)
        schema = schema or schemas.activation_schema(widths, dtype)
        report.update(step, tokens=min(start + batch_size, num_sequences) * context_length)
        yield pa.RecordBatch.from_arrays(columns, schema=schema)
    report.close()


def hook_widths(model, hook_points: Sequence[str], context_length: int, device: str = "cpu") -> dict[str, int]:
    """{hook: D} from one tiny forward pass (the model decides the width, not the config)."""
    probe = torch.zeros((1, min(context_length, 4)), dtype=torch.int64, device=device)
    cache = capture_hooks(model, probe, hook_points)
    return {hook: int(cache[hook].shape[-1]) for hook in hook_points}


def check_same_format(expected: dict, found: dict, *, where_expected: str, where_found: str) -> None:
    """Refuse to mix activation partitions of different dtype or hook widths."""
    if expected != found:
        raise ActivationError(
            f"{where_found} has activation format {found} but {where_expected} has {expected}; "
            "refusing to mix them: rematerialize every shard with one config"
        )


def hook_activations(model, tokens_ST: np.ndarray, hook: str, *, batch_size: int,
                     device: str = "cpu") -> Iterator[torch.Tensor]:
    """(B*T, D) float32 activations at one hook for each batch of sequences (for evaluation)."""
    for start in range(0, len(tokens_ST), batch_size):
        batch_BT = torch.from_numpy(tokens_ST[start : start + batch_size].astype(np.int64)).to(device)
        cache = capture_hooks(model, batch_BT, [hook])
        yield cache[hook].reshape(-1, cache[hook].shape[-1]).float()
