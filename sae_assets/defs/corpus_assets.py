"""Corpus group: corpus_shards [shard], tokenizer, token_shards [shard].

Each asset reads its inputs through the storage resource, calls sae_assets.core, writes
manifest-last and returns the manifest's hash as its data version.
"""


import time

import dagster as dg

from resources import ArtifactStorage, RunSettings
from sae_assets.defs.common import read_upstream, result
from sae_assets.defs.identity import AssetIdentity
from sae_assets.defs.partitions import SHARDS, shard_index, training_shard_keys


CORPUS_SHARDS = AssetIdentity("corpus_shards", version="1", keys=tuple(
    f"corpus.{key}" for key in ("source", "paths", "hf_name", "hf_config", "hf_split", "text_field", "num_shards",
                                "documents_per_shard", "max_documents", "min_document_chars")))


@CORPUS_SHARDS.asset(
    group_name="corpus",
    partitions_def=SHARDS,
    description="Documents of the configured corpus, cut into contiguous shards of similar size.",
)
def corpus_shards(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sae_assets.core import schemas
    from sae_assets.core.corpus import documents as corpus

    cfg = settings.load()
    index = shard_index(context.partition_key)
    docs = corpus.load_documents(cfg.corpus)
    bounds = corpus.corpus_shard_bounds(cfg.corpus, np.array([len(d.text) for d in docs]))
    if index >= len(bounds) - 1:
        raise ValueError(f"partition {context.partition_key} is beyond the corpus's {len(bounds) - 1} shards "
                         f"(corpus.num_shards / corpus.documents_per_shard)")
    mine = docs[bounds[index] : bounds[index + 1]]
    table = pa.Table.from_pylist([d._asdict() for d in mine], schema=schemas.corpus_schema())
    store = storage.store()
    with CORPUS_SHARDS.writer(store, cfg, context.partition_key) as out:
        pq.write_table(table, out.path("documents.parquet"))
        out.describe_table("documents.parquet", rows=table.num_rows, schema=str(table.schema))
    characters = sum(len(d.text) for d in mine)
    return result(out.manifest, store, {"documents": len(mine), "characters": characters,
                                        "corpus_documents_total": len(docs)})


def _read_documents(store, manifest) -> list[str]:
    import polars as pl

    return pl.read_parquet(store.fetch(manifest, "documents.parquet"))["text"].to_list()


TOKENIZER = AssetIdentity("tokenizer", version="1", keys=(
    "tokenizer.kind", "tokenizer.vocab_size", "corpus.training_shards", "model.name"))


@TOKENIZER.asset(
    group_name="corpus",
    deps=[corpus_shards],
    description="Byte-level BPE trained on every corpus shard (embedded model), or the named model's own.",
)
def tokenizer(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
    from tokenizers import Tokenizer

    from sae_assets.core.corpus import tokenization

    cfg = settings.load()
    store = storage.store()
    started = time.perf_counter()
    if cfg.tokenizer.kind == "bpe":
        manifests, upstream = read_upstream(store, "corpus_shards", training_shard_keys(context.instance, cfg))
        texts = [text for m in manifests for text in _read_documents(store, m)]
        trained = tokenization.train_bpe(texts, cfg.tokenizer.vocab_size)
        tokenizer_json, eos_id = trained.to_str(), tokenization.end_of_text_id(trained)
    else:
        upstream = {}
        tokenizer_json, eos_id = tokenization.pretrained_tokenizer_json(cfg.model.name)
    vocab_size = Tokenizer.from_str(tokenizer_json).get_vocab_size()
    with TOKENIZER.writer(store, cfg, None, upstream=upstream) as out:
        out.path("tokenizer.json").write_text(tokenizer_json)
        out.extra.update(vocab_size=vocab_size, eos_id=eos_id)
    # Content version: a corpus edit that leaves the trained vocabulary byte-identical must not
    # make every token shard and the model stale.
    return result(out.manifest, store, content_version=True, metadata={"vocab_size": vocab_size, "eos_id": eos_id,
                                        "seconds": round(time.perf_counter() - started, 2)})


def load_tokenizer(store) -> "tuple[Tokenizer, dict]":
    """The tokenizer asset's Tokenizer and its manifest facts (vocab_size, eos_id)."""
    from tokenizers import Tokenizer

    manifest = store.require("tokenizer", None)
    return Tokenizer.from_str(store.read_bytes(manifest, "tokenizer.json").decode()), manifest


def special_token_ids(store, cfg) -> "tuple[tuple[int, ...], resources.manifest.Manifest]":
    """special_tokens.token_ids resolved against the tokenizer asset ('auto': its end-of-text id and
    the tokens it flags special), and the tokenizer's manifest."""
    from sae_assets.core.corpus.special_tokens import resolve_special_token_ids

    tok, manifest = load_tokenizer(store)
    return resolve_special_token_ids(cfg.special_tokens.token_ids, tok, eos_id=manifest.extra["eos_id"]), manifest


def excluded_token_ids(store, cfg) -> tuple[tuple[int, ...], dict[str, str]]:
    """The token ids kept out of SAE training, sae_metrics and the feature statistics (none when
    special_tokens.exclude is off), and the upstream version they come from ({} when none)."""
    if not cfg.special_tokens.exclude:
        return (), {}
    ids, manifest = special_token_ids(store, cfg)
    return ids, {"tokenizer": manifest.data_version}


TOKEN_SHARDS = AssetIdentity("token_shards", version="1", keys=("tokenizer.context_length",))


@TOKEN_SHARDS.asset(
    group_name="corpus",
    partitions_def=SHARDS,
    deps=[corpus_shards, tokenizer],
    description="Fixed-length token sequences with stable 64-bit global token indices (Arrow IPC).",
)
def token_shards(context: dg.AssetExecutionContext, settings: RunSettings, storage: ArtifactStorage):
    from resources.arrow_files import write_ipc_file
    from sae_assets.core.corpus import tokenization

    cfg = settings.load()
    store = storage.store()
    [doc_manifest], upstream = read_upstream(store, "corpus_shards", [context.partition_key])
    tok, tok_manifest = load_tokenizer(store)
    upstream["tokenizer"] = tok_manifest.data_version
    texts = _read_documents(store, doc_manifest)
    started = time.perf_counter()
    sequences = tokenization.pack_sequences(
        tokenization.encode_documents(tok, texts), tok_manifest.extra["eos_id"], cfg.tokenizer.context_length
    )  # (S, T) int32
    if len(sequences) == 0:
        raise ValueError(f"token_shards[{context.partition_key}]: the shard has fewer than "
                         f"tokenizer.context_length={cfg.tokenizer.context_length} tokens")
    table = tokenization.sequences_table(sequences, shard_index(context.partition_key))
    with TOKEN_SHARDS.writer(store, cfg, context.partition_key, upstream=upstream) as out:
        write_ipc_file(out.path("sequences.arrow"), table.schema, table.to_batches(max_chunksize=4096))
        out.describe_table("sequences.arrow", rows=table.num_rows, schema=str(table.schema))
        out.extra.update(context_length=cfg.tokenizer.context_length, shard_index=shard_index(context.partition_key))
    seconds = time.perf_counter() - started
    return result(out.manifest, store, {"sequences": len(sequences), "tokens": int(sequences.size),
                                        "tokens_per_second": round(sequences.size / max(seconds, 1e-9))})

