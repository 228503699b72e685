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
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sae_assets.core.partition_budget import PartitionPlan, budget_problem, plan_partitions

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "default.yaml"

CorpusSource = Literal["embedded", "local", "huggingface"]
TokenizerKind = Literal["bpe", "pretrained"]
ModelKind = Literal["embedded", "named"]
ActivationDtype = Literal["float32", "float16", "bfloat16"]
StorageBackend = Literal["local", "s3"]
SaeArchitecture = Literal["relu", "topk", "jumprelu", "batchtopk", "matryoshka", "gated"]
SaeInit = Literal["anthropic", "orthogonal", "xavier", "data", "svd", "kmeans_rare", "outlier_rare"]
ResampleMethod = Literal["anthropic", "rare", "reinit"]
_DATA_INITS = ("data", "svd", "kmeans_rare", "outlier_rare")
"""sae.init values that draw decoder directions from the input sample (not for transcoders)."""


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names its key."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {message}")



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
    documents_per_shard: int = 0
    """> 0: shards of this many documents in corpus order instead (num_shards is then the
    corpus's count, found by listing it), so documents appended to the corpus only add shards."""
    training_shards: int = 0
    """The first N shards train the tokenizer, the language model and the dictionaries (0 = all).
    Shards beyond them are cached and browsed, but never change a model or dictionary."""
    max_documents: int = 0
    """Keep only the first N documents (0 = all): a quick way to shrink a run."""
    min_document_chars: int = 40
    """Shorter documents (one-word docstrings and the like) are dropped."""

    def __post_init__(self) -> None:
        _check(self.num_shards >= 1, "corpus.num_shards", "must be >= 1")
        _check(self.num_shards <= 10_000, "corpus.num_shards", "must be <= 10000")
        _check(self.max_documents >= 0, "corpus.max_documents", "must be >= 0")
        _check(self.documents_per_shard >= 0, "corpus.documents_per_shard", "must be >= 0")
        _check(self.training_shards >= 0, "corpus.training_shards", "must be >= 0")
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


