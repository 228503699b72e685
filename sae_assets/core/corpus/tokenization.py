"""Tokenizers and fixed-length token sequences.

`train_bpe` fits a byte-level BPE (Hugging Face `tokenizers`) on corpus text for the
embedded model; `pretrained_tokenizer_json` takes a named model's own tokenizer. Both end as
a `tokenizer.json` string, the one form later assets load. `pack_sequences` joins documents
with an end-of-text separator and cuts the stream into (S, T) sequences. Tests:
tests/test_corpus.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
from sae_assets.core import schemas
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

END_OF_TEXT = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE whose id 0 is the end-of-text token. Deterministic for a fixed input."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def pretrained_tokenizer_json(name_or_path: str) -> tuple[str, int]:
    """(tokenizer.json text, end-of-text id) of a named model's fast tokenizer."""
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if not getattr(hf_tokenizer, "is_fast", False):
        raise ValueError(f"model {name_or_path!r} has no fast tokenizer (tokenizer.json); cannot use it")
    eos = hf_tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"model {name_or_path!r} tokenizer has no end-of-text token")
    return hf_tokenizer.backend_tokenizer.to_str(), int(eos)


def end_of_text_id(tokenizer: Tokenizer) -> int:
    token_id = tokenizer.token_to_id(END_OF_TEXT)
    if token_id is None:
        raise ValueError(f"tokenizer has no {END_OF_TEXT} token")
    return token_id


def encode_documents(tokenizer: Tokenizer, texts: list[str], batch_size: int = 512) -> Iterator[list[int]]:
    """Token ids per document, encoded in batches (tokenizers parallelises a batch)."""
    for start in range(0, len(texts), batch_size):
        for encoding in tokenizer.encode_batch(texts[start : start + batch_size], add_special_tokens=False):
            yield encoding.ids


def pack_sequences(docs_token_ids: Iterable[list[int]], eos_id: int, context_length: int) -> np.ndarray:
    """(S, T) int32: documents joined as `doc eos doc eos ...`, cut into rows of T tokens.

    The tail shorter than T is dropped, so every row is a full window the model can train on.
    """
    pieces: list[np.ndarray] = []
    for ids in docs_token_ids:
        pieces.append(np.asarray(ids, dtype=np.int32))
        pieces.append(np.asarray([eos_id], dtype=np.int32))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)  # (L,)
    num_sequences = len(stream) // context_length
    return stream[: num_sequences * context_length].reshape(num_sequences, context_length)


def token_counts(sequences: np.ndarray, vocab_size: int) -> np.ndarray:
    """(V,) int64 occurrences of each token id in an (S, T) array."""
    return np.bincount(sequences.ravel(), minlength=vocab_size).astype(np.int64)


def sequences_table(sequences: np.ndarray, shard: int) -> pa.Table:
    """(S, T) int32 sequences of shard `shard` as a token_shards table with global indices."""
    num_sequences, context_length = sequences.shape
    first = schemas.global_token_index(shard, np.arange(num_sequences, dtype=np.int64) * context_length)
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(sequences.ravel(), pa.int32()), context_length)
    return pa.Table.from_arrays([pa.array(first, pa.int64()), tokens],
                                schema=schemas.token_sequence_schema(context_length))


def sequences_from_table(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """((S, T) int32 tokens, (S,) int64 first_token_index) of a token_shards table."""
    column = table.column("tokens").combine_chunks()
    context_length = column.type.list_size
    tokens = column.values.to_numpy(zero_copy_only=False).reshape(-1, context_length)
    return tokens, table.column("first_token_index").to_numpy()
