"""The typed run configuration: frozen dataclasses loaded and validated from YAML.

One `RunConfig` describes a whole run of the graph: corpus source and sharding, tokenizer,
language model, hook points, activation dtype and storage backend. `load_config(path)` reads
a YAML file whose keys override the defaults in `sae_assets/config/default.yaml`;
`config_from_dict` validates a plain mapping. Every error names the dotted key that is wrong
and, for a choice, the allowed values. Tests: tests/test_config.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "default.yaml"

CorpusSource = Literal["embedded", "local", "huggingface"]
TokenizerKind = Literal["bpe", "pretrained"]
ModelKind = Literal["embedded", "named"]
ActivationDtype = Literal["float32", "float16", "bfloat16"]
StorageBackend = Literal["local", "s3"]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names its key."""


@dataclass(frozen=True)
class CorpusConfig:
    source: CorpusSource = "embedded"
    """Where text comes from: Python's standard-library docstrings, local files, or a HF dataset."""
    paths: tuple[str, ...] = ()
    """For source=local: files or directories of .txt, .jsonl or .parquet (globs allowed)."""
    hf_name: str = ""
    """For source=huggingface: a `datasets` name or a local dataset directory."""
    hf_config: str = ""
    """For source=huggingface: the dataset's configuration name, if it has several."""
    hf_split: str = "train"
    text_field: str = "text"
    """The column holding text in JSONL, Parquet and HF datasets."""
    num_shards: int = 4
    """Documents are cut into this many contiguous shards; each is one partition."""
    max_documents: int = 0
    """Keep only the first N documents (0 = all): a quick way to shrink a run."""
    min_document_chars: int = 40
    """Shorter documents (one-word docstrings and the like) are dropped."""

    def __post_init__(self) -> None:
        _check(self.num_shards >= 1, "corpus.num_shards", "must be >= 1")
        _check(self.num_shards <= 10_000, "corpus.num_shards", "must be <= 10000")
        _check(self.max_documents >= 0, "corpus.max_documents", "must be >= 0")
        if self.source == "local":
            _check(len(self.paths) > 0, "corpus.paths", "must list files when corpus.source is 'local'")
        if self.source == "huggingface":
            _check(bool(self.hf_name), "corpus.hf_name", "must be set when corpus.source is 'huggingface'")


@dataclass(frozen=True)
class TokenizerConfig:
    kind: TokenizerKind = "bpe"
    """'bpe' trains a byte-level BPE on the corpus; 'pretrained' uses the named model's own."""
    vocab_size: int = 4096
    context_length: int = 128
    """Tokens per sequence in token_shards (and the model's n_ctx for the embedded model)."""

    def __post_init__(self) -> None:
        _check(260 <= self.vocab_size <= 1_000_000, "tokenizer.vocab_size", "must be in [260, 1000000]")
        _check(2 <= self.context_length <= 65_536, "tokenizer.context_length", "must be in [2, 65536]")


@dataclass(frozen=True)
class ModelConfig:
    kind: ModelKind = "embedded"
    """'embedded' trains a small TransformerLens-native model; 'named' boots a HF model."""
    name: str = ""
    """For kind=named: a Hugging Face model name or a local directory (e.g. gpt2)."""
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    train_tokens: int = 600_000
    """Tokens seen in training (steps = train_tokens / (batch_size * context_length))."""
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    val_fraction: float = 0.05
    """Fraction of sequences held out (chosen by a hash of the sequence index)."""
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.kind == "named":
            _check(bool(self.name), "model.name", "must be set when model.kind is 'named'")
        _check(self.n_layers >= 1, "model.n_layers", "must be >= 1")
        _check(self.d_model % self.n_heads == 0, "model.d_model", "must be divisible by model.n_heads")
        _check(self.batch_size >= 1, "model.batch_size", "must be >= 1")
        _check(self.train_tokens >= 1, "model.train_tokens", "must be >= 1")
        _check(0.0 < self.val_fraction < 0.5, "model.val_fraction", "must be in (0, 0.5)")
        _check(self.learning_rate > 0, "model.learning_rate", "must be > 0")


