"""Document labels and the document each packed token came from, for probing evaluations.

A label is a fact about a document that its `doc_id` already records: the embedded corpus's
docstrings are labelled by the top-level module or package they come from
('json/decoder.py:JSONDecoder.decode' -> 'json', 'argparse.py:<module>' -> 'argparse'),
local files by the directory that holds them ('data/pos/review1.txt' -> 'pos'; rows of a
.jsonl or .parquet file by that file's directory). Hugging Face rows carry no label.

`token_documents` recovers, for every token of a shard's packed sequences, which of the
shard's documents it belongs to: token_shards joins the shard's documents as
`doc eos doc eos ...` and cuts the stream into rows of T tokens, so the document of a token is
the number of end-of-text tokens before it in its shard. Tests: tests/test_probing.py.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import numpy as np

from sae_assets.core import schemas
from sae_assets.core.config import CorpusSource

SEPARATOR = -1
"""The document ordinal `token_documents` gives end-of-text tokens, which belong to no document."""


def document_label(doc_id: str, source: CorpusSource) -> str | None:
    """The label of one document from its doc_id: module/package (embedded), directory (local), None (HF)."""
    if source == "embedded":  # '<path relative to the stdlib>:<qualified name>'
        top = doc_id.split(":", 1)[0].split("/", 1)[0]
        return top.removesuffix(".py") or None
    if source == "local":  # '<path>' of a text file, '<path>:<row>' of a .jsonl/.parquet row
        path, _, row = doc_id.rpartition(":")
        file = path if row.isdigit() and path else doc_id
        return PurePosixPath(file.replace("\\", "/")).parent.name or None
    return None


def token_documents(tokens_ST: np.ndarray, first_S: np.ndarray, eos_id: int) -> np.ndarray:
    """(S, T) int64: the ordinal, within its shard, of the document each token belongs to
    (SEPARATOR on end-of-text tokens).

    `tokens_ST`/`first_S` must hold every sequence of each shard they touch, from the shard's
    start (token_shards' rows of whole shards, in any order); raises ValueError otherwise, as
    the count of separators before a token would be wrong."""
    if tokens_ST.ndim != 2 or len(first_S) != len(tokens_ST):
        raise ValueError(f"token_documents: tokens must be (S, T) with S first indices, got {tokens_ST.shape} "
                         f"and {np.shape(first_S)}")
    T = tokens_ST.shape[1]
    first_S = np.asarray(first_S, dtype=np.int64)
    shard_S = schemas.shard_of_token(first_S)
    offset_S = first_S - (shard_S << schemas.SHARD_BITS)
    order = np.lexsort((offset_S, shard_S))  # shard by shard, in stream order
    document_ST = np.empty(tokens_ST.shape, dtype=np.int64)
    for shard in np.unique(shard_S):
        rows = order[shard_S[order] == shard]
        expected = np.arange(len(rows), dtype=np.int64) * T
        if not np.array_equal(offset_S[rows], expected):
            raise ValueError(f"token_documents: shard {int(shard)} is not whole: its sequences start at offsets "
                             f"{offset_S[rows][:5].tolist()}..., expected 0, {T}, {2 * T}, ...")
        stream_L = tokens_ST[rows].reshape(-1)  # (L,) the shard's packed token stream
        is_eos_L = stream_L == eos_id
        before_L = np.cumsum(is_eos_L) - is_eos_L  # separators strictly before each token
        document_ST[rows] = np.where(is_eos_L, SEPARATOR, before_L).reshape(len(rows), T)
    return document_ST
