"""SAEs on disk in the layout SAELens 6 loads: a directory with cfg.json + sae_weights.safetensors.

`export_tensors(sae)` gives the tensors SAELens expects (W_enc (d_in, d_sae), b_enc
(d_sae), W_dec (d_sae, d_in), b_dec (d_in), float32) with our `input_scale` s folded in, so
they act on activations in the model's own units: W_enc' = s W_enc, W_dec' = W_dec / s,
b_dec' = b_dec / s, b_enc' = b_enc (SAELens' own `fold_activation_norm_scaling_factor`), and
cfg.json says `normalize_activations: "none"`. Folding leaves the pre-activations unchanged,
so per-feature tensors on them need no folding. Per architecture (SAELens 6 names, read from
its sae_lens/saes/*.py): relu -> 'standard'; topk -> 'topk' + cfg keys `k` and
`rescale_acts_by_decoder_norm: false` (ours ranks raw pre-activations); jumprelu ->
'jumprelu' + tensor `threshold` (d_sae,), which SAELens applies as f = ReLU(z) * 1[z >
ReLU(threshold)]; batchtopk and matryoshka -> 'jumprelu' with `threshold` = the learnt
inference threshold for every feature (SAELens saves its own BatchTopK and Matryoshka SAEs
so); gated -> 'gated' with tensors W_enc, b_gate, r_mag, b_mag, W_dec, b_dec and no b_enc.
`saelens_config` writes the SAELens 6 keys (architecture, d_in, d_sae, dtype, device,
apply_b_dec_to_input, normalize_activations, reshape_activations, the architecture's own
keys, and `metadata` with sae_lens_version >= 6 so no pre-6 conversion runs, hook_name,
hook_layer) plus a `sae_assets` block SAELens ignores: our architecture name,
hyperparameters, the folded scale and free-form extras. `load_sae` / `sae_from_saelens`
rebuild our module (our architecture from the `sae_assets` block when present, else the
SAELens one: 'standard', 'topk', 'jumprelu', 'gated', 'transcoder', 'jumprelu_transcoder'),
unfolding the scale when recorded; outputs then match the original to float32 rounding.
Transcoders (SAELens' `Transcoder` layout): cfg `d_out`, W_dec (d_sae, d_out), b_dec (d_out),
`apply_b_dec_to_input: false`, metadata `hook_name_out` / `hook_layer_out`; the output scale
is folded into W_dec and b_dec (W_dec' = W_dec / s_out). SAELens has 'transcoder' (ReLU) and
'jumprelu_transcoder' (also what batchtopk and matryoshka transcoders export as, with their
inference threshold); a TopK or Gated transcoder has no SAELens class and is written as
'topk_transcoder' / 'gated_transcoder', which SAELens refuses by name rather than misreads. `save_sae` writes weights, then
cfg.json, each via a temp name + os.replace. A real SAELens 6 (in a venv of its own, as it
pins TransformerLens < 4) loads each architecture's files with `SAE.load_from_disk` and its
encode/decode agree with ours within 1e-5: tests/test_saelens_compat.py (and
`bench/sae_vs_saelens.py --load-check-only`). Tests: tests/test_sae_core.py,
tests/test_sae_architectures.py, tests/test_saelens_compat.py.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from sae_assets.core.sae.base import SparseAutoencoder
from sae_assets.core.sae.build import ARCHITECTURES

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_VERSION = "6.0.0"
"""Recorded as metadata.sae_lens_version: >= 6.0.0-rc.0 means SAELens reads the file as 6.x."""
SAELENS_METADATA_KEYS = (
    "model_name", "hook_name", "model_class_name", "hook_layer", "hook_head_index", "model_from_pretrained_kwargs",
    "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice", "dataset_path",
)
"""Fields of SAELens' SAEMetadata; other `extra` keys go to the `sae_assets` block."""


@torch.no_grad()
def export_tensors(sae: SparseAutoencoder) -> dict[str, Tensor]:
    """The SAELens state dict, input scale folded in, float32, contiguous, on the CPU."""
    s, s_out = float(sae.input_scale), float(sae.target_scale)
    folded = {"W_enc": sae.W_enc.double() * s, "b_enc": sae.b_enc.double(),
              "W_dec": sae.W_dec.double() / s_out, "b_dec": sae.b_dec.double() / s_out, **sae.saelens_tensors()}
    if sae.saelens_architecture == "gated":  # SAELens' gated SAE has b_gate (our b_enc) and no b_enc
        del folded["b_enc"]
    return {name: t.float().cpu().contiguous() for name, t in folded.items()}


_TRANSCODER_ARCHITECTURES = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}
"""SAELens' transcoder class for an SAE architecture; others get '<architecture>_transcoder'."""


def saelens_architecture(sae: SparseAutoencoder) -> str:
    """The cfg.json `architecture` of a module (a transcoder's is SAELens' transcoder name)."""
    if not sae.transcoder:
        return sae.saelens_architecture
    return _TRANSCODER_ARCHITECTURES.get(sae.saelens_architecture, f"{sae.saelens_architecture}_transcoder")


