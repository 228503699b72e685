"""Arrow/Parquet schemas: the one module that defines every table's columns and types.

Token shards and activation shards are Arrow IPC files (uncompressed, so they memory-map
with zero copies); small tables are Parquet. Global token indices are 64-bit and stable:
`shard_index << SHARD_BITS | offset_in_shard`, so adding a shard never renumbers another.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SHARD_BITS = 40
"""Token offsets within one shard stay below 2**40 (about 1.1e12 tokens)."""

TOKEN_INDEX = "token_index"
TOKEN_ID = "token_id"

# Arrow has no bfloat16: such activations are stored as their raw uint16 bits and the file's
# schema metadata records the logical dtype.
_STORAGE_TYPES = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}


def global_token_index(shard_index: int, offsets: np.ndarray) -> np.ndarray:
    """(n,) int64 stable global indices of the tokens at `offsets` within shard `shard_index`."""
    return (np.int64(shard_index) << np.int64(SHARD_BITS)) + offsets.astype(np.int64)


def shard_of_token(token_index: np.ndarray) -> np.ndarray:
    return (token_index >> SHARD_BITS).astype(np.int64)


def corpus_schema() -> pa.Schema:
    """corpus_shards: one row per document."""
    return pa.schema([
        pa.field("doc_id", pa.string(), nullable=False),  # stable: source file/row + position
        pa.field("text", pa.large_string(), nullable=False),
    ])


def token_sequence_schema(context_length: int) -> pa.Schema:
    """token_shards: one row per fixed-length sequence."""
    return pa.schema([
        pa.field("first_token_index", pa.int64(), nullable=False),  # global index of tokens[0]
        pa.field("tokens", pa.list_(pa.int32(), context_length), nullable=False),
    ])


def activation_schema(hook_widths: dict[str, int], dtype: str) -> pa.Schema:
    """cached_activations: one row per token; one fixed-size-list column per hook point."""
    if dtype not in _STORAGE_TYPES:
        raise ValueError(f"activation dtype {dtype!r} not in {sorted(_STORAGE_TYPES)}")
    fields = [
        pa.field(TOKEN_INDEX, pa.int64(), nullable=False),
        pa.field(TOKEN_ID, pa.int32(), nullable=False),
    ]
    fields += [
        pa.field(hook, pa.list_(_STORAGE_TYPES[dtype], width), nullable=False)
        for hook, width in hook_widths.items()
    ]
    return pa.schema(fields, metadata={"dtype": dtype, "hooks": ",".join(hook_widths)})


def training_curve_schema() -> pa.Schema:
    return pa.schema([
        pa.field("step", pa.int64()),
        pa.field("tokens_seen", pa.int64()),
        pa.field("train_loss", pa.float64()),
        pa.field("lr", pa.float64()),
        pa.field("val_loss", pa.float64()),  # null except at evaluation steps
    ])


# --- the feature browser ----------------------------------------------------------------------

def feature_top_schema() -> pa.Schema:
    """Top-K table: one row per (feature, rank); rank 0 is the largest activation."""
    return pa.schema([
        pa.field("feature", pa.int32(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("token_index", pa.int64(), nullable=False),
        pa.field("activation", pa.float32(), nullable=False),
    ])


def feature_sample_schema() -> pa.Schema:
    """Sample table: one row per (feature, rank); rank 0 has the smallest hash."""
    return pa.schema([
        pa.field("feature", pa.int32(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("hash", pa.uint64(), nullable=False),
        pa.field("token_index", pa.int64(), nullable=False),
        pa.field("activation", pa.float32(), nullable=False),
    ])


def feature_stats_schema(n_bins: int) -> pa.Schema:
    """Stats table: one row per feature of the range, also for features that never fired."""
    return pa.schema([
        pa.field("feature", pa.int32(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),  # tokens with activation > 0
        pa.field("sum", pa.float64(), nullable=False),  # sum of positive activations
        pa.field("max", pa.float32(), nullable=False),  # 0 where count == 0
        pa.field("hist", pa.list_(pa.int64(), n_bins), nullable=False),  # counts per bin of hist_edges
    ])


def shown_examples_schema() -> pa.Schema:
    """The examples the browser shows for a range (features.select_shown_examples): one row per
    (feature, token); `role` is 'top', 'random' or 'level' and `rank` orders examples of a role."""
    return pa.schema([
        pa.field("feature", pa.int32(), nullable=False),
        pa.field("token_index", pa.int64(), nullable=False),  # the example's (centre) token
        pa.field("activation", pa.float32(), nullable=False),
        pa.field("role", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("level", pa.int32(), nullable=False),  # 1..activation_levels for 'level', else 0
    ])


def context_windows_schema() -> pa.Schema:
    """context_gather (per shard) and context_windows (per range): the feature's activation on
    every token of each shown example's window."""
    return pa.schema([
        pa.field("feature", pa.int32(), nullable=False),
        pa.field("token_index", pa.int64(), nullable=False),  # the example's token
        pa.field("first_token_index", pa.int64(), nullable=False),  # of the window
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("activations", pa.list_(pa.float32()), nullable=False),
    ])