def default_matryoshka_prefixes(width: int) -> tuple[int, ...]:
    """The nested prefix sizes a 'matryoshka' point gets when it names none: F/8, F/4, F/2, F
    (sizes below 1 and repeats dropped, so a tiny width has fewer levels)."""
    return tuple(sorted({width // 8, width // 4, width // 2, width} - {0}))


_L0_ARCHITECTURES = ("topk", "batchtopk", "matryoshka")
"""Architectures whose sparsity is k, the number of active features per token."""
_SPARSITY_TAGS = {"relu": "l1_", "gated": "l1_", "jumprelu": "l0_"}
"""Key tag of the penalty coefficient of the other architectures (L1 lambda or L0 lambda)."""


@dataclass(frozen=True)
class DictionaryPoint:
    """One point of the SAE sweep; its `key` names the sae_dictionary partition."""

    architecture: SaeArchitecture = "relu"
    width: int = 1024
    """Dictionary size (number of features)."""
    sparsity: float = 5.0
    """The L1 coefficient for 'relu' and 'gated'; the L0 coefficient for 'jumprelu'; k (active
    features per token, on average over a batch for 'batchtopk' and 'matryoshka') for 'topk',
    'batchtopk' and 'matryoshka'."""
    prefixes: tuple[int, ...] = ()
    """'matryoshka' only: the nested dictionary sizes m_1 < ... < m_n = width whose
    reconstruction losses are summed; empty = `default_matryoshka_prefixes(width)`."""
    hook: str = ""
    """The cached hook the dictionary reads; empty = sae.hook_point (whose empty = the first of
    activations.hook_points)."""
    target_hook: str = ""
    """Set, the point is a transcoder: it reads `hook` and reconstructs this cached hook (an
    MLP's input -> the MLP's output, e.g. blocks.1.ln2.hook_normalized -> blocks.1.hook_mlp_out);
    sae_metrics splices its output in at this hook. Empty = an SAE, which reconstructs what it reads."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefixes", tuple(int(m) for m in self.prefixes))
        _check(self.width >= 1, self._where("width"), "must be >= 1")
        _check(self.sparsity > 0, self._where("sparsity"), "must be > 0")
        if self.architecture in _L0_ARCHITECTURES:
            _check(float(self.sparsity).is_integer() and self.sparsity <= self.width, self._where("sparsity"),
                   f"must be a whole number k <= width ({self.width}) for architecture {self.architecture!r}")
        if self.architecture != "matryoshka":
            _check(not self.prefixes, self._where("prefixes"), "is only for architecture 'matryoshka'")
        else:
            m = self.matryoshka_prefixes
            ok = m[0] >= 1 and m[-1] == self.width and all(a < b for a, b in zip(m, m[1:]))
            _check(ok, self._where("prefixes"), f"is {list(m)}; must be strictly increasing sizes >= 1 "
                   f"ending at the width {self.width}")

    def _where(self, field_name: str) -> str:
        """The config key of a field, with this point's partition key (errors name both)."""
        return f"sae.sweep[{self.key}].{field_name}"

    def as_dict(self) -> dict[str, Any]:
        """The point as hashed into identities; `prefixes` only where set, so that points without
        them keep the hashes they had before the field existed."""
        values = dataclasses.asdict(self)
        for name in ("prefixes", "hook", "target_hook"):
            if not values[name]:
                del values[name]
        return values

    @property
    def is_transcoder(self) -> bool:
        """True when the point reconstructs another hook than the one it reads."""
        return bool(self.target_hook)

    @property
    def matryoshka_prefixes(self) -> tuple[int, ...]:
        """The prefix sizes in effect: `prefixes`, or the default for the width when empty."""
        return self.prefixes or default_matryoshka_prefixes(self.width)

    @property
    def key(self) -> str:
        """Readable partition key: relu-w1024-l1_5, gated-w1024-l1_5, jumprelu-w1024-l0_0.1,
        topk-w1024-k32, batchtopk-w1024-k32, matryoshka-w1024-k32 (default prefixes) or
        matryoshka-w1024-k32-p64_256_1024 (others); a point with its own hook ends in
        -in-<hook>, a transcoder in -out-<target_hook> (relu-w1024-l1_5-in-blocks.1.ln2.hook_normalized-
        out-blocks.1.hook_mlp_out). No | , [ ] (Dagster refuses them)."""
        if self.architecture in _L0_ARCHITECTURES:
            k = self.sparsity
            tag = f"k{int(k)}" if float(k).is_integer() else f"k{k:g}"
        else:
            tag = f"{_SPARSITY_TAGS.get(self.architecture, '')}{self.sparsity:g}"
        key = f"{self.architecture}-w{self.width}-{tag}"
        default = default_matryoshka_prefixes(self.width)
        if self.architecture == "matryoshka" and self.prefixes and self.prefixes != default:
            key += "-p" + "_".join(str(m) for m in self.prefixes)
        if self.hook:  # hook names are Dagster- and path-safe (letters, digits, '.', '_')
            key += f"-in-{self.hook}"
        if self.target_hook:
            key += f"-out-{self.target_hook}"
        return key


def resolve_resample_steps(resample_steps: tuple[float, ...], total_steps: int) -> tuple[int, ...]:
    """The steps at which a run of `total_steps` resamples, sorted: whole numbers are steps,
    numbers in (0, 1) fractions of the run (rounded to the nearest step). Raises ValueError
    unless every one lands strictly inside the run (0 < step < total_steps)."""
    steps = []
    for value in resample_steps:
        if 0 < value < 1:
            steps.append(round(value * total_steps))
        elif value >= 1 and float(value).is_integer():
            steps.append(int(value))
        else:
            raise ValueError(f"holds {value!r}: each must be a whole step >= 1 or a fraction of the run in (0, 1)")
        if not 0 < steps[-1] < total_steps:
            what = f"step {steps[-1]}" if value >= 1 else f"{value!r} (step {steps[-1]})"
            raise ValueError(f"holds {what}, outside a run of {total_steps} steps, so it would never resample "
                             f"(give a step in 1..{total_steps - 1} or a fraction in (0, 1))")
    return tuple(sorted(set(steps)))


@dataclass(frozen=True)
class SaeConfig:
    sweep: tuple[DictionaryPoint, ...] = (
        DictionaryPoint("relu", 1024, 5.0),
        DictionaryPoint("topk", 1024, 32.0),
    )
    """Dictionaries to train: each is one partition of sae_dictionary and sae_metrics."""
    hook_point: str = ""
    """Which cached hook to train on; empty = the first of activations.hook_points."""
    train_tokens: int = 2_000_000
    batch_size: int = 1024
    learning_rate: float = 1e-3
    lr_warmup_steps: int = 50
    lr_decay_fraction: float = 0.2
    """Linear decay to zero over this final fraction of training (Anthropic 2024)."""
    l1_warmup_fraction: float = 0.05
    """The sparsity coefficient (relu, gated: L1; jumprelu: L0) ramps from 0 over this first
    fraction of training."""
    init: SaeInit = "anthropic"
    """anthropic: W_dec columns at norm 0.1, W_enc = W_dec^T; others from "Informed initialization of sparse dictionaries"."""
    resample: bool = True
    """Revive dead features at `resample_steps` (how: `resample_method`)."""
    resample_steps: tuple[float, ...] = (500, 1000)
    """When to resample: a whole number >= 1 is a step, a number in (0, 1) a fraction of the run
    (0.5 = half-way). Every one must fall strictly inside the run when `resample` is on: a step
    past the end would silently never resample, so it is a ConfigError."""
    resample_method: ResampleMethod = "anthropic"
    """How dead features are revived (core/sae/resample.py): anthropic: directions of poorly
    reconstructed inputs drawn by loss^2; rare: rare-feature vectors of the worst-reconstructed
    inputs; reinit: random directions (the plain re-initialisation "My best guess at the important
    tricks for training 1L SAEs" compares with). All three reset norms and optimizer state alike."""
    rewarm_after_resample: bool = True
    """Re-warm the LR after each resample ("My best guess at the important tricks for training 1L SAEs")."""
    rewarm_steps: int = 50
    dead_after_tokens: int = 200_000
    """A feature that has not fired on this many training tokens counts as dead (and is resampled);
    sae_metrics counts dead features over at least this many held-out tokens."""
    aux_k: int = 256
    """TopK, BatchTopK, Matryoshka: the dead latents used by the AuxK loss."""
    aux_coefficient: float = 0.03125
    checkpoint_every: int = 200
    seed: int = 0
    device: str = "cpu"
    eval_sequences: int = 64
    """Held-out sequences (the LM's validation split) scored by sae_metrics: a seeded uniform sample
    (by sae.seed) over every training shard; as many training sequences give the mean-ablation mean."""
    max_dead_fraction: float = 0.5
    """Asset check threshold: fail when more features than this are dead."""
    min_loss_recovered: float = 0.5
    """Asset check threshold: fail when loss recovered against mean ablation is lower."""

    def __post_init__(self) -> None:
        keys = [p.key for p in self.sweep]
        _check(len(keys) >= 1, "sae.sweep", "must list at least one dictionary")
        _check(len(set(keys)) == len(keys), "sae.sweep", f"has duplicate points: {keys}")
        _check(self.batch_size >= 1, "sae.batch_size", "must be >= 1")
        _check(self.train_tokens >= self.batch_size, "sae.train_tokens", "must be >= sae.batch_size")
        _check(0 <= self.lr_decay_fraction < 1, "sae.lr_decay_fraction", "must be in [0, 1)")
        _check(0 <= self.l1_warmup_fraction < 1, "sae.l1_warmup_fraction", "must be in [0, 1)")
        _check(0 <= self.max_dead_fraction <= 1, "sae.max_dead_fraction", "must be in [0, 1]")
        _check(self.checkpoint_every >= 1, "sae.checkpoint_every", "must be >= 1")
        # Whole numbers as ints, so that [500, 1000] hashes as it did when the field held ints.
        object.__setattr__(self, "resample_steps", tuple(
            int(v) if float(v).is_integer() else float(v) for v in self.resample_steps))
        if self.resample:
            try:
                resolve_resample_steps(self.resample_steps, self.total_steps)
            except ValueError as exc:
                raise ConfigError(f"config key 'sae.resample_steps' {exc}; the runs of sae.sweep points "
                                  f"{keys} have {self.total_steps} steps (sae.train_tokens // sae.batch_size)") from exc

    @property
    def total_steps(self) -> int:
        """Optimizer steps of each sweep point's training run."""
        return max(1, self.train_tokens // self.batch_size)

    def point(self, key: str) -> DictionaryPoint:
        for candidate in self.sweep:
            if candidate.key == key:
                return candidate
        raise ConfigError(f"dictionary partition {key!r} is not in sae.sweep (have: {[p.key for p in self.sweep]})")


@dataclass(frozen=True)
class FeaturesConfig:
    """The feature browser: example tables, context windows and one static site over the served dictionaries."""

    dictionary: str = ""
    """The sae.sweep point (sae_dictionary partition key) the browser opens on; empty = the first."""
    dictionaries: Literal["all"] | tuple[str, ...] = "all"
    """Further sweep points the same site serves ('all': every one; []: none), each with its own feature
    assets (named `<asset>__<key slug>`), a place in the site's dictionary picker, and on each
    feature page the closest feature of every other served dictionary (feature_matches)."""
    range_width: int = 256
    """Features per feature-range partition; memory per step is batch_size x range_width."""
    top_k: int = 16
    """Largest activations kept per feature (ties ordered by global token index)."""
    sample_k: int = 0
    """Uniform sample of activating tokens kept per feature; 0 = 10 x top_k."""
    seed: int = 0
    """Seed of the sample's hash: the same seed gives the same sample under any sharding."""
    batch_size: int = 4096
    """Tokens encoded per step by feature_samples and context_windows."""
    window_before: int = 24
    """Context tokens shown before each example (clipped at the sequence start)."""
    window_after: int = 8
    """Context tokens shown after each example (clipped at the sequence end)."""
    random_examples: int = 8
    """Examples from the uniform sample shown per feature (the first by hash, so a fixed choice)."""
    activation_levels: int = 10
    """Equal-width intervals of (0, max] a feature page shows, each with its share of the feature's
    non-zero activations (SAEDashboard's 10 quantile groups)..."""
    examples_per_level: int = 2
    """...and how many examples in each (the first by hash among the uniform sample and the top-K)."""
    logit_effects: int = 10
    """Top and bottom tokens of each decoder direction through the unembedding."""
    neuronpedia_export: bool = False
    """Also write feature JSON in Neuronpedia's upload layout (feature_site/neuronpedia/)."""
    require_passing_checks: bool = True
    """Refuse to open the site on (features.dictionary) a dictionary whose sae_metrics checks
    failed; a further served one that failed is served, its failed checks named in the picker."""
    device: str = "cpu"

    def __post_init__(self) -> None:
        _check(1 <= self.range_width <= 1 << 20, "features.range_width", "must be in [1, 1048576]")
        _check(self.top_k >= 1, "features.top_k", "must be >= 1")
        _check(self.sample_k >= 0, "features.sample_k", "must be >= 0")
        _check(0 <= self.seed < 1 << 63, "features.seed", "must be in [0, 2**63)")
        _check(self.batch_size >= 1, "features.batch_size", "must be >= 1")
        _check(self.window_before >= 0 and self.window_after >= 0, "features.window_before",
               "and features.window_after must be >= 0")
        _check(self.random_examples >= 0, "features.random_examples", "must be >= 0")
        _check(self.activation_levels >= 0 and self.examples_per_level >= 0, "features.activation_levels",
               "and features.examples_per_level must be >= 0")
        _check(self.logit_effects >= 0, "features.logit_effects", "must be >= 0")
        _check(self.random_examples + self.activation_levels * self.examples_per_level <= self.samples_kept,
               "features.random_examples", "plus activation_levels x examples_per_level must not exceed the "
               "uniform sample (features.sample_k)")

    @property
    def samples_kept(self) -> int:
        """The uniform sample's size per feature (sample_k, or 10 x top_k)."""
        return self.sample_k or 10 * self.top_k


SpecialTokenIds = Literal["auto"] | tuple[int, ...]


@dataclass(frozen=True)
class SpecialTokensConfig:
    """Special tokens (BOS, EOS, padding): the language model still sees them, but their
    positions are no dictionary's business. Resolved against the tokenizer by
    `core.corpus.special_tokens.resolve_special_token_ids`."""

    exclude: bool = True
    """Keep special-token positions out of SAE training, out of sae_metrics' scores (the
    reconstruction is spliced in at the other positions only) and out of the feature statistics
    and examples. false: they are ordinary tokens."""
    token_ids: SpecialTokenIds = "auto"
    """Which token ids are special: 'auto' = the tokenizer's end-of-text id and every token its
    tokenizer.json flags special (BOS, EOS, padding), or a list of ids. The browser marks them in
    context windows either way."""

    def __post_init__(self) -> None:
        if self.token_ids != "auto":
            object.__setattr__(self, "token_ids", tuple(int(i) for i in self.token_ids))
            for i, token_id in enumerate(self.token_ids):
                _check(token_id >= 0, f"special_tokens.token_ids[{i}]", f"is {token_id}; token ids are >= 0")


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
    """For backend=s3: where downloaded files are kept (named by their checksum) and outputs are
    staged. `{run_id}` in it becomes each Dagster run's id, so runs on one machine share no local
    files, as on a cluster (`.data/s3-cache/{run_id}`); delete such directories after the runs."""
    gc_grace_hours: float = 24.0
    """Garbage collection (`make gc`) keeps every object put, and every manifest superseded,
    less than this long ago: longer than any run that reads an old version or commits one."""
    gc_keep_versions: int = 2
    """Garbage collection keeps this many most recently committed versions of each partition
    (the current one included), however old."""

    def __post_init__(self) -> None:
        if self.backend == "s3":
            _check(bool(self.bucket), "storage.bucket", "must be set when storage.backend is 's3'")
        _check(self.gc_grace_hours > 0, "storage.gc_grace_hours", "must be > 0")
        _check(self.gc_keep_versions >= 1, "storage.gc_keep_versions", "must be >= 1")


TrackedTensorKind = Literal["attn.q", "attn.k", "attn.v", "attn.o", "mlp.in", "mlp.out", "embed", "unembed"]
AblationUnitKind = Literal["mlp_neuron", "attention_head"]


@dataclass(frozen=True)
class AttributionConfig:
    """Training-data attribution from per-datum parameter shifts, after
    "Gradient capture / training-data attribution from outlier parameter shifts"."""

    capture: bool = True
    """Capture per-datum shifts while language_model trains (embedded model only)."""
    tensors: tuple[TrackedTensorKind, ...] = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.in", "mlp.out")
    """Weights tracked in every block; 'embed' and 'unembed' may be added (the write-up left them out)."""
    top_k: int = 100
    """Largest |shift| kept per datum per step (that write-up kept 1000)."""
    steps_per_range: int = 100
    """Training steps per parameter_shifts partition."""
    heuristic_min_count: int = 20
    """c: a notable token occurs at least this often in a unit's attributed data."""
    heuristic_top_relative: int = 200
    """r: of those, the top r by frequency relative to the training split..."""
    heuristic_top_count: int = 5
    """s: ...and of those the top s by count are the unit's notable tokens."""
    ablation_kind: AblationUnitKind = "mlp_neuron"
    """Which units are zero-ablated to test their notable tokens."""
    ablation_units: int = 8
    """The most-attributed units (with a notable token) ablated, each against a random control."""
    ablation_windows: int = 32
    """Attributed training sequences run with and without each ablated unit."""
    seed: int = 0
    """Seed of the random control units, the paired test's draws and the activation sample."""
    activation_sequences: int = 256
    """Training sequences (a seeded uniform sample) whose MLP activations rank each ablated neuron
    among its layer by selectivity for its notable tokens: would activations alone have found it?"""

    def __post_init__(self) -> None:
        _check(len(self.tensors) >= 1, "attribution.tensors", "must name at least one tensor")
        _check(self.activation_sequences >= 0, "attribution.activation_sequences", "must be >= 0")
        _check(len(set(self.tensors)) == len(self.tensors), "attribution.tensors", "has duplicates")
        _check(self.top_k >= 1, "attribution.top_k", "must be >= 1")
        _check(self.steps_per_range >= 1, "attribution.steps_per_range", "must be >= 1")
        _check(self.heuristic_min_count >= 1, "attribution.heuristic_min_count", "must be >= 1")
        _check(self.heuristic_top_relative >= 1, "attribution.heuristic_top_relative", "must be >= 1")
        _check(self.heuristic_top_count >= 1, "attribution.heuristic_top_count", "must be >= 1")
        _check(self.ablation_units >= 0, "attribution.ablation_units", "must be >= 0")
        _check(self.ablation_windows >= 1, "attribution.ablation_windows", "must be >= 1")
        _check(self.seed >= 0, "attribution.seed", "must be >= 0")

    def capture_settings(self) -> dict[str, Any]:
        """The settings that shape what language_model captures (the rest shape only the tables)."""
        return {"capture": self.capture, "tensors": list(self.tensors), "top_k": self.top_k,
                "steps_per_range": self.steps_per_range}


@dataclass(frozen=True)
class ProbingConfig:
    """k-sparse probing of each dictionary (sae_probing), after SAEBench's sparse probing: one
    label against the rest, on documents pooled from the language model's held-out sequences
    (labels: `core.corpus.labels.document_label`, e.g. the module a docstring comes from)."""

    k_values: tuple[int, ...] = (1, 2, 5, 20)
    """Latents per sparse probe: the k with the largest difference of class means on the training split."""
    tasks: tuple[str, ...] = ()
    """Labels probed one-vs-rest; empty = the `num_tasks` most frequent labels with enough documents."""
    num_tasks: int = 8
    """With `tasks` empty: how many of the most frequent labels are probed."""
    min_documents: int = 10
    """A task needs this many documents of its label (and as many of others) in the sample, else it is skipped."""
    test_fraction: float = 0.25
    """Fraction of each task's documents (per class) held out to score the probes."""
    sequences: int = 4096
    """Held-out sequences pooled into documents: a seeded uniform sample (by probing.seed)."""
    seed: int = 0
    """Seed of the sequence sample, the negatives drawn for each task and its train/test split."""

    def __post_init__(self) -> None:
        _check(len(self.k_values) >= 1 and min(self.k_values) >= 1, "probing.k_values", "must list integers >= 1")
        _check(len(set(self.k_values)) == len(self.k_values), "probing.k_values", "has duplicates")
        _check(len(set(self.tasks)) == len(self.tasks), "probing.tasks", "has duplicates")
        _check(self.num_tasks >= 1, "probing.num_tasks", "must be >= 1")
        _check(self.min_documents >= 2, "probing.min_documents", "must be >= 2 (a train and a test document)")
        _check(0.0 < self.test_fraction < 1.0, "probing.test_fraction", "must be in (0, 1)")
        _check(self.sequences >= 1, "probing.sequences", "must be >= 1")
        _check(self.seed >= 0, "probing.seed", "must be >= 0")


@dataclass(frozen=True)
class RunConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    shuffle: ShuffleConfig = field(default_factory=ShuffleConfig)
    sae: SaeConfig = field(default_factory=SaeConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    special_tokens: SpecialTokensConfig = field(default_factory=SpecialTokensConfig)
    probing: ProbingConfig = field(default_factory=ProbingConfig)

    def __post_init__(self) -> None:
        if self.tokenizer.kind == "bpe" and self.special_tokens.token_ids != "auto":
            for i, token_id in enumerate(self.special_tokens.token_ids):
                _check(token_id < self.tokenizer.vocab_size, f"special_tokens.token_ids[{i}]",
                       f"is {token_id}, not below tokenizer.vocab_size ({self.tokenizer.vocab_size})")
        if self.model.kind == "named":
            _check(self.tokenizer.kind == "pretrained", "tokenizer.kind",
                   "must be 'pretrained' when model.kind is 'named' (a named model brings its own)")
        if self.model.kind == "embedded":
            _check(self.tokenizer.kind == "bpe", "tokenizer.kind",
                   "must be 'bpe' when model.kind is 'embedded'")
        if self.features.dictionary:
            _check(self.features.dictionary in [p.key for p in self.sae.sweep], "features.dictionary",
                   f"must be one of the sae.sweep keys {[p.key for p in self.sae.sweep]}")
        if self.features.dictionaries != "all":
            for i, key in enumerate(self.features.dictionaries):
                _check(key in [p.key for p in self.sae.sweep], f"features.dictionaries[{i}]",
                       f"is {key!r}, not one of the sae.sweep keys {[p.key for p in self.sae.sweep]}")
        slugs: dict[str, str] = {}
        for point in self.browsed_dictionaries:
            other = slugs.setdefault(dictionary_slug(point.key), point.key)
            _check(other == point.key, "features.dictionaries",
                   f"serves {other!r} and {point.key!r}, whose asset names would both end in "
                   f"__{dictionary_slug(point.key)}: serve one of them")
        if self.sae.hook_point:
            _check(self.sae.hook_point in self.activations.hook_points, "sae.hook_point",
                   f"must be one of activations.hook_points {list(self.activations.hook_points)}")
        for point in self.sae.sweep:
            self._check_point_hooks(point)
        if not self.corpus.documents_per_shard:  # a growing corpus is checked when its shards are listed
            problem = budget_problem(self.partition_plan(self.corpus.num_shards))
            _check(problem is None, "features.range_width", problem or "")

    def partition_plan(self, shards: int) -> PartitionPlan:
        """The shard x feature-range partition counts of this config over `shards` data shards."""
        return plan_partitions(shards=shards, dictionary_width=max(p.width for p in self.browsed_dictionaries),
                               range_width=self.features.range_width)

    @property
    def feature_dictionary(self) -> DictionaryPoint:
        """The sweep point the feature browser serves (features.dictionary, or the first)."""
        return self.sae.point(self.features.dictionary) if self.features.dictionary else self.sae.sweep[0]

    @property
    def browsed_dictionaries(self) -> tuple[DictionaryPoint, ...]:
        """The sweep points the feature browser serves: features.dictionary (the one it opens on)
        first, then features.dictionaries in sweep order ('all') or as listed, each once."""
        listed = ([p.key for p in self.sae.sweep] if self.features.dictionaries == "all"
                  else list(self.features.dictionaries))
        first = self.feature_dictionary.key
        return (self.feature_dictionary, *(self.sae.point(key) for key in dict.fromkeys(listed) if key != first))

    def served_slug(self, key: str) -> str | None:
        """How a served dictionary's assets, partitions and site files are named apart: None for
        the one the site opens on (plain names), else its `dictionary_slug`."""
        return None if key == self.feature_dictionary.key else dictionary_slug(key)

    def browsing(self, key: str) -> RunConfig:
        """This config with the browser on sweep point `key`: what the feature assets of `key`
        read (`feature_dictionary`, `feature_hook` and every key derived from them follow)."""
        if key == self.feature_dictionary.key:
            return self
        return dataclasses.replace(self, features=dataclasses.replace(self.features, dictionary=key))

    @property
    def special_token_exclusion(self) -> str | tuple[int, ...]:
        """The special tokens kept out of training, evaluation and the feature statistics:
        special_tokens.token_ids when special_tokens.exclude is on, else none (())."""
        return self.special_tokens.token_ids if self.special_tokens.exclude else ()

    @property
    def sae_hook(self) -> str:
        """The hook point the dictionaries read unless a sweep point names its own."""
        return self.sae.hook_point or self.activations.hook_points[0]

    def point_hooks(self, point: DictionaryPoint) -> tuple[str, str]:
        """(the hook a sweep point reads, the hook it reconstructs): the same hook for an SAE."""
        source = point.hook or self.sae_hook
        return source, point.target_hook or source

    def training_columns(self, point: DictionaryPoint) -> tuple[str, ...]:
        """The hook columns a point's training rows hold, side by side: its hook, then a
        transcoder's target hook."""
        source, target = self.point_hooks(point)
        return (source, target) if point.is_transcoder else (source,)

    @property
    def feature_hook(self) -> str:
        """The hook whose activations the browsed dictionary's features are computed on (its input)."""
        return self.point_hooks(self.feature_dictionary)[0]

    def _check_point_hooks(self, point: DictionaryPoint) -> None:
        cached = list(self.activations.hook_points)
        for name in ("hook", "target_hook"):
            hook = getattr(point, name)
            _check(not hook or hook in cached, point._where(name),
                   f"is {hook!r}, which is not cached: add it to activations.hook_points {cached} (one forward "
                   "pass caches them all)")
        source, target = self.point_hooks(point)
        if point.is_transcoder:
            _check(target != source, point._where("target_hook"),
                   f"is the hook the point reads ({source!r}); leave it empty for an SAE")
            _check(self.sae.init not in _DATA_INITS, "sae.init",
                   f"is {self.sae.init!r}, which draws decoder directions from the input data; transcoder "
                   f"{point.key} reconstructs another hook: use one of anthropic, orthogonal, xavier")
            _check(not (self.sae.resample and self.sae.resample_method == "rare"), "sae.resample_method",
                   f"is 'rare' (rare-feature vectors of the input); transcoder {point.key} needs anthropic or reinit")

    def value_at(self, path: str) -> Any:
        """The value at a dotted path: a config key ('sae.batch_size') or a derived value
        ('sae_hook', 'feature_dictionary'), as plain JSON-able data."""
        value: Any = self
        for part in path.split("."):
            if not hasattr(value, part):
                raise ConfigError(f"config key '{path}' does not exist")
            value = getattr(value, part)
        if isinstance(value, DictionaryPoint):
            return value.as_dict()
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SLUG_CHARS = 40
"""The longest slug: `feature_examples__<slug>` stays within the 64 characters of an asset name."""


def dictionary_slug(key: str) -> str:
    """A sweep point's key as it can end an asset name and a file name (a-z, 0-9, _):
    relu-w1024-l1_5 -> relu_w1024_l1_5; a longer key (a transcoder's names two hooks) keeps its
    first 31 characters and a hash of the whole."""
    slug = re.sub(r"[^a-z0-9_]", "_", key.lower())
    if len(slug) <= SLUG_CHARS:
        return slug
    return f"{slug[:SLUG_CHARS - 9]}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def config_keys() -> list[str]:
    """Every dotted key of a RunConfig ('corpus.source', ...), section by section."""
    return [f"{section.name}.{f.name}" for section in dataclasses.fields(RunConfig)
            for f in dataclasses.fields(typing.get_type_hints(RunConfig)[section.name])]


def config_hash(values: dict[str, Any]) -> str:
    """The one hash of config values (e.g. {'sae.seed': 0}): short, stable, order-free."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation and return it in the field's type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):  # e.g. 'auto' or a list of ids: the first form that fits
        problems = []
        for form in typing.get_args(annotation):
            try:
                return _coerce(value, form, key)
            except ConfigError as exc:
                problems.append(str(exc).removeprefix(f"config key '{key}' "))
        raise ConfigError(f"config key '{key}' is {value!r}, which fits none of its forms: {'; or '.join(problems)}")
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


def merge_mappings(base: dict, override: dict) -> dict:
    """`override` laid over `base`, nested mappings merged key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_mappings(merged[key], value)
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
        data = merge_mappings(data, _read_yaml(Path(path)))
    if overrides:
        data = merge_mappings(data, overrides)
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

