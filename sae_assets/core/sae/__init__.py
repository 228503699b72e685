"""Sparse autoencoders: architectures, initialisations, the training loop and the SAELens layout.

`base` (the abstract SAE with input scaling), `relu` (Anthropic 2024 recipe), `topk` (OpenAI
2024, AuxK), `jumprelu`, `batchtopk`, `matryoshka` and `gated` (one file each), `init` (the initialisations of "Informed initialization of sparse dictionaries"), `build` (sweep point -> module), `schedule`,
`tracker`, `resample`, `checkpoint` and `training` (the loop built from them), `io` (cfg.json +
sae_weights.safetensors) and `toy` (ground-truth toy data and MMCS). The names below are the
public API; tests: tests/test_sae_core.py, tests/test_sae_architectures.py.
"""

from sae_assets.core.sae.base import LossOutput, SparseAutoencoder, StepInfo
from sae_assets.core.sae.batchtopk import BatchTopKSae
from sae_assets.core.sae.build import ARCHITECTURES, build_sae, make_sae
from sae_assets.core.sae.gated import GatedSae
from sae_assets.core.sae.init import INITIALIZERS, init_decoder
from sae_assets.core.sae.io import export_tensors, load_sae, saelens_config, sae_from_saelens, save_sae
from sae_assets.core.sae.jumprelu import JumpReLUSae
from sae_assets.core.sae.matryoshka import MatryoshkaSae
from sae_assets.core.sae.relu import ReluSae
from sae_assets.core.sae.topk import TopKSae
from sae_assets.core.sae.training import SaeTrainingError, TrainOutcome, total_steps, train_sae

__all__ = [
    "ARCHITECTURES", "BatchTopKSae", "GatedSae", "INITIALIZERS", "JumpReLUSae", "LossOutput", "MatryoshkaSae",
    "ReluSae", "SaeTrainingError", "SparseAutoencoder", "StepInfo", "TopKSae", "TrainOutcome", "build_sae",
    "export_tensors", "init_decoder", "load_sae", "make_sae", "sae_from_saelens", "saelens_config", "save_sae",
    "total_steps", "train_sae",
]
