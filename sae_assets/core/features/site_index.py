"""The feature browser's chunked index: feature list pages, sorted orders and token search.

A `SiteIndex` takes index rows `[feature, density, max, [top tokens]]` one at a time, in
feature order, and hands back `(file name, script text)` pairs for the caller to write, so
nothing here opens a file and no file grows with the number of features:

- `index-<n>.js`: rows n*C .. n*C+C-1 in feature order (C = `chunk_rows`, 1024);
- `by-density-<n>.js`, `by-max-<n>.js`: the same rows sorted (high first, then feature id), so
  a sorted page is one file, whatever the number of features;
- `tokens-<n>.js`: posting rows, C per file — for each search key (a top token, trimmed and
  lower-cased) the rows of the features whose top tokens include it, keys in sorted order;
- `search-<b>.js`: [[key, first posting row, count], ...] for the keys whose FNV-1a hash (over
  UTF-16 code units, as JavaScript sees a string) falls in bucket b, ~512 keys a bucket;
- `site-meta.js`: dictionary, n_tokens, histogram edges and the counts the list pages by.

A token search therefore loads one search bucket and one or two posting chunks, a list page
one chunk. Rows are kept compactly (numbers in arrays, top tokens as interned ids, postings as
int arrays), about 70 bytes a feature, so a million features fit in memory while the sorted
orders and postings are written at `finish`. Data are JSONP-style scripts because browsers
refuse fetch() on file://. Tests: tests/test_site_scale.py, tests/test_feature_browser.py.
"""

from __future__ import annotations

import json
import math
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

CHUNK_ROWS = 1024
KEYS_PER_BUCKET = 512
ORDERS = ("density", "max")
_WHITESPACE = " \t\n\r\f\v"  # the same set app.js trims: str.strip() and String.trim() differ on others
_SCRIPT_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                                 "\u2028": "\\u2028", "\u2029": "\\u2029"})


class SiteRange(NamedTuple):
    """One feature range's input to the site, as site_json stores it."""

    rows: list
    """Index rows [feature, density, max, [top tokens]] in feature order (`site_data.index_row`)."""
    documents: Iterable[tuple[int, str]]
    """(feature, the feature's JSON document as text), read lazily."""
    n_tokens: int
    hist_edges: list[float]
    lineage: dict | None = None
    """What the range's feature pages show of their provenance (`changes.lineage_of`), if known."""


def escape_script_text(json_text: str) -> str:
    """JSON text made safe inside a script: `<`, `>`, `&`, U+2028/9 occur in JSON only inside
    strings, where their \\u escapes mean the same, so no corpus text can close a tag."""
    return json_text.translate(_SCRIPT_ESCAPES)


