"""Building an SAE from a sweep point and the run config: the one place that maps names to classes.

`ARCHITECTURES` maps DictionaryPoint.architecture to its class. `make_sae(point, d_in, cfg)`
constructs the module with the point's width and sparsity (L1 coefficient for 'relu' and
'gated', L0 coefficient for 'jumprelu', k for 'topk', 'batchtopk' and 'matryoshka', with the
point's prefixes for 'matryoshka') and the config's training hyperparameters (the sparsity
warm-up for the penalised ones, aux_k and aux_coefficient for the k ones); `build_sae(point, d_in, cfg, sample_ND)`
also sets the input scale from the sample and initialises the decoder by `cfg.init` with a
generator seeded from `cfg.seed`, so the same config and sample give the same weights.
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


def make_sae(point: DictionaryPoint, d_in: int, cfg: SaeConfig) -> SparseAutoencoder:
    """An uninitialised SAE (all-zero weights, input_scale 1) for the sweep point."""
    arch, width, sparsity = point.architecture, point.width, point.sparsity
    if arch == "relu":
        return ReluSae(d_in, width, l1_coefficient=sparsity, l1_warmup_fraction=cfg.l1_warmup_fraction)
    if arch == "gated":
        return GatedSae(d_in, width, l1_coefficient=sparsity, l1_warmup_fraction=cfg.l1_warmup_fraction)
    if arch == "jumprelu":
        return JumpReLUSae(d_in, width, l0_coefficient=sparsity, l0_warmup_fraction=cfg.l1_warmup_fraction)
    aux = {"aux_k": cfg.aux_k, "aux_coefficient": cfg.aux_coefficient}
    if arch == "topk":
        return TopKSae(d_in, width, k=int(sparsity), **aux)
    if arch == "batchtopk":
        return BatchTopKSae(d_in, width, k=int(sparsity), **aux)
    if arch == "matryoshka":
        return MatryoshkaSae(d_in, width, k=int(sparsity), prefixes=point.matryoshka_prefixes, **aux)
    raise ValueError(f"unknown SAE architecture {point.architecture!r}; allowed: {', '.join(ARCHITECTURES)}")


def build_sae(point: DictionaryPoint, d_in: int, cfg: SaeConfig, sample_ND: Tensor, *,
              init: str | None = None) -> SparseAutoencoder:
    """An SAE ready to train: input scale from `sample_ND`, decoder by `init` (default cfg.init)."""
    sae = make_sae(point, d_in, cfg)
    scale = sae.set_input_scale_from(sample_ND)
    generator = seeded_generator(cfg.seed, INIT_STREAM)
    W_dec_FD = init_decoder(init or cfg.init, sample_ND.float() * scale, point.width, generator)
    sae.initialize(W_dec_FD)
    # Start the decoder bias at the data mean (scaled units): residual streams carry a large
    # constant component, and learning it through b_dec alone costs hundreds of steps.
    with torch.no_grad():
        sae.b_dec.copy_((sample_ND.float() * scale).mean(dim=0).to(sae.b_dec))
    return sae