@dataclass(frozen=True)
class ActivationsConfig:
    hook_points: tuple[str, ...] = ("blocks.1.hook_resid_post",)
    """TransformerLens hook names whose activations are cached."""
    dtype: ActivationDtype = "float32"
    batch_size: int = 32
    """Sequences per forward pass when caching."""
    device: str = "cpu"

    def __post_init__(self) -> None:
        _check(len(self.hook_points) >= 1, "activations.hook_points", "must name at least one hook")
        _check(len(set(self.hook_points)) == len(self.hook_points), "activations.hook_points", "has duplicates")
        _check(self.batch_size >= 1, "activations.batch_size", "must be >= 1")


@dataclass(frozen=True)
class ShuffleConfig:
    num_buckets: int = 4
    """Output buckets (partitions of shuffled_shards); each should fit the memory budget."""
    seed: int = 0
    memory_budget_mb: float = 256.0
    """Largest bucket held in memory when gathering; a bigger one takes another pass."""
    block_rows: int = 4096
    """Rows labelled together when scattering; part of the shuffle's identity, like the seed."""

    def __post_init__(self) -> None:
        _check(1 <= self.num_buckets <= 100_000, "shuffle.num_buckets", "must be in [1, 100000]")
        _check(self.memory_budget_mb > 0, "shuffle.memory_budget_mb", "must be > 0")
        _check(self.block_rows >= 1, "shuffle.block_rows", "must be >= 1")


@dataclass(frozen=True)
class StorageConfig:
    backend: StorageBackend = "local"
    root: str = ".data/artifacts"
    """For backend=local: the artifact root directory."""
    endpoint_url: str = ""
    """For backend=s3: the S3 API endpoint (empty = AWS)."""
    bucket: str = ""
    prefix: str = "sae_assets"
    region: str = "us-east-1"
    cache_dir: str = ".data/s3-cache"
    """For backend=s3: where downloaded files are kept, named by their checksum."""

    def __post_init__(self) -> None:
        if self.backend == "s3":
            _check(bool(self.bucket), "storage.bucket", "must be set when storage.backend is 's3'")


@dataclass(frozen=True)
class RunConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    shuffle: ShuffleConfig = field(default_factory=ShuffleConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        if self.model.kind == "named":
            _check(self.tokenizer.kind == "pretrained", "tokenizer.kind",
                   "must be 'pretrained' when model.kind is 'named' (a named model brings its own)")
        if self.model.kind == "embedded":
            _check(self.tokenizer.kind == "bpe", "tokenizer.kind",
                   "must be 'bpe' when model.kind is 'embedded'")

    def section_hash(self, *sections: str) -> str:
        """A short stable hash of the named config sections, e.g. ('corpus', 'tokenizer')."""
        payload = {name: dataclasses.asdict(getattr(self, name)) for name in sorted(sections)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {message}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation and return it in the field's type."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is {value!r}; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {type(value).__name__}")
        (item_type, _ellipsis) = typing.get_args(annotation)
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} at {key}")  # a bug here, not bad input


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix or '<root>'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown config key '{where}'; allowed keys here: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_dict(data: dict[str, Any] | None) -> RunConfig:
    """Validate a mapping (as read from YAML) into a RunConfig; missing keys take defaults."""
    return _build(RunConfig, data or {}, "")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read the packaged defaults, then `path` (if given), then `overrides`, and validate."""
    data = _read_yaml(DEFAULT_CONFIG_PATH)
    if path is not None:
        data = _merge(data, _read_yaml(Path(path)))
    if overrides:
        data = _merge(data, overrides)
    return config_from_dict(data)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def replace(config: Any, **changes: Any) -> Any:
    """A new config with `changes` applied (configs are frozen; derived values are new objects)."""
    return dataclasses.replace(config, **changes)