def script_json(value) -> str:
    """Compact JSON text safe to embed in a JavaScript file or <script> element."""
    return escape_script_text(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def search_key(token: str) -> str:
    """What the search box matches a token by: trimmed of ASCII whitespace, lower-cased."""
    return token.strip(_WHITESPACE).lower()


def bucket_of(key: str, buckets: int) -> int:
    """FNV-1a (32 bit) of the key's UTF-16 code units, modulo `buckets`; app.js computes the same."""
    h = 0x811C9DC5
    data = key.encode("utf-16-le")
    for i in range(0, len(data), 2):
        h = ((h ^ (data[i] | data[i + 1] << 8)) * 0x01000193) & 0xFFFFFFFF
    return h % buckets


def chunk_script(name: str, value) -> tuple[str, str]:
    """`(name.js, text)` of a data chunk: the script hands its value to the page's loader."""
    return f"{name}.js", f"SAE_SITE.chunk({json.dumps(name)},{script_json(value)});\n"


class SiteIndex:
    """Accumulates index rows in feature order; `add` and `finish` yield the files to write."""

    def __init__(self, chunk_rows: int = CHUNK_ROWS, keys_per_bucket: int = KEYS_PER_BUCKET):
        self.chunk_rows, self.keys_per_bucket = chunk_rows, keys_per_bucket
        self._ids, self._density, self._max = array("q"), array("d"), array("d")
        self._tok_start, self._tok_ids = array("q", [0]), array("i")
        self._strings: list[str] = []
        self._interned: dict[str, int] = {}
        self._postings: dict[str, array] = {}
        self._pending: list[list] = []

    def densities(self) -> np.ndarray:
        """(F,) float64: the density of every feature added so far, in the order added."""
        return np.frombuffer(self._density, dtype=np.float64).copy() if self._ids else np.zeros(0)

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, row: Sequence) -> Iterator[tuple[str, str]]:
        """Take one row; yield the feature-order chunk it completes, if any."""
        feature, density, peak, tokens = row
        if self._ids and feature <= self._ids[-1]:
            raise ValueError(f"index rows must come in increasing feature order: {feature} after {self._ids[-1]}")
        position = len(self._ids)
        self._ids.append(int(feature))
        self._density.append(float(density))
        self._max.append(float(peak))
        for token in tokens:
            self._tok_ids.append(self._interned.setdefault(token, len(self._interned)))
            if len(self._interned) > len(self._strings):
                self._strings.append(token)
        self._tok_start.append(len(self._tok_ids))
        for key in dict.fromkeys(search_key(t) for t in tokens):  # a feature once per key
            if key:
                self._postings.setdefault(key, array("i")).append(position)
        self._pending.append([int(feature), float(density), float(peak), list(tokens)])
        if len(self._pending) == self.chunk_rows:
            yield self._flush()

    def _flush(self) -> tuple[str, str]:
        n = (len(self._ids) - 1) // self.chunk_rows
        rows, self._pending = self._pending, []
        return chunk_script(f"index-{n}", rows)

    def _row(self, position: int) -> list:
        start, end = self._tok_start[position], self._tok_start[position + 1]
        return [self._ids[position], self._density[position], self._max[position],
                [self._strings[t] for t in self._tok_ids[start:end]]]

    def _chunks(self, prefix: str, positions) -> Iterator[tuple[str, str]]:
        for n, lo in enumerate(range(0, len(positions), self.chunk_rows)):
            yield chunk_script(f"{prefix}-{n}", [self._row(int(p)) for p in positions[lo:lo + self.chunk_rows]])

    def finish(self, *, dictionary: str, n_tokens: int, hist_edges: Sequence[float],
               prefix: str = "") -> Iterator[tuple[str, str]]:
        """Yield the last feature-order chunk, the sorted orders, the token search and site-meta.js.
        `prefix`: what the page prepends to every data file it loads (a further served dictionary's)."""
        if self._pending:
            yield self._flush()
        ids = np.frombuffer(self._ids, dtype=np.int64) if self._ids else np.zeros(0, np.int64)
        for order in ORDERS:
            values = np.frombuffer(self._density if order == "density" else self._max, dtype=np.float64) \
                if self._ids else np.zeros(0)
            yield from self._chunks(f"by-{order}", np.lexsort((ids, -values)))  # high first, ties by id
        buckets, token_rows = yield from self._search_files()
        live = int(np.count_nonzero(np.frombuffer(self._density, dtype=np.float64))) if self._ids else 0
        meta = {"dictionary": dictionary, "n_tokens": int(n_tokens), "hist_edges": list(hist_edges),
                "features": len(self._ids), "live": live, "chunk": self.chunk_rows,
                "chunks": math.ceil(len(self._ids) / self.chunk_rows), "orders": list(ORDERS),
                "search_buckets": buckets, "token_rows": token_rows, "search_keys": len(self._postings),
                "prefix": prefix}
        yield "site-meta.js", f"window.SAE_SITE_META = {script_json(meta)};\n"

    def _search_files(self):
        """Posting chunks and search buckets (a generator whose return value is (buckets, rows))."""
        keys = sorted(self._postings)
        where: dict[str, list[int]] = {}
        chunk: list[list] = []
        start = n = 0
        for key in keys:
            where[key] = [start, len(self._postings[key])]
            start += len(self._postings[key])
            for p in self._postings[key]:
                chunk.append(self._row(p))
                if len(chunk) == self.chunk_rows:
                    yield chunk_script(f"tokens-{n}", chunk)
                    chunk, n = [], n + 1
        if chunk:
            yield chunk_script(f"tokens-{n}", chunk)
        buckets = max(1, math.ceil(len(keys) / self.keys_per_bucket))
        # Entries are lists, not an object literal, where a key "__proto__" would set the prototype.
        grouped: list[list] = [[] for _ in range(buckets)]
        for key in keys:
            grouped[bucket_of(key, buckets)].append([key, *where[key]])
        for b, entries in enumerate(grouped):  # every bucket exists, so a miss is an empty list, not a 404
            yield chunk_script(f"search-{b}", entries)
        return buckets, start
