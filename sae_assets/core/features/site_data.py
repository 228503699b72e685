"""The feature browser's data: one JSON document per feature, index rows and a Neuronpedia export.

`feature_documents` joins a range's merged samples (statistics, histogram, the share of each
activation interval: core/features/intervals.py), the examples the page shows
(`feature_windows.select_shown_examples`), their context windows, the decoder
direction's panels (logit effects and their histogram, nearest features, neuron alignment:
core/features/panels.py) and the features co-firing on the top examples
(core/features/cofiring.py) into plain dicts, ready for `json.dumps`. Token ids become strings
through `token_strings` (each id decoded alone; bytes of a split UTF-8 character show as
U+FFFD). Strings stay raw here: the browser inserts them as text, never as HTML. Positions of
special tokens (BOS/EOS/padding) in a window are listed so the browser can mark them.
`neuronpedia_feature` (core/features/neuronpedia.py) maps a document onto Neuronpedia's fields.
Tests: tests/test_feature_assets.py, tests/test_feature_browser.py, tests/test_site_panels.py.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from sae_assets.core.features.intervals import interval_shares
from sae_assets.core.features.merge import FeatureSamples
from sae_assets.core.features.neuronpedia import neuronpedia_feature  # noqa: F401  (the export's per-feature dict)
from sae_assets.core.features.panels import LogitEffects, logit_effects  # noqa: F401

# Letter key: W features in the range, D model width, V vocabulary, N logit effects kept.

Neighbours = tuple[np.ndarray, np.ndarray]  # panels.nearest_features: ids (W, K), cosines (W, K)
Alignment = tuple[np.ndarray, np.ndarray, np.ndarray]  # panels.neuron_alignment: dims, weights, L1 shares


def _byte_level_alphabet() -> dict[str, int]:
    """{character: byte} of the byte-level BPE alphabet (GPT-2's): printable bytes stand for
    themselves, the other 68 are shifted to code points 256 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


def token_strings(tokenizer) -> list[str]:
    """Display string of every token id of a HF `tokenizers.Tokenizer`.

    A byte-level token holding part of a UTF-8 character decodes to U+FFFD; it is shown as
    its bytes instead (e.g. '\\xe2\\x80'), so different partial tokens stay distinguishable.
    """
    alphabet = _byte_level_alphabet()
    strings = []
    for i in range(tokenizer.get_vocab_size()):
        text = tokenizer.decode([i], skip_special_tokens=False)
        piece = tokenizer.id_to_token(i) or ""
        if "\ufffd" in text and piece and all(ch in alphabet for ch in piece):
            text = bytes(alphabet[ch] for ch in piece).decode("utf-8", errors="backslashreplace")
        strings.append(text)
    return strings


def _num(x: float, digits: int = 4) -> float:
    """A float rounded to `digits` significant digits (JSON size), NaN/inf refused."""
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"non-finite value {x} in the feature browser's data")
    return float(f"{x:.{digits}g}")


def _windows_by_key(windows: pa.Table) -> dict[tuple[int, int], tuple[int, list[int], list[float]]]:
    out = {}
    feature, tok = windows.column("feature").to_pylist(), windows.column("token_index").to_pylist()
    first = windows.column("first_token_index").to_pylist()
    ids, acts = windows.column("token_ids").to_pylist(), windows.column("activations").to_pylist()
    for f, t, s, i, a in zip(feature, tok, first, ids, acts):
        out[(f, t)] = (t - s, i, a)
    return out


def _example(key, activation, windows, strings, special_ids: frozenset[int]) -> dict[str, Any]:
    """An example with its window; `special` lists the window positions holding a special token
    (only when there are any), which the browser marks."""
    center, ids, acts = windows[key]
    example = {"token_index": int(key[1]), "activation": _num(activation), "center": center,
               "tokens": [strings[i] for i in ids], "acts": [_num(a, 3) for a in acts]}
    special = [position for position, i in enumerate(ids) if i in special_ids]
    return {**example, "special": special} if special else example


