"""The language model: build, save, load and score a TransformerLens 4 `TransformerBridge`.

The embedded model is a small TL-native transformer (`TransformerBridge.boot_native`, no Hub,
no `transformers` weights) whose weights are a pure function of `ModelConfig.seed`; it is
trained by `sae_assets.core.model.training` and kept on disk as `model.safetensors` (TL-format state
dict) plus `model_config.json` (the exact architecture to rebuild it). A named model is any
causal LM `transformers` can load from a Hub name or a local directory, wrapped with
`TransformerBridge.boot_transformers`. Both expose the same hook names
(`blocks.{i}.hook_resid_post`, `blocks.{i}.hook_mlp_out`, ...). Also here: the next-token
loss, the held-out split by hashed sequence id and the unigram-entropy baseline.
Tests: tests/test_lm.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from sae_assets.core.config import ModelConfig

if TYPE_CHECKING:  # transformer_lens imports transformers (seconds); load it only when used
    from transformer_lens.model_bridge import TransformerBridge

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
FORMAT = "sae_assets.embedded_lm/1"


def native_architecture(cfg: ModelConfig, *, vocab_size: int, context_length: int) -> dict[str, Any]:
    """The `TransformerBridgeConfig` keyword arguments of the embedded model (JSON-serialisable).

    Pre-LayerNorm GPT-2 style: learned absolute positions, GELU MLP, untied unembedding,
    GPT-2 init (N(0, 0.8/sqrt(d_model)), residual outputs scaled by 1/sqrt(2 n_layers)).
    TL's own default act_fn is 'relu', so every choice is spelled out here.
    """
    return {
        "d_model": cfg.d_model,
        "d_head": cfg.d_model // cfg.n_heads,
        "n_heads": cfg.n_heads,
        "n_layers": cfg.n_layers,
        "d_mlp": cfg.d_mlp,
        "d_vocab": vocab_size,
        "n_ctx": context_length,
        "act_fn": "gelu",
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
        "init_mode": "gpt2",
        "seed": cfg.seed,
        "model_name": "sae_assets-embedded",
    }


def boot_native_architecture(architecture: dict[str, Any], device: str = "cpu") -> TransformerBridge:
    """A freshly initialised native bridge; the same dict and seed give the same weights."""
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    # boot_native forks the RNG when seeded, so the caller's global torch RNG is untouched.
    return TransformerBridge.boot_native(TransformerBridgeConfig(**architecture), device=device)


def build_embedded_model(cfg: ModelConfig, *, vocab_size: int, context_length: int) -> TransformerBridge:
    """The untrained embedded model, on `cfg.device`, seeded by `cfg.seed`."""
    architecture = native_architecture(cfg, vocab_size=vocab_size, context_length=context_length)
    return boot_native_architecture(architecture, device=cfg.device)


def save_embedded_model(
    model: TransformerBridge, *, cfg: ModelConfig, vocab_size: int, context_length: int, directory: Path
) -> list[str]:
    """Write `model.safetensors` and `model_config.json` into `directory`; return the file names.

    Each file is written under a temporary name and renamed, so a killed write leaves no
    partial file under the final name.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    sidecar = {
        "format": FORMAT,
        "architecture": native_architecture(cfg, vocab_size=vocab_size, context_length=context_length),
        "model_config": dataclasses.asdict(cfg),
        "vocab_size": vocab_size,
        "context_length": context_length,
    }
    tmp_weights = directory / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp_weights), metadata={"format": FORMAT})
    os.replace(tmp_weights, directory / WEIGHTS_FILE)
    tmp_config = directory / f".{CONFIG_FILE}.tmp"
    tmp_config.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_config, directory / CONFIG_FILE)
    return [WEIGHTS_FILE, CONFIG_FILE]


def load_embedded_model(directory: Path, device: str = "cpu") -> TransformerBridge:
    """Rebuild the model `save_embedded_model` wrote into `directory` (strict load, eval mode)."""
    directory = Path(directory)
    return load_embedded_model_files(directory / WEIGHTS_FILE, directory / CONFIG_FILE, device=device)