def cofiring_schema() -> pa.Schema:
    """context_gather (per shard) and context_windows (per range): every feature of the whole
    dictionary active at each top example's token (core/features/cofiring.py)."""
    return pa.schema([
        pa.field("token_index", pa.int64(), nullable=False),
        pa.field("features", pa.list_(pa.int32()), nullable=False),  # ascending
    ])


def feature_map_schema() -> pa.Schema:
    """feature_map (per dictionary): every feature's quantised place on the map
    (core/features/feature_map.py), one row per feature in feature order."""
    return pa.schema([
        pa.field("feature", pa.int32(), nullable=False),
        pa.field("x", pa.uint16(), nullable=False),
        pa.field("y", pa.uint16(), nullable=False),
    ])


# --- training-data attribution (sae_assets.core.attribution) ------------------------------------

def feature_matches_schema() -> pa.Schema:
    """feature_matches (per served dictionary and sweep point): every feature's closest feature
    of the other dictionary by decoder cosine (core/features/matches.py), in feature order."""
    return pa.schema([
        pa.field("feature", pa.int64()),
        pa.field("match", pa.int64()),
        pa.field("cosine", pa.float32()),
    ])


def raw_shift_schema() -> pa.Schema:
    """language_model's capture files: the top-k shifts of each datum at each step, as captured."""
    return pa.schema([
        pa.field("step", pa.int32(), nullable=False),  # 1-based optimizer step
        pa.field("datum_id", pa.int64(), nullable=False),  # global token index of the sequence's first token
        pa.field("flat_index", pa.int64(), nullable=False),  # into the tracked space (TensorLayout.decode)
        pa.field("value", pa.float32(), nullable=False),
    ])


def capture_step_schema() -> pa.Schema:
    """One row per captured step: its settings, the sum check and the split of its update."""
    return pa.schema([
        pa.field("step", pa.int32(), nullable=False),
        pa.field("lr", pa.float64(), nullable=False),
        pa.field("clip_coefficient", pa.float64(), nullable=False),  # min(1, max_norm / (grad_norm + 1e-6))
        pa.field("grad_norm", pa.float64(), nullable=False),  # of all parameters, before clipping
        pa.field("loss", pa.float64(), nullable=False),
        pa.field("sum_check_error", pa.float64(), nullable=False),  # max |sum of shifts - attributable| / max |attributable|
        pa.field("sum_check_abs_error", pa.float64(), nullable=False),
        pa.field("update_norm", pa.float64(), nullable=False),  # L2 over tracked weights: applied update
        pa.field("attributable_norm", pa.float64(), nullable=False),  # ...its part shared out among the data
        pa.field("carried_norm", pa.float64(), nullable=False),  # ...momentum from earlier steps (Adam)
        pa.field("decay_norm", pa.float64(), nullable=False),  # ...weight decay
        pa.field("topk_mass", pa.float64(), nullable=False),  # mean over data of sum(top-k^2) / sum(all^2)
    ])


