"""Building an SAE from a sweep point and the run config: the one place that maps names to classes.

`ARCHITECTURES` maps DictionaryPoint.architecture to its class. `make_sae(point, d_in, cfg)`
constructs the module with the point's width and sparsity (L1 coefficient for 'relu' and
'gated', L0 coefficient for 'jumprelu', k for 'topk', 'batchtopk' and 'matryoshka', with the
point's prefixes for 'matryoshka') and the config's training hyperparameters (the sparsity
warm-up for the penalised ones, aux_k and aux_coefficient for the k ones);
`build_sae(point, d_in, cfg, sample_ND)` also sets the input scale from the sample and
initialises the decoder by `cfg.init` with a generator seeded from `cfg.seed`, so the same
config and sample give the same weights. With `d_out=` both build a transcoder (whose sample
rows are input | target).
`seeded_generator(seed, stream)` gives independent CPU generators for the different uses of
one seed. Tests: tests/test_sae_core.py.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sae_assets.core.config import DictionaryPoint, SaeConfig
from sae_assets.core.sae.base import SparseAutoencoder
from sae_assets.core.sae.batchtopk import BatchTopKSae
from sae_assets.core.sae.gated import GatedSae
from sae_assets.core.sae.init import init_decoder
from sae_assets.core.sae.jumprelu import JumpReLUSae
from sae_assets.core.sae.matryoshka import MatryoshkaSae
from sae_assets.core.sae.relu import ReluSae
from sae_assets.core.sae.topk import TopKSae

# Letter key: N sample rows, D input width, F features.

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    cls.architecture: cls for cls in (ReluSae, TopKSae, JumpReLUSae, BatchTopKSae, MatryoshkaSae, GatedSae)}
INIT_STREAM, RESAMPLE_STREAM = 1, 2
_TAG = 0x5AE_B11D  # keeps these streams apart from other uses of the same seed


def seeded_generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for (seed, stream); streams keep init and resampling draws independent."""
    state = np.random.SeedSequence([_TAG, int(seed), int(stream)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) % (2**63))


def make_sae(point: DictionaryPoint, d_in: int, cfg: SaeConfig, d_out: int | None = None) -> SparseAutoencoder:
    """An uninitialised SAE (all-zero weights, input_scale 1) for the sweep point; with `d_out`, a
    transcoder to that width (which never subtracts its output bias from the input)."""
    arch, width, sparsity = point.architecture, point.width, point.sparsity
    shape = {} if d_out is None else {"d_out": d_out, "apply_b_dec_to_input": False}
    if arch == "relu":
        return ReluSae(d_in, width, l1_coefficient=sparsity, l1_warmup_fraction=cfg.l1_warmup_fraction, **shape)
    if arch == "gated":
        return GatedSae(d_in, width, l1_coefficient=sparsity, l1_warmup_fraction=cfg.l1_warmup_fraction, **shape)
    if arch == "jumprelu":
        return JumpReLUSae(d_in, width, l0_coefficient=sparsity, l0_warmup_fraction=cfg.l1_warmup_fraction, **shape)
    aux = {"aux_k": cfg.aux_k, "aux_coefficient": cfg.aux_coefficient, **shape}
    if arch == "topk":
        return TopKSae(d_in, width, k=int(sparsity), **aux)
    if arch == "batchtopk":
        return BatchTopKSae(d_in, width, k=int(sparsity), **aux)
    if arch == "matryoshka":
        return MatryoshkaSae(d_in, width, k=int(sparsity), prefixes=point.matryoshka_prefixes, **aux)
    raise ValueError(f"unknown SAE architecture {point.architecture!r}; allowed: {', '.join(ARCHITECTURES)}")


def build_sae(point: DictionaryPoint, d_in: int, cfg: SaeConfig, sample_NR: Tensor, *,
              init: str | None = None, d_out: int | None = None) -> SparseAutoencoder:
    """An SAE ready to train: input scale from the sample, decoder by `init` (default cfg.init).

    With `d_out`, a transcoder: the sample's rows are input | target (N, D + E); the input and the
    target each get their scale, the decoder its directions by `init` in the target's space and
    the encoder its own, an independent draw in the input's space (the two spaces differ, so
    the encoder cannot be the decoder's transpose)."""
    sae = make_sae(point, d_in, cfg, d_out)
    sample_ND, target_NE = sae.split_rows(sample_NR)
    scale = sae.set_input_scale_from(sample_ND)
    generator = seeded_generator(cfg.seed, INIT_STREAM)
    if target_NE is None:
        targets_NE = sample_ND.float() * scale
        sae.initialize(init_decoder(init or cfg.init, targets_NE, point.width, generator))
    else:
        targets_NE = target_NE.float() * sae.set_output_scale_from(target_NE)
        W_dec_FE = init_decoder(init or cfg.init, targets_NE, point.width, generator)
        sae.initialize(W_dec_FE, init_decoder(init or cfg.init, sample_ND.float() * scale, point.width, generator))
    # Start the decoder bias at the target mean (scaled units): residual streams carry a large
    # constant component, and learning it through b_dec alone costs hundreds of steps.
    with torch.no_grad():
        sae.b_dec.copy_(targets_NE.mean(dim=0).to(sae.b_dec))
    return sae
