"""Corpus stage: documents from a source cut into shards (`documents`), and tokenizers and
fixed-length token sequences with stable global token indices (`tokenization`)."""
