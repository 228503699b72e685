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
