"""Text corpora: the embedded default, local files and Hugging Face datasets, cut into shards.

The embedded default is the docstrings of Python's own standard library, read with `ast`
(no module is imported, so nothing runs), in sorted file order: a few MB of real English
prose about programming that exists on every machine with Python. Local sources read
.txt (one document per file), .jsonl and .parquet (one per row); a Hugging Face source is
a `datasets` name or a local dataset directory. `shard_bounds` cuts the ordered documents
into contiguous shards of similar character counts. Tests: tests/test_corpus.py.
"""

from __future__ import annotations

import ast
import functools
import glob
import json
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq

from sae_assets.core.config import CorpusConfig

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}


class Document(NamedTuple):
    doc_id: str
    """Stable across runs: source file (and row or qualified name) of the text."""
    text: str


class CorpusError(ValueError):
    """The corpus source is missing, unreadable or empty; the message names the file or key."""


def stdlib_docstrings(stdlib_dir: Path | None = None) -> Iterator[Document]:
    """Module, class and function docstrings of the standard library, in a stable order."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old modules
                tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(rel))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are templates or deliberately broken
        yield from _docstrings_of(tree, str(rel))


@functools.lru_cache(maxsize=1)
def _stdlib_docstrings_cached() -> tuple[Document, ...]:
    # Parsing the stdlib takes seconds and every shard partition needs the whole ordered list.
    return tuple(stdlib_docstrings())


def _docstrings_of(tree: ast.Module, rel: str) -> Iterator[Document]:
    module_doc = ast.get_docstring(tree)
    if module_doc:
        yield Document(f"{rel}:<module>", module_doc)
    # A stack of (node, qualified-name prefix) walks nested classes and functions in order.
    stack: list[tuple[ast.AST, str]] = [(node, "") for node in reversed(tree.body)]
    while stack:
        node, prefix = stack.pop()
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{node.name}"
            doc = ast.get_docstring(node)
            if doc:
                yield Document(f"{rel}:{name}", doc)
            stack.extend((child, f"{name}.") for child in reversed(node.body))


def local_documents(patterns: Iterable[str], text_field: str) -> Iterator[Document]:
    """Documents from .txt/.md/.rst files, .jsonl rows and .parquet rows (globs and dirs expand)."""
    for path in _expand(patterns):
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        elif suffix == ".parquet":
            yield from _parquet_documents(path, text_field)
        else:
            try:
                yield Document(str(path), path.read_text(encoding="utf-8"))
            except UnicodeDecodeError as exc:
                raise CorpusError(f"corpus file {path} is not UTF-8 text: {exc}") from exc


def _expand(patterns: Iterable[str]) -> list[Path]:
    found: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise CorpusError(f"corpus.paths entry {pattern!r} matches no file")
        for match in map(Path, matches):
            if match.is_dir():
                found.extend(sorted(p for p in match.rglob("*") if p.is_file() and not p.name.startswith(".")))
            else:
                found.append(match)
    return found


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"corpus file {path} line {line_no} is not JSON: {exc}") from exc
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise CorpusError(f"corpus file {path} line {line_no} has no string field '{text_field}' "
                                  f"(config key corpus.text_field)")
            yield Document(f"{path}:{line_no}", row[text_field])


def _parquet_documents(path: Path, text_field: str) -> Iterator[Document]:
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise CorpusError(f"corpus file {path} is not readable Parquet: {exc}") from exc
    if text_field not in parquet.schema_arrow.names:
        raise CorpusError(f"corpus file {path} has no column '{text_field}' (config key corpus.text_field); "
                          f"columns: {parquet.schema_arrow.names}")
    row = 0
    for batch in parquet.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield Document(f"{path}:{row}", text)
            row += 1


def huggingface_documents(name: str, config_name: str, split: str, text_field: str) -> Iterator[Document]:
    """Rows of a `datasets` dataset: a hub name, a local dataset repo, or a save_to_disk dir."""
    import datasets  # optional dependency: only this source needs it

    local = Path(name)
    try:
        if (local / "dataset_info.json").exists() or (local / "state.json").exists():
            dataset = datasets.load_from_disk(str(local))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(name, config_name or None, split=split)
    except Exception as exc:
        raise CorpusError(f"corpus.hf_name {name!r} (split {split!r}) could not be loaded: {exc}") from exc
    if text_field not in dataset.column_names:
        raise CorpusError(f"dataset {name!r} has no column '{text_field}' (config key corpus.text_field); "
                          f"columns: {dataset.column_names}")
    for row, text in enumerate(dataset[text_field]):
        if text is not None:
            yield Document(f"{name}:{split}:{row}", text)


def load_documents(cfg: CorpusConfig) -> list[Document]:
    """Every document of the configured source, filtered and in a stable order."""
    if cfg.source == "embedded":
        source: Iterable[Document] = _stdlib_docstrings_cached()
    elif cfg.source == "local":
        source = local_documents(cfg.paths, cfg.text_field)
    else:
        source = huggingface_documents(cfg.hf_name, cfg.hf_config, cfg.hf_split, cfg.text_field)
    docs = [d for d in source if len(d.text.strip()) >= cfg.min_document_chars]
    if cfg.max_documents:
        docs = docs[: cfg.max_documents]
    if not docs:
        where = {"embedded": "the embedded stdlib docstrings", "local": f"corpus.paths {list(cfg.paths)}",
                 "huggingface": f"corpus.hf_name {cfg.hf_name!r}"}[cfg.source]
        raise CorpusError(f"the corpus is empty: {where} gave no document of at least "
                          f"{cfg.min_document_chars} characters (config key corpus.min_document_chars)")
    return docs


def shard_count(cfg: CorpusConfig) -> int:
    """How many shards the corpus has now: num_shards, or (documents_per_shard) from listing it."""
    if not cfg.documents_per_shard:
        return cfg.num_shards
    return len(fixed_shard_bounds(len(load_documents(cfg)), cfg.documents_per_shard)) - 1


def fixed_shard_bounds(num_documents: int, documents_per_shard: int) -> np.ndarray:
    """(S + 1,) offsets of shards of `documents_per_shard` documents (the last may be short):
    appending documents never moves a boundary, it only fills the last shard and adds new ones."""
    if num_documents < 1:
        raise CorpusError("the corpus has no documents to shard")
    return np.minimum(np.arange(0, num_documents + documents_per_shard, documents_per_shard), num_documents)[
        : -(-num_documents // documents_per_shard) + 1]


def corpus_shard_bounds(cfg: CorpusConfig, doc_lengths: np.ndarray) -> np.ndarray:
    """The shard offsets the config asks for: fixed-size shards, or num_shards balanced ones."""
    if cfg.documents_per_shard:
        return fixed_shard_bounds(len(doc_lengths), cfg.documents_per_shard)
    return shard_bounds(doc_lengths, cfg.num_shards)


def shard_bounds(doc_lengths: np.ndarray, num_shards: int) -> np.ndarray:
    """(num_shards + 1,) document offsets cutting the ordered documents into contiguous shards
    of about equal character count. Raises when a shard would be empty."""
    if len(doc_lengths) < num_shards:
        raise CorpusError(f"the corpus has {len(doc_lengths)} documents, fewer than corpus.num_shards="
                          f"{num_shards}; lower corpus.num_shards")
    cumulative = np.concatenate([[0], np.cumsum(doc_lengths, dtype=np.int64)])  # (D+1,)
    targets = cumulative[-1] * np.arange(num_shards + 1) / num_shards
    bounds = np.searchsorted(cumulative, targets, side="left")
    bounds[0], bounds[-1] = 0, len(doc_lengths)
    # Every shard gets at least one document, even if one document dominates the characters.
    for i in range(1, num_shards):
        bounds[i] = min(max(bounds[i], bounds[i - 1] + 1), len(doc_lengths) - (num_shards - i))
    return bounds