def saelens_config(sae: SparseAutoencoder, *, hook_name: str, extra: Mapping[str, Any] | None = None,
                   hook_name_out: str | None = None) -> dict[str, Any]:
    """cfg.json contents for `export_tensors(sae)` (JSON-serialisable `extra` values only);
    `hook_name_out`: a transcoder's output hook."""
    if sae.transcoder != (hook_name_out is not None):
        raise ValueError("a transcoder's cfg.json names its output hook (hook_name_out); an SAE's does not")
    extra = dict(extra or {})
    metadata: dict[str, Any] = {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None,
                                "hook_name": hook_name}
    for key, hook in (("hook_layer", hook_name), ("hook_layer_out", hook_name_out)):
        layer = re.match(r"blocks\.(\d+)\.", hook or "")
        if layer:
            metadata[key] = int(layer.group(1))
    if hook_name_out is not None:
        metadata["hook_name_out"] = hook_name_out
    metadata.update({k: extra.pop(k) for k in SAELENS_METADATA_KEYS if k in extra and k != "hook_name"})
    cfg: dict[str, Any] = {
        "architecture": saelens_architecture(sae), "d_in": sae.d_in, "d_sae": sae.width,
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none", "reshape_activations": "none", "metadata": metadata,
    }
    cfg.update(sae.saelens_fields())
    cfg["sae_assets"] = {"architecture": sae.architecture, "hyperparameters": sae.hyperparameters(),
                         "input_scale": float(sae.input_scale), "input_scale_folded": True, "extra": extra}
    if sae.transcoder:
        cfg["d_out"] = sae.d_out
        cfg["sae_assets"]["output_scale"] = float(sae.output_scale)
    return cfg


def _replace_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_sae(sae: SparseAutoencoder, directory: str | Path, *, hook_name: str,
             extra: Mapping[str, Any] | None = None, hook_name_out: str | None = None) -> Path:
    """Write cfg.json + sae_weights.safetensors into `directory` (created); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = export_tensors(sae)
    cfg = saelens_config(sae, hook_name=hook_name, extra=extra, hook_name_out=hook_name_out)
    _replace_atomically(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _replace_atomically(directory / CFG_FILE, lambda p: p.write_text(json.dumps(cfg, indent=2, sort_keys=True)))
    return directory


_FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated",
                 "transcoder": "relu", "jumprelu_transcoder": "jumprelu"}
"""Our architecture for a SAELens one, when the file has no `sae_assets` block."""


def _module_for(cfg: Mapping[str, Any], where: str) -> SparseAutoencoder:
    ours = cfg.get("sae_assets", {})
    arch = cfg.get("architecture", "standard")
    name = ours.get("architecture") or _FROM_SAELENS.get(arch)
    if ours.get("architecture") and name not in ARCHITECTURES:
        raise ValueError(f"{where}: key 'sae_assets.architecture' is {name!r}; known: {', '.join(ARCHITECTURES)}")
    if name not in ARCHITECTURES:
        raise ValueError(f"{where}: key 'architecture' is {arch!r}; supported: {', '.join(map(repr, _FROM_SAELENS))}")
    hp = dict(ours.get("hyperparameters", {}))
    if not hp:  # a file SAELens wrote: training-only coefficients do not matter for inference
        hp = {"topk": {"k": int(cfg.get("k", 0))}, "jumprelu": {"l0_coefficient": 0.0}}.get(
            name, {"l1_coefficient": 0.0})
    hp["apply_b_dec_to_input"] = bool(cfg.get("apply_b_dec_to_input", True))
    if "d_out" in cfg or str(arch).endswith("transcoder"):
        hp["d_out"] = int(cfg.get("d_out", cfg["d_in"]))
    try:
        return ARCHITECTURES[name](int(cfg["d_in"]), int(cfg["d_sae"]), **hp)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: cannot build a {name!r} SAE from its hyperparameters {hp}: {exc}") from exc


@torch.no_grad()
def sae_from_saelens(cfg: Mapping[str, Any], tensors: Mapping[str, Tensor], *,
                     where: str = CFG_FILE) -> SparseAutoencoder:
    """Our module from a SAELens config dict and state dict (unfolding our recorded input scale)."""
    if cfg.get("normalize_activations") not in (None, "none", False):
        raise ValueError(f"{where}: key 'normalize_activations' is {cfg['normalize_activations']!r}; "
                         "only 'none' (scale folded into the weights) is supported")
    sae = _module_for(cfg, where)
    for name, expected in export_tensors(sae).items():
        if name not in tensors or tuple(tensors[name].shape) != tuple(expected.shape):
            got = tuple(tensors[name].shape) if name in tensors else "missing"
            raise ValueError(f"{where}: tensor {name} is {got}, expected {tuple(expected.shape)}")
    ours = cfg.get("sae_assets", {})
    s = float(ours.get("input_scale", 1.0))
    s_out = float(ours.get("output_scale", 1.0)) if sae.transcoder else s
    sae.W_enc.copy_((tensors["W_enc"].double() / s).float())
    if "b_enc" in tensors:
        sae.b_enc.copy_(tensors["b_enc"].float())
    sae.W_dec.copy_((tensors["W_dec"].double() * s_out).float())
    sae.b_dec.copy_((tensors["b_dec"].double() * s_out).float())
    sae.load_saelens_tensors({k: v.float() for k, v in tensors.items()})
    sae.input_scale.fill_(s)
    if sae.transcoder:
        sae.output_scale.fill_(s_out)
    return sae


def load_sae(directory: str | Path, *, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Read an SAE directory written by `save_sae` (or by SAELens) as our module."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if not path.exists():
            raise FileNotFoundError(f"SAE directory {directory} has no {path.name}")
    cfg = json.loads(cfg_path.read_text())
    return sae_from_saelens(cfg, load_file(str(weights_path)), where=str(cfg_path)).to(device)