def parameter_shift_schema() -> pa.Schema:
    """parameter_shifts: one row per (step, datum, rank); (row, column) index the stored weight."""
    return pa.schema([
        pa.field("step", pa.int32(), nullable=False),
        pa.field("datum_id", pa.int64(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),  # 0 = the datum's largest |shift| at this step
        pa.field("tensor", pa.string(), nullable=False),  # state-dict key, e.g. blocks.0.mlp.in.weight
        pa.field("row", pa.int32(), nullable=False),
        pa.field("column", pa.int32(), nullable=False),
        pa.field("value", pa.float32(), nullable=False),
    ])


def _unit_fields() -> list[pa.Field]:
    return [
        pa.field("unit_kind", pa.string(), nullable=False),  # mlp_neuron | attention_head | ..._token
        pa.field("layer", pa.int32()),  # null for embed / unembed
        pa.field("unit", pa.int32(), nullable=False),  # neuron, head or token index
    ]


def parameter_count_schema() -> pa.Schema:
    """attribution_tables: how often each parameter lands in a datum's top-k."""
    return pa.schema([
        pa.field("tensor", pa.string(), nullable=False), pa.field("row", pa.int32(), nullable=False),
        pa.field("column", pa.int32(), nullable=False), *_unit_fields(),
        pa.field("count", pa.int64(), nullable=False), pa.field("abs_shift_sum", pa.float64(), nullable=False),
    ])


def unit_attribution_schema() -> pa.Schema:
    """attribution_tables: per unit, the top-k entries and (step, datum) pairs attributed to it."""
    return pa.schema([
        *_unit_fields(), pa.field("parameters", pa.int64(), nullable=False),
        pa.field("entries", pa.int64(), nullable=False), pa.field("data", pa.int64(), nullable=False),
        pa.field("distinct_data", pa.int64(), nullable=False), pa.field("abs_shift_sum", pa.float64(), nullable=False),
    ])


def notable_token_schema() -> pa.Schema:
    """attribution_tables: the univariate heuristic of
    "Gradient capture / training-data attribution from outlier parameter shifts", per unit."""
    return pa.schema([
        *_unit_fields(), pa.field("rank", pa.int32(), nullable=False),
        pa.field("token_id", pa.int32(), nullable=False), pa.field("token", pa.string(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),  # occurrences in the unit's attributed data
        pa.field("freq_attributed", pa.float64(), nullable=False), pa.field("freq_train", pa.float64(), nullable=False),
        pa.field("relative_freq", pa.float64(), nullable=False),
    ])


def ablation_flip_schema() -> pa.Schema:
    """attribution_tables: prediction flips per token when one unit is zero-weight ablated."""
    return pa.schema([
        pa.field("arm", pa.string(), nullable=False),  # 'attributed' or 'control' (a random unit)
        *_unit_fields(),  # the unit ablated
        pa.field("for_unit", pa.int32(), nullable=False),  # the attributed unit whose windows were used
        pa.field("token_id", pa.int32(), nullable=False), pa.field("token", pa.string(), nullable=False),
        pa.field("instances", pa.int64(), nullable=False),  # positions predicting the token clean or ablated
        pa.field("flips", pa.int64(), nullable=False),  # ...of which the prediction changed
        pa.field("proportion_flipped", pa.float64(), nullable=False),
        pa.field("notable", pa.bool_(), nullable=False),  # a notable token of for_unit
    ])


def ablation_summary_schema() -> pa.Schema:
    """attribution_tables: one row per ablated unit against its random control unit."""
    return pa.schema([
        *_unit_fields(), pa.field("control_unit", pa.int32(), nullable=False),
        pa.field("windows", pa.int64(), nullable=False), pa.field("positions", pa.int64(), nullable=False),
        pa.field("flip_rate", pa.float64(), nullable=False), pa.field("control_flip_rate", pa.float64(), nullable=False),
        pa.field("notable_tokens", pa.int64(), nullable=False),
        pa.field("notable_flip_proportion", pa.float64()),  # null when no notable token was predicted
        pa.field("control_notable_flip_proportion", pa.float64()),
        # Rank (1 = most selective) of the unit among its layer's units by activation on its
        # notable tokens (activation_baseline.py); null for heads or unseen tokens.
        pa.field("activation_rank", pa.int32()), pa.field("layer_units", pa.int32(), nullable=False),
    ])


def probing_schema() -> pa.Schema:
    """sae_probing: one row per (task, probe); `core.sae.probing.ProbingResult.rows`."""
    return pa.schema([
        pa.field("label", pa.string(), nullable=False),  # the task: this label against the rest
        pa.field("probe", pa.string(), nullable=False),  # 'raw' (the activations) or 'sae' (k latents)
        pa.field("k", pa.int32(), nullable=False),  # latents of an 'sae' probe; 0 for 'raw'
        pa.field("accuracy", pa.float64(), nullable=False),  # on the task's test documents
        pa.field("train_documents", pa.int32(), nullable=False),
        pa.field("test_documents", pa.int32(), nullable=False),
        pa.field("latents", pa.list_(pa.int32()), nullable=False),  # the k chosen, largest mean difference first
    ])