def load_embedded_model_files(weights_path: Path, config_path: Path, device: str = "cpu") -> TransformerBridge:
    """The same from two explicit files (artifact storage keeps each under its own checksum)."""
    from safetensors.torch import load_file

    sidecar = json.loads(Path(config_path).read_text())
    if sidecar.get("format") != FORMAT:
        raise ValueError(f"{config_path} has format {sidecar.get('format')!r}, expected {FORMAT!r}")
    model = boot_native_architecture(sidecar["architecture"], device=device)
    model.load_state_dict(load_file(str(weights_path), device=str(device)), strict=True)
    model.eval()
    return model


def load_named_model(name_or_path: str, device: str = "cpu", *, tokenizer: Any = None) -> TransformerBridge:
    """A Hugging Face causal LM (Hub name or local directory) wrapped as a `TransformerBridge`.

    Loaded with eager attention so attention-pattern hooks fire; weights are HF's own (not
    HookedTransformer-processed), so logits equal the HF model's. The tokenizer comes from the
    same place unless given; a directory without tokenizer files is an error, since
    `transformers` would otherwise hand back an empty one.
    """
    from transformer_lens import TransformerBridge
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(name_or_path, attn_implementation="eager")
    hf_model.eval()
    model = TransformerBridge.boot_transformers(name_or_path, hf_model=hf_model, device=device, tokenizer=tokenizer)
    if model.tokenizer is None or not getattr(model.tokenizer, "vocab_size", 0):
        raise ValueError(
            f"model {name_or_path!r} has no usable tokenizer (no tokenizer files found); "
            "save one next to the weights or pass tokenizer="
        )
    return model


def hook_names(model: TransformerBridge) -> list[str]:
    """Every hook point name the model accepts, sorted (e.g. 'blocks.0.hook_resid_post')."""
    return sorted(model.hook_dict)


def check_hook_names(model: TransformerBridge, names: Sequence[str]) -> None:
    """Raise ValueError naming each unknown hook, its closest matches and all valid names."""
    valid = hook_names(model)
    unknown = [name for name in names if name not in model.hook_dict]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
        hints.append(f"{name!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    raise ValueError(f"unknown hook name(s) {'; '.join(hints)}. Valid hook names: {', '.join(valid)}")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def forward_logits(model: TransformerBridge, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) for int64 tokens (B, T), in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    try:
        return model(tokens.to(model_device(model)))
    finally:
        model.train(was_training)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) at positions 0..T-2 against tokens (B, T) at 1..T-1."""
    vocab = logits.shape[-1]
    pred = logits[:, :-1].reshape(-1, vocab).float()  # (B*(T-1), V)
    target = tokens[:, 1:].reshape(-1)  # (B*(T-1),)
    return F.cross_entropy(pred, target, reduction=reduction)


@torch.no_grad()
def evaluate_loss(model: TransformerBridge, tokens: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy in nats over every predicted token of tokens (M, T)."""
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise ValueError(f"evaluate_loss needs tokens of shape (M>=1, T>=2), got {tuple(tokens.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total, count = 0.0, 0
    for start in range(0, tokens.shape[0], batch_size):
        batch_BT = tokens[start : start + batch_size]
        logits_BTV = forward_logits(model, batch_BT)
        total += next_token_loss(logits_BTV, batch_BT.to(logits_BTV.device), reduction="sum").item()
        count += batch_BT.shape[0] * (batch_BT.shape[1] - 1)
    return total / count


def split_is_validation(sequence_ids: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask (N,): True where a sequence is held out for validation.

    Decided per sequence by a SplitMix64 hash of (stable id, seed), never by position, so
    appending sequences or reordering them never moves one between train and validation.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    ids = np.asarray(sequence_ids, dtype=np.int64).astype(np.uint64)  # (N,)
    with np.errstate(over="ignore"):  # uint64 arithmetic is meant to wrap
        x = ids + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    uniform = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # (N,) in [0, 1)
    return uniform < val_fraction


def unigram_entropy(token_ids: np.ndarray) -> float:
    """Entropy in nats of the empirical unigram distribution: the loss of a context-free model."""
    flat = np.asarray(token_ids).reshape(-1)
    if flat.size == 0:
        raise ValueError("unigram_entropy needs at least one token")
    counts = np.bincount(flat.astype(np.int64))
    p = counts[counts > 0] / flat.size
    return float(-(p * np.log(p)).sum())