def feature_documents(samples: FeatureSamples, shown: pa.Table, windows: pa.Table, strings: Sequence[str], *,
                      logits: LogitEffects, activation_levels: int, dictionary: str,
                      neighbours: Neighbours | None = None,
                      alignment: Alignment | None = None,
                      cofiring: Sequence[Sequence[tuple[int, float]]] | None = None,
                      special_ids: Collection[int] = ()) -> Iterator[dict[str, Any]]:
    """One JSON-ready document per feature of the range, in feature order.

    `levels` lists the `activation_levels` intervals of (0, max], highest first, each with its
    bounds, its `share` of the feature's non-zero activations, whether that share is `exact`
    (else estimated from the activation histogram: core/features/intervals.py) and its examples.

    `neighbours`, `alignment` and `cofiring` are the range's rows of `panels.nearest_features`,
    `panels.neuron_alignment` and `cofiring.cofiring_features`; without them the lists are empty.
    Window positions holding one of `special_ids` (special tokens) are listed in each example's
    `special`.
    """
    special_ids = frozenset(int(i) for i in special_ids)
    win = _windows_by_key(windows)
    stats = samples.stats.to_pydict()
    examples: dict[int, dict[str, list]] = {}
    for f, t, a, role, level in zip(*(shown.column(c).to_pylist()
                                      for c in ("feature", "token_index", "activation", "role", "level"))):
        by_role = examples.setdefault(f, {"top": [], "random": [], "level": []})
        entry = _example((f, t), a, win, strings, special_ids)
        by_role[role].append({**entry, "level": level} if role == "level" else entry)
    top_ids, top_vals, bottom_ids, bottom_vals = logits[:4]
    shares = interval_shares(samples, activation_levels)
    for w, f in enumerate(stats["feature"]):
        count, peak = stats["count"][w], stats["max"][w]
        mine = examples.get(f, {"top": [], "random": [], "level": []})
        levels = [{"level": i, "low": _num(peak * (i - 1) / activation_levels), "high": _num(peak * i / activation_levels),
                   "share": _num(shares.share[w, i - 1]), "exact": bool(shares.exact[w, i - 1]),
                   "examples": [e for e in mine["level"] if e["level"] == i]}
                  for i in range(activation_levels, 0, -1)] if count else []
        yield {
            "feature": int(f), "dictionary": dictionary, "count": int(count),
            "density": _num(count / max(samples.n_tokens, 1)), "max": _num(peak),
            "mean": _num(stats["sum"][w] / count) if count else 0.0,
            "histogram": [int(c) for c in stats["hist"][w]],
            "top": mine["top"], "random": mine["random"], "levels": levels,
            "logits": {"top": [[strings[i], _num(v)] for i, v in zip(top_ids[w], top_vals[w])],
                       "bottom": [[strings[i], _num(v)] for i, v in zip(bottom_ids[w], bottom_vals[w])]},
            "logit_histogram": {"counts": [int(c) for c in logits.hist_counts[w]],
                                "edges": [_num(e) for e in logits.hist_edges[w]]},
            "neighbours": [[int(i), _num(c)] for i, c in zip(*(a[w] for a in neighbours))] if neighbours else [],
            "neuron_alignment": [[int(i), _num(v), _num(s)] for i, v, s in zip(*(a[w] for a in alignment))]
            if alignment else [],
            "cofiring": [[int(i), _num(share, 3)] for i, share in cofiring[w]] if cofiring else [],
        }


def index_row(doc: dict[str, Any], n_tokens: int = 5) -> list:
    """[feature, density, max, top tokens] of a document: what the feature list shows and searches."""
    seen: list[str] = []
    for example in doc["top"]:
        token = example["tokens"][example["center"]]
        if token not in seen:
            seen.append(token)
        if len(seen) == n_tokens:
            break
    return [doc["feature"], doc["density"], doc["max"], seen]
