"""Corpus sources, sharding, BPE training and sequence packing (pure core functions)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sae_assets.core import schemas
from sae_assets.core.corpus import documents as corpus
from sae_assets.core.corpus import tokenization
from sae_assets.core.config import CorpusConfig


def test_stdlib_docstrings_are_real_prose_in_stable_order():
    docs = corpus.load_documents(CorpusConfig(source="embedded"))
    assert len(docs) > 2000
    assert sum(len(d.text) for d in docs) > 1_000_000
    assert len({d.doc_id for d in docs}) == len(docs), "doc ids must be unique"
    again = list(corpus.stdlib_docstrings())
    assert [d.doc_id for d in again if len(d.text.strip()) >= 40][:50] == [d.doc_id for d in docs[:50]]
    assert any("Return" in d.text for d in docs[:200])


def test_local_sources_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("The first document is a plain text file with enough characters.")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "A JSON line document long enough to be kept by the filter."}) + "\n\n"
        + json.dumps({"text": "short"}) + "\n"
    )
    pq.write_table(pa.table({"body": ["A Parquet row that is also long enough to be kept by the filter."]}),
                   tmp_path / "c.parquet")
    cfg = CorpusConfig(source="local", paths=(str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl")), num_shards=1)
    docs = corpus.load_documents(cfg)
    assert [d.doc_id.split("/")[-1] for d in docs] == ["a.txt", "b.jsonl:1"]
    parquet_docs = list(corpus.local_documents([str(tmp_path / "c.parquet")], "body"))
    assert parquet_docs[0].text.startswith("A Parquet row")
    with pytest.raises(corpus.CorpusError, match="c.parquet has no column 'text'"):
        list(corpus.local_documents([str(tmp_path / "c.parquet")], "text"))


def test_bad_local_input_names_the_file(tmp_path):
    with pytest.raises(corpus.CorpusError, match="matches no file"):
        corpus.load_documents(CorpusConfig(source="local", paths=(str(tmp_path / "nope*.txt"),)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine fine fine fine fine fine fine fine fine"}\n{not json\n')
    with pytest.raises(corpus.CorpusError, match=r"bad.jsonl line 2 is not JSON"):
        corpus.load_documents(CorpusConfig(source="local", paths=(str(bad),)))


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "tiny.txt").write_text("too short")
    with pytest.raises(corpus.CorpusError, match=r"the corpus is empty: corpus.paths .*corpus.min_document_chars"):
        corpus.load_documents(CorpusConfig(source="local", paths=(str(tmp_path / "tiny.txt"),)))


def test_huggingface_source_from_local_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [f"Document number {i} of a small local dataset saved to disk." for i in range(5)]
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "saved"))
    cfg = CorpusConfig(source="huggingface", hf_name=str(tmp_path / "saved"), num_shards=1)
    assert [d.text for d in corpus.load_documents(cfg)] == rows
    # A local directory of data files goes through load_dataset, the path hub names take.
    (tmp_path / "repo").mkdir()
    pq.write_table(pa.table({"text": rows}), tmp_path / "repo" / "train.parquet")
    cfg = CorpusConfig(source="huggingface", hf_name=str(tmp_path / "repo"), num_shards=1)
    assert [d.text for d in corpus.load_documents(cfg)] == rows
    with pytest.raises(corpus.CorpusError, match="no column 'body'"):
        list(corpus.huggingface_documents(str(tmp_path / "saved"), "", "train", "body"))


def test_shard_bounds_cover_everything_in_order():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 1000, size=500)
    bounds = corpus.shard_bounds(lengths, 7)
    assert bounds[0] == 0 and bounds[-1] == 500 and np.all(np.diff(bounds) > 0)
    sizes = np.add.reduceat(lengths, bounds[:-1])
    assert sizes.max() < 1.3 * sizes.mean()
    # One huge document still leaves every shard non-empty.
    bounds = corpus.shard_bounds(np.array([10**6, 1, 1, 1]), 4)
    assert list(np.diff(bounds)) == [1, 1, 1, 1]
    with pytest.raises(corpus.CorpusError, match="fewer than corpus.num_shards=5"):
        corpus.shard_bounds(np.array([5, 5]), 5)


def test_bpe_is_deterministic_and_round_trips():
    texts = [d.text for d in corpus.load_documents(CorpusConfig(max_documents=300))]
    first = tokenization.train_bpe(texts, 400)
    second = tokenization.train_bpe(texts, 400)
    assert first.to_str() == second.to_str()
    assert first.get_vocab_size() == 400
    assert tokenization.end_of_text_id(first) == 0
    ids = first.encode(texts[3]).ids
    assert first.decode(ids) == texts[3]


def test_pack_sequences_joins_with_eos_and_drops_tail():
    packed = tokenization.pack_sequences([[5, 6, 7], [8], [9, 10, 11, 12]], eos_id=0, context_length=4)
    assert packed.tolist() == [[5, 6, 7, 0], [8, 0, 9, 10]]
    table = tokenization.sequences_table(packed, shard=3)
    tokens, first = tokenization.sequences_from_table(table)
    assert np.array_equal(tokens, packed)
    assert list(schemas.shard_of_token(first)) == [3, 3]
    assert list(first - (3 << schemas.SHARD_BITS)) == [0, 4]
